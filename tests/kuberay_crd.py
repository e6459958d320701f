"""KubeRay objects checked by their owners' rules: the CRD schemas of KubeRay v1.5.1 (vendored under
tests/kuberay/, see SOURCE.md there) and `ray start`'s own command-line parser for rayStartParams.

`schema_errors` validates an object as the API server does when kubectl asks for strict field validation (its
default, `--validate=strict`): JSON Schema types, enums, required fields, int32/int64 ranges, and every field a
schema does not name is an error, except under `x-kubernetes-preserve-unknown-fields` (the schemas themselves
allow unknown fields: the API server prunes them, and reports them when asked to be strict). What it cannot check:
- the CRDs' CEL rules (`x-kubernetes-validations`): managedBy's allowed values and immutability, and RayJob's
  deletionStrategy combinations;
- the operator's own validation (ray-operator/controllers/ray/utils/validation.go: name lengths, token auth's
  Ray version, resources in both rayStartParams and `resources`, rayStartParams' `labels`, autoscaler v2's
  restartPolicy, the values of RayService's upgradeStrategy.type and RayJob's submissionMode, which are no CRD
  enums, ...), which tests/test_infra.py checks;
- what is inside a pod template beyond its schema: env names and resource names (`nvidia.com/gpus`) are any
  string there, and the API server's pod validation only runs when the operator creates the pods.

`ray_start_param_errors` checks a group's rayStartParams against `ray start` (ray.scripts.scripts.start, a click
command), after turning them into a command line exactly as the operator does.
"""

from __future__ import annotations

import difflib
import functools
import shlex
from collections.abc import Iterable
from pathlib import Path

import click
import jsonschema
import yaml
from ray.scripts.scripts import start as ray_start

KUBERAY_VERSION = "v1.5.1"
CRD_DIR = Path(__file__).resolve().parent / "kuberay" / KUBERAY_VERSION
API_VERSION = "ray.io/v1"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

# --------------------------------------------------------------------------------------------------------
# The CRD schemas
# --------------------------------------------------------------------------------------------------------

# A CRD's schema says only `metadata: {type: object}` at the top: the API server checks it as ObjectMeta
# (k8s.io/apimachinery/pkg/apis/meta/v1), and a custom resource's name as a DNS-1123 subdomain.
_DNS_1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": f"^{_DNS_1123_LABEL}(\\.{_DNS_1123_LABEL})*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": f"^{_DNS_1123_LABEL}$"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        # set by the API server; a manifest may carry them (kubectl get -o yaml)
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "nullable": True},
        "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "selfLink": {"type": "string"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}

FORMATS = jsonschema.FormatChecker(formats=())
INT_RANGES = {"int32": 2**31, "int64": 2**63}
for _name, _bound in INT_RANGES.items():
    # a non-integer passes here: `type` reports it
    FORMATS.checks(_name)(lambda value, bound=_bound: not isinstance(value, int) or -bound <= value < bound)


