"""Offline batch labeling with Ray Data: inputs -> decode (CPU tasks) -> a registered model (an autoscaling
actor pool, the model loaded once per actor) -> Parquet, streaming end to end, one row per input.

    result = label(LabelConfig(input="s3://b/images/", output="s3://b/labels/run1",
                               registry="s3://b/registry", model="crossvit-small"))

Rows: ``path`` (the input's id), ``labels`` / ``names`` / ``probs`` (top-k), ``model``, ``version``,
``problem`` (its kind: unreadable, truncated, undecodable, ...) and ``error`` (in words; both null when
labeled), ``label`` (the input's own label, where it has one: data sets and shards), and with
``embeddings`` the pooled features the head sees (both branches' CLS tokens, float16).

Resumable with Ray Data's checkpointing (``CheckpointConfig``, id column ``path``): each write task records
the ids it wrote, first as pending, then committed once its Parquet file is written; a rerun of the same
command drops the committed ids right after the read (before decoding) and deletes a pending task's file,
so the output ends with exactly one row per input. The checkpoint is kept after success, so a finished job
run again writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import torch
from ray.data.checkpoint import CheckpointConfig

from pipelines import storage
from pipelines.cluster import ResourcePlanError, connect
from pipelines.data.reader import UNDECODABLE
from pipelines.label.inputs import InputDatasource, resolve
from pipelines.preprocess import MAX_PIXELS, eval_transform, normalize
from pipelines.registry.store import Registry

log = logging.getLogger(__name__)

ACTOR_MEMORY = 2 * 2**30  # bytes Ray reserves for each model actor (crossvit_tiny_240 on CPU: 0.9 GiB)
WRITE_CPUS = 0.1  # a Parquet write task (Ray Data's default, 1, would wait for a whole free CPU)
CHECKPOINT_FOLDER = "_checkpoint"  # inside the output; pyarrow and Ray Data skip names starting with "_"
JOB_RECORD = "_label_job.json"  # what the first run labeled with (see _pin_the_job)
# The rows' format, recorded with the job: 2 added the ``problem`` column and gave a shard's own error row
# its bare URI as id. An output of another format is not resumed into (its files would not read as one).
OUTPUT_FORMAT = 2


class LabelConfigError(ValueError):
    """A rerun that would label an output differently from its first run, or an output used by something else."""


@dataclass
class LabelConfig:
    input: str
    output: str
    registry: str
    model: str
    alias: str = "production"
    version: int | None = None  # this version instead of the alias's
    split: str | None = None  # of a prepared data set; None: all
    top_k: int = 5
    batch_size: int = 64  # images per model call
    replicas: tuple[int, int] = (1, 1)  # the model's actor pool, min and max
    use_gpu: bool = False
    embeddings: bool = False
    max_pixels: int = MAX_PIXELS
    free_cpu_wait_s: float = 20.0  # how long a plan that does not fit waits for CPUs that are being freed


@dataclass(frozen=True)
class LabelPlan:
    """CPUs per decode task and per model actor."""

    decode_cpus: float
    actor_cpus: float

    def describe(self, cluster_cpus: float, replicas: tuple[int, int], resuming: bool) -> str:
        return (
            f"CPU plan: {cluster_cpus:g} free CPUs; up to {replicas[1]} model actor(s) reserving {self.actor_cpus:g} "
            f"each, decode tasks {self.decode_cpus:g} each, writes {WRITE_CPUS:g}"
            + (", 1 for Ray Data's checkpoint filter (resuming)" if resuming else "")
        )


def plan_label_cpus(cluster_cpus: float, replicas: tuple[int, int], use_gpu: bool, resuming: bool) -> LabelPlan:
    """The model's actors, the decode tasks and the Parquet writes share the CPUs; a resumed run also has Ray
    Data's checkpoint filter (an actor of 1 CPU, which Ray does not let us change). What the actors reserve
    is lowered so that a decode task and a write always fit, or it is an error with the numbers: never a
    pipeline waiting forever."""
    filter_cpus = 1.0 if resuming else 0.0
    wanted = 0.0 if use_gpu else 1.0
    decode = 1.0 if cluster_cpus - filter_cpus - replicas[1] * wanted >= 1 else 0.5
    spare = cluster_cpus - filter_cpus - decode - WRITE_CPUS
    actor = wanted if replicas[1] * wanted <= spare else math.floor(100 * spare / replicas[1]) / 100
    if spare < 0 or (not use_gpu and actor <= 0):
        raise ResourcePlanError(
            f"the cluster has {cluster_cpus:g} free CPU(s): {replicas[1]} model actor(s), decode tasks, writes"
            + (" and Ray Data's checkpoint filter (1 CPU, resuming)" if resuming else "")
            + " do not fit. Fix: start Ray with more CPUs, use fewer --replicas, or add a node"
        )
    return LabelPlan(decode, actor)


def _plan_from_free_cpus(cfg: LabelConfig, resuming: bool) -> tuple[float, LabelPlan]:
    """The plan for the CPUs free now (a Serve application or another job keeps what it holds). A job that
    just ended in this process, or on the cluster, frees its actors' CPUs a few seconds after it returns, so a
    plan that does not fit is tried again for ``cfg.free_cpu_wait_s`` before it is the error."""
    deadline = time.monotonic() + cfg.free_cpu_wait_s
    while True:
        free = ray.available_resources().get("CPU", 0)
        try:
            return free, plan_label_cpus(free, cfg.replicas, cfg.use_gpu, resuming)
        except ResourcePlanError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Decode:
    """map_batches over raw rows: the evaluation transform at the model's input size -> pixels (uint8 NHWC;
    zeros where the row has an error) beside path, label and error."""

    def __init__(self, size: int, max_pixels: int):
        self.size, self.max_pixels = size, max_pixels

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        paths = batch.column("path").to_pylist()
        problems, errors = batch.column("problem").to_pylist(), batch.column("error").to_pylist()
        pixels = np.zeros((len(paths), self.size, self.size, 3), np.uint8)
        for i, data in enumerate(batch.column("image").to_pylist()):
            if problems[i] is None:
                try:
                    pixels[i] = eval_transform(data, self.size, self.max_pixels)
                except Exception as e:  # Pillow raises many types for damaged data
                    problems[i], errors[i] = UNDECODABLE, f"cannot decode image: {type(e).__name__}: {e}"
        labels = [-1 if v is None else v for v in batch.column("label").to_pylist()]
        return {
            "path": np.asarray(paths, dtype=object),
            "pixels": pixels,
            "label": np.asarray(labels, dtype=np.int64),
            # "": none (numpy has no null string)
            "problem": np.asarray([p or "" for p in problems], dtype=object),
            "error": np.asarray([e or "" for e in errors], dtype=object),
        }


class Labeler:
    """The model's actor: loads the version once, labels batches of decoded rows."""

    def __init__(
        self, registry: str, model: str, version: int, top_k: int, embeddings: bool, use_gpu: bool, threads: int
    ):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            # Ray gives an actor as many torch threads as CPUs it reserves (1 here), but the decode tasks
            # beside it need a small part of the cores (about 3 ms of a core per image against the model's
            # 40): the model takes the cores it shares with them.
            torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        reg = Registry(registry)
        self.version = reg.get(model, version)
        self.model = reg.load(self.version, self.device)
        self.names = [c["name"] for c in self.version.classes]
        self.top_k, self.embeddings = min(top_k, len(self.names)), embeddings
        self.dim = sum(norm.normalized_shape[0] for norm in self.model.norm)  # forward_features' width

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        problems = [str(p) or None for p in batch["problem"]]
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([p is None for p in problems])
        n, k = len(errors), self.top_k
        probs = np.zeros((n, k), np.float32)
        labels = np.zeros((n, k), np.int64)
        features = np.zeros((n, self.dim), np.float16)
        if ok.any():
            x = normalize(torch.from_numpy(batch["pixels"][ok]).to(self.device), self.device.type == "cuda")
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                f = self.model.forward_features(x)
                p = self.model.forward_head(f).float().softmax(dim=-1)
            top = p.topk(k, dim=-1)
            probs[ok], labels[ok] = top.values.cpu().numpy(), top.indices.cpu().numpy()
            features[ok] = f.float().cpu().numpy().astype(np.float16)
        bad = pa.array(~ok)

        def rows(values: np.ndarray, kind: pa.DataType) -> pa.Array:  # one fixed-size list per row, null if bad
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), values.shape[1], mask=bad)

        names = np.asarray(self.names, dtype=object)[labels]
        columns = {
            "path": pa.array(list(batch["path"]), pa.string()),
            "labels": rows(labels, pa.int64()),
            "names": rows(names, pa.string()),
            "probs": rows(probs, pa.float32()),
            "model": pa.array([self.version.model] * n, pa.string()),
            "version": pa.array([self.version.number] * n, pa.int64()),
            "problem": pa.array(problems, pa.string()),
            "error": pa.array(errors, pa.string()),
            "label": pa.array([int(v) if v >= 0 else None for v in batch["label"]], pa.int64()),
        }
        if self.embeddings:
            columns["embedding"] = rows(features, pa.float16())
        return pa.table(columns)


