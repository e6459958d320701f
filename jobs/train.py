"""Train CrossViT with Ray Train, locally or on a cluster:

    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/sample.yaml --data s3://...
    python -m jobs.train --config jobs/configs/crossvit_small_240.yaml --data s3://bucket/datasets/imagenet \\
        --storage s3://bucket/runs --num-workers 16 --use-gpu

Work in progress (issue 4): see pipelines/train.py for what is done.
"""

from __future__ import annotations

import argparse
import logging

from pipelines.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML file of TrainConfig fields")
    p.add_argument("--data", help="the prepared data set (URI)")
    p.add_argument("--storage", help="where runs go (URI)")
    p.add_argument("--name")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", help="N, or MIN-MAX for an elastic worker group")
    p.add_argument("--init", help="fine-tune from these weights (safetensors or a timm/official .pth), any URI")
    p.add_argument("--use-gpu", action="store_true", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    result = fit(TrainConfig.from_yaml(args.config, **overrides))
    if result is not None:
        print(f"final metrics: {result.metrics}\nlatest checkpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()
