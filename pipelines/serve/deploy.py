"""Deploying the Serve application from its config file (infra/serve.yaml), its replicas planned for the cluster first.

`serve run` / `serve deploy` read the same file; ``deploy`` is what ``python -m jobs.serve``, the demo, the
benchmark and the tests use, so that they all run the configuration users deploy, not a second copy of it.
"""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray import serve

from pipelines.cluster import Capacity, ResourcePlanError, cluster_capacity, connect
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


def plan_serving_resources(options: dict, capacity: Capacity, free: dict) -> None:
    """The replicas Serve starts at once must fit, or Serve waits for resources forever and the deployment never
    becomes healthy; so this is checked before deploying, with the numbers and the fixes. One replica's resources
    (``ray_actor_options``: CPUs, GPUs, custom resources) must fit one node, live or of a type the autoscaler may
    add. All of them at once: on a cluster that autoscales, in what it can become (``capacity``: its node types,
    the autoscaler adds the nodes); on a fixed one, in what it has ``free`` now (another application or job keeps
    what it holds)."""
    actor = options.get("ray_actor_options", {})
    shape = {"CPU": float(actor.get("num_cpus", 1)), "GPU": float(actor.get("num_gpus", 0))}
    shape.update({k: float(v) for k, v in (actor.get("resources") or {}).items()})
    shape = {k: v for k, v in shape.items() if v}
    autoscaling = options.get("autoscaling_config")
    if autoscaling:
        replicas = autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)
    else:
        replicas = options.get("num_replicas", 1)
    what = " and ".join(f"{v:g} {k}" for k, v in shape.items())
    publish = (
        ""
        if capacity.autoscaling
        else " (on a cluster whose autoscaler adds nodes, publish its node types first: python -m jobs.cluster "
        "report-node-types; or deploy with --skip-resource-check)"
    )
    if not capacity.fits(shape):
        largest = max(capacity.shapes(), key=lambda n: tuple(n.get(k, 0) for k in ("GPU", *shape)), default={})
        has = ", ".join(f"{largest.get(k, 0):g} {k}" for k in shape)
        raise ResourcePlanError(
            f"a replica needs {what} on one node, and no node has that, nor any node type the autoscaler may add "
            f"(the largest: {has}). Fix: lower ray_actor_options in the Serve config (infra/serve.yaml on CPU-only "
            f"clusters), or add such a node or node type{publish}"
        )
    if capacity.autoscaling:
        most = capacity.holds(shape)
        if replicas > most:
            raise ResourcePlanError(
                f"{replicas} replica(s) of {what} each start at once, and the cluster can hold {most} at most, with "
                "every node its autoscaler may add. Fix: lower min_replicas (or initial_replicas) or "
                "ray_actor_options in the Serve config, or raise max_workers of a node type that holds a replica"
            )
        return
    for name, each in shape.items():
        if each * replicas > free.get(name, 0.0):
            raise ResourcePlanError(
                f"{replicas} replica(s) x {each:g} {name} = {each * replicas:g} {name}, but the cluster has "
                f"{free.get(name, 0.0):g} free. Fix: lower min_replicas or ray_actor_options in the Serve config, "
                f"or add nodes{publish}"
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
        plan_serving_resources(options, cluster_capacity(), ray.available_resources())
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(args, options), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    return f"http://{host}:{port}{app.get('route_prefix', '/').rstrip('/')}"