@dataclass(frozen=True)
class LabelResult:
    output: str
    rows: int  # rows in the output (all runs)
    errors: int
    written: int  # rows this run wrote
    seconds: float

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        return (
            f"labeled {self.written:,} input(s) in {self.seconds:.1f} s ({rate:.1f} images/s); the output holds "
            f"{self.rows:,} row(s), {self.errors:,} with an error: {self.output}"
        )


def labels_dataset(output: str) -> pads.Dataset:
    """A labeling job's output as a pyarrow dataset (its Parquet files; the checkpoint folder is skipped)."""
    fs, path = storage.filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet")


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """A labeling job's output, all of it in memory: for small outputs and tests (Ray Data reads big ones:
    ``ray.data.read_parquet(output)``)."""
    return labels_dataset(output).to_table(columns=columns)


def _count(output: str) -> tuple[int, int]:
    """(rows, rows with an error) of the output's Parquet files, read column by column."""
    try:
        dataset = labels_dataset(output)
    except (FileNotFoundError, pa.ArrowInvalid):
        return 0, 0
    if not dataset.files:  # a run that failed before writing anything
        return 0, 0
    rows = dataset.count_rows()
    errors = dataset.count_rows(filter=pads.field("error").is_valid())
    return rows, errors


def _committed(fs: pa.fs.FileSystem, checkpoint_path: str) -> int:
    """Ids the checkpoint has committed (written and recorded): what a run added is the difference. Counting
    data files instead would count a killed run's uncommitted part, which the next run deletes."""
    files = [f.path for f in fs.get_file_info(pa.fs.FileSelector(checkpoint_path, allow_not_found=True))
             if f.path.endswith(".parquet") and ".pending" not in f.path]  # fmt: skip
    return pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0


