"""Distributed CrossViT training with Ray Train: the config, the per-worker loop, and the launcher.

One ``TrainConfig`` per run. ``fit`` builds the Ray Data ingest (pipelines/ingest.py) and a TorchTrainer
whose workers run ``train_loop_per_worker``: DDP (nccl on GPUs, gloo on CPUs), normalisation and
Mixup/CutMix on the device, bf16 autocast and fused AdamW on GPUs, the learning rate stepped per iteration,
an exact evaluation over the whole validation split, and a checkpoint every epoch in the run's storage.

Failures: a lost worker or node restarts the group from the latest checkpoint (FailureConfig); a run
started again under the same name resumes from its latest checkpoint; a finished one does nothing.

Elastic runs (``num_workers: "MIN-MAX"``) start with what is available and resize, always by restarting
the group from the latest checkpoint. The optimisation stays consistent across resizes by following the
recipe's linear scaling rule: the global batch is ``batch_size x workers``, the peak learning rate is
``lr x global batch / 512``, and the schedule is a function of (fractional) epochs, not of steps, so a
resize changes the step size with the batch and nothing else (tested in tests/test_cluster.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
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
    storage: str = "runs"  # where runs go (URI)
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
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"CPU": 8, "GPU": 1}; empty: Ray's default
    elastic_resize_interval_s: float = 60.0  # how often an elastic run looks for more workers
    init: str = ""  # fine-tune from these weights: safetensors, a timm/official .pth, or a checkpoint folder
    compile: bool = False
    eval_every: int = 1
    keep_checkpoints: int = 2  # the best N by validation top-1, plus the latest
    max_failures: int = 3  # worker or node losses survived (drained/preempted nodes are not counted)
    seed: int = 0
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


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: loop_config = {"cfg": TrainConfig as a dict, "classes": the
    manifest's class list, "train_samples"} (what the driver learnt from the manifest)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["cfg"])
    _quiet_worker_logs(cfg.ray_train_log_level)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    num_classes = len(loop_config["classes"])
    steps_per_epoch = max(1, math.ceil(loop_config["train_samples"] / (cfg.batch_size * world)))
    run_uri = storage.join(cfg.storage, cfg.name)

    model = crossvit.create_model(
        cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_overrides
    )
    peak = cfg.lr * cfg.batch_size * world / 512  # the linear scaling rule, for this run's global batch
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak, fused=device.type == "cuda")
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, step, saved_metrics = restore(checkpoint, model, optimizer)
        if rank == 0:
            log.info("resuming %s after epoch %d from %s, %d workers", cfg.name, start_epoch, checkpoint.path, world)
            record_epoch(run_uri, saved_metrics)  # in case the last attempt died between its checkpoint and this
    elif cfg.init:
        load_init(model, cfg.init)
    model = ray.train.torch.prepare_model(model)  # DDP: nccl on GPUs, gloo on CPUs
    if cfg.compile:
        model = torch.compile(model)
    trackers = None
    if rank == 0 and (cfg.tensorboard or cfg.mlflow_tracking_uri):
        trackers = Trackers(run_uri, cfg.name, loop_config, cfg.tensorboard, cfg.mlflow_tracking_uri)

    last_eval = {"val_loss": float("nan"), "val_top1": 0.0, "val_top5": 0.0, "val_samples": 0}
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        # The RNG state is a function of (seed, rank, epoch): a resumed run draws what the uninterrupted one
        # would have (drop-path, erasing, Mixup/CutMix), and ranks differ from each other. So checkpoints
        # need no RNG state: re-deriving it restores exactly what a saved one would.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)
        t0 = time.monotonic()
        train_loss, seen, batches = train_one_epoch(
            model, optimizer, train_shard, cfg, num_classes, device, schedule=(epoch, steps_per_epoch, peak)
        )
        train_seconds = time.monotonic() - t0
        step += batches
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            last_eval = evaluate(model, val_shard, num_classes, cfg.batch_size, device)
        metrics = {
            "epoch": epoch,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "images_per_s": seen * world / max(train_seconds, 1e-9),  # training throughput, all workers
            "epoch_s": time.monotonic() - t0,  # training and evaluation
            "workers": world,
            "resumed": checkpoint is not None and epoch == start_epoch,  # the first epoch after a (re)start
            **last_eval,  # between evaluations the last one stands (checkpoints are ranked by it)
        }
        # The checkpoint first, then the record: metrics.json only lists epochs whose checkpoint is stored.
        with tempfile.TemporaryDirectory() as d:
            saved = None
            if rank == 0:
                save_checkpoint(Path(d), model, optimizer, loop_config, metrics)
                saved = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=saved)
        if rank == 0:
            history = record_epoch(run_uri, metrics)
            log.info(format_epoch(metrics, cfg.epochs))
            if trackers is not None:
                trackers.log(metrics)
            if epoch + 1 == cfg.epochs:
                storage.write_bytes(storage.join(run_uri, "curves.png"), plot_curves(history))
    if trackers is not None:
        trackers.close()


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
    model, optimizer, shard, cfg: TrainConfig, num_classes: int, device, schedule: tuple[int, int, float]
) -> tuple[float, int, int]:
    """One pass over this worker's share of the training split; returns (mean loss, images, batches).
    schedule = (epoch, steps per epoch, peak learning rate) places each step on the learning-rate curve."""
    from pipelines.ingest import to_model_input

    epoch, steps_per_epoch, peak = schedule
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    seen, batches, loss_sum = 0, 0, torch.zeros((), device=device)
    for batch in shard.iter_torch_batches(
        batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=4 * cfg.batch_size
    ):
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
            group["lr"] = lr_at(epoch + min(batches / steps_per_epoch, 1.0), cfg, peak)  # stepped per iteration
        with autocast:
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        seen += len(y)
        loss_sum += loss.detach()  # no host sync per step
        batches += 1
    return loss_sum.item() / max(batches, 1), seen, batches


def save_checkpoint(folder: Path, model, optimizer, loop_config: dict, metrics: dict) -> None:
    """weights.safetensors (the bare model: no DDP or compile wrapper), state.pt (optimizer, epoch, step;
    read back with weights_only=True), config.json (the run's config and class list) and metrics.json (the
    epoch's metrics).

    The learning-rate schedule is a pure function of the epoch (``lr_at``) and bf16 autocast needs no
    gradient scaler, so neither has state to save; nor has the RNG (see the loop)."""
    inner = model.module if hasattr(model, "module") else model
    inner = getattr(inner, "_orig_mod", inner)
    save_weights(inner, folder / "weights.safetensors")
    state = {"optimizer": optimizer.state_dict(), "epoch": metrics["epoch"], "step": metrics["step"]}
    torch.save(state, folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(loop_config, indent=1))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))


def restore(checkpoint, model: nn.Module, optimizer) -> tuple[int, int, dict]:
    """Load a checkpoint written by ``save_checkpoint``; returns (the epoch to start at, the step, the saved
    epoch's metrics)."""
    with checkpoint.as_directory() as d:
        load_weights(model, Path(d) / "weights.safetensors")
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        metrics = json.loads((Path(d) / "metrics.json").read_text())
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"] + 1, state["step"], metrics


def load_init(model: nn.Module, uri: str) -> None:
    """Fine-tuning start: a safetensors or .pth file, or a folder holding weights.safetensors (a checkpoint
    of another run, a registered model version), from any URI. Another class count (a new classifier) and
    another resolution (resampled position embeddings) are adapted; any other mismatch is an error."""
    if not uri.endswith((".safetensors", ".pth", ".pt")):
        uri = storage.join(uri, "weights.safetensors")
    suffix = ".safetensors" if uri.endswith(".safetensors") else ".pth"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(storage.read_bytes(uri))
        f.flush()
        load_weights(model, f.name, reset_classifier=True, resize_pos_embed=True)


def evaluate(model: nn.Module, shard, num_classes: int, batch_size: int, device) -> dict:
    """Loss, top-1 and top-5 over the whole split: each worker counts its part, then one all-reduce."""
    import torch.distributed as dist

    from pipelines.ingest import to_model_input

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
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


def fit(cfg: TrainConfig, datasets: dict | None = None):
    """Build the datasets and the TorchTrainer for ``cfg`` and run it; returns Ray Train's Result, or None
    when a run of that name has already finished (a stopped one resumes from its latest checkpoint).

    ``datasets`` replaces the ingest pipeline (the training benchmark feeds synthetic in-memory batches)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ingest import AugmentConfig, read_split
    from pipelines.shards import load_manifest

    history = load_history(storage.join(cfg.storage, cfg.name))
    if history and history[-1]["epoch"] + 1 >= cfg.epochs:
        print(f"run {cfg.name} already finished its {cfg.epochs} epochs: nothing to do")
        return None
    manifest = load_manifest(cfg.data)
    image_size = cfg.model_config().img_size
    augment = AugmentConfig(
        scale=tuple(cfg.crop_scale), rand_augment_ops=2 if cfg.rand_augment else 0, random_erasing=cfg.random_erasing
    )
    datasets = datasets or {
        "train": read_split(cfg.data, "train", image_size=image_size, train=True, augment=augment),
        "val": read_split(cfg.data, "val", image_size=image_size, train=False),
    }
    loop_config = {
        "cfg": asdict(cfg),
        "classes": manifest["classes"],  # [{index, wnid, name}]: saved with every checkpoint
        "train_samples": manifest["splits"]["train"]["samples"],
    }
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling(cfg.num_workers),
            use_gpu=cfg.use_gpu,
            resources_per_worker=cfg.resources_per_worker or None,
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
