"""Distributed CrossViT training with Ray Train: the config, the per-worker loop, and the launcher.

One ``TrainConfig`` per run. ``fit`` plans the cluster's CPUs (pipelines/cluster.py), builds the Ray Data
ingest (pipelines/ingest.py) and a TorchTrainer whose workers run ``train_loop_per_worker``: DDP (nccl on
GPUs, gloo on CPUs), normalisation and Mixup/CutMix on the device, bf16 autocast and fused AdamW on GPUs,
the learning rate stepped per iteration, an exact evaluation over the whole validation split, and a
checkpoint every epoch in the run's storage.

Failures: a lost worker or node restarts the group from the latest checkpoint (FailureConfig); a run
started again under the same name resumes from its latest checkpoint, if its configuration has not changed
in a way that matters (``RESUMABLE_CHANGES``); a finished one does nothing.

Elastic runs (``num_workers: "MIN-MAX"``) start with what is available and resize, always by restarting
the group from the latest checkpoint. The optimisation stays consistent across resizes by following the
recipe's linear scaling rule: the global batch is ``batch_size x workers``, the peak learning rate is
``lr x global batch / 512``, and the schedule is a function of (fractional) epochs, not of steps, so a
resize changes the step size with the batch and nothing else (tested in tests/test_cluster.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import crossvit
from crossvit.weights import load_weights, save_weights
from pipelines import storage
from pipelines.metrics import format_epoch, load_history, plot_curves, record_epoch
from pipelines.tracking import Trackers

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything one training run needs; loadable from YAML, saved beside every checkpoint."""

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
    mixup: float = 0.8
    cutmix: float = 1.0
    random_erasing: float = 0.25
    rand_augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    drop_path: float = 0.1
    clip_grad: float = 0.0  # 0: no clipping
    num_workers: int | str = 2  # or "MIN-MAX": an elastic worker group
    use_gpu: bool = False  # one GPU per worker unless resources_per_worker says otherwise
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"CPU": 8, "GPU": 1}; empty: planned
    min_ingest_cpus: float = 1.0  # CPUs left to Ray Data's decode tasks at least (0: no check, autoscaling)
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
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be within [0, 1], not {self.max_bad_fraction}")

    def model_config(self) -> crossvit.CrossViTConfig:
        """The network this run trains: the named variant with ``model_overrides`` applied."""
        return dataclasses.replace(crossvit.VARIANTS[crossvit.model.resolve_name(self.model)], **self.model_overrides)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


