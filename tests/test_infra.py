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
import importlib
import re
import shlex
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from botocore.session import get_session
from botocore.validate import ParamValidator
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
SERVE_LINE = " ".join(f"{k}={v}" for k, v in SERVE_ENV.items())  # as README and infra/serve.yaml write it

# --------------------------------------------------------------------------------------------------------
# What KubeRay v1.5.1 requires. Source: github.com/ray-project/kuberay at tag v1.5.1, the CRDs
# ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml (required fields, the fields each
# level knows, enums) and the operator's ray-operator/controllers/ray/utils/validation.go (the checks noted below).
# v1.5.1 is our minimum: it is the first with authOptions (token authentication); an older operator's CRD does not
# know the field, the API server drops it silently (structural pruning), and the cluster runs without auth. The
# same pruning drops any misspelt or newer field (authOptions.secretName is v1.6's), hence the `known` sets.
# Pod templates inside are core/v1 PodTemplateSpecs: checked with kubernetes-validate instead.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    required: frozenset[str]
    known: frozenset[str]
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _level(required: str, known: str, **enums: tuple[str, ...]) -> Level:
    return Level(frozenset(required.split()), frozenset(known.split()) | frozenset(required.split()), enums)


CLUSTER_SPEC = {
    "": _level(
        "headGroupSpec",
        "authOptions autoscalerOptions enableInTreeAutoscaling gcsFaultToleranceOptions headServiceAnnotations "
        "managedBy rayVersion suspend workerGroupSpecs",
    ),
    "authOptions": _level("", "mode", mode=("disabled", "token")),
    "autoscalerOptions": _level(
        "",
        "env envFrom idleTimeoutSeconds image imagePullPolicy resources securityContext upscalingMode version "
        "volumeMounts",
        upscalingMode=("Default", "Aggressive", "Conservative"),
        version=("v1", "v2"),
    ),
    "headGroupSpec": _level("template", "enableIngress headService labels rayStartParams resources serviceType"),
    "workerGroupSpecs[]": _level(
        "groupName maxReplicas minReplicas template",
        "idleTimeoutSeconds labels numOfHosts rayStartParams replicas resources scaleStrategy suspend",
    ),
}
KUBERAY_V1_5_1 = {
    "RayCluster": {"spec": CLUSTER_SPEC},
    "RayJob": {
        "spec": {
            "": _level(
                "",
                "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint entrypointNumCpus "
                "entrypointNumGpus entrypointResources jobId managedBy metadata rayClusterSpec runtimeEnvYAML "
                "shutdownAfterJobFinishes submissionMode submitterConfig submitterPodTemplate suspend "
                "ttlSecondsAfterFinished",
                # not a CRD enum: rayjob_types.go's JobSubmissionMode values
                submissionMode=("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
            ),
        },
        "spec.rayClusterSpec": CLUSTER_SPEC,
    },
    "RayService": {
        "spec": {
            "": _level(
                "rayClusterConfig",
                "deploymentUnhealthySecondThreshold excludeHeadPodFromServeSvc rayClusterDeletionDelaySeconds "
                "serveConfigV2 serveService serviceUnhealthySecondThreshold upgradeStrategy",
            ),
            "upgradeStrategy": _level(
                "", "clusterUpgradeOptions type", type=("NewClusterWithIncrementalUpgrade", "NewCluster", "None")
            ),
        },
        "spec.rayClusterConfig": CLUSTER_SPEC,
    },
}
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # utils/constant.go: room for generated suffixes
MIN_RAY_FOR_TOKEN_AUTH = Version("2.52.0")  # validation.go: authOptions.mode token needs rayVersion >= 2.52.0
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")  # validation.go: not also in `resources`
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[tuple[str, dict]]:
    """(file name, object) for every object of every manifest in infra/k8s/."""
    return [(path.name, obj) for path in sorted(K8S.glob("*.yaml")) for obj in load_all(path)]


def kuberay(kind: str) -> list[dict]:
    return [obj for _, obj in k8s_objects() if obj["kind"] == kind]


def one(kind: str, name: str) -> dict:
    (obj,) = [o for o in kuberay(kind) if o["metadata"]["name"] == name]
    return obj


def cluster_spec(obj: dict) -> dict:
    """The RayCluster spec of any KubeRay object."""
    spec = obj["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        obj["kind"]
    ]


def groups(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group) for the head and every worker group of a RayCluster spec."""
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


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


def test_kubernetes_builtin_kinds_and_every_pod_template_pass_the_api_servers_schemas():
    builtin = [(f, o) for f, o in k8s_objects() if not o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for _, o in builtin} >= {"Secret", "Deployment", "Service", "PersistentVolumeClaim", "Job"}
    for _, obj in builtin:
        validate_k8s(obj)
    templates = 0
    for kind in KUBERAY_KINDS:
        for obj in kuberay(kind):
            for group_name, group in groups(cluster_spec(obj)):
                name = f"{obj['metadata']['name']}-{group_name}"
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
                validate_k8s({**template, "template": group["template"]})
                templates += 1
    assert templates == 11  # RayCluster 3, the two RayJobs 3 each, RayService 2


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


def at(obj: object, path: str) -> list[dict]:
    """The mappings found at a dotted path; `name[]` steps into each item of a list."""
    found = [obj]
    for step in filter(None, path.split(".")):
        key = step.removesuffix("[]")
        found = [f[key] for f in found if isinstance(f, dict) and key in f]
        if step.endswith("[]"):
            found = [item for f in found if isinstance(f, list) for item in f]
    return [f for f in found if isinstance(f, dict)]


def crd_errors(obj: dict) -> list[str]:
    """What KubeRay v1.5.1 would refuse or drop in one object."""
    kind, errors = obj["kind"], []
    name = obj["metadata"].get("name", "")
    if obj["apiVersion"] != "ray.io/v1":
        errors.append(f"apiVersion {obj['apiVersion']}: ray.io/v1")
    if len(name) > MAX_NAME[kind] or not DNS_1035.match(name):
        errors.append(f"name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    for prefix, levels in KUBERAY_V1_5_1[kind].items():
        for sub, level in levels.items():
            for found in at(obj, f"{prefix}.{sub}" if sub else prefix):
                where = f"{kind} {name} {prefix}.{sub}".rstrip(".")
                errors += [f"{where}: {f} is required" for f in sorted(level.required - set(found))]
                errors += [f"{where}: {f} is not a v1.5.1 field" for f in sorted(set(found) - level.known)]
                errors += [
                    f"{where}: {f} {found[f]!r} not in {allowed}"
                    for f, allowed in level.enums.items()
                    if f in found and found[f] not in allowed
                ]
    spec = cluster_spec(obj)
    if spec is None:
        return [*errors, f"{kind} {name}: no Ray cluster spec"]
    auth = (spec.get("authOptions") or {}).get("mode", "token" if "authOptions" in spec else "disabled")
    if auth == "token" and not (spec.get("rayVersion") and Version(spec["rayVersion"]) >= MIN_RAY_FOR_TOKEN_AUTH):
        errors.append(f"{kind} {name}: token authentication needs rayVersion >= {MIN_RAY_FOR_TOKEN_AUTH}")
    v2 = spec.get("enableInTreeAutoscaling") and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    for group_name, group in groups(spec):
        where = f"{kind} {name} group {group_name}"
        pod = group.get("template", {}).get("spec", {})
        params = group.get("rayStartParams") or {}
        if not pod.get("containers"):
            errors.append(f"{where}: no container")
        if group.get("resources") and any(params.get(k) for k in RAY_START_RESOURCES):
            errors.append(f"{where}: resources in both rayStartParams and resources")
        if "labels" in params or any(not isinstance(v, str) for v in params.values()):
            errors.append(f"{where}: rayStartParams are strings, and labels go in the group's labels field")
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{where}: autoscaler v2 needs restartPolicy Never or unset")
    if kind == "RayJob":
        job = obj["spec"]
        if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append(f"RayJob {name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("backoffLimit", 0) < 0:
            errors.append(f"RayJob {name}: backoffLimit must be >= 0")
    return errors


def test_kuberay_objects_have_what_the_v1_5_1_crds_and_operator_require():
    objects = {kind: kuberay(kind) for kind in KUBERAY_KINDS}
    assert {k: len(v) for k, v in objects.items()} == {"RayCluster": 1, "RayJob": 2, "RayService": 1}
    for kind_objects in objects.values():
        for obj in kind_objects:
            assert crd_errors(obj) == []


def test_the_crd_table_catches_what_kuberay_would_refuse_or_drop():
    """Each rule of the table fails a manifest broken in its way, with its own message."""
    job = one("RayJob", "crossvit-train")
    cluster = ("spec", "rayClusterSpec")
    for path, change, message in (
        ((*cluster, "workerGroupSpecs", 0), lambda g: g.pop("minReplicas"), "minReplicas is required"),
        ((*cluster, "authOptions"), lambda a: a.update(secretName="x"), "secretName is not a v1.5.1 field"),
        ((*cluster, "authOptions"), lambda a: a.update(mode="tokens"), "mode 'tokens' not in"),
        (cluster, lambda c: c.update(rayVersion="2.51.0"), "token authentication needs rayVersion >= 2.52.0"),
        (("spec",), lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs"),
        (("metadata",), lambda m: m.update(name="crossvit_train"), "a DNS-1035 label"),
        ((*cluster, "headGroupSpec"), lambda h: h.update(resources={"CPU": "1"}), "resources in both"),
    ):
        obj = copy.deepcopy(job)
        target = obj
        for step in path:
            target = target[step]
        change(target)
        errors = crd_errors(obj)
        assert len(errors) == 1 and message in errors[0], (message, errors)


def test_ray_token_authentication_is_on_in_every_cluster():
    """authOptions.mode token on every KubeRay cluster (set explicitly: the operator's default is no auth when
    authOptions is absent), and on `ray up`'s nodes RAY_AUTH_MODE=token with the token file copied to each."""
    for kind in KUBERAY_KINDS:
        for obj in kuberay(kind):
            assert cluster_spec(obj)["authOptions"] == {"mode": "token"}, obj["metadata"]["name"]
    cluster = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    readme = (INFRA / "README.md").read_text()
    assert "KubeRay v1.5.1" in readme and "not protect Serve's HTTP port" in readme


def test_every_ray_container_runs_the_project_image_with_storage_from_a_secret():
    for kind in KUBERAY_KINDS:
        for obj in kuberay(kind):
            spec = cluster_spec(obj)
            assert spec["rayVersion"] == ray.__version__
            for group_name, group in groups(spec):
                container = ray_container(group)
                where = f"{obj['metadata']['name']} {group_name}"
                assert container["image"].split("/")[-1] == project_image(), where
                assert {"secretRef": {"name": "crossvit-s3"}} in container.get("envFrom", []), where


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
    Services <name>-head-svc and <name>-serve-svc. All the manifests go into one namespace."""
    names = [f"{o['kind']}/{o['metadata']['name']}" for _, o in k8s_objects()]
    for obj in kuberay("RayCluster") + kuberay("RayService"):
        name = obj["metadata"]["name"]
        names += [f"Service/{name}-head-svc"]
        names += [f"Secret/{name}"] if obj["kind"] == "RayCluster" else [f"Service/{name}-serve-svc"]
    assert len(names) == len(set(names)), sorted(names)


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
    found = [f"{name} = {value}" for name, _, value in ASSIGNMENT.findall(text) if name != "secretName"]
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


def test_the_rayservice_serves_infra_serve_yaml_through_serves_schema():
    service = one("RayService", "crossvit-online")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_errors(config) == []
    assert config == yaml.safe_load((INFRA / "serve.yaml").read_text())  # the CPU profile, unchanged
    assert serve_errors(yaml.safe_load((INFRA / "serve-gpu.yaml").read_text())) == []
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
    the cluster starts with, max_replicas on the most pods its worker group may grow to."""
    spec = cluster_spec(one("RayService", "crossvit-online"))
    options = deployment_options(yaml.safe_load(one("RayService", "crossvit-online")["spec"]["serveConfigV2"]))
    for scale, replicas in (("minReplicas", "min_replicas"), ("maxReplicas", "max_replicas")):
        nodes = cluster_nodes(spec, scale)
        at_scale = copy.deepcopy(options)
        at_scale["autoscaling_config"]["min_replicas"] = options["autoscaling_config"][replicas]
        free = {r: sum(n[r] for n in nodes) for r in ("CPU", "GPU")}
        plan_serving_resources(at_scale, nodes, free)


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
    assert re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base) == f"rayproject/ray:{ray_pin}-py3{python[1]}-gpu"
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
    assert workdirs == [APP] and copies == [(".", APP)]
    tests_run = re.search(r"pytest (.*?);", " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN"))
    paths = [a for a in tests_run[1].split() if a.startswith("tests/")]
    assert paths and all((REPO / p).is_file() for p in paths) and "tests/test_infra.py" in paths
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert {".git", ".venv"} <= set(ignored)
    for needed in ("pyproject.toml", "README.md", "crossvit", "pipelines", "jobs", "tests", "infra"):
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed


def test_images_and_versions_match_the_project_everywhere():
    """One Ray, one Python, one project image: the Dockerfile's, the KubeRay rayVersions, `ray up`'s image;
    third-party images pinned to a release, never a moving tag."""
    ray_versions = {cluster_spec(o)["rayVersion"] for k in KUBERAY_KINDS for o in kuberay(k)}
    assert ray_versions == {dockerfile_args()["RAY_VERSION"]} == {ray.__version__}
    images = {n["image"] for _, o in k8s_objects() for n in walk(o) if "image" in n and isinstance(n["image"], str)}
    third_party = images - {project_image()}
    assert third_party and all(re.search(r":RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z$", i) for i in third_party), images


def test_infra_readme_describes_every_file():
    readme = (INFRA / "README.md").read_text()
    for path in infra_files():
        if path != INFRA / "README.md":
            name = str(path.relative_to(INFRA)) if path.is_relative_to(INFRA) else path.name
            assert name in readme, name
