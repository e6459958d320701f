"""Label images in bulk with a registered model, into Parquet, with Ray Data:

    python -m jobs.label --input s3://bucket/images/ --output s3://bucket/labels/run1 \\
        --registry s3://bucket/registry --model crossvit-small [--alias production | --version N] \\
        [--split val] [--top-k 5] [--batch-size N] [--replicas 1-4] [--embeddings] [--rows-per-file N] \\
        [--use-gpu [--gpus-per-actor 0.5] [--decode-on-gpu] [--compile]] \\
        [--retry-errors] [--max-error-fraction 0.5]

--input: a prepared data set, a folder/prefix of .tar shards or a brace pattern of them, a folder/prefix of
images, or a .parquet/.csv/.txt list of image URIs. One output row per input image; the same command again
after a crash or Ctrl-C completes what is missing, fetching only that (pipelines/label/job.py); with
--retry-errors it also labels again the inputs that storage failed to deliver.
"""

from __future__ import annotations

import argparse
import logging

from pipelines.cluster import ResourcePlanError
from pipelines.data.bad_samples import BadDataError
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
    p.add_argument("--batch-size", type=int, help="images per model call (default: 256 on a GPU, 64 on CPUs)")
    p.add_argument("--replicas", type=replicas, default=(1, 1), help="the model's actors: N or MIN-MAX")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="a fraction lets actors share a GPU")
    p.add_argument("--decode-on-gpu", action="store_true", help="decode and preprocess JPEGs on the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--embeddings", action="store_true", help="add the pooled features (float16)")
    p.add_argument("--rows-per-file", type=int, help="rows per output file (default: about 128 MB of them)")
    p.add_argument("--retry-errors", action="store_true", help="label again the rows storage failed to deliver")
    p.add_argument("--max-error-fraction", type=float, default=0.5, help="more failing inputs stop the job")
    args = p.parse_args(argv)
    if args.top_k < 1 or (args.batch_size or 1) < 1 or (args.rows_per_file or 1) < 1:
        p.error("--top-k, --batch-size and --rows-per-file must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = LabelConfig(
            input=args.input, output=args.output, registry=args.registry, model=args.model, alias=args.alias,
            version=args.version, split=args.split, top_k=args.top_k, batch_size=args.batch_size,
            replicas=args.replicas, use_gpu=args.use_gpu, gpus_per_actor=args.gpus_per_actor,
            decode_on_gpu=args.decode_on_gpu, compile=args.compile, embeddings=args.embeddings,
            rows_per_file=args.rows_per_file, retry_errors=args.retry_errors,
            max_error_fraction=args.max_error_fraction,
        )  # fmt: skip
        result = label(cfg)
    except (InputError, LabelConfigError, RegistryError, ResourcePlanError, BadDataError) as e:
        raise SystemExit(f"cannot label: {e}") from None
    except (StorageError, OSError) as e:  # storage failed mid-run: what was committed stays
        raise SystemExit(f"cannot label: {e}\nthe same command again labels what is missing") from None
    print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
