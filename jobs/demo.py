"""The whole workflow on one machine, on embedded defaults: ``python -m jobs.demo``.

Starts an S3-compatible endpoint on loopback and a local Ray, generates the built-in sample data set,
writes it as WebDataset shards to the bucket, streams batches through the Ray Data ingest pipeline into a
small CrossViT, trains it with Ray Train (2 DDP workers), promotes the run into the model registry, serves
it with Ray Serve over HTTP, labels the validation split with Ray Data into Parquet, and ends with where
everything is (under --workdir, which outlives the endpoint). ``--ray-address`` and ``--bucket`` point it
at a real cluster and a real bucket instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipelines import demo
from pipelines.data.sample import max_classes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workdir",
        default="crossvit-demo",
        help="where the sample images and, with the loopback "
        "endpoint, a copy of the bucket (shards, run, registry, labels) stay (default: ./crossvit-demo)",
    )
    p.add_argument(
        "--bucket",
        help="an s3:// prefix of a real bucket to use instead of the loopback endpoint "
        "(credentials and endpoint from the usual AWS_* variables)",
    )
    p.add_argument("--ray-address", help="a running Ray cluster (default: RAY_ADDRESS, else a local Ray)")
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
    if args.bucket and not args.bucket.startswith("s3://"):
        p.error(f"--bucket {args.bucket}: an s3:// prefix")
    if args.ray_address and not args.bucket:
        p.error("--ray-address needs --bucket: the cluster's nodes cannot reach this machine's loopback endpoint")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.stdout.reconfigure(line_buffering=True)  # in order with the progress lines (stderr) in one log file
    start = time.monotonic()
    workdir = Path(args.workdir).resolve()
    demo.run(workdir, args.classes, args.train_per_class, args.val_per_class, args.image_size, args.epochs,
             bucket=args.bucket, ray_address=args.ray_address)  # fmt: skip
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; what it made is under {workdir}")


if __name__ == "__main__":
    main()
