"""Make a data set: image folders become WebDataset shards plus a manifest at a URI, or WebDataset shards made
elsewhere get a manifest that names them where they are.

    python -m jobs.prepare_data --source ~/imagenet --dest s3://bucket/datasets/imagenet --workers 16
    python -m jobs.prepare_data --adopt --dest s3://bucket/datasets/imagenet1k \\
        --train 's3://corpora/imagenet1k-train-{0000..1023}.tar' \\
        --val 's3://corpora/imagenet1k-validation-{00..63}.tar' [--classes classes.txt]

The S3 endpoint and credentials come from the standard AWS configuration (AWS_ENDPOINT_URL, ...).
Rerunning finishes an interrupted run and skips shards already in place with the right checksum; adopting
again does nothing while every shard keeps the size it had.
"""

from __future__ import annotations

import argparse
import logging
import os

from pipelines.cluster import connect
from pipelines.data.adopt import adopt
from pipelines.data.prepare import prepare


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", required=True, help="s3://bucket/prefix or a local folder: where the manifest goes")
    p.add_argument("--source", help="image folder: ImageNet layout or one folder per class")
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle before sharding")
    p.add_argument("--adopt", action="store_true", help="write a manifest for shards made elsewhere, copying nothing")
    p.add_argument("--train", help="with --adopt: the training shards (a brace pattern, a folder or a prefix)")
    p.add_argument("--val", help="with --adopt: the validation shards")
    p.add_argument("--classes", help="with --adopt: a file naming the classes, one a line (wnids or names)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.adopt:
        splits = {k: v for k, v in (("train", args.train), ("val", args.val)) if v}
        if not splits or args.source:
            p.error("--adopt takes --train and/or --val shard patterns, not --source")
        connect(logging_level="WARNING")  # a Ray task per shard counts and hashes it
        manifest = adopt(splits, args.dest, args.classes)
    else:
        if not args.source:
            p.error("--source is required (or --adopt with --train/--val)")
        manifest = prepare(args.source, args.dest, args.shard_size_mb, args.workers, args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} images in {len(info['shards'])} shards")
    print(
        f"{len(manifest['classes'])} classes, {len(manifest['skipped'])} files or shards reported; manifest at "
        f"{args.dest.rstrip('/')}/manifest.json"
    )


if __name__ == "__main__":
    main()
