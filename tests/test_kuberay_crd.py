"""The checks of tests/kuberay_crd.py (KubeRay v1.5.1's own CRD schemas, `ray start`'s own parser) on their own:
the mistakes a hand-typed table of fields let through, each made once on a real object and caught, and what the
API server accepts, accepted. tests/test_infra.py runs them on every object the overlays render."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml
from kuberay_crd import kubectl_strict, object_ray_start_param_errors, schema_errors

K8S = Path(__file__).resolve().parent.parent / "infra" / "k8s"
KINDS = {"RayCluster", "RayJob", "RayService"}


def kuberay_objects() -> list[tuple[str, dict]]:
    """(where, object) for every KubeRay object in the files that infra/k8s/'s Kustomizations list as resources
    (not their patches, which are partial objects): the real objects the mistakes are made on."""
    files = {
        (kustomization.parent / entry).resolve()
        for kustomization in K8S.rglob("kustomization.yaml")
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", [])
    }
    found = []
    for path in sorted(f for f in files if f.is_file()):
        for obj in yaml.safe_load_all(path.read_text()):
            if isinstance(obj, dict) and str(obj.get("apiVersion", "")).startswith("ray.io/"):
                found.append((f"{path.relative_to(K8S)}:{obj['kind']}/{obj['metadata']['name']}", obj))
    return found


OBJECTS = kuberay_objects()


def real(kind: str) -> dict:
    """A copy of the first manifest's object of `kind`, to break."""
    return copy.deepcopy(next(obj for _, obj in OBJECTS if obj["kind"] == kind))


