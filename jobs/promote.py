"""Promote a training run into the model registry, roll an alias back, or list what is registered:

    python -m jobs.promote --run s3://bucket/runs/small-1 --registry s3://bucket/registry --model crossvit-small \\
        [--alias production] [--min-top1 75] [--force] [--eval-data s3://bucket/datasets/imagenet]
    python -m jobs.promote --registry s3://bucket/registry --model crossvit-small --rollback [--alias production]
    python -m jobs.promote --registry s3://bucket/registry --model crossvit-small --list

A promotion registers the run's checkpoint with the best validation top-1 as a new version and moves the
alias to it, if it passes the gate: at least --min-top1, and not below the version the alias names now
(unless --force). --eval-data evaluates both on the same split first and gates on those numbers. A refusal,
or an alias moved by another promotion meanwhile, exits non-zero with the reason on one line.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.registry.store import Registry, RegistryError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, help="the registry's root (URI)")
    p.add_argument("--model", required=True, help="the registered model's name")
    p.add_argument("--alias", default="production")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="the training run to promote (its folder's URI)")
    what.add_argument("--rollback", action="store_true", help="point the alias back at its previous version")
    what.add_argument("--list", action="store_true", help="versions, aliases and metrics, as a table")
    p.add_argument("--min-top1", type=float, help="refuse a candidate below this validation top-1 (percent)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    p.add_argument("--eval-data", help="evaluate candidate and current version on this prepared data set")
    p.add_argument("--eval-split", default="val")
    p.add_argument("--why", default="", help="recorded in the alias's history")
    args = p.parse_args(argv)
    try:
        if args.list:
            print(Registry(args.registry).table(args.model))
        elif args.rollback:
            record = Registry(args.registry).rollback(args.model, args.alias, why=args.why or "rollback")
            print(f"{args.model}:{args.alias} -> version {record['version']} (was {record['history'][-1]['previous']})")
        else:
            from pipelines.registry.promote import promote  # torch and Ray Data: only a promotion needs them

            version, record = promote(
                args.run, args.registry, args.model, alias=args.alias, min_top1=args.min_top1, force=args.force,
                eval_data=args.eval_data, eval_split=args.eval_split, why=args.why,
            )  # fmt: skip
            source = version.meta["source"]["checkpoint"]
            print(f"registered {args.model} version {version.number} (top-1 {version.top1:.2f}) from {source}")
            print(f"{args.model}:{args.alias} -> version {record['version']} (was {record['previous']})")
    except (RegistryError, ValueError, OSError) as e:  # ValueError: WeightsMismatchError; OSError: StorageError, 403s
        print(f"promote: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
