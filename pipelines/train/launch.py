"""The driver's side of a training run: ``fit``.

Before anything starts: connect to Ray, make local paths absolute (and check they are shared on a
cluster), stop if the run has finished, compare a resumed run's configuration with the saved one, read the
data set once, plan the cluster's CPUs between the workers and the data pipeline. Then build the Ray Data
ingest and a TorchTrainer whose workers run pipelines/train/loop.py.

Failures: a lost worker or node restarts the group from the latest checkpoint (FailureConfig); a run
started again under the same name resumes from its latest checkpoint; a finished one does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines import storage
from pipelines.cluster import check_shared_path, cluster_capacity, connect, plan_training_cpus
from pipelines.data.bad_samples import bad_sample_counter
from pipelines.data.dataset import DataSet
from pipelines.data.ingest import read_split
from pipelines.train.config import ConfigChangedError, TrainConfig, config_changes, scaling
from pipelines.train.data_config import ExactValDataConfig
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.metrics import load_history

log = logging.getLogger(__name__)


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Every local path of the config made absolute once, here on the driver, so that the workers (which
    run elsewhere, in other working directories) and Ray Train read and write the same folders. Under
    ``ray job submit --working-dir`` the driver runs in a temporary copy of that folder, so a relative
    path there is an error rather than a run that vanishes with the copy; on a cluster of several nodes a
    local path must be shared storage (pipelines/cluster.py checks it from every node)."""
    in_job_copy = bool((ray.get_runtime_context().runtime_env or {}).get("working_dir"))
    resolved = {}
    for key in ("storage", "data", "init"):
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
            check_shared_path(path, key)
        else:  # read by Ray Data's tasks (data) or by every worker (init), wherever they run
            probe = os.path.join(path, "manifest.json") if key == "data" else path
            if not os.path.exists(probe):
                raise FileNotFoundError(f"{key} {probe} does not exist")
            check_shared_path(path, key, probe=probe)
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
    connect()
    cfg = resolve_paths(cfg)
    run_uri = storage.join(cfg.storage, cfg.name)
    history = load_history(run_uri)
    if history and history[-1]["epoch"] + 1 >= cfg.epochs:
        print(f"run {cfg.name} already finished its {cfg.epochs} epochs: nothing to do")
        return None
    check_resume(cfg, allow_changes)
    data = DataSet.load(cfg.data)  # read once, handed down
    run_config = {
        "cfg": cfg.to_dict(),
        "classes": data.classes,  # [{index, wnid, name}]: saved with every checkpoint
        "train_samples": data.samples("train"),
        "data_fingerprint": data.fingerprint,  # so a checkpoint knows its data without the manifest
    }

    workers = scaling(cfg.num_workers)
    capacity = cluster_capacity()  # what the cluster can become: an autoscaling one may have no CPU yet
    if cfg.use_gpu:
        capacity.check_gpus("use_gpu")
    plan = plan_training_cpus(
        capacity.most("CPU"),
        workers,
        use_gpu=cfg.use_gpu,
        cpus_per_worker=cfg.resources_per_worker.get("CPU"),
        min_ingest_cpus=cfg.min_ingest_cpus,
        cpu_nodes=capacity.nodes_with("CPU"),
    )
    log.info("CPU plan: %s", plan.describe())
    loop_config = dict(run_config)
    if datasets is None:
        # The bad-sample limit is judged once 100 samples were seen, or the whole split if it is smaller.
        counters = {s: bad_sample_counter(cfg.max_bad_fraction, min(100, data.samples(s))) for s in ("train", "val")}
        common = dict(
            image_size=cfg.model_config().img_size,
            augment=cfg.augment,
            seed=cfg.seed,
            decode_on_device=cfg.decode_on_device,
            decode_cpus=plan.decode_cpus,
        )
        datasets = {s: read_split(data, s, train=s == "train", counter=counters[s], **common) for s in counters}
        loop_config.update(train_counter=counters["train"], val_counter=counters["val"])
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
        dataset_config=ExactValDataConfig(),
    )
    return trainer.fit()
