"""Sweeps on Ray: a 2-worker local Ray gives the records a sequential sweep gives, also when a worker is killed
in the middle of a task (Ray runs the task again; every record is written)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from coreunits._core.cache import ActivationCache
from coreunits.sweep import plan, run_sweep

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'coreunits[ray]')")
psutil = pytest.importorskip("psutil")

# Random models predict some classes for few inputs: D'_c is then unbalanced (said by a warning).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:only .* inputs are predicted:UserWarning")]

# Enough steps that one selection takes a few seconds: long enough for the kill test to catch a task running.
OPTIONS: dict[str, Any] = {"alpha": 0.002, "min_steps": 600, "batch_size": 64}
# 12 tasks: batches of 10 and 2 (batch_selections on a CPU), so both workers get one
TASKS = plan(["1"], [0, 1, 2], runs=4)


def _model_and_data() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 3)).eval()
    return model, torch.randn(600, 20)


def _sweep(out: Path, **kw: Any) -> list[dict[str, Any]]:
    model, data = _model_and_data()
    return run_sweep(model, data, TASKS, out, identity={"test": 1}, options=OPTIONS, progress=False, **kw)


def _essence(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["fingerprint"], r["layer"], r["target_class"], r["seed"], r["units"], r["holding_rate_strict"])
            for r in records]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    # One thread, as each Ray worker has: the same arithmetic, hence the same units.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _essence(_sweep(tmp_path_factory.mktemp("seq")))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_cache_survives_pickling() -> None:
    import pickle

    model, data = _model_and_data()
    cache = ActivationCache(model, "1", data)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.gated.engine == cache.gated.engine == "fx" and copy.cached
    assert torch.equal(copy.predictions, cache.predictions)
    copy.check_model(copy.user_model)  # its own fingerprint, not the driver's version counters


def test_two_workers_give_the_sequential_records(local_ray: Any, sequential: list[tuple[Any, ...]],
                                                  tmp_path: Path) -> None:
    records = _sweep(tmp_path, workers=2)
    assert _essence(records) == sequential
    files = sorted((tmp_path / "runs").rglob("*.json"))
    assert len(files) == len(TASKS)
    assert all(json.loads(f.read_text())["holding_rate"] is not None for f in files)


def test_a_killed_worker_loses_nothing(local_ray: Any, sequential: list[tuple[Any, ...]], tmp_path: Path) -> None:
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_running_task() -> None:
        while not stop.is_set() and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if any("_select_on_worker" in part for part in (proc.info["cmdline"] or [])):
                    time.sleep(0.5)  # well inside the task
                    proc.kill()
                    killed.append(proc.info["pid"])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_running_task, daemon=True)
    watcher.start()
    try:
        records = _sweep(tmp_path, workers=2)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed, "no running task was caught to kill: the test proved nothing"
    assert _essence(records) == sequential
    assert len(list((tmp_path / "runs").rglob("*.json"))) == len(TASKS)
