"""Does the decode-once cache of the CIFAR-10 JPEG tree pay? Decoding through ImageFolder vs loading the cache.

    python benchmarks/decode_cache.py --data-root ../shared/data [--out benchmarks/RESULTS.md]

``coreunits.data.load_cifar10`` reads a JPEG tree through torchvision's
ImageFolder and keeps the decoded uint8 arrays as one ``.npz`` in the cache
folder. Per split this times, in one process, what a load costs without the
cache (list the tree with ImageFolder, decode every image with Pillow through
it) against a load that finds the cache (list the tree, key it by file names and
sizes, read the ``.npz``), checks that both give the same arrays, and prints a
markdown table; ``--out`` also puts it in RESULTS.md under its own heading
(a rerun replaces that section only).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from coreunits._core.io import atomic_write_text
from coreunits.data import _balanced, _decode, _image_folder, load_cifar10

_HEADING = "CIFAR-10 JPEG tree: decode through ImageFolder vs the decode-once cache"


def _time_split(root: Path, split: str, cache: Path) -> dict[str, float]:
    folder = root / "cifar10-jpeg" / split
    _image_folder(folder)  # list once first: both sides then find the listing in the OS file cache
    t0 = time.perf_counter()
    ds = _image_folder(folder)
    scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = _decode(ds, _balanced(ds.targets, None), progress=False, desc="")
    decode = time.perf_counter() - t0
    load_cifar10(root, train=split == "train", cache=cache, progress=False)  # writes the cache
    t0 = time.perf_counter()
    cached = load_cifar10(root, train=split == "train", cache=cache, progress=False)
    warm = time.perf_counter() - t0
    if not torch.equal(cached.tensors[0], images):
        raise SystemExit(f"{split}: the cached arrays differ from a fresh decode")
    size = sum(p.stat().st_size for p in cache.glob(f"cifar10-{split}-*.npz"))
    return {"images": len(images), "scan": scan, "decode": decode, "warm": warm, "mb": size / 1e6}


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| split | images | ImageFolder scan s | decode s | no cache: scan + decode s | cached load s | speedup | cache MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, r in rows.items():
        cold = r["scan"] + r["decode"]
        lines.append(f"| {split} | {int(r['images'])} | {r['scan']:.2f} | {r['decode']:.2f} | {cold:.2f} | "
                     f"{r['warm']:.2f} | {cold / r['warm']:.1f} | {r['mb']:.0f} |")
    return "\n".join(lines)


def _write_section(out: Path, body: str) -> None:
    text = out.read_text() if out.is_file() else "# Benchmark results\n"
    section = f"<!-- benchmark: decode cache -->\n## {_HEADING}\n\n{body}\n<!-- end benchmark: decode cache -->\n"
    pattern = re.compile(r"<!-- benchmark: decode cache -->.*?<!-- end benchmark: decode cache -->\n", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    atomic_write_text(out, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True, help="folder holding cifar10-jpeg/{train,test}/")
    p.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"])
    p.add_argument("--out", type=Path, default=None, help="RESULTS.md to put the table in")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {split: _time_split(args.data_root, split, Path(tmp)) for split in args.splits}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = (f"`python benchmarks/decode_cache.py --data-root ../shared/data --out benchmarks/RESULTS.md` "
            f"(cache in a fresh temp folder, the tree listed once before timing; {os.cpu_count()} CPUs, load average {load} at the end; "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}).\n\n"
            f"{_table(rows)}\n")
    print(body)
    if args.out is not None:
        _write_section(args.out, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
