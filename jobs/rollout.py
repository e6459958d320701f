"""Judge the canary of a running Serve application on its live evidence: promote it or roll it back.

    python -m jobs.rollout --url http://serve:8000 --registry s3://bucket/registry --model crossvit-small \\
        [--canary candidate] [--production production] [--window 10m] [--min-requests 200] \\
        [--max-error-rate 0.01] [--max-latency-ratio 1.5] [--min-agreement 0.9] [--dry-run]

Reads the evidence from the application's admin status (the admin token from $CROSSVIT_SERVE_ADMIN_TOKEN or
--admin-token-file) and the aliases from the registry, decides (pipelines/serve/rollout.py) and, unless
--dry-run, acts by compare-and-swap, writing the decision and its evidence into the aliases' history. Prints
the decision, its reasons and the evidence (JSON). Exit codes, for a scheduler that calls it again:
0 promoted, 3 rolled back, 4 nothing to judge (the canary alias names no version), 5 conflict (another judge or
promotion moved an alias first; nothing of this decision was done, or only the canary's clearing, as printed),
75 too little evidence yet (call again later), 1 an error (the application or the registry cannot be read).
With --dry-run the codes say what it would have done (0: would promote, 3: would roll back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict

import requests

from pipelines.registry.store import Registry, RegistryError
from pipelines.serve import rollout
from pipelines.serve.auth import Token, TokenError

UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h`` -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 10m or 1h")
    return float(match[1]) * UNITS[match[2] or "s"]


def read_evidence(url: str, token: str, window_s: float) -> dict:
    """The application's live evidence over ``window_s`` (its admin status route)."""
    response = requests.get(f"{url.rstrip('/')}/v1/admin/status", params={"window": window_s},
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
    if response.status_code != 200:
        raise RuntimeError(f"{url}/v1/admin/status answered {response.status_code}: {response.text[:300]}")
    evidence = response.json().get("rollout")
    if not evidence or "error" in evidence:
        raise RuntimeError(f"{url} has no evidence to give: {evidence and evidence['error']}")
    if not evidence["canary"]["alias"]:
        raise RuntimeError(f"{url} serves no canary (its canary.alias is empty)")
    return evidence


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = rollout.Criteria()
    p.add_argument("--url", required=True, help="the Serve application's base URL")
    p.add_argument("--registry", required=True, help="the registry's root (URI)")
    p.add_argument("--model", required=True, help="the registered model's name")
    p.add_argument("--canary", default="candidate", help="the canary's alias (the application's canary.alias)")
    p.add_argument("--production", default="production", help="the production alias")
    p.add_argument("--window", type=duration, default=defaults.window_s, help="the evidence's window (10m)")
    p.add_argument("--min-requests", type=int, default=defaults.min_requests,
                   help="fewer canary requests (shadow: compared answers) in the window: wait")  # fmt: skip
    p.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate, help="the canary's, 0-1")
    p.add_argument("--max-latency-ratio", type=float, default=defaults.max_latency_ratio,
                   help="the canary's p95 latency over production's")  # fmt: skip
    p.add_argument("--min-agreement", type=float, default=defaults.min_agreement,
                   help="shadow mode: the share of top-1 answers equal to production's, 0-1")  # fmt: skip
    p.add_argument("--admin-token-env", default="CROSSVIT_SERVE_ADMIN_TOKEN", help="the admin token's variable")
    p.add_argument("--admin-token-file", default=os.environ.get("CROSSVIT_SERVE_ADMIN_TOKEN_FILE", ""),
                   help="the admin token's file (instead of the variable)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    args = p.parse_args(argv)
    try:
        criteria = rollout.Criteria(args.window, args.min_requests, args.max_error_rate, args.max_latency_ratio,
                                    args.min_agreement)  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    try:
        token = Token("admin", args.admin_token_env, args.admin_token_file)
        if not token.configured:
            raise TokenError(f"no admin token: set {args.admin_token_env} or --admin-token-file")
        evidence = read_evidence(args.url, token.value(), criteria.window_s)
        decision = rollout.judge(Registry(args.registry), args.model, args.production, args.canary, evidence,
                                 criteria, dry_run=args.dry_run)  # fmt: skip
    except (TokenError, RegistryError, ValueError, RuntimeError, OSError, requests.RequestException) as e:
        print(f"rollout: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    done = decision.action in (rollout.PROMOTED, rollout.ROLLED_BACK)
    said = f"would be {decision.action} (dry run)" if args.dry_run and done else decision.action
    print(f"{args.model}:{args.canary} (version {decision.canary}) against {args.production} (version "
          f"{decision.production}): {said}")  # fmt: skip
    for reason in decision.reasons:
        print(f"  - {reason}")
    print(json.dumps({"decision": asdict(decision)}, indent=1))
    raise SystemExit(decision.exit_code)


if __name__ == "__main__":
    main()
