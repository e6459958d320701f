"""Train CrossViT with Ray Train, locally or on a cluster:

    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/sample.yaml --data s3://...
    python -m jobs.train --config jobs/configs/crossvit_small_240.yaml --data s3://bucket/datasets/imagenet \\
        --storage s3://bucket/runs --name small-1 --num-workers 16 --use-gpu batch_size=256 compile=true

Any TrainConfig field can be overridden as KEY=VALUE after the flags (values are read as YAML: 5e-4, true,
[0.5, 1.0]). Starting a run again under the same --name resumes it from its latest checkpoint (a changed
data set, model or recipe is refused unless --allow-config-change); a finished run does nothing.
--num-workers MIN-MAX makes the worker group elastic. With no cluster to join (no `ray start`, RAY_ADDRESS or
`ray job submit`) it starts a local Ray with this machine's CPUs.
"""

from __future__ import annotations

import argparse
import logging

from pipelines.train.config import TrainConfig, parse_overrides
from pipelines.train.launch import fit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML file of TrainConfig fields")
    p.add_argument("--data", help="the prepared data set (URI)")
    p.add_argument("--storage", help="where runs go (URI)")
    p.add_argument("--name", help="the run's name: its folder under --storage")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", help="N, or MIN-MAX for an elastic worker group")
    p.add_argument("--init", help="fine-tune from these weights (safetensors, timm/official .pth, checkpoint folder)")
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run even though its data, model or recipe differ from what it was started with",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any other TrainConfig field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "allow_config_change")}
    try:
        cfg = TrainConfig.from_yaml(args.config, **{**parse_overrides(args.overrides), **flags})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad configuration: {e}") from None
    try:
        result = fit(cfg, allow_changes=args.allow_config_change)
    except (ValueError, OSError) as e:  # before training starts: the plan, paths, storage, resume
        raise SystemExit(f"cannot train: {e}") from None
    if result is not None:
        print(f"final metrics: {result.metrics}\nlatest checkpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()
