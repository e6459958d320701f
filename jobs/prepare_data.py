"""Turn an image folder into WebDataset shards plus a manifest at a URI.

    python -m jobs.prepare_data --source ~/imagenet --dest s3://bucket/datasets/imagenet --workers 16

The S3 endpoint and credentials come from the standard AWS configuration (AWS_ENDPOINT_URL, ...).
Rerunning finishes an interrupted run and skips shards already in place with the right checksum.
"""

from __future__ import annotations

import argparse
import logging
import os

from pipelines.shards import prepare


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="image folder: ImageNet layout or one folder per class")
    p.add_argument("--dest", required=True, help="s3://bucket/prefix or a local folder")
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle before sharding")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = prepare(args.source, args.dest, args.shard_size_mb, args.workers, args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} images in {len(info['shards'])} shards")
    print(
        f"{len(manifest['classes'])} classes, {len(manifest['skipped'])} files skipped; manifest at "
        f"{args.dest.rstrip('/')}/manifest.json"
    )


if __name__ == "__main__":
    main()
