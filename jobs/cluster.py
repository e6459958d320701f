"""Tell a Ray cluster what it can become, so that jobs plan for the nodes its autoscaler may add:

    python -m jobs.cluster report-node-types ~/ray_bootstrap_config.yaml [--address HOST:PORT]

Run on the head after `ray start --head --autoscaling-config=...` (infra/aws/cluster.yaml does). It publishes
the config's worker node types in the GCS, where Ray Train, Ray Data's autoscaler and our planners read them
(pipelines/cluster.py: Capacity). KubeRay's autoscaler publishes them itself; Ray 2.60's `ray up` does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pipelines.cluster import report_node_types


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report-node-types", help="publish an autoscaling config's worker node types")
    report.add_argument("config", help="the autoscaling config (YAML or JSON), as ray up leaves it on the head")
    report.add_argument("--address", help="the GCS (default: the Ray started on this machine)")
    args = p.parse_args(argv)
    text = Path(args.config).expanduser().read_text()
    config = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    if args.address is None:  # the Ray started on this machine, as a driver finds it
        import ray

        ray.init(address="auto", log_to_driver=False)
        args.address = ray.get_runtime_context().gcs_address
        ray.shutdown()
    types = report_node_types(config, args.address)
    print(f"published {len(types)} worker node type(s) to {args.address}: {', '.join(types) or 'none'}")


if __name__ == "__main__":
    main()