def _job_record(cfg: LabelConfig, version: int) -> dict:
    return {"input": cfg.input, "split": cfg.split, "model": cfg.model, "version": version, "top_k": cfg.top_k,
            "embeddings": cfg.embeddings, "output_format": OUTPUT_FORMAT}  # fmt: skip


def _pin_the_job(cfg: LabelConfig, reg: Registry, resuming: bool) -> int:
    """The version to label with. The first run records what it labels (input, model, version, top-k,
    embeddings) in the output; a rerun must label the same way (an alias that moved meanwhile keeps the
    recorded version), else one output would mix models or schemas. An output that holds other files and no
    record is refused."""
    record_uri = storage.join(cfg.output, JOB_RECORD)
    recorded = json.loads(storage.read_bytes(record_uri)) if storage.exists(record_uri) else None
    if recorded is None:
        if resuming or storage.list_files(cfg.output, ".parquet"):
            raise LabelConfigError(
                f"{cfg.output} holds files of something else (no {JOB_RECORD}): choose another --output"
            )
        version = reg.get(cfg.model, cfg.version) if cfg.version is not None else reg.resolve(cfg.model, cfg.alias)
        storage.write_bytes(record_uri, json.dumps(_job_record(cfg, version.number), indent=1).encode())
        return version.number
    if recorded.get("output_format", 1) != OUTPUT_FORMAT:
        raise LabelConfigError(
            f"{cfg.output} was written by an earlier version of this job (rows of format "
            f"{recorded.get('output_format', 1)}, now {OUTPUT_FORMAT}: other columns and ids), so it cannot be "
            f"resumed: label into a new --output, or delete {cfg.output} to start it again"
        )
    number = cfg.version if cfg.version is not None else recorded["version"]
    wanted = _job_record(cfg, number)
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        said = ", ".join(f"{k} {old!r} then, {new!r} now" for k, (old, new) in differ.items())
        raise LabelConfigError(
            f"{cfg.output} was labeled differently ({said}): run it as before, or choose another --output"
        )
    return number


