"""The steps of ``python -m jobs.demo``: every stage of the workflow, small, on one machine."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import requests
import torch
from ray import serve

from crossvit import create_model
from pipelines import storage
from pipelines.cluster import connect
from pipelines.data.bad_samples import bad_sample_counter
from pipelines.data.dataset import DataSet
from pipelines.data.ingest import read_split
from pipelines.data.prepare import prepare
from pipelines.data.sample import SampleSpec, write_sample_dataset
from pipelines.device import to_model_input
from pipelines.label.job import LabelConfig, label, read_labels
from pipelines.local_s3 import free_port, local_s3
from pipelines.progress import Progress
from pipelines.registry.promote import best_checkpoint, promote
from pipelines.registry.store import Registry
from pipelines.serve import rollout
from pipelines.serve.deploy import deploy, load_serve_config
from pipelines.train.config import TrainConfig
from pipelines.train.launch import fit
from pipelines.train.metrics import format_epoch, load_history

DEMO_BUCKET = "s3://crossvit-demo"  # on the loopback S3 endpoint
# infra/serve.yaml's application under a name and route of its own: on a cluster that serves the real one
# (--ray-address), the demo neither replaces nor deletes it.
DEMO_APP, DEMO_ROUTE = "crossvit-demo", "/demo"
SAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "sample.yaml"
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "infra" / "serve.yaml"


def _step(title: str) -> None:
    print(f"\n== {title}")


def run(
    workdir: Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    epochs: int,
    bucket: str | None = None,
    ray_address: str | None = None,
) -> None:
    """Every stage; the artefacts under ``bucket`` (default: the loopback S3 endpoint's bucket, copied into
    ``workdir`` at the end, since the endpoint keeps them in memory only)."""
    local = bucket is None
    root = (bucket or DEMO_BUCKET).rstrip("/")
    with local_s3() if local else contextlib.nullcontext() as endpoint:
        if endpoint:
            print(f"S3-compatible endpoint on {endpoint} (moto server); AWS_ENDPOINT_URL points at it")
        # The machine's own CPUs, as a user's `ray start` or `ray.init()` gives them: training plans them
        # between its workers and the data pipeline (pipelines/cluster.py).
        # The demo's output is its own lines: Ray's notices (token authentication is on, Ray Data's execution
        # plans and "progress bars disabled", Ray's deprecation notices to itself) go to Ray's log files
        # only; errors still show. Worker processes inherit the environment from here.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        # The workers' and actors' output (Ray's notices from the raylet, the Serve controller, Ray Train's
        # actors) stays in Ray's logs; the demo shows the training epochs itself (_follow). Errors still
        # reach the demo: a failed step raises with the worker's traceback.
        connect(address=ray_address, logging_level="ERROR", log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # Progress: bars of the demo's own (pipelines/progress.py) and Ray Data's for the labeling step.
        ray.data.DataContext.get_current().enable_progress_bars = False
        results: dict[str, object] = {}
        try:
            data = _prepare(root, workdir, classes, train_per_class, val_per_class)
            data_uri = data.uri
            _ingest(data, image_size, classes)
            _step("3. Ray Train: DDP over 2 workers (gloo on CPU), checkpoints and metrics to object storage")
            results["top1"] = _train(root, data_uri, epochs, image_size, classes)
            longer = max(1, epochs // 2)
            _step(f"3b. a second, longer run: the first's best weights trained {longer} epoch(s) more")
            init = best_checkpoint(f"{root}/runs/sample").checkpoint
            _train(root, data_uri, longer, image_size, classes, name="sample-longer", init=init)
            _promote(root)
            results["served"] = _serve(root, workdir / "sample" / "val")
            results["labels"], results["labeled"] = _label(root, data_uri)
        finally:
            with contextlib.suppress(Exception):  # the demo's own application only, on a shared cluster too
                serve.delete(DEMO_APP)
            ray.shutdown()
            if local:
                kept = _keep(root, workdir / "bucket")
        _summary(workdir, kept if local else root, data_uri, results)


def _keep(root: str, folder: Path) -> Path:
    """Copy everything under ``root`` into ``folder`` (same layout, replacing an earlier demo's), so that it
    outlives the endpoint."""
    shutil.rmtree(folder, ignore_errors=True)
    for uri in storage.list_files(root):
        if uri.endswith("/"):  # a folder marker (pyarrow makes them on S3): the folders come with the files
            continue
        target = folder / uri[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(uri))
    return folder


def _summary(workdir: Path, where: Path | str, data_uri: str, results: dict) -> None:
    """Where every artefact is, the results, and the commands that run each stage on a cluster."""
    _step("what the demo made, and how to run each stage on a real cluster")
    at = str(where)
    print(f"sample images (ImageNet layout): {workdir / 'sample'}")
    print(f"shards and manifest:             {at}/datasets/sample/")
    print(f"training run:                    {at}/runs/sample/ (checkpoints, metrics.json, metrics.csv)")
    print(f"training curves:                 {at}/runs/sample/curves.png")
    print(f"model registry:                  {at}/registry/sample/")
    print(f"labels (Parquet):                {at}/labels/val/")
    print("Ray's logs (the workers' output too): /tmp/ray/session_latest/logs on the head node")
    print(f"validation top-1 of the trained model: {results['top1']:.1f}%; "
          f"accuracy of the batch labels: {results['labels']:.1f}%")  # fmt: skip
    print("example predictions, online (Serve) and in bulk (Parquet):")
    for line in [*results["served"][:2], *results["labeled"][:2]]:
        print(f"  {line}")
    b = "s3://your-bucket"
    print("on a cluster (ray start --head ..., or infra/: KubeRay, ray up), the same stages:")
    for line in (
        f"python -m jobs.prepare_data --source ~/imagenet --dest {b}/datasets/imagenet",
        f"ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/crossvit_small_240.yaml "
        f"--data {b}/datasets/imagenet --storage {b}/runs --name small-1",
        f"python -m jobs.promote --run {b}/runs/small-1 --registry {b}/registry --model crossvit-small",
        f"python -m jobs.promote --run {b}/runs/small-2 --registry {b}/registry --model crossvit-small "
        "--alias candidate",
        f"ray job submit --working-dir . -- python -m jobs.serve --registry {b}/registry --model crossvit-small "
        "--config infra/serve-gpu.yaml --host 0.0.0.0 --canary-alias candidate --canary-mode shadow",
        f"python -m jobs.rollout --url http://<serve>:8000 --registry {b}/registry --model crossvit-small",
        f"ray job submit --working-dir . -- python -m jobs.label --input {b}/datasets/imagenet --split val "
        f"--output {b}/labels/val --registry {b}/registry --model crossvit-small --use-gpu",
    ):
        print(f"  {line}")


def _prepare(root: str, workdir: Path, classes: int, train_per_class: int, val_per_class: int) -> DataSet:
    _step("1. sample data set -> WebDataset shards in object storage")
    t = time.monotonic()
    images = write_sample_dataset(workdir / "sample", SampleSpec(classes, train_per_class, val_per_class))
    print(
        f"generated {classes * (train_per_class + val_per_class)} images in ImageNet layout under {images} "
        f"({time.monotonic() - t:.1f} s)"
    )
    data_uri = f"{root}/datasets/sample"
    t = time.monotonic()
    manifest = prepare(str(images), data_uri, shard_size_mb=1)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} images in {len(info['shards'])} shards at {data_uri}/{split}/")
    print(
        f"manifest: {data_uri}/manifest.json, {len(manifest['classes'])} classes "
        f"({', '.join(c['name'] for c in manifest['classes'][:3])}, ...), {time.monotonic() - t:.1f} s"
    )
    return DataSet(data_uri, manifest)


def sample_config(image_size: int, **fields) -> TrainConfig:
    """jobs/configs/sample.yaml (the small model the demo trains) at the demo's image size."""
    cfg = TrainConfig.from_yaml(SAMPLE_CONFIG, **fields)
    cfg.model_overrides = {**cfg.model_overrides, "img_size": image_size}
    cfg.model_config()  # a size the model cannot take is an error now, not in the middle of the demo
    return cfg


def _ingest(data: DataSet, image_size: int, classes: int) -> None:
    _step("2. Ray Data streams the shards: decode + augment on CPUs, uint8 batches to the consumer")
    counter = bad_sample_counter()
    ds = read_split(data, "train", image_size=image_size, train=True, counter=counter)
    sample = sample_config(image_size)  # the same small model the training step uses
    model = create_model(sample.model, num_classes=classes, **sample.model_overrides).eval()
    total = data.samples("train")  # from the manifest prepare returned
    t = time.monotonic()
    with Progress(total, "decode + augment + forward") as progress:
        for batch in ds.iter_torch_batches(batch_size=64, local_shuffle_buffer_size=256):
            x, y = to_model_input(
                batch["image"],
                batch["label"],
                num_classes=classes,
                train=True,
                random_erasing=0.25,
                mixup_alpha=0.8,
                cutmix_alpha=1.0,
            )
            with torch.no_grad():
                logits = model(x)
            progress.update(len(batch["label"]))
    n, seconds = progress.done, time.monotonic() - t
    counts = ray.get(counter.counts.remote())
    print(
        f"one epoch: {n} training images in {seconds:.1f} s ({n / seconds:.0f} img/s, worker start-up included),"
        f" {counts['bad']} bad samples"
    )
    print(
        f"last batch: uint8 {tuple(batch['image'].shape)} -> normalised, erased, mixed {tuple(x.shape)}, "
        f"soft targets {tuple(y.shape)} -> CrossViT logits {tuple(logits.shape)}"
    )


def _train(
    root: str, data_uri: str, epochs: int, image_size: int, classes: int, name: str = "sample", init: str = ""
) -> float:
    cfg = sample_config(image_size, data=data_uri, storage=f"{root}/runs", name=name, epochs=epochs, init=init)
    run_uri = f"{root}/runs/{name}"
    before = load_history(run_uri)  # a bucket of yours may hold the run already (fit then resumes or returns)
    t = time.monotonic()
    if before and before[-1]["epoch"] + 1 >= cfg.epochs:
        last, result = before[cfg.epochs - 1], None
        print(f"the run at {run_uri} has finished its {cfg.epochs} epochs already")
    else:
        with Progress(cfg.epochs, "training", unit="epoch", file=sys.stdout) as progress:
            progress.update_to(len(before))
            with _follow(run_uri, progress):
                result = fit(cfg)  # raises when training fails
        last = load_history(run_uri)[-1]
    print(
        f"trained {cfg.epochs} epochs in {time.monotonic() - t:.0f} s: validation top-1 {last['val_top1']:.1f}% "
        f"(chance {100 / classes:.0f}%), top-5 {last['val_top5']:.1f}%"
        + (f" over {result.metrics['val_samples']} images" if result else "")
    )
    if result:
        print(f"checkpoint: s3://{result.checkpoint.path}")
    print(f"metrics: {run_uri}/metrics.json (.csv), curves: {run_uri}/curves.png")
    return last["val_top1"]


@contextlib.contextmanager
def _follow(run_uri: str, progress: Progress) -> Iterator[None]:
    """Shows each epoch as rank 0 records it in the run's metrics.json (the workers' own output stays in
    Ray's logs: the demo runs with ``log_to_driver=False``)."""
    stop = threading.Event()

    def show() -> None:
        with contextlib.suppress(Exception):  # a half-written or not yet written file: the next look
            for m in load_history(run_uri)[progress.done :]:
                progress.write(format_epoch(m, progress.total))
                progress.update(1)

    def watch() -> None:
        while not stop.wait(1.0):
            show()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        show()


def _promote(root: str) -> None:
    _step("4. the model registry: each run's best checkpoint becomes a version of 'sample'; aliases name them")
    registry = f"{root}/registry"
    for run, alias in (("sample", "production"), ("sample-longer", "candidate")):
        version, record = promote(f"{root}/runs/{run}", registry, "sample", alias=alias)
        print(
            f"registered {registry}/sample/versions/{version.number}/ (weights.safetensors, model.json) from "
            f"{version.meta['source']['checkpoint']}, top-1 {version.top1:.1f}%; {alias} -> version {record['version']}"
        )
    print(Registry(registry).table("sample"))


def _serve(root: str, val_images: Path) -> list[str]:
    _step("5. Ray Serve: production over HTTP (infra/serve.yaml), the candidate in its shadow, a few images")
    t = time.monotonic()
    config = load_serve_config(SERVE_CONFIG)
    config["applications"][0].update(name=DEMO_APP, route_prefix=DEMO_ROUTE)
    settings = {"registry": f"{root}/registry", "model": "sample", "request_log_level": "WARNING",
                "canary": {"alias": "candidate", "mode": rollout.SHADOW, "percent": 100}}  # fmt: skip
    url = deploy(config, settings, port=free_port())
    print(f"serving at {url}/v1/classify ({time.monotonic() - t:.0f} s to deploy)")
    folders = sorted(p for p in val_images.iterdir() if p.is_dir())
    lines = []
    for folder in folders[:4]:
        image = sorted(folder.iterdir())[0]
        answer = requests.post(f"{url}/v1/classify", params={"top_k": 3}, data=image.read_bytes(), timeout=60).json()
        guesses = ", ".join(f"{n} {100 * p:.0f}%" for n, p in zip(answer["names"], answer["probs"]))
        lines.append(f"POST {image.parent.name}/{image.name} -> {guesses} (version {answer['version']})")
        print(lines[-1])
    _judge_canary(url, f"{root}/registry", sorted(val_images.glob("*/*")))
    # Deleted before labeling, which plans from the CPUs that are free: on 2 cores the model's actor would not
    # fit beside the replica.
    serve.delete(DEMO_APP)
    print("deleted the demo's application; python -m jobs.serve serves the registry until Ctrl-C")
    return lines


def _judge_canary(url: str, registry: str, images: list[Path]) -> None:
    """Every validation image once through the application (the candidate shadows each), then the judge on
    the live evidence, as `python -m jobs.rollout` runs it (here the evidence comes from the application's
    Rollout deployment directly: the demo's application has no admin token)."""
    t = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        failed = sum(r.status_code != 200 for r in pool.map(lambda p: requests.post(f"{url}/v1/classify",
                                                              data=p.read_bytes(), timeout=60), images))  # fmt: skip
    board = serve.get_deployment_handle("Rollout", app_name=DEMO_APP)
    criteria = rollout.Criteria(min_requests=len(images))
    for _ in range(50):  # the replicas report every second
        evidence = board.evidence.remote(criteria.window_s).result()
        decision = rollout.judge(Registry(registry), "sample", "production", "candidate", evidence, criteria,
                                 who="jobs.demo")  # fmt: skip
        if decision.action != rollout.WAIT:
            break
        time.sleep(0.2)
    print(f"{len(images)} requests in {time.monotonic() - t:.1f} s ({failed} failed), each also run on the candidate;"
          f" the judge: {decision.action}")  # fmt: skip
    for reason in decision.reasons:
        print(f"  - {reason}")
    for role in (rollout.PRODUCTION, rollout.CANARY):
        e = decision.evidence.get(role, {})
        if e.get("requests"):
            p50, p95, confidence = e["latency_ms"]["p50"], e["latency_ms"]["p95"], e["mean_confidence"]
            figures = f"{e['requests']} {'answered' if role == rollout.PRODUCTION else 'shadowed'}"
            if p50 is not None:  # None: every one failed
                figures += f", p50/p95 {p50:.0f}/{p95:.0f} ms, mean top-1 confidence {confidence:.2f}"
            if e.get("agreement") is not None:
                figures += f", top-1 agreement {e['agreement']:.1%}, confidence gap {e['confidence_gap']:+.3f}"
            print(f"  {role} (version {e['version']}): {figures}")


def _label(root: str, data_uri: str) -> tuple[float, list[str]]:
    _step("6. batch labeling with Ray Data: the validation split -> Parquet, one row per image")
    output, registry = f"{root}/labels/val", f"{root}/registry"
    ctx = ray.data.DataContext.get_current()  # Ray Data's own bar for the whole pipeline (in a terminal)
    flags = ctx.enable_progress_bars, ctx.enable_operator_progress_bars
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars = True, False
    try:
        result = label(
            LabelConfig(input=data_uri, output=output, registry=registry, model="sample", split="val", top_k=3)
        )
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = flags
    print(result.summary())
    table = read_labels(output, columns=["path", "names", "probs", "label", "labels", "error"])
    lines = []
    for row in table.slice(0, 3).to_pylist():
        guesses = ", ".join(f"{n} {100 * p:.0f}%" for n, p in zip(row["names"], row["probs"]))
        lines.append(f"{row['path'].rsplit('/', 1)[-1]} -> {guesses}")
        print(lines[-1])
    right = sum(r["labels"] is not None and r["labels"][0] == r["label"] for r in table.to_pylist())
    print(f"accuracy of the labels against the ground truth: {100 * right / max(1, table.num_rows):.1f}% "
          f"({right} of {table.num_rows})")  # fmt: skip
    print(f"python -m jobs.label --input {data_uri} --split val --output {output} --registry {registry} --model sample")
    return 100 * right / max(1, table.num_rows), lines
