"""Offline batch labeling with Ray Data: inputs -> decode (CPU tasks) -> a registered model (an autoscaling
actor pool, the model loaded once per actor) -> Parquet, streaming end to end, one row per input.

    result = label(LabelConfig(input="s3://b/images/", output="s3://b/labels/run1",
                               registry="s3://b/registry", model="crossvit-small"))

Rows: ``path`` (the input's id), ``labels`` / ``names`` / ``probs`` (top-k), ``model``, ``version``,
``problem`` (its kind: unreadable, truncated, undecodable, ...) and ``error`` (in words; both null when
labeled), ``label`` (the input's own label, where it has one: data sets and shards), and with
``embeddings`` the pooled features the head sees (both branches' CLS tokens, float16).

Resumable: the output's Parquet files are the record of what is done. A file is there whole or not at all
(S3 shows an object once its upload completes; a local file that a killed run left without its footer is
deleted at the next start), so the ids in the files are exactly the inputs done. A rerun of the same command
reads those ids (one column) and drops the inputs they name before fetching them (``inputs.pending_units``),
so the output ends with exactly one row per input, and a finished job run again writes nothing. Ray Data's
own checkpointing was used before: it filters after the read (every byte fetched again), in one actor that
holds every id, and doubles the files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.cluster import Capacity, ResourcePlanError, cluster_capacity, connect
from pipelines.data.bad_samples import BadDataError, bad_sample_counter, surfaced
from pipelines.data.reader import UNREADABLE
from pipelines.label.inputs import IMAGES_PER_TASK, ReadUnits, pending_units, resolve
from pipelines.label.model import ACTOR_MEMORY, GPU_BATCHES_IN_FLIGHT, Decode, Labeler
from pipelines.preprocess import MAX_PIXELS
from pipelines.registry.store import Registry

log = logging.getLogger(__name__)

WRITE_CPUS = 0.1  # a Parquet write task (Ray Data's default, 1, would wait for a whole free CPU)
JOB_RECORD = "_label_job.json"  # what the first run labeled with (see _pin_the_job)
# The rows' format, recorded with the job: 2 added the ``problem`` column and gave a shard's own error row
# its bare URI as id; 3 normalised the ids (storage.normalise). An output of another format is not resumed
# into (its files would not read as one, or its ids would not match).
OUTPUT_FORMAT = 3
ROW_BYTES = 300  # about what a row of top-5 labels takes in Parquet (path, labels, names, probs, ...)
FILE_BYTES = 128 * 2**20  # the most an output file holds by default (see LabelConfig.file_rows)
SAMPLES_PER_SHARD = 1000  # about what a 256 MB shard of ImageNet holds: the rows a shard is taken for
RETRYABLE = (UNREADABLE,)  # errors of storage, not of the data: what --retry-errors labels again
SUPERSEDED = "-kept"  # a file rewritten without some rows is <name>-kept.parquet; it replaces <name>.parquet


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
    batch_size: int | None = None  # images per model call; None: 256 on a GPU, 64 on CPUs
    replicas: tuple[int, int] = (1, 1)  # the model's actor pool, min and max
    use_gpu: bool = False
    gpus_per_actor: float = 1.0  # a fraction lets several actors share a GPU
    decode_on_gpu: bool = False  # JPEGs decoded and preprocessed on the GPU (other formats on the CPUs)
    compile: bool = False  # torch.compile the model in each actor
    embeddings: bool = False
    max_pixels: int = MAX_PIXELS
    rows_per_file: int | None = None  # rows per output file; None: about FILE_BYTES of them
    retry_errors: bool = False  # label again the rows whose error was storage's (RETRYABLE)
    max_error_fraction: float = 0.5  # more inputs than this failing (after 100) stops the job
    free_cpu_wait_s: float = 20.0  # how long a plan that does not fit waits for CPUs that are being freed

    def __post_init__(self) -> None:
        if self.decode_on_gpu and not self.use_gpu:
            raise LabelConfigError("--decode-on-gpu needs --use-gpu")
        g = self.gpus_per_actor
        if g <= 0 or (g > 1 and g != int(g)):
            raise LabelConfigError("--gpus-per-actor: a fraction of one GPU, or a whole number of them")
        if not 0 < self.max_error_fraction <= 1:
            raise LabelConfigError("--max-error-fraction: more than 0, at most 1")

    @property
    def model_batch(self) -> int:
        return self.batch_size or (256 if self.use_gpu else 64)

    def file_rows(self, inputs: int) -> int:
        """Rows per output file: ``rows_per_file``, else about FILE_BYTES of them, but at most a hundredth of
        the job's ``inputs`` (at least 1,000). Each file is the commit of its rows: a job killed at any point
        loses about a hundredth of its work, not a file's worth."""
        row = ROW_BYTES + (2 * 1152 if self.embeddings else 0)  # crossvit_base's 2 CLS tokens, float16
        return self.rows_per_file or max(1000, min(FILE_BYTES // row, inputs // 100))


# --------------------------------------------------------------------------------------------------------
# The plan: one place that divides the cluster between the model's actors, the decode tasks and the writes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelPlan:
    """What each model actor reserves (and the torch threads it runs: as many as its CPUs, so that it does
    not take the cores of the decode tasks beside it) and what each decode task reserves."""

    decode_cpus: float
    actor_cpus: float
    actor_gpus: float = 0.0

    @property
    def threads(self) -> int:
        return max(1, round(self.actor_cpus))

    def describe(self, where: str, replicas: tuple[int, int]) -> str:
        gpus = f" and {self.actor_gpus:g} GPU" if self.actor_gpus else ""
        return (
            f"plan for {where}: up to {replicas[1]} model actor(s) reserving {self.actor_cpus:g} CPU{gpus} each "
            f"({self.threads} torch thread(s)), decode tasks {self.decode_cpus:g} CPU each, writes {WRITE_CPUS:g}"
        )


def plan_label_cpus(
    node_cpus: float, replicas: tuple[int, int], use_gpu: bool, gpus_per_actor: float = 1.0, nodes: int = 1
) -> LabelPlan:
    """Divide a node's CPUs (``node_cpus``: the most one node has, or what is free on a machine shared with
    other work) for up to ``replicas[1]`` actors over ``nodes`` nodes.

    On CPUs the model is the work: decoding and preprocessing an image costs a small part of what the model
    spends on it (3 against 40 ms of a core for crossvit_tiny_240 here), so the actors of a node share all of
    its CPUs but a tenth (at least 0.2: one decode task at a time) and the writes' share. A GPU actor reserves
    1 CPU to feed its GPU (copies, results; the JPEG decode with ``decode_on_gpu``); the rest decodes."""
    per_node = math.ceil(replicas[1] / max(1, nodes))
    if use_gpu:
        actor = 1.0 if node_cpus - per_node >= 1 else math.floor(100 * max(0, node_cpus - 0.3) / per_node) / 100
        left = node_cpus - per_node * actor - WRITE_CPUS
        decode = 1.0 if left >= 1 else math.floor(100 * left) / 100
        actor_gpus = gpus_per_actor
    else:
        decode = 1.0 if node_cpus >= 10 else max(0.2, math.floor(10 * node_cpus) / 100)
        actor = math.floor(100 * (node_cpus - decode - WRITE_CPUS) / per_node) / 100
        actor_gpus = 0.0
    if decode <= 0 or (not use_gpu and actor <= 0):
        raise ResourcePlanError(
            f"{node_cpus:g} CPU(s) on a node: {per_node} model actor(s), decode tasks and writes do not fit. Fix: "
            "start Ray with more CPUs, use fewer --replicas, or add a node"
        )
    return LabelPlan(decode, actor, actor_gpus)


def plan_for(cfg: LabelConfig, capacity: Capacity, free_cpus=None) -> tuple[str, LabelPlan]:
    """The plan for this cluster. One that autoscales is planned for what it can become (its node types): it
    may have no CPU now. A fixed one is planned for the CPUs free now (a Serve application or another job
    keeps what it holds; ``free_cpus()`` says how many, and is asked again for ``cfg.free_cpu_wait_s``: a job
    that just ended frees its actors' CPUs a few seconds after it returns). A plan whose actor no node can
    ever hold is an error before anything starts."""
    if cfg.use_gpu:
        capacity.check_gpus("--use-gpu")
    gpus = cfg.gpus_per_actor if cfg.use_gpu else 0
    if not capacity.fits({"GPU": gpus}):
        raise _no_node_holds({"GPU": gpus})
    # The nodes a model actor goes to: with GPUs, GPU nodes; without, CPU nodes where there are any (a CPU job
    # on a GPU node would hold a GPU machine for CPU work).
    shapes = [r for r in capacity.shapes() if r.get("GPU", 0) >= gpus]
    if not cfg.use_gpu:
        shapes = [r for r in shapes if not r.get("GPU")] or shapes
    node_cpus = max(r.get("CPU", 0) for r in shapes)
    nodes = max(1, capacity.nodes_with("GPU" if cfg.use_gpu else "CPU"))
    if capacity.autoscaling:
        where = f"an autoscaling cluster (nodes of up to {node_cpus:g} CPUs)"
        plan = plan_label_cpus(node_cpus, cfg.replicas, cfg.use_gpu, cfg.gpus_per_actor, nodes)
    else:
        free_cpus = free_cpus or (lambda: ray.available_resources().get("CPU", 0))
        deadline = time.monotonic() + cfg.free_cpu_wait_s
        while True:
            free = free_cpus()
            where = f"{free:g} free CPUs on {nodes} node(s)"
            try:
                if free < 1:  # Ray Data's aggregation of the inputs runs tasks of 1 CPU before the model starts
                    raise ResourcePlanError("the aggregation of the inputs needs 1 CPU")
                plan = plan_label_cpus(min(free, node_cpus), cfg.replicas, cfg.use_gpu, cfg.gpus_per_actor, nodes)
                break
            except ResourcePlanError as e:
                if time.monotonic() > deadline:
                    raise ResourcePlanError(f"the cluster has {free:g} free CPU(s): {e}") from None
                time.sleep(0.5)
    actor = {"CPU": plan.actor_cpus, "GPU": plan.actor_gpus}
    if not capacity.fits(actor):
        raise _no_node_holds(actor)
    return where, plan


def _no_node_holds(actor: dict[str, float]) -> ResourcePlanError:
    return ResourcePlanError(
        f"no node, and no node type the autoscaler may add, can hold a model actor ({actor}). Fix: use "
        "--gpus-per-actor 1 or less, or a node type with more CPUs or GPUs"
    )


# --------------------------------------------------------------------------------------------------------
# The output: its files are the record of what is done
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelResult:
    output: str
    rows: int  # rows in the output (all runs)
    errors: int
    written: int  # rows this run wrote
    seconds: float
    duplicates: int = 0  # inputs named more than once (labeled once)

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        dupes = f"; {self.duplicates:,} input(s) named more than once, labeled once" if self.duplicates else ""
        return (
            f"labeled {self.written:,} input(s) in {self.seconds:.1f} s ({rate:.1f} images/s); the output holds "
            f"{self.rows:,} row(s), {self.errors:,} with an error{dupes}: {self.output}"
        )


def labels_dataset(output: str) -> pads.Dataset:
    """A labeling job's output as a pyarrow dataset (its Parquet files; names starting with ``_`` skipped)."""
    fs, path = storage.filesystem(output)
    return pads.dataset(path, filesystem=fs, format="parquet")


def read_labels(output: str, columns: list[str] | None = None) -> pa.Table:
    """A labeling job's output, all of it in memory: for small outputs and tests (Ray Data reads big ones:
    ``ray.data.read_parquet(output)``)."""
    return labels_dataset(output).to_table(columns=columns)


def output_files(fs: pa.fs.FileSystem, path: str) -> list[str]:
    """The output's complete data files. A file a killed run left without its footer (a local write cut
    short; S3 never shows a part of an object) is deleted: its rows are not done. A file that a rewrite
    without some rows replaced (``<name>-kept.parquet``, see ``_drop_rows``) is deleted if the rewrite
    completed but the deletion did not."""
    listed = fs.get_file_info(pa.fs.FileSelector(path, recursive=False, allow_not_found=True))
    found = [f for f in listed if f.type == pa.fs.FileType.File and f.base_name.endswith(".parquet")]
    found = [f for f in found if not f.base_name.startswith("_")]
    files = []
    for f in found:
        try:
            with fs.open_input_file(f.path) as handle:
                pq.read_metadata(handle)
        except (OSError, pa.ArrowInvalid) as e:
            log.warning("deleting %s: a write cut short (%s); its rows are labeled again", f.path, e)
            fs.delete_file(f.path)
            continue
        files.append(f.path)
    for path in [p for p in files if p.removesuffix(".parquet") + f"{SUPERSEDED}.parquet" in files]:
        log.warning("deleting %s: a rewrite of it without some rows is complete", path)
        fs.delete_file(path)
        files.remove(path)
    return sorted(files)


def _count(fs: pa.fs.FileSystem, files: list[str]) -> tuple[int, int]:
    """(rows, rows with an error) of the output's files, from their footers and one column."""
    if not files:
        return 0, 0
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    return dataset.count_rows(), dataset.count_rows(filter=pads.field("error").is_valid())


def _drop_rows(fs: pa.fs.FileSystem, files: list[str], problems: tuple[str, ...]) -> int:
    """Rewrite each file that holds rows with one of ``problems`` without them (``<name>-kept.parquet``,
    then the original deleted: see ``output_files`` for a run killed in between). Returns the rows dropped."""
    dropped = 0
    wanted = pa.array(problems, pa.string())
    for path in files:
        with fs.open_input_file(path) as f:
            if not pc.any(pc.is_in(pq.read_table(f, columns=["problem"]).column("problem"), wanted)).as_py():
                continue  # only the one column read
            table = pq.read_table(f)
        retry = pc.fill_null(pc.is_in(table.column("problem"), wanted), False)
        n = pc.sum(retry.cast(pa.int64())).as_py()
        kept = table.filter(pc.invert(retry))
        if kept.num_rows:
            with fs.open_output_stream(path.removesuffix(".parquet") + f"{SUPERSEDED}.parquet") as out:
                pq.write_table(kept, out)
        fs.delete_file(path)
        dropped += n
    return dropped


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


def _record_counts(cfg: LabelConfig, counts: dict) -> None:
    """Add what the run counted (inputs named more than once) to the job record."""
    record_uri = storage.join(cfg.output, JOB_RECORD)
    record = json.loads(storage.read_bytes(record_uri))
    record.update(counts)
    storage.write_bytes(record_uri, json.dumps(record, indent=1).encode())


# --------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------


def label(cfg: LabelConfig) -> LabelResult:
    """Run (or resume) a labeling job; see the module's docstring."""
    start = time.perf_counter()
    inputs = resolve(cfg.input, cfg.split)  # before Ray starts: a wrong input fails at once ...
    storage.check_buckets([cfg.input, *(u.uri for u in inputs.first())])  # ... as does storage we cannot read
    connect()
    reg = Registry(cfg.registry)
    fs, out_path = storage.filesystem(cfg.output)
    files = output_files(fs, out_path)
    version = reg.get(cfg.model, _pin_the_job(cfg, reg, resuming=bool(files)))
    if cfg.retry_errors and files:
        log.info("--retry-errors: %d row(s) of storage errors to label again", _drop_rows(fs, files, RETRYABLE))
        files = output_files(fs, out_path)
    before = _count(fs, files)[0]
    where, plan = plan_for(cfg, cluster_capacity())
    log.info("%s", plan.describe(where, cfg.replicas))
    log.info("labeling %s with %s version %d (%d row(s) done before)", cfg.input, cfg.model, version.number, before)
    counter = bad_sample_counter(cfg.max_error_fraction, min_samples=100)
    try:
        _run(cfg, inputs, files, fs, out_path, version, plan, counter)
    except Exception as e:
        verdict = ray.get(counter.verdict.remote())
        if verdict:
            raise BadDataError(f"stopped: too many inputs fail. {verdict}") from None
        raise surfaced(e) from e
    tallies = ray.get(counter.tallies.remote())
    duplicates = tallies.get("duplicates", {"count": 0, "examples": []})
    if duplicates["count"]:
        log.warning("%d input(s) were named more than once (each labeled once), e.g. %s", duplicates["count"],
                    ", ".join(duplicates["examples"][:3]))  # fmt: skip
    _record_counts(cfg, {"duplicates": duplicates})
    rows, errors = _count(fs, output_files(fs, out_path))
    return LabelResult(cfg.output, rows, errors, rows - before, time.perf_counter() - start, duplicates["count"])


def _run(cfg: LabelConfig, inputs, files: list[str], fs, out_path: str, version, plan: LabelPlan, counter) -> None:
    """The Ray Data pipelines: the pending units (materialized in the object store: an aggregation returns
    nothing before it has seen all its input anyway, and its tasks then have the CPUs before the model's
    actors take theirs), then read + decode (CPU tasks) -> the model (actor pool) -> Parquet."""
    # In blocks of one shard, or of IMAGES_PER_TASK image files: the unit of a read task.
    units = pending_units(inputs, files, fs, counter)
    units = units.repartition(target_num_rows_per_block=1 if inputs.kind == "tar" else IMAGES_PER_TASK).materialize()
    count = units.count()
    log.info("%d unit(s) to read (%s)", count, "shards" if inputs.kind == "tar" else "image files")
    file_rows = cfg.file_rows(count * (SAMPLES_PER_SHARD if inputs.kind == "tar" else 1))
    # Read and decode ask for the same CPUs, so Ray fuses them into one task per block of units. Ray merges
    # a read's blocks up to its target block size (128 MiB) before the fused decode sees them, so a task
    # fetches its 256 image files (or its shard) before it decodes any of them. A 4 MiB target hands them
    # on as they arrive, but made the job 22 % slower on local files (steady 23.6 against 30.1 img/s, 2
    # cores: smaller blocks all the way to the model); see benchmarks/RESULTS.md.
    ds = units.map_batches(ReadUnits(inputs.kind), batch_size=None, batch_format="pyarrow", num_cpus=plan.decode_cpus)
    decode = Decode(version.image_size, cfg.max_pixels, pass_jpegs=cfg.decode_on_gpu)
    ds = ds.map_batches(decode, batch_size=None, batch_format="pyarrow", num_cpus=plan.decode_cpus)
    ds = ds.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "registry": cfg.registry,
            "model": cfg.model,
            "version": version.number,
            "top_k": cfg.top_k,
            "embeddings": cfg.embeddings,
            "use_gpu": cfg.use_gpu,
            "threads": plan.threads,
            "compile": cfg.compile,
            "counter": counter,
            "max_pixels": cfg.max_pixels,
        },
        batch_size=cfg.model_batch,
        # A GPU actor works on GPU_BATCHES_IN_FLIGHT batches at once, each in a thread (and CUDA stream) of its
        # own: Ray Data runs the calls concurrently with enable_true_multi_threading (pipelines/label/model.py).
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.replicas[0],
            max_size=cfg.replicas[1],
            max_concurrent_calls_per_actor=GPU_BATCHES_IN_FLIGHT if cfg.use_gpu else None,
            enable_true_multi_threading=cfg.use_gpu,
        ),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        # What the model's actor holds (weights, a batch's activations). Remote arguments that differ from the
        # decode's also keep Ray Data from fusing the decode into the actor: decoding runs in CPU tasks beside
        # the model, not in turn with it.
        memory=ACTOR_MEMORY,
        batch_format="numpy",
    )
    ds.write_parquet(out_path, filesystem=fs, min_rows_per_file=file_rows, ray_remote_args={"num_cpus": WRITE_CPUS})
