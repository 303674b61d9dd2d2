"""Build the embedded MNIST sample ``src/coreunits/_assets/mnist_sample.npz``.

The sample is the first 2000 digits of the MNIST *test* set (uint8 images and
labels). It lets demos and tests run without downloading anything. The sha256 of
the source test files is stored next to the arrays so the asset's provenance can be
checked against a local MNIST copy.

Usage:
    python scripts/make_mnist_sample.py --data-root /path/to/data [--count 2000]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from coreunits.data import open_mnist

_MAX_BYTES = 1_000_000
_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_OUT = _REPO / "src" / "coreunits" / "_assets" / "mnist_sample.npz"


def main(argv: list[str] | None = None) -> None:
    """Write the sample asset.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", type=Path, required=True, help="folder containing MNIST/raw/"
    )
    parser.add_argument("--count", type=int, default=2000, help="number of test digits to keep")
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args(argv)

    test = open_mnist(args.data_root, train=False)  # torchvision reads the IDX files
    images = test.data[: args.count].numpy().copy()
    labels = test.targets[: args.count].numpy().astype(np.uint8)

    # Hash the source files (images then labels), as mnist_checksum does, but keep the
    # full digest since this is a provenance record.
    h = hashlib.sha256()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        h.update((Path(test.raw_folder) / name).read_bytes())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        images=images,
        labels=labels,
        source_sha256=np.array(h.hexdigest()),
        source=np.array(f"first {args.count} digits of the MNIST test set (t10k-*-ubyte)"),
    )
    size = args.out.stat().st_size
    if size >= _MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes; it must stay under {_MAX_BYTES}")
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {args.out} ({size} bytes, {len(labels)} digits, class counts {counts})")


if __name__ == "__main__":
    main()