# The fields a resumed run may change: how and where it runs, how long, what it logs. Anything else (data,
# model, batch, the optimiser and augmentation recipe, seed, init) would silently make it another run.
RESUMABLE_CHANGES = frozenset(
    {
        "storage",  # where the run folder is found; the same folder, however it was written
        "epochs",  # a longer (or shorter) schedule: the learning rate follows the new length from here on
        "num_workers",  # the linear scaling rule keeps the optimisation consistent (see the module docstring)
        "use_gpu",
        "resources_per_worker",
        "min_ingest_cpus",
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


def config_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"lr: 0.0005 -> 0.001"`` for every field outside RESUMABLE_CHANGES that differs from the saved config.
    A field the saved config lacks (written by an older version) counts as its default."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}  # fmt: skip
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as they were saved
    diffs = []
    for key, value in now.items():
        if key in RESUMABLE_CHANGES or key == "name":
            continue
        before = saved.get(key, json.loads(json.dumps(defaults[key])))
        if key in ("data", "init") and before and value:  # older runs saved local paths as they were typed
            before, value = _normal(before), _normal(value)
        if before != value:
            diffs.append(f"{key}: {before!r} -> {value!r}")
    return diffs


def _normal(uri: str) -> str:
    loc = storage.parse(uri)
    return uri.rstrip("/") if loc.is_s3 else loc.key


def parse_overrides(pairs: list[str]) -> dict:
    """Command-line KEY=VALUE pairs, values read as YAML:
    ["lr=1e-3", "crop_scale=[0.5, 1.0]"] -> {"lr": "1e-3" (a number once in TrainConfig), "crop_scale": [0.5, 1.0]}"""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {pair!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, class tokens and position embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(epoch_progress: float, cfg: TrainConfig, peak: float) -> float:
    """Linear warmup from warmup_lr, then cosine to min_lr; a function of (fractional) epochs done, so the
    schedule stays the same when an elastic run changes its number of workers (and so its steps per epoch)."""
    if epoch_progress < cfg.warmup_epochs:
        return cfg.warmup_lr + (peak - cfg.warmup_lr) * epoch_progress / cfg.warmup_epochs
    progress = (epoch_progress - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


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


# --------------------------------------------------------------------------------------------------------
# On every worker
# --------------------------------------------------------------------------------------------------------


def bare_model(model: nn.Module) -> nn.Module:
    """The CrossViT inside a DDP and/or torch.compile wrapper."""
    inner = model.module if hasattr(model, "module") else model
    return getattr(inner, "_orig_mod", inner)


def training_state(
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    peak_lr: float,
    place: Callable[[nn.Module], nn.Module] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, int, int, dict | None]:
    """The model and optimizer a worker trains, and where to start: (model, optimizer, start epoch, step,
    the saved epoch's metrics or None).

    The order keeps everything on one device: build (seeded, so every rank and every run starts from the
    same weights) -> fine-tuning weights (``cfg.init``, fresh runs only) -> ``place`` on the device (Ray
    Train's ``prepare_model``: move + DDP; default ``.to(device)``) -> the optimizer over the placed
    parameters -> the checkpoint, whose optimizer state ``load_state_dict`` moves onto each parameter's
    device. Restoring before placing leaves AdamW's state on the CPU, and the first fused step on a GPU
    fails with "Tensors of the same index must be on the same device".
    """
    torch.manual_seed(cfg.seed)
    model = crossvit.create_model(
        cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_overrides
    )
    if checkpoint_dir is None and cfg.init:
        load_init(model, cfg.init)
    model = place(model) if place is not None else model.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(bare_model(model), cfg.weight_decay), lr=peak_lr, fused=torch.device(device).type == "cuda"
    )
    if checkpoint_dir is None:
        return model, optimizer, 0, 0, None
    start_epoch, step, saved = restore(checkpoint_dir, bare_model(model), optimizer)
    return model, optimizer, start_epoch, step, saved


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: loop_config = {"cfg": TrainConfig as a dict, "classes": the
    manifest's class list, "train_samples", "train_counter": the training set's counter actor, where each
    epoch is announced (absent when the training set is not ours)}."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["cfg"])
    _quiet_worker_logs(cfg.ray_train_log_level)
    counter = loop_config.get("train_counter")
    if counter is not None and (reason := ray.get(counter.stopped.remote())):
        # An earlier attempt stopped the run for a reason a restart cannot fix: end this one at once.
        raise RunStoppedError(reason)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    num_classes = len(loop_config["classes"])
    steps_per_epoch = max(1, math.ceil(loop_config["train_samples"] / (cfg.batch_size * world)))
    run_uri = storage.join(cfg.storage, cfg.name)
    peak = cfg.lr * cfg.batch_size * world / 512  # the linear scaling rule, for this run's global batch

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
        model, optimizer, start_epoch, step, saved = training_state(
            cfg, num_classes, device, peak, ray.train.torch.prepare_model, folder
        )
    if saved is not None and rank == 0:
        log.info("resuming %s after epoch %d from %s, %d workers", cfg.name, start_epoch, checkpoint.path, world)
        record_epoch(run_uri, saved)  # in case the last attempt died between its checkpoint and this
    if cfg.compile:
        model = torch.compile(model)
    trackers = None
    if rank == 0 and (cfg.tensorboard or cfg.mlflow_tracking_uri):
        trackers = Trackers(run_uri, cfg.name, _saved_config(loop_config), cfg.tensorboard, cfg.mlflow_tracking_uri)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        # The RNG state is a function of (seed, rank, epoch): a resumed run draws what the uninterrupted one
        # would have (drop-path, erasing, Mixup/CutMix), and ranks differ from each other. So checkpoints
        # need no RNG state: re-deriving it restores exactly what a saved one would.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)
        if counter is not None:  # before iterating: the data's shard order and augmentation follow the epoch
            ray.get(counter.set_epoch.remote(epoch))
        t0 = time.monotonic()
        batches = _watched(
            train_shard.iter_torch_batches(
                batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=4 * cfg.batch_size
            ),
            cfg.batch_timeout_s,
            "training batch",
            counter,
        )
        loss_sum, seen, count = train_one_epoch(
            model, optimizer, batches, cfg, num_classes, device, schedule=(epoch, steps_per_epoch, peak)
        )
        train_seconds = time.monotonic() - t0
        loss_sum, seen, count = _sum_over_workers(loss_sum, seen, count)
        step += count // world
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:
            val = evaluate(model, val_shard, num_classes, cfg.batch_size, device, cfg.batch_timeout_s, counter)
        else:
            val = dict.fromkeys(("val_loss", "val_top1", "val_top5", "val_samples"))
        metrics = {
            "epoch": epoch,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(count, 1),  # the mean over every rank's batches
            "images_per_s": seen / max(train_seconds, 1e-9),  # training throughput, all workers
            "epoch_s": time.monotonic() - t0,  # training and evaluation
            "workers": world,
            "resumed": saved is not None and epoch == start_epoch,  # the first epoch after a (re)start
            **val,  # None when this epoch was not evaluated
        }
        # The checkpoint first, then the record: metrics.json only lists epochs whose checkpoint is stored.
        with tempfile.TemporaryDirectory() as d:
            saved_checkpoint = None
            if rank == 0:
                save_checkpoint(Path(d), model, optimizer, _saved_config(loop_config), metrics)
                saved_checkpoint = ray.train.Checkpoint.from_directory(d)
            # Ray Train ranks checkpoints by val_top1 (keep_checkpoints): an epoch that was not evaluated
            # reports NaN, which Ray ranks below every number, so only evaluated checkpoints compete on their
            # own result (never on an earlier epoch's) and the others go first; the latest is always kept.
            ranked = {**metrics, "val_top1": metrics["val_top1"] if evaluated else float("nan")}
            ray.train.report(ranked, checkpoint=saved_checkpoint)
        if rank == 0:
            history = record_epoch(run_uri, metrics)
            log.info(format_epoch(metrics, cfg.epochs))
            if trackers is not None:
                trackers.log(metrics)
            if epoch + 1 == cfg.epochs:
                storage.write_bytes(storage.join(run_uri, "curves.png"), plot_curves(history))
    if trackers is not None:
        trackers.close()


class RunStoppedError(RuntimeError):
    """An earlier attempt of this run stopped it (too many bad samples, no batch for too long)."""


def _watched(batches, timeout_s: float, what: str, counter=None):
    """A worker's batches with the stall watchdog (pipelines/cluster.py), a data error raised as itself, and
    both recorded as the run's stop reason in the training set's counter, so that Ray Train's restarts of
    the worker group end at once instead of waiting for the same failure again."""
    import ray

    from pipelines.bad_samples import BadDataError, surfaced
    from pipelines.cluster import StalledError, watch

    try:
        yield from watch(batches, timeout_s, what)
    except Exception as e:
        plain = surfaced(e)
        if counter is not None and isinstance(plain, BadDataError | StalledError):
            ray.get(counter.stop.remote(f"{type(plain).__name__}: {plain}"))
        if plain is e:
            raise
        raise plain from e


def _saved_config(loop_config: dict) -> dict:
    """What a checkpoint records of its run: the config, the class list, the training set's size."""
    return {k: loop_config[k] for k in ("cfg", "classes", "train_samples")}


def _sum_over_workers(loss_sum: torch.Tensor, seen: int, count: int) -> tuple[float, int, int]:
    """(summed loss, images, batches) summed over every worker, in one all-reduce on the loss's device."""
    import torch.distributed as dist

    totals = torch.stack(
        [loss_sum.double(), *(loss_sum.new_tensor(float(v), dtype=torch.float64) for v in (seen, count))]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, seen, count = totals.tolist()
    return loss, int(seen), int(count)


def _quiet_worker_logs(ray_train_level: str) -> None:
    """Keep the driver's log to one line per epoch. Ray 2.60 logs every report at INFO under a logger named
    by its file's path, which RunConfig's LoggingConfig does not reach; botocore announces where it found
    its credentials (never the credentials themselves) at INFO."""
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(ray_train_level)
    except ImportError:  # another Ray version: its own logging config applies
        pass


def train_one_epoch(
    model, optimizer, batches, cfg: TrainConfig, num_classes: int, device, schedule: tuple[int, int, float]
) -> tuple[torch.Tensor, int, int]:
    """One pass over this worker's share of the training split; returns (summed loss as a tensor, images,
    batches). schedule = (epoch, steps per epoch, peak learning rate) places each step on the learning-rate
    curve."""
    from pipelines.device import to_model_input

    epoch, steps_per_epoch, peak = schedule
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    seen, count, loss_sum = 0, 0, torch.zeros((), device=device)
    for batch in batches:
        x, y = to_model_input(
            batch["image"],
            batch["label"],
            num_classes=num_classes,
            train=True,
            random_erasing=cfg.random_erasing,
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            channels_last=device.type == "cuda",
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch + min(count / steps_per_epoch, 1.0), cfg, peak)  # stepped per iteration
        with autocast:
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        seen += len(y)
        loss_sum += loss.detach()  # no host sync per step
        count += 1
    return loss_sum, seen, count


def save_checkpoint(folder: Path, model, optimizer, run_config: dict, metrics: dict) -> None:
    """weights.safetensors (the bare model: no DDP or compile wrapper), state.pt (optimizer, epoch, step;
    read back with weights_only=True), config.json (the run's config and class list) and metrics.json (the
    epoch's metrics).

    The learning-rate schedule is a pure function of the epoch (``lr_at``) and bf16 autocast needs no
    gradient scaler, so neither has state to save; nor has the RNG (see the loop)."""
    save_weights(bare_model(model), folder / "weights.safetensors")
    state = {"optimizer": optimizer.state_dict(), "epoch": metrics["epoch"], "step": metrics["step"]}
    torch.save(state, folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(run_config, indent=1))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))


def restore(folder: str | Path, model: nn.Module, optimizer) -> tuple[int, int, dict]:
    """Load a checkpoint folder written by ``save_checkpoint`` into a model and optimizer that are on their
    device already (see ``training_state``); returns (the epoch to start at, the step, the saved epoch's
    metrics)."""
    folder = Path(folder)
    load_weights(model, folder / "weights.safetensors")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])  # moves each state tensor to its parameter's device
    metrics = json.loads((folder / "metrics.json").read_text())
    return state["epoch"] + 1, state["step"], metrics