def test_every_kind_is_there_to_break():
    assert {obj["kind"] for _, obj in OBJECTS} == KINDS


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A change to an object: set the field at a dotted path (`a.b[0].c`), creating the objects on the way."""

    def change(obj: dict) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        for step in parents:
            obj = obj[int(step[1:-1])] if step.startswith("[") else obj.setdefault(step, {})
        obj[last] = value

    return change


def _drop(path: str) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        for step in parents:
            obj = obj[int(step[1:-1])] if step.startswith("[") else obj[step]
        del obj[last]

    return change


WORKER = "spec.workerGroupSpecs[0]"
JOB_WORKER = "spec.rayClusterSpec.workerGroupSpecs[0]"
SCHEMA_MISTAKES = {
    "string for an integer": (
        "RayJob",
        _set(f"{JOB_WORKER}.idleTimeoutSeconds", "300"),
        f"{JOB_WORKER}.idleTimeoutSeconds: '300' is not of type 'integer'",
    ),
    "unknown field in headService": (
        "RayCluster",
        _set("spec.headGroupSpec.headService.spec.portz", [{"port": 80}]),
        "spec.headGroupSpec.headService.spec.portz: unknown field",
    ),
    "unknown field in autoscalerOptions.resources": (
        "RayCluster",
        _set("spec.autoscalerOptions.resources.limit", {"cpu": "1"}),
        "spec.autoscalerOptions.resources.limit: unknown field",
    ),
    "unknown field in submitterConfig": (
        "RayJob",
        _set("spec.submitterConfig.backoffLimits", 1),
        "spec.submitterConfig.backoffLimits: unknown field",
    ),
    "enum": (
        "RayCluster",
        _set("spec.autoscalerOptions.upscalingMode", "Fast"),
        "spec.autoscalerOptions.upscalingMode: 'Fast' is not one of ['Default', 'Aggressive', 'Conservative']",
    ),
    "enum in a RayService": (
        "RayService",
        _set("spec.rayClusterConfig.autoscalerOptions.version", "v3"),
        "spec.rayClusterConfig.autoscalerOptions.version: 'v3' is not one of ['v1', 'v2']",
    ),
    "missing required field": (
        "RayCluster",
        _drop(f"{WORKER}.groupName"),
        f"{WORKER}: 'groupName' is a required property",
    ),
    "int32 out of range": (
        "RayCluster",
        _set(f"{WORKER}.replicas", 2**31),
        f"{WORKER}.replicas: 2147483648 is out of int32's range",
    ),
    "int-or-string given a float": (
        "RayCluster",
        _set(f"{WORKER}.template.spec.containers[0].resources.limits.cpu", 1.5),
        f"{WORKER}.template.spec.containers[0].resources.limits.cpu: 1.5 is not of type 'integer', 'string'",
    ),
    "unknown field in metadata": (
        "RayCluster",
        _set("metadata.label", {"app": "crossvit"}),
        "metadata.label: unknown field",
    ),
    "metadata.name not a string": ("RayCluster", _set("metadata.name", 7), "metadata.name: 7 is not of type 'string'"),
}


@pytest.mark.parametrize("mistake", SCHEMA_MISTAKES)
def test_schema_mistake_gives_one_clear_error(mistake: str):
    kind, change, message = SCHEMA_MISTAKES[mistake]
    obj = real(kind)
    change(obj)
    assert schema_errors(obj) == [message]


@pytest.mark.parametrize(
    "change",
    [
        _drop(f"{WORKER}.minReplicas"),  # required, with a default the API server fills in first
        _set(f"{WORKER}.rayStartParams", None),  # `rayStartParams:` with nothing: the API server drops the null
        _set(f"{WORKER}.rayStartParams.anything-at-all", "1"),  # a map of strings to the CRD: ray start checks it
    ],
    ids=["defaulted required field", "null", "map key"],
)
def test_schema_accepts_what_the_api_server_accepts(change: Callable[[dict], None]):
    obj = real("RayCluster")
    change(obj)
    assert schema_errors(obj) == []


@pytest.mark.parametrize("api_version, kind", [("ray.io/v1alpha1", "RayCluster"), ("ray.io/v1", "RayCronJob")])
def test_other_versions_and_kinds_are_refused(api_version: str, kind: str):
    with pytest.raises(ValueError, match=r"not a KubeRay v1\.5\.1 object"):
        schema_errors({**real("RayCluster"), "apiVersion": api_version, "kind": kind})


def test_kubectl_strict_rules_on_a_small_schema():
    """What the vendored CRDs do not exercise: none of their v1 schemas has x-kubernetes-preserve-unknown-fields,
    and only status fields, which manifests leave out, are nullable."""
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "integer"}},
            },
            "when": {"type": "string", "nullable": True},
        },
    }
    validator = jsonschema.Draft4Validator(kubectl_strict(schema))
    assert list(validator.iter_errors({"open": {"a": 1, "b": 2}, "when": None})) == []
    assert [e.message for e in validator.iter_errors({"closed": {"a": 1, "b": 2}})] == [
        "Additional properties are not allowed ('b' was unexpected)"
    ]


RAY_START_MISTAKES = {
    "misspelt key": (
        "spec.headGroupSpec",
        {"num-cpu": "0"},
        "num-cpu: ray start has no option --num-cpu (did you mean --num-cpus?)",
    ),
    "value of the wrong type": (
        WORKER,
        {"num-gpus": "one"},
        "num-gpus: ray start refuses ['--num-gpus=one']: Invalid value for '--num-gpus': 'one' is not a valid integer.",
    ),
    "true on an option that takes a value": (
        WORKER,
        {"include-log-monitor": "true"},  # the operator passes a bare --include-log-monitor
        "include-log-monitor: ray start refuses ['--include-log-monitor']: Option '--include-log-monitor' "
        "requires an argument.",
    ),
    "value on a flag": (
        WORKER,
        {"disable-usage-stats": "yes"},
        "disable-usage-stats: ray start refuses ['--disable-usage-stats=yes']: Option '--disable-usage-stats' "
        "does not take a value.",
    ),
    "JSON that bash splits": (
        WORKER,
        {"resources": '{"accel": 1}'},
        "resources: ray start refuses ['--resources={accel:', '1}']: Got unexpected extra argument (1})",
    ),
    "key the operator sets": (
        WORKER,
        {"block": "false"},
        "block: set by KubeRay, not here: the operator always passes --block (setMissingRayStartParams)",
    ),
    "no-monitor on an autoscaling head": (
        "spec.headGroupSpec",
        {"no-monitor": "false"},
        "no-monitor: set by KubeRay, not here: the operator passes --no-monitor on the head when "
        "enableInTreeAutoscaling is on (DefaultHeadPodTemplate)",
    ),
}


@pytest.mark.parametrize("mistake", RAY_START_MISTAKES)
def test_ray_start_mistake_gives_one_clear_error(mistake: str):
    group, params, message = RAY_START_MISTAKES[mistake]
    obj = real("RayCluster")
    assert obj["spec"]["enableInTreeAutoscaling"]
    _set(f"{group}.rayStartParams", params)(obj)
    assert object_ray_start_param_errors(obj) == [f"{group}.rayStartParams.{message}"]


def test_ray_start_accepts_what_the_operator_passes_well():
    obj = real("RayCluster")
    params = {
        "disable-usage-stats": "true",  # a flag: --disable-usage-stats
        "include-dashboard": "false",  # true/false are this option's values: --include-dashboard=false
        "log-color": "true",
        "resources": """'{"accel": 1}'""",  # quoted for bash
        "object-store-memory": "1000000000",
        "no-monitor": "true",  # only the head's is the operator's
    }
    _set(f"{WORKER}.rayStartParams", params)(obj)
    assert object_ray_start_param_errors(obj) == []
