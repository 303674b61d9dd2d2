"""Where a stacked step's time goes: one selection's step against 30 stacked, then cProfile of one batch of 30.

    python benchmarks/stacked_profile.py --data-root ../shared/data [--device cuda] [--layer max2]

The paper's MNIST classifier, the Table 1 coefficients, classes 0-9 x seeds 0-2. Prints the time per step of
one selection and of 30 stacked (``find_core_units_batched``), then cProfile's top functions by own time for
one batch of 30, and, with ``--torch-profile``, torch.profiler's top operations. A benchmark measures; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from coreunits import ActivationCache, find_core_units_batched
from coreunits.data import get_mnist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layer", default="max2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    coef = coefficients("mnist", [args.layer])
    cache = ActivationCache(model, args.layer, data, batch_size=1000, progress=False, device=args.device)
    jobs = [(c, r) for c in range(10) for r in range(3)]
    find_core_units_batched(model, args.layer, jobs[:2], cache, progress=False, **coef)  # warm-up
    for size in (1, len(jobs)):
        _sync(args.device)
        t0 = time.perf_counter()
        found = find_core_units_batched(model, args.layer, jobs[:size], cache, progress=False, **coef)
        _sync(args.device)
        seconds = time.perf_counter() - t0
        steps = max(int(r.settings["steps_run"]) for r in found)
        print(f"batch {size}: {seconds:.2f} s, {steps} steps, {1000 * seconds / steps:.2f} ms a step", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    find_core_units_batched(model, args.layer, jobs, cache, progress=False, **coef)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as tp:
            find_core_units_batched(model, args.layer, jobs, cache, progress=False, **coef)
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
