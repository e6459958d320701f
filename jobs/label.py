"""Label images in bulk with a registered model, into Parquet, with Ray Data:

    python -m jobs.label --input s3://bucket/images/ --output s3://bucket/labels/run1 \\
        --registry s3://bucket/registry --model crossvit-small [--alias production | --version N] \\
        [--split val] [--top-k 5] [--batch-size 64] [--replicas 1-4] [--use-gpu] [--embeddings]

--input: a prepared data set, a folder/prefix of .tar shards or a brace pattern of them, a folder/prefix of
images, or a .parquet/.csv/.txt list of image URIs. One output row per input image; the same command again
after a crash or Ctrl-C completes what is missing (pipelines/label/job.py).
"""

from __future__ import annotations

import argparse
import logging

from pipelines.cluster import ResourcePlanError
from pipelines.label.inputs import InputError
from pipelines.label.job import LabelConfig, LabelConfigError, label
from pipelines.registry.store import RegistryError
from pipelines.storage import StorageError


def replicas(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a count or MIN-MAX, e.g. 2 or 1-4") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return pair


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="a folder or prefix for the Parquet files")
    p.add_argument("--registry", required=True)
    p.add_argument("--model", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default="production")
    which.add_argument("--version", type=int)
    p.add_argument("--split", help="of a prepared data set (default: all)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--replicas", type=replicas, default=(1, 1), help="the model's actors: N or MIN-MAX")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--embeddings", action="store_true", help="add the pooled features (float16)")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = LabelConfig(
        input=args.input, output=args.output, registry=args.registry, model=args.model, alias=args.alias,
        version=args.version, split=args.split, top_k=args.top_k, batch_size=args.batch_size,
        replicas=args.replicas, use_gpu=args.use_gpu, embeddings=args.embeddings,
    )  # fmt: skip
    try:
        result = label(cfg)
    except (InputError, LabelConfigError, RegistryError, ResourcePlanError) as e:
        raise SystemExit(f"cannot label: {e}") from None
    except (StorageError, OSError) as e:  # storage failed mid-run: what was committed stays
        raise SystemExit(f"cannot label: {e}\nthe same command again labels what is missing") from None
    print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
