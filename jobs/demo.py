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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the sample images go (default: a temporary folder)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--image-size", type=int, default=48, help="model input size (the demo model is tiny)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs of the sample config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crossvit-demo-") as tmp:
        workdir = Path(args.workdir or tmp)
        demo.run(workdir, args.classes, args.train_per_class, args.val_per_class, args.image_size, args.epochs)
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