def load_init(model: nn.Module, uri: str) -> None:
    """Fine-tuning start: a weights file (safetensors, or a timm/official PyTorch file, whatever its name:
    .pth, .pt, .bin), or a folder holding weights.safetensors (a checkpoint of another run, a registered
    model version), from any URI. Another class count (a new classifier) and another resolution (resampled
    position embeddings) are adapted; any other mismatch is an error."""
    if storage.head(uri) is None:  # not a file: a folder
        uri = storage.join(uri, "weights.safetensors")
    data = storage.read_bytes(uri)
    # Told apart by content, not by name: a safetensors file starts with its header's length and "{".
    suffix = ".safetensors" if data[8:9] == b"{" else ".pth"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        load_weights(model, f.name, reset_classifier=True, resize_pos_embed=True)


def evaluate(
    model: nn.Module, shard, num_classes: int, batch_size: int, device, timeout_s: float = 0, counter=None
) -> dict:
    """Loss, top-1 and top-5 over the whole split: each worker counts its part, then one all-reduce."""
    import torch.distributed as dist

    from pipelines.device import to_model_input

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    with torch.no_grad():
        for batch in _watched(
            shard.iter_torch_batches(batch_size=batch_size, device=device), timeout_s, "validation batch", counter
        ):
            x, y = to_model_input(
                batch["image"],
                batch["label"],
                num_classes=num_classes,
                train=False,
                channels_last=device.type == "cuda",
            )
            logits = model(x).float()
            top5 = logits.topk(min(5, num_classes), dim=1).indices
            totals += torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    (top5[:, 0] == y).sum().double(),
                    (top5 == y[:, None]).any(dim=1).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": 100 * top1 / max(n, 1),
        "val_top5": 100 * top5 / max(n, 1),
        "val_samples": int(n),
    }


