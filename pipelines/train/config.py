"""One training run's configuration: ``TrainConfig``, loaded from YAML with command-line overrides, saved
beside every checkpoint, compared with the saved one when a run resumes.

The augmentation is one nested config (``augment:``, pipelines/data/augment.py), overridden field by field
with dotted keys (``augment.scale=[0.5,1.0]``). Configs carry a ``version``; older ones are migrated when
read (``from_dict``), so checkpoints, run folders and registered models written before still load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

import crossvit
from crossvit.model import resolve_name
from pipelines import storage
from pipelines.data.augment import DEIT_RAND_AUGMENT, AugmentConfig

VERSION = 2  # 1: before the nested augmentation (crop_scale, rand_augment, random_erasing, mixup, cutmix)


@dataclass
class TrainConfig:
    """Everything one training run needs; loadable from YAML, saved beside every checkpoint."""

    version: int = VERSION
    data: str = ""  # the prepared data set (URI of its manifest's folder)
    storage: str = "runs"  # where runs go (URI); a relative path is resolved once, on the driver
    name: str = "crossvit"
    model: str = "crossvit_small_240"
    model_overrides: dict = field(default_factory=dict)  # any CrossViTConfig field, e.g. a tiny custom shape
    epochs: int = 300
    batch_size: int = 128  # per worker
    lr: float = 5e-4  # for a global batch of 512; scaled linearly with the real global batch
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # crop, flip, RandAugment, erasing, mixing
    drop_path: float = 0.1
    clip_grad: float = 0.0  # 0: no clipping
    num_workers: int | str = 2  # or "MIN-MAX": an elastic worker group
    use_gpu: bool = False  # one GPU per worker unless resources_per_worker says otherwise
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"CPU": 8, "GPU": 1}; empty: planned
    min_ingest_cpus: float = 1.0  # CPUs left to Ray Data's decode tasks at least (0: no check, autoscaling)
    decode_on_device: bool = False  # ship JPEGs encoded and decode them on the GPU (nvJPEG): CPU-poor nodes
    elastic_resize_interval_s: float = 60.0  # how often an elastic run looks for more workers
    init: str = ""  # fine-tune from these weights: safetensors, a timm/official .pth, or a checkpoint folder
    compile: bool = False
    eval_every: int = 1
    keep_checkpoints: int = 2  # the best N by validation top-1, plus the latest
    max_failures: int = 3  # worker or node losses survived (drained/preempted nodes are not counted)
    max_bad_fraction: float = 0.01  # corrupt or unlabelled samples tolerated; past it the run stops
    batch_timeout_s: float = 600.0  # no batch for this long: stop with what Ray waits for (0: wait forever)
    seed: int = 0  # model initialisation, shard order, every sample's augmentation, drop-path, Mixup/CutMix
    ray_train_log_level: str = "WARNING"  # Ray Train's own messages (INFO: every report and checkpoint)
    tensorboard: bool = False  # event files in <run>/tensorboard/ (needs the tensorboard package)
    mlflow_tracking_uri: str = ""  # log params and per-epoch metrics to this MLflow tracking URI (needs mlflow)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            unknown = set(self.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
            if unknown:
                raise ValueError(f"unknown augment keys {sorted(unknown)}")
            self.augment = AugmentConfig(**self.augment)
        # YAML 1.1 reads 5e-4 as a string (it wants 5.0e-4): numbers are converted here, with a clear error.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and isinstance(value, str | int | float) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value) if f.type == "float" else int(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, not {value!r}") from None
        scaling(self.num_workers)  # "N" or "MIN-MAX", or a clear error now rather than on the cluster
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, not {self.epochs} and {self.batch_size}")
        if self.decode_on_device and self.augment.color_jitter:
            raise ValueError("augment.color_jitter is not applied when decoding on the device (decode_on_device)")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be within [0, 1], not {self.max_bad_fraction}")

    def model_config(self) -> crossvit.CrossViTConfig:
        """The network this run trains: the named variant with ``model_overrides`` applied."""
        return dataclasses.replace(crossvit.VARIANTS[resolve_name(self.model)], **self.model_overrides)

    def to_dict(self) -> dict:
        """As JSON gives it back (tuples as lists): what is saved, and compared when a run resumes."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From a YAML recipe or a saved config of any version; an unknown key is an error."""
        values = migrate(values)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        """A YAML recipe, with overrides (flags, KEY=VALUE pairs; None values are left out) merged in."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        try:
            return cls.from_dict(merge(migrate(values), {k: v for k, v in overrides.items() if v is not None}))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def migrate(values: dict) -> dict:
    """A config dict of an older version as the current version writes it (a new dict).
    Version 1 had the augmentation as top-level fields: crop_scale, rand_augment (a bool; the recipe asked
    for rand-m9-mstd0.5, which it now gets as published), random_erasing, mixup, cutmix; its earliest runs
    also had cpus_per_worker. A config newer than this code is an error, never read as the current one."""
    values = dict(values)
    if values.get("version", 1) > VERSION:
        raise ValueError(f"config version {values['version']} is newer than this code's ({VERSION}): update the code")
    if values.get("version", 1) < 2:
        if "cpus_per_worker" in values:  # an early version-1 field, later folded into resources_per_worker
            cpus = values.pop("cpus_per_worker")
            values["resources_per_worker"] = {"CPU": cpus, **(values.get("resources_per_worker") or {})}
        augment = dict(values.get("augment") or {})
        if "crop_scale" in values:
            augment["scale"] = values.pop("crop_scale")
        if "rand_augment" in values:
            augment["auto_augment"] = DEIT_RAND_AUGMENT if values.pop("rand_augment") else ""
        for key in ("random_erasing", "mixup", "cutmix"):
            if key in values:
                augment[key] = values.pop(key)
        if augment:
            values["augment"] = augment
    values["version"] = VERSION
    return values


NESTED_FIELDS = ("augment", "model_overrides", "resources_per_worker")  # the fields that dotted keys reach into


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base`` (a new dict). A plain key replaces the value; a dotted key
    (``augment.scale``, ``model_overrides.img_size``) sets one entry of a nested field and keeps the others;
    a dotted key under a field that holds no mapping is an error."""
    out = dict(base)
    for key, value in overrides.items():
        parent, dot, leaf = key.partition(".")
        if not dot:
            out[key] = value
            continue
        if parent not in NESTED_FIELDS:
            raise ValueError(f"{key}: {parent} has no entries to set (dotted keys work for {sorted(NESTED_FIELDS)})")
        nested = out.get(parent) or {}
        out[parent] = merge(asdict(nested) if isinstance(nested, AugmentConfig) else nested, {leaf: value})
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """Command-line KEY=VALUE pairs, values read as YAML, dotted keys kept for ``merge``:
    ["lr=1e-3", "augment.scale=[0.5, 1.0]"] -> {"lr": "1e-3" (a number once in TrainConfig),
    "augment.scale": [0.5, 1.0]}"""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {pair!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def scaling(num_workers: int | str) -> int | tuple[int, int]:
    """``4`` -> 4 workers; ``"2-8"`` -> an elastic group of 2 to 8 workers (Ray Train's (min, max))."""
    try:
        if isinstance(num_workers, str) and "-" in num_workers:
            lo, hi = (int(v) for v in num_workers.split("-"))
            if 1 <= lo <= hi:
                return lo, hi
        elif int(num_workers) >= 1:
            return int(num_workers)
    except ValueError:
        pass
    raise ValueError(f"num_workers must be N or MIN-MAX with 1 <= MIN <= MAX, not {num_workers!r}")


# The fields a resumed run may change: how and where it runs, how long, what it logs. Anything else (data,
# model, batch, the optimiser and augmentation recipe, seed, init) would silently make it another run.
RESUMABLE_CHANGES = frozenset(
    {
        "version",  # an older config is migrated before it is compared
        "storage",  # where the run folder is found; the same folder, however it was written
        "epochs",  # a longer (or shorter) schedule: the learning rate follows the new length from here on
        "num_workers",  # the linear scaling rule keeps the optimisation consistent (pipelines/train/loop.py)
        "use_gpu",
        "resources_per_worker",
        "min_ingest_cpus",
        "decode_on_device",  # the same crop, flip and strength; RandAugment is torchvision's there (see device.py)
        "elastic_resize_interval_s",
        "compile",
        "eval_every",
        "keep_checkpoints",
        "max_failures",
        "max_bad_fraction",
        "batch_timeout_s",
        "ray_train_log_level",
        "tensorboard",
        "mlflow_tracking_uri",
    }
)


class ConfigChangedError(ValueError):
    """A run resumed with a configuration that differs from the one it was started with."""


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if key == "augment" and isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"lr: 0.0005 -> 0.001"`` for every field outside RESUMABLE_CHANGES that differs from the saved config
    (of any version). A field the saved config lacks counts as its default."""
    before = _flat(TrainConfig.from_dict({**saved, "name": cfg.name}).to_dict())
    now = _flat(cfg.to_dict())
    diffs = []
    for key, value in now.items():
        if key.split(".")[0] in RESUMABLE_CHANGES or key == "name":
            continue
        old = before.get(key)
        if key in ("data", "init") and old and value:  # older runs saved local paths as they were typed
            old, value = _normal(old), _normal(value)
        if old != value:
            diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def _normal(uri: str) -> str:
    loc = storage.parse(uri)
    return uri.rstrip("/") if loc.is_s3 else loc.key