def kubectl_strict(schema: dict) -> dict:
    """A copy of a CRD's structural schema that a JSON Schema validator reads as the API server does:
    - an object schema with `properties` gets `additionalProperties: false` (unless it has its own, or
      `x-kubernetes-preserve-unknown-fields: true`): strict field validation's "unknown field";
    - `x-kubernetes-int-or-string: true` means an integer or a string (its `anyOf` is dropped so that a wrong
      value gives one error, not two);
    - `nullable: true` admits null;
    - a required field with a `default` is never missing: the API server fills in defaults before it validates
      (workerGroupSpecs' minReplicas and maxReplicas are required, with defaults).
    """
    node = dict(schema)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)
        node["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in node:
        node["type"] = [*([node["type"]] if isinstance(node["type"], str) else node["type"]), "null"]
    if "properties" in node:
        node["properties"] = {name: kubectl_strict(sub) for name, sub in node["properties"].items()}
        if "required" in node:
            node["required"] = [name for name in node["required"] if "default" not in node["properties"].get(name, {})]
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = kubectl_strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [kubectl_strict(sub) for sub in node[key]]
    return node


@functools.cache
def _crd_schema(kind: str) -> dict:
    """The served ray.io/v1 version's openAPIV3Schema of `kind`'s CRD, as vendored."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.7 s for the three, not 4 s
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    group, version = API_VERSION.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, f"{CRD_FILES[kind]} is not {kind}"
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return served["schema"]["openAPIV3Schema"]


@functools.cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    """OpenAPI v3.0's schema objects are JSON Schema draft 4's keywords (plus the x-kubernetes-* ones)."""
    schema = kubectl_strict({**_crd_schema(kind), "required": ["apiVersion", "kind", "metadata"]})
    schema["properties"]["metadata"] = kubectl_strict(OBJECT_META)
    return jsonschema.Draft4Validator(schema, format_checker=FORMATS)


def schema_errors(obj: dict) -> list[str]:
    """Every way `obj` (a RayCluster, RayJob or RayService of ray.io/v1) breaks its KubeRay v1.5.1 CRD, one
    message per mistake, each starting with the field's path (`spec.workerGroupSpecs[0].replicas: ...`)."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if api_version != API_VERSION or kind not in CRD_FILES:
        raise ValueError(
            f"not a KubeRay {KUBERAY_VERSION} object: apiVersion {api_version!r}, kind {kind!r} "
            f"(this knows {API_VERSION} {', '.join(CRD_FILES)})"
        )
    schema = _validator(kind).schema
    errors = [
        message for error in _validator(kind).iter_errors(drop_nulls(obj, schema)) for message in _messages(error)
    ]
    return sorted(errors)


def drop_nulls(value: object, schema: dict) -> object:
    """`value` without the nulls the API server drops before it validates: those of known fields that are not
    `nullable` (an empty YAML key, `rayStartParams:`, reads as null). A null unknown field stays, to be reported."""
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        kept = {}
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                kept[key] = item  # unknown: additionalProperties reports it
            elif item is not None or sub.get("nullable"):
                kept[key] = drop_nulls(item, sub)
        return kept
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [drop_nulls(item, schema["items"]) for item in value]
    return value


def _path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


def _messages(error: jsonschema.ValidationError) -> list[str]:
    """jsonschema's error as kubectl words it: one message per unknown field, the path first."""
    path = _path(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {})
        return [f"{_path([*error.absolute_path, name])}: unknown field" for name in error.instance if name not in known]
    if error.validator == "format" and error.validator_value in INT_RANGES:
        return [f"{path}: {error.instance} is out of {error.validator_value}'s range"]
    return [f"{path or '(the object)'}: {error.message}"]


# --------------------------------------------------------------------------------------------------------
# rayStartParams and `ray start`
# --------------------------------------------------------------------------------------------------------

# KubeRay v1.5.1 turns a group's rayStartParams into `ray start`'s flags in
# ray-operator/controllers/ray/common/pod.go, convertParamMap: a value "true" or "false" (any case) is a bare
# flag, `--key` or nothing at all, except for these two keys, whose true and false are values; any other value
# becomes `--key=value`, unquoted, in a line that runs under `/bin/bash -c` (BuildPod; utils.GetContainerCommand).
TRUE_FALSE_ARE_VALUES = ("log-color", "include-dashboard")
# Keys the operator sets itself in the same file, over whatever the group says.
OPERATOR_SETS = {
    "head": "the operator passes --head on the head group and only there (generateRayStartCommand)",
    "block": "the operator always passes --block (setMissingRayStartParams)",
}
OPERATOR_SETS_WITH_AUTOSCALER = {
    "no-monitor": "the operator passes --no-monitor on the head when enableInTreeAutoscaling is on "
    "(DefaultHeadPodTemplate)",
}
RAY_START_OPTIONS = {opt[2:]: param for param in ray_start.params for opt in param.opts if opt.startswith("--")}


def ray_start_words(key: str, value: str) -> list[str]:
    """The words `ray start` receives for one rayStartParams entry (convertParamMap, then bash's splitting)."""
    if value.lower() in ("true", "false") and key not in TRUE_FALSE_ARE_VALUES:
        return [f"--{key}"] if value.lower() == "true" else []
    return shlex.split(f"--{key}={value}")


def ray_start_param_errors(params: dict[str, str], *, head: bool = False, autoscaling: bool = False) -> list[str]:
    """What `ray start` (or the operator) refuses or overrides in one group's rayStartParams, one message per key
    (`num-cpu: ...`). `head`: the head group's; `autoscaling`: the cluster has enableInTreeAutoscaling."""
    errors = []
    overridden = OPERATOR_SETS | (OPERATOR_SETS_WITH_AUTOSCALER if head and autoscaling else {})
    for key, value in sorted(params.items()):
        if not isinstance(value, str):
            errors.append(f"{key}: {value!r} is not a string (rayStartParams' values are strings)")
        elif key in overridden:
            errors.append(f"{key}: set by KubeRay, not here: {overridden[key]}")
        elif key not in RAY_START_OPTIONS:
            near = difflib.get_close_matches(key, RAY_START_OPTIONS, n=1)
            errors.append(f"{key}: ray start has no option --{key}" + (f" (did you mean --{near[0]}?)" if near else ""))
        else:
            try:
                words = ray_start_words(key, value)
                ray_start.make_context("ray start", list(words))  # parses (consuming its list), converts, runs nothing
            except ValueError as error:  # shlex: an unclosed quote, which bash refuses too
                errors.append(f"{key}: bash cannot read --{key}={value}: {error}")
            except click.ClickException as error:
                errors.append(f"{key}: ray start refuses {words}: {error.format_message()}")
    return errors


def ray_cluster_spec(obj: dict) -> tuple[str, dict] | None:
    """The path and the RayClusterSpec that an object of `kind` holds (None: a RayJob on an existing cluster)."""
    path = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}[obj["kind"]]
    found = obj
    for key in path.split("."):
        found = (found or {}).get(key)
    return (path, found) if isinstance(found, dict) else None


def object_ray_start_param_errors(obj: dict) -> list[str]:
    """`ray_start_param_errors` for every group of a KubeRay object, each message prefixed with the group's path."""
    found = ray_cluster_spec(obj)
    if found is None:
        return []
    path, spec = found
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    groups = [(f"{path}.headGroupSpec", spec.get("headGroupSpec") or {}, True)]
    groups += [(f"{path}.workerGroupSpecs[{i}]", g, False) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    return [
        f"{where}.rayStartParams.{message}"
        for where, group, head in groups
        for message in ray_start_param_errors(group.get("rayStartParams") or {}, head=head, autoscaling=autoscaling)
    ]