# --------------------------------------------------------------------------------------------------------
# On the driver
# --------------------------------------------------------------------------------------------------------


def _exact_val_data_config():
    """Ray Train's DataConfig splits every dataset with ``equal=True``, which may drop rows to even the
    shards out. Fine for training (every worker must take the same number of steps), wrong for
    evaluation: here "val" is split with ``equal=False``, so every sample is evaluated exactly once."""
    import ray.train

    class ExactValDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                for i, split in enumerate(datasets["val"].streaming_split(world_size, equal=False)):
                    output[i]["val"] = split
            return output

    return ExactValDataConfig()


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Every local path of the config made absolute once, here on the driver, so that the workers (which
    run elsewhere, in other working directories) and Ray Train read and write the same folders. Under
    ``ray job submit --working-dir`` the driver runs in a temporary copy of that folder, so a relative
    path there is an error rather than a run that vanishes with the copy; on a cluster of several nodes a
    local path must be shared storage (pipelines/cluster.py checks it from every node)."""
    import ray

    from pipelines.cluster import check_shared_path

    in_job_copy = bool((ray.get_runtime_context().runtime_env or {}).get("working_dir"))
    resolved = {}
    for key, what in (("storage", "storage"), ("data", "data"), ("init", "init")):
        uri = getattr(cfg, key)
        if not uri or storage.parse(uri).is_s3:
            continue
        if in_job_copy and not os.path.isabs(os.path.expanduser(uri.removeprefix("file://"))):
            raise ValueError(
                f"{key} {uri!r} is a relative path, and this job runs in a temporary copy of its working_dir "
                f"that Ray deletes: give an absolute path on shared storage, or s3://..."
            )
        path = storage.parse(uri).key
        if key == "storage":
            check_shared_path(path, what)
        else:  # read by Ray Data's tasks (data) or by every worker (init), wherever they run
            probe = os.path.join(path, "manifest.json") if key == "data" else path
            if not os.path.exists(probe):
                raise FileNotFoundError(f"{key} {probe} does not exist")
            check_shared_path(path, what, probe=probe)
        resolved[key] = path
    return dataclasses.replace(cfg, **resolved)


def _has_checkpoint(run_uri: str) -> bool:
    return bool(storage.list_files(run_uri, suffix="weights.safetensors"))


def _saved_run_config(run_uri: str) -> dict | None:
    """The config a run was started (or last resumed) with: <run>/config.json, or for runs written before
    that file existed, the newest checkpoint's config.json."""
    for uri in [storage.join(run_uri, "config.json"), *reversed(storage.list_files(run_uri, suffix="/config.json"))]:
        with contextlib.suppress(FileNotFoundError):
            return json.loads(storage.read_bytes(uri))["cfg"]
    return None


