"""The whole workflow on one machine, on embedded defaults: ``python -m jobs.demo``.

Starts an S3-compatible endpoint on loopback and a local Ray, generates the built-in sample data set,
writes it as WebDataset shards to the bucket, streams batches through the Ray Data ingest pipeline into a
small CrossViT, trains it with Ray Train (2 DDP workers), and prints what it did. Each stage of the
product adds its step here.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from pipelines import demo
from pipelines.data.sample import max_classes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the sample images go (default: a temporary folder)")
    p.add_argument("--classes", type=int, default=10, help=f"1 to {max_classes()} classes of the sample data set")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--image-size", type=int, default=48, help="model input size, a multiple of 48 (patches 12, 16)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs of the sample config")
    args = p.parse_args(argv)
    if not 1 <= args.classes <= max_classes():
        p.error(f"--classes must be between 1 and {max_classes()}, not {args.classes}")
    if min(args.train_per_class, args.val_per_class, args.epochs) < 1:
        p.error("--train-per-class, --val-per-class and --epochs must be positive")
    try:
        demo.sample_config(args.image_size)
    except ValueError as e:
        p.error(f"--image-size {args.image_size}: {e}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crossvit-demo-") as tmp:
        workdir = Path(args.workdir or tmp)
        demo.run(workdir, args.classes, args.train_per_class, args.val_per_class, args.image_size, args.epochs)
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
