"""What every Ray Train worker runs: ``train_loop_per_worker``.

DDP (nccl on GPUs, gloo on CPUs); batches from the worker's share of the Ray Data stream, normalised,
erased and mixed on the device (pipelines/device.py), or decoded there too (``decode_on_device``); bf16
autocast and fused AdamW on GPUs; the learning rate set every iteration (pipelines/train/optim.py); an exact
evaluation over the whole validation split every ``eval_every`` epochs (pipelines/train/evaluate.py); a
checkpoint every epoch (pipelines/checkpoint.py), then the epoch's line and records, and rank 0's live Ray
metrics (metrics.py: throughput, epoch time, and progress as each batch arrives, for the stall alert).

Elastic runs resize by restarting the group from the latest checkpoint. The optimisation stays consistent
across resizes by the recipe's linear scaling rule: the global batch is ``batch_size x workers``, the peak
learning rate ``lr x global batch / 512``, and the schedule a function of (fractional) epochs, not of
steps, so a resize changes the step size with the batch and nothing else (tests/test_cluster.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipelines import storage
from pipelines.checkpoint import save_checkpoint
from pipelines.cluster import StalledError, watch
from pipelines.data.bad_samples import BadDataError, surfaced
from pipelines.device import decode_on_device, to_model_input
from pipelines.train.config import TrainConfig
from pipelines.train.evaluate import evaluate
from pipelines.train.metrics import LiveMetrics, format_epoch, plot_curves, record_epoch
from pipelines.train.optim import lr_at, peak_lr
from pipelines.train.state import training_state
from pipelines.train.tracking import Trackers

log = logging.getLogger(__name__)


class RunStoppedError(RuntimeError):
    """An earlier attempt of this run stopped it (too many bad samples, no batch for too long)."""


def train_loop_per_worker(loop_config: dict) -> None:
    """loop_config = {"cfg": TrainConfig as a dict, "classes": the data set's class list, "train_samples",
    "data_fingerprint", and "train_counter" / "val_counter": the data sets' counter actors, where each epoch
    is announced and a stop is recorded (absent when the data sets are not ours)}."""
    cfg = TrainConfig.from_dict(loop_config["cfg"])
    _quiet_worker_logs(cfg.ray_train_log_level)
    counter, val_counter = loop_config.get("train_counter"), loop_config.get("val_counter")
    if counter is not None and (reason := ray.get(counter.stopped.remote())):
        # An earlier attempt stopped the run for a reason a restart cannot fix: end this one at once.
        raise RunStoppedError(reason)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()
    num_classes = len(loop_config["classes"])
    steps_per_epoch = max(1, math.ceil(loop_config["train_samples"] / (cfg.batch_size * world)))
    run_uri = storage.join(cfg.storage, cfg.name)
    peak = peak_lr(cfg, world)

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
    live = LiveMetrics(cfg.name) if rank == 0 else None
    trackers = None
    if rank == 0 and (cfg.tensorboard or cfg.mlflow_tracking_uri):
        trackers = Trackers(run_uri, cfg.name, run_record(loop_config), cfg.tensorboard, cfg.mlflow_tracking_uri)

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
        decoded: dict = {}  # where device_batches decoded this epoch's images, for the metrics
        batches = device_batches(train_shard, cfg, device, train=True, counter=counter, decoded=decoded)
        if live is not None:
            batches = live.batches(batches)
        loss_sum, seen, count = train_one_epoch(
            model, optimizer, batches, cfg, num_classes, device, schedule=(epoch, steps_per_epoch, peak)
        )
        train_seconds = time.monotonic() - t0
        loss_sum, seen, count = _sum_over_workers(loss_sum, seen, count)
        step += count // world
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:
            val_batches = device_batches(val_shard, cfg, device, train=False, counter=val_counter, stop=counter)
            if live is not None:
                val_batches = live.batches(val_batches)
            val = evaluate(model, val_batches, num_classes, device)
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
            "decoded_on": decoded.get("on"),  # "ray-data" (CPU tasks) or the device (decode_on_device)
            **val,  # None when this epoch was not evaluated
        }
        # The checkpoint first, then the record: metrics.json only lists epochs whose checkpoint is stored.
        with tempfile.TemporaryDirectory() as d:
            saved_checkpoint = None
            if rank == 0:
                save_checkpoint(Path(d), model, optimizer, run_record(loop_config), metrics)
                saved_checkpoint = ray.train.Checkpoint.from_directory(d)
            # Ray Train ranks checkpoints by val_top1 (keep_checkpoints): an epoch that was not evaluated
            # reports NaN, which Ray ranks below every number, so only evaluated checkpoints compete on their
            # own result (never on an earlier epoch's) and the others go first; the latest is always kept.
            ranked = {**metrics, "val_top1": metrics["val_top1"] if evaluated else float("nan")}
            ray.train.report(ranked, checkpoint=saved_checkpoint)
        if rank == 0:
            history = record_epoch(run_uri, metrics)
            log.info(format_epoch(metrics, cfg.epochs))
            live.epoch(metrics)
            if trackers is not None:
                trackers.log(metrics)
            if epoch + 1 == cfg.epochs:
                storage.write_bytes(storage.join(run_uri, "curves.png"), plot_curves(history))
    if trackers is not None:
        trackers.close()
    if live is not None:
        live.close()


def run_record(loop_config: dict) -> dict:
    """What a checkpoint records of its run (its config.json): the config, the class list, the training
    set's size and the data set's fingerprint."""
    return {k: loop_config[k] for k in ("cfg", "classes", "train_samples", "data_fingerprint") if k in loop_config}


def device_batches(
    shard, cfg: TrainConfig, device: torch.device, *, train: bool, counter=None, stop=None, decoded: dict | None = None
) -> Iterator[dict]:
    """A worker's batches of one epoch as {"image": uint8 NHWC, "label"} on its device: decoded on CPUs by
    the ingest, or here (``cfg.decode_on_device``: nvJPEG on GPUs). Watched: no batch within
    ``batch_timeout_s`` is an error, and that or too many bad samples is recorded in ``stop`` (the training
    set's counter; ``counter`` by default) so that Ray Train's restarts end at once."""
    shuffle = 4 * cfg.batch_size if train else None
    decoded = {} if decoded is None else decoded
    decoded["on"] = device.type if cfg.decode_on_device else "ray-data"
    if not cfg.decode_on_device:
        raw = shard.iter_torch_batches(batch_size=cfg.batch_size, device=device, local_shuffle_buffer_size=shuffle)
        what = "training batch" if train else "validation batch"
        yield from _watched(raw, cfg.batch_timeout_s, what, counter, stop or counter)
        return
    raw = shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=shuffle)
    size = cfg.model_config().img_size
    for batch in _watched(raw, cfg.batch_timeout_s, "encoded batch", counter, stop or counter):
        images, labels = decode_on_device(
            batch, size=size, train=train, device=device, augment=cfg.augment, seed=cfg.seed, counter=counter
        )
        yield {"image": images, "label": labels}


def _watched(batches: Iterable, timeout_s: float, what: str, counter=None, stop=None) -> Iterator:
    """Batches with the stall watchdog (pipelines/cluster.py); at their end, the data's bad-sample verdict
    from ``counter`` (a decode task may have ended before its limit-passing report was answered); a data error
    raised as itself, and both recorded as the run's stop reason in ``stop``."""
    try:
        yield from watch(batches, timeout_s, what)
        if counter is not None and (problem := ray.get(counter.verdict.remote())):
            raise BadDataError(problem)
    except Exception as e:
        plain = surfaced(e)
        if stop is not None and isinstance(plain, BadDataError | StalledError):
            ray.get(stop.stop.remote(f"{type(plain).__name__}: {plain}"))
        if plain is e:
            raise
        raise plain from e


def train_one_epoch(
    model, optimizer, batches, cfg: TrainConfig, num_classes: int, device, schedule: tuple[int, int, float]
) -> tuple[torch.Tensor, int, int]:
    """One pass over this worker's share of the training split; returns (summed loss as a tensor, images,
    batches). schedule = (epoch, steps per epoch, peak learning rate) places each step on the learning-rate
    curve."""
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
            random_erasing=cfg.augment.random_erasing,
            mixup_alpha=cfg.augment.mixup,
            cutmix_alpha=cfg.augment.cutmix,
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


def _sum_over_workers(loss_sum: torch.Tensor, seen: int, count: int) -> tuple[float, int, int]:
    """(summed loss, images, batches) summed over every worker, in one all-reduce on the loss's device."""
    totals = torch.stack(
        [loss_sum.double(), *(loss_sum.new_tensor(float(v), dtype=torch.float64) for v in (seen, count))]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, seen, count = totals.tolist()
    return loss, int(seen), int(count)


def _quiet_worker_logs(ray_train_level: str) -> None:
    """Keep the driver's log to one line per epoch. Ray 2.60 logs every report at INFO under a logger named
    by its file's path, which RunConfig's LoggingConfig does not reach and no public API names (so the one
    private import, guarded); botocore announces where it found its credentials (never the credentials
    themselves) at INFO."""
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(ray_train_level)
    except ImportError:  # another Ray version: its own logging config applies
        pass