def check_resume(cfg: TrainConfig, allow_changes: bool = False) -> None:
    """Before a run resumes from its checkpoints, compare its config with the saved one: a change outside
    RESUMABLE_CHANGES is an error listing the differences, unless ``allow_changes``."""
    run_uri = storage.join(cfg.storage, cfg.name)
    saved = _saved_run_config(run_uri) if _has_checkpoint(run_uri) else None
    diffs = config_changes(saved, cfg) if saved is not None else []
    if diffs and not allow_changes:
        raise ConfigChangedError(
            f"run {cfg.name} at {run_uri} exists with another configuration; resuming it would continue the old "
            f"run with these changes: {'; '.join(diffs)}. Use another --name for a new run, or pass "
            "--allow-config-change to continue this one anyway"
        )
    if diffs:
        log.warning("resuming %s with a changed configuration: %s", cfg.name, "; ".join(diffs))


def fit(cfg: TrainConfig, datasets: dict | None = None, *, allow_changes: bool = False):
    """Plan the cluster, build the datasets and the TorchTrainer for ``cfg`` and run it; returns Ray Train's
    Result, or None when a run of that name has already finished (a stopped one resumes from its latest
    checkpoint, if its configuration has not changed, see ``check_resume``).

    Connects to the Ray cluster this process belongs to (``ray job submit``, RAY_ADDRESS, a ``ray start``
    on this machine) or starts a local one with the machine's CPUs. ``datasets`` replaces the ingest
    pipeline (the training benchmark feeds synthetic in-memory batches)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.bad_samples import bad_sample_counter
    from pipelines.cluster import connect, plan_training_cpus
    from pipelines.ingest import AugmentConfig, read_split
    from pipelines.shards import load_manifest

    connect()
    cfg = resolve_paths(cfg)
    run_uri = storage.join(cfg.storage, cfg.name)
    history = load_history(run_uri)
    if history and history[-1]["epoch"] + 1 >= cfg.epochs:
        print(f"run {cfg.name} already finished its {cfg.epochs} epochs: nothing to do")
        return None
    check_resume(cfg, allow_changes)
    manifest = load_manifest(cfg.data)
    run_config = {
        "cfg": asdict(cfg),
        "classes": manifest["classes"],  # [{index, wnid, name}]: saved with every checkpoint
        "train_samples": manifest["splits"]["train"]["samples"],
    }

    workers = scaling(cfg.num_workers)
    plan = plan_training_cpus(
        ray.cluster_resources().get("CPU", 0.0),
        workers,
        use_gpu=cfg.use_gpu,
        cpus_per_worker=cfg.resources_per_worker.get("CPU"),
        min_ingest_cpus=cfg.min_ingest_cpus,
        cpu_nodes=sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0),
    )
    log.info("CPU plan: %s", plan.describe())
    loop_config = dict(run_config)
    if datasets is None:
        image_size = cfg.model_config().img_size
        augment = AugmentConfig(scale=tuple(cfg.crop_scale), rand_augment_ops=2 if cfg.rand_augment else 0)
        # The limit is judged once 100 samples were seen, or the whole split if it is smaller.
        train_counter, val_counter = (
            bad_sample_counter(cfg.max_bad_fraction, min_samples=min(100, manifest["splits"][s]["samples"]))
            for s in ("train", "val")
        )
        common = dict(image_size=image_size, seed=cfg.seed, decode_cpus=plan.decode_cpus, manifest=manifest)
        datasets = {
            "train": read_split(cfg.data, "train", train=True, augment=augment, counter=train_counter, **common),
            "val": read_split(cfg.data, "val", train=False, counter=val_counter, **common),
        }
        loop_config["train_counter"] = train_counter
    # Everything is checked: the configuration of this start is the one the next start is compared with.
    storage.write_bytes(storage.join(run_uri, "config.json"), json.dumps(run_config, indent=1).encode())
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={**cfg.resources_per_worker, "CPU": plan.cpus_per_worker},
            elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            # The best keep_checkpoints by validation top-1; Ray Train always keeps the latest as well.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_top1", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray_train_log_level),
        ),
        datasets=datasets,
        dataset_config=_exact_val_data_config(),
    )
    return trainer.fit()