def label(cfg: LabelConfig) -> LabelResult:
    """Run (or resume) a labeling job; see the module's docstring."""
    start = time.perf_counter()
    units = resolve(cfg.input, cfg.split)  # before Ray starts: a wrong input fails at once ...
    storage.check_buckets([u.uri for u in units])  # ... as does storage we cannot reach or read
    connect()
    reg = Registry(cfg.registry)
    fs, out_path = storage.filesystem(cfg.output)
    checkpoint_path = f"{out_path.rstrip('/')}/{CHECKPOINT_FOLDER}"
    resuming = fs.get_file_info(checkpoint_path).type != pa.fs.FileType.NotFound
    version = reg.get(cfg.model, _pin_the_job(cfg, reg, resuming))
    before = _committed(fs, checkpoint_path)
    free_cpus, plan = _plan_from_free_cpus(cfg, resuming)
    log.info("%s", plan.describe(free_cpus, cfg.replicas, resuming))
    log.info("labeling %d input unit(s) of %s with %s version %d", len(units), cfg.input, cfg.model, version.number)

    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config  # restored at the end: later pipelines of this process must not inherit it
    checkpoint = CheckpointConfig(
        id_column="path", checkpoint_path=checkpoint_path, delete_checkpoint_on_success=False, override_filesystem=fs
    )
    checkpoint.checkpoint_actor_pool_max_size = 1
    ctx.checkpoint_config = checkpoint
    try:
        _run(cfg, units, version, plan, fs, out_path)
    finally:
        ctx.checkpoint_config = previous
    rows, errors = _count(cfg.output)
    written = _committed(fs, checkpoint_path) - before
    return LabelResult(cfg.output, rows, errors, written, time.perf_counter() - start)


def _run(cfg: LabelConfig, units: list, version, plan: LabelPlan, fs: pa.fs.FileSystem, out_path: str) -> None:
    """The Ray Data pipeline: read + decode (CPU tasks) -> the model (actor pool) -> Parquet."""
    # Read and decode ask for the same CPUs, so Ray fuses them into one task per shard.
    source = InputDatasource(units)
    ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks, num_cpus=plan.decode_cpus)
    ds = ds.map_batches(
        Decode(version.image_size, cfg.max_pixels), batch_size=None, batch_format="pyarrow", num_cpus=plan.decode_cpus
    )
    # Torch threads per model actor: the cores, shared by the actors (of the whole cluster, not of what is free
    # now: a job that just ended may still hold some for a moment; each actor caps it at its node's cores).
    threads = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.replicas[1]))
    ds = ds.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "registry": cfg.registry,
            "model": cfg.model,
            "version": version.number,
            "top_k": cfg.top_k,
            "embeddings": cfg.embeddings,
            "use_gpu": cfg.use_gpu,
            "threads": threads,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.replicas[0], max_size=cfg.replicas[1]),
        num_cpus=plan.actor_cpus,
        num_gpus=1 if cfg.use_gpu else 0,
        # What the model's actor holds (weights, a batch's activations). Remote arguments that differ from the
        # decode's also keep Ray Data from fusing the decode into the actor: decoding runs in CPU tasks beside
        # the model, not in turn with it.
        memory=ACTOR_MEMORY,
        batch_format="numpy",
    )
    # Ray merges a read's blocks up to its target block size (128 MiB) before the fused decode sees them, so
    # a task fetches its 256 image files (or its shard) before it decodes any of them. A 4 MiB target hands
    # them on as they arrive, but made the job 22 % slower on local files (steady 23.6 against 30.1 img/s,
    # 2 cores: smaller blocks all the way to the model); at the S3 profile the job runs at 0.98 of loopback
    # without it (benchmarks/RESULTS.md).
    ds.write_parquet(out_path, filesystem=fs, ray_remote_args={"num_cpus": WRITE_CPUS})
