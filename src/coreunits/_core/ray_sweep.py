"""A sweep's tasks on Ray: a local Ray with N workers, or a cluster.

The layer's :class:`~coreunits._core.cache.ActivationCache` is put into Ray's object store once; each worker
process reads it from there once and keeps it for every task of that layer it runs (the reference travels
inside a list, so Ray does not resolve it per task). Records come back to the driver, which writes each as it
arrives, so a sweep interrupted at any point keeps what finished and a rerun resumes. A task whose worker
dies is run again by Ray (``max_retries``); nothing else is lost. Ray is an optional dependency, imported here
only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from coreunits._core.cache import ActivationCache
from coreunits._core.errors import OptionError

__all__ = ["run_on_ray"]

logger = logging.getLogger(__name__)

#: Times Ray runs a task again after its worker died (killed, out of memory, a lost node).
MAX_RETRIES = 3

# Per worker process: the cache of the layer it is working on, by object-store id.
_WORKER_CACHE: dict[str, ActivationCache] = {}

Item = tuple[Any, str, "str | None"]  # (task, fingerprint, class name)
SelectBatch = Callable[[ActivationCache, Sequence[Item], dict[str, Any]], list[dict[str, Any]]]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise OptionError("--workers/--ray need Ray, which is not installed: pip install 'coreunits[ray]'") from err
    return ray


def _select_on_worker(box: list[Any], select: SelectBatch, items: Sequence[Item],
                      options: dict[str, Any]) -> list[dict[str, Any]]:
    import ray

    ref = box[0]
    key = ref.hex()
    cache = _WORKER_CACHE.get(key)
    if cache is None:
        _WORKER_CACHE.clear()  # the previous layer's activations
        cache = _WORKER_CACHE[key] = ray.get(ref)
    return select(cache, items, options)


def run_on_ray(cache: ActivationCache, batches: Sequence[Sequence[Item]], select: SelectBatch,
               options: dict[str, Any], save: Callable[[Any, dict[str, Any]], None], *, workers: int,
               address: str | None) -> None:
    """Run ``select(cache, batch, options)`` for each batch of ``(task, fingerprint, class name)`` on Ray.

    A batch is what the sequential sweep optimises together, so each record is the one it would write.
    ``save(task, record)`` is called in the driver for each task of a batch as the batch finishes. A Ray
    already initialised by the caller is used as it is; otherwise one is started (``address``: a cluster to
    join) and shut down after.
    """
    ray = _import_ray()
    if workers < 1:
        raise OptionError(f"--workers must be >= 1, got {workers}")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_select_on_worker)
        ref = ray.put(cache)
        pending = {remote.remote([ref], select, list(batch), options): batch for batch in batches}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            batch = pending.pop(done[0])
            for (task, _, _), record in zip(batch, ray.get(done[0])):
                save(task, record)
        del ref
    finally:
        if started:
            ray.shutdown()
