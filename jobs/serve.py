"""Serve a registered model over HTTP with Ray Serve, on this machine or the cluster it belongs to:

    python -m jobs.serve --registry s3://bucket/registry --model crossvit-small [--alias production] [--port 8000] \
        [--canary-alias candidate [--canary-percent 10] [--canary-mode split|shadow] [--[no-]canary-auto]]

The same application and settings as `serve run infra/serve.yaml` / `serve deploy infra/serve.yaml`
(--config names another profile, e.g. infra/serve-gpu.yaml): this reads that file and deploys it with the
registry, model and alias given here. Starts its own Ray if none is running; serves until Ctrl-C (or SIGTERM:
`ray job stop`), then deletes the application.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

from ray import serve

from pipelines.cluster import ResourcePlanError
from pipelines.serve.deploy import deploy, load_serve_config

SERVE_CONFIG = Path(__file__).resolve().parent.parent / "infra" / "serve.yaml"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, help="the registry's root (URI)")
    p.add_argument("--model", required=True, help="the registered model's name")
    p.add_argument("--alias", default="production", help="the alias to serve and follow")
    p.add_argument("--version", type=int, help="serve this version instead, and follow no alias")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept requests from other machines")
    p.add_argument("--config", default=str(SERVE_CONFIG), help="the Serve config whose settings to use")
    p.add_argument("--canary-alias", help="serve the version this alias names beside production (canary.alias)")
    p.add_argument("--canary-percent", type=float, help="the canary's share of requests, 0-100 (canary.percent)")
    p.add_argument("--canary-mode", choices=["split", "shadow"], help="answer the share, or shadow it (canary.mode)")
    p.add_argument(
        "--canary-auto",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the application judges the canary itself on a timer (canary.auto; criteria in --config)",
    )
    p.add_argument(
        "--skip-resource-check",
        action="store_true",
        help="deploy without checking that the replicas fit the cluster (the check counts the node types an "
        "autoscaler may add where the cluster publishes them: KubeRay, python -m jobs.cluster report-node-types)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_serve_config(args.config)
    settings = {"registry": args.registry, "model": args.model, "alias": args.alias, "version": args.version,
                "canary.alias": args.canary_alias, "canary.percent": args.canary_percent,
                "canary.mode": args.canary_mode, "canary.auto": args.canary_auto}  # fmt: skip
    try:
        url = deploy(config, settings, host=args.host, port=args.port, check_resources=not args.skip_resource_check)
    except (ResourcePlanError, ValueError) as e:  # ValueError: settings that do not hold together
        raise SystemExit(f"cannot serve: {e}") from None
    canary = f", canary {args.canary_alias} ({args.canary_mode or 'settings of --config'})" if args.canary_alias else ""
    print(f"serving {args.model}:{args.alias if args.version is None else args.version}{canary} at {url}/v1/classify "
          "(Ctrl-C to stop)", flush=True)  # fmt: skip
    # `ray job stop` sends SIGTERM: stop as on Ctrl-C. Serve keeps an application after the process that deployed
    # it exits, so without this the job ended and the application (its replicas, the nodes they hold) stayed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # This application only (others on a shared cluster stay), bounded: a stop must not hang on a busy
        # cluster. A local Ray this process started goes down with it (ray.shutdown at exit). Under `ray job
        # stop`, Ray's job supervisor kills this process RAY_JOB_STOP_WAIT_TIME_S (3 s by default) after its
        # SIGTERM: the delete request has reached Serve's controller by then (tests/test_autoscaling.py), but
        # "stopped" may not be printed; set that variable where the cluster starts to wait for it.
        stopping = threading.Thread(target=serve.delete, args=(config["applications"][0]["name"],), daemon=True)
        stopping.start()
        stopping.join(timeout=30)
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
