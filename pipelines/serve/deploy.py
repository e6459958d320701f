"""Deploying the Serve application from its config file (infra/serve.yaml), with the CPUs planned first.

`serve run` / `serve deploy` read the same file; ``deploy`` is what ``python -m jobs.serve``, the demo, the
benchmark and the tests use, so that they all run the configuration users deploy, not a second copy of it.
"""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray import serve

from pipelines.cluster import ResourcePlanError, connect
from pipelines.serve.app import application


def load_serve_config(path: str | Path) -> dict:
    """A Serve config file (ServeDeploySchema's format) with exactly one application, ours."""
    config = yaml.safe_load(Path(path).read_text())
    (app,) = config["applications"]
    if not app["import_path"].endswith("pipelines.serve.app:build"):
        raise ValueError(f"{path}: the application is not pipelines.serve.app:build")
    return config


def deployment_options(config: dict) -> dict:
    """The Classifier deployment's options from the config (everything but its name)."""
    (app,) = config["applications"]
    (options,) = [d for d in app.get("deployments", []) if d["name"] == "Classifier"] or [{"name": "Classifier"}]
    return {k: v for k, v in options.items() if k != "name"}


def plan_serving_resources(options: dict, nodes: list[dict], free: dict) -> None:
    """The replicas Serve starts at once must fit: one replica's CPUs and GPUs on some node, and all of them
    in what the cluster has free. Otherwise Serve waits for resources forever (on a cluster that does not
    grow) and the deployment never becomes healthy, so this is checked before deploying, with the numbers
    and the fixes. ``nodes``: each alive node's total resources; ``free``: the cluster's available ones."""
    actor = options.get("ray_actor_options", {})
    cpus, gpus = float(actor.get("num_cpus", 1)), float(actor.get("num_gpus", 0))
    autoscaling = options.get("autoscaling_config")
    if autoscaling:
        replicas = autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)
    else:
        replicas = options.get("num_replicas", 1)
    what = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise ResourcePlanError(
            f"a replica needs {what} on one node, and no node has that (the largest: {biggest.get('CPU', 0):g} "
            f"CPUs, {biggest.get('GPU', 0):g} GPUs): lower ray_actor_options in the Serve config, use "
            "infra/serve.yaml on CPU-only clusters, or add such a node (--skip-resource-check on a cluster "
            "whose autoscaler adds them)"
        )
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each * replicas > free.get(name, 0.0):
            raise ResourcePlanError(
                f"{replicas} replica(s) x {each:g} {name}s = {each * replicas:g} {name}s, but the cluster has "
                f"{free.get(name, 0.0):g} free: lower ray_actor_options.num_{name.lower()}s or min_replicas in the "
                "Serve config, or add nodes"
            )


def deploy(
    config: dict, settings: dict, *, host: str = "127.0.0.1", port: int = 8000, check_resources: bool = True
) -> str:
    """Deploy the application of ``config`` with ``settings`` (ServeSettings fields over the config's
    args) on the Ray cluster this process belongs to (or a local one); returns its base URL."""
    connect()
    (app,) = config["applications"]
    args = {**(app.get("args") or {}), **{k: v for k, v in settings.items() if v is not None}}  # application() nests
    options = deployment_options(config)
    if check_resources:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        plan_serving_resources(options, nodes, ray.available_resources())
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(args, options), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    return f"http://{host}:{port}{app.get('route_prefix', '/').rstrip('/')}"
