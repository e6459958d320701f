"""Batch labeling throughput: the labeling job (pipelines/label/job.py: read, decode in CPU tasks, the model
in an actor pool, Parquet) at steady state, against the same model's raw batched images/s in-process on
already-decoded tensors (the same batch size), in one run.

    python -m benchmarks.label                                # crossvit_tiny_240 at 240 px, CPU
    python -m benchmarks.label --model sample                 # the sample recipe's 48 px model
    python -m benchmarks.label --use-gpu --small 5000 --large 25000 --batch-size 256   # on a GPU node

Inputs: --large distinct 500x375 JPEGs (ImageNet-like, quality 90) in a temporary folder (or under
--input-root, e.g. an s3:// prefix, where they are left), named by two .txt lists of URIs: the first
--small of them and all of them. The model is untrained (weights do not change the speed), registered as
version 1 of "bench" in a temporary local registry. One Ray for the whole run, as the jobs start it
(pipelines.cluster.connect: the cluster this process belongs to, else a local one with this machine's
CPUs; RAY_ADDRESS=local forces a local one); a first job on the small list warms its worker processes up
and is reported apart. Then each repeat labels both lists, each into a fresh output folder, in alternating
order. Start-up (actors, model load, planning, the final count) is the same for both sizes, so the
steady-state rate is the marginal one, (large - small) / (t_large - t_small), median over the repeats; the
large run's wall time and images/s with start-up are reported too. Read tasks take 256 images each, so the
small run should have at least as many of them as there are decode slots (CPUs not held by the model's
actors), or it runs below the steady rate and the marginal rate comes out too high: the benchmark warns.

Raw: the same model in this process, batches of --batch-size on decoded tensors, measured before and after
the jobs (this machine's speed drifts) and the median of all rounds taken: on CPU fp32 with every core
(benchmarks.serve.raw_rates), on CUDA bf16 autocast on normalised channels_last tensors already on the GPU,
as the labeling actor runs it. Goal: steady-state >= 0.85 raw (decoding hidden behind inference).

    python -m benchmarks.label --storage s3-profile          # the same, inputs in object storage
    python -m benchmarks.label --storage s3-compare          # S3 profile against loopback, files and shards
    python -m benchmarks.label --listing 1000000             # resolving and planning a corpus of names

``s3-profile`` runs the same small and large jobs and raw comparison with the JPEGs in object storage
(moto's server behind the storage proxy, pipelines/storage_proxy.py) at the proxy's S3 profile (30 ms to a
response's first byte, 90 MB/s per connection: our assumption from published measurements of S3 Standard),
goal >= 0.9 of raw; then the resume: the large job's output with a tenth of its files deleted (what a kill
at 90 % leaves) is labeled again, and the image bytes it fetches are printed against a fresh run's (goal
<= 15 %; Ray Data's checkpoint filter, which this job used before, fetched everything again).

``s3-compare`` puts the --large JPEGs in object storage as files and packed into WebDataset shards of
about 16 MB, and labels each at the proxy's S3 profile and at its loopback profile, alternately, --repeats
times: the proxy's own CPU on the same cores both times. Prints the jobs' wall times (start-up included),
S3/loopback for files and shards (goal >= 0.9) and the GETs per shard against the budget ceil(MB / 8) + 2.

``--listing N`` writes a list of N image URIs (no images), and measures resolving it and reducing it to
what is left to label on the cluster (``inputs.pending_units``, materialized in the object store): seconds
and the driver's memory growth, beside what holding the same names as units on the driver costs (how the
job enumerated its inputs before).
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import math
import os
import statistics
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

import crossvit
from benchmarks.model import images_per_s, make_step
from benchmarks.serve import model_config, raw_rates, register
from jobs.label import replicas
from pipelines import storage
from pipelines.cluster import connect
from pipelines.data.bad_samples import bad_sample_counter
from pipelines.data.sample import draw_sample
from pipelines.label.inputs import IMAGES_PER_TASK, Unit, pending_units, resolve
from pipelines.label.job import LabelConfig, LabelResult, label, output_files
from pipelines.preprocess import normalize
from pipelines.storage_proxy import LOOPBACK, S3, proxied_local_s3

GOAL = 0.85


def write_inputs(root: str, small: int, large: int) -> tuple[str, str]:
    """``large`` distinct 500x375 JPEGs (quality 90) under ``root``/images, and two .txt lists of their
    URIs, the first ``small`` and all; returns the lists' URIs. Drawn on every core (Pillow and numpy
    release the GIL)."""

    def one(i: int) -> str:
        buf = io.BytesIO()
        draw_sample(i % 4, 4, 500, 375, np.random.default_rng(i)).save(buf, format="JPEG", quality=90)
        uri = storage.join(root, "images", f"{i:06d}.jpg")
        storage.write_bytes(uri, buf.getvalue())
        return uri

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        uris = list(pool.map(one, range(large)))
    lists = storage.join(root, f"small-{small}.txt"), storage.join(root, f"large-{large}.txt")
    for uri, names in zip(lists, (uris[:small], uris)):
        storage.write_bytes(uri, "\n".join(names).encode() + b"\n")
    return lists


def raw_batched(config: crossvit.CrossViTConfig, batch: int, use_gpu: bool, rounds: int = 5) -> list[float]:
    """The model's images/s at ``batch`` in this process, per round: on CPU, benchmarks.serve.raw_rates (fp32,
    every core); on CUDA, bf16 autocast on normalised channels_last tensors already on the GPU."""
    if not use_gpu:
        return raw_rates(config, batch, rounds)[0]
    device = torch.device("cuda")
    model = crossvit.CrossViT(config).eval().to(device)
    images = torch.randint(0, 255, (batch, config.img_size, config.img_size, 3), dtype=torch.uint8, device=device)
    step = make_step(model, normalize(images, channels_last=True), train=False, bf16=True)
    for _ in range(3):  # warm-up: kernels chosen, memory allocated
        step()
    return [images_per_s(step, batch, 10, device) for _ in range(rounds)]


def run_job(lst: str, images: int, out: str, registry: str, args: argparse.Namespace, **kw) -> float:
    """One labeling job over the list ``lst`` into the fresh folder ``out``; its seconds. Every input must
    come out labeled."""
    cfg = LabelConfig(
        input=lst, output=out, registry=registry, model="bench", batch_size=args.batch_size,
        replicas=args.replicas, use_gpu=args.use_gpu, **kw,
    )  # fmt: skip
    result: LabelResult = label(cfg)
    if result.written != images or result.errors:
        raise SystemExit(f"the job over {images} images wrote {result.written} row(s), {result.errors} error(s)")
    print(f"  {images:6d} images: {result.seconds:7.1f} s, {images / result.seconds:7.1f} img/s", flush=True)
    return result.seconds


def write_shards(root: str, images: list[str], shard_bytes: int = 16 * 2**20) -> tuple[str, list[int]]:
    """The images packed into WebDataset shards of about ``shard_bytes`` under ``root``/shards: their brace
    pattern and sizes."""
    groups: list[list[tuple[int, bytes]]] = [[]]
    for i, uri in enumerate(images):
        if sum(len(d) for _, d in groups[-1]) >= shard_bytes:
            groups.append([])
        groups[-1].append((i, storage.read_bytes(uri)))
    sizes = []
    for n, group in enumerate(groups):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, data in group:
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(storage.join(root, "shards", f"shard-{n:06d}.tar"), buf.getvalue())
        sizes.append(buf.tell())
    return storage.join(root, "shards", f"shard-{{000000..{len(groups) - 1:06d}}}.tar"), sizes


def through_object_storage(args: argparse.Namespace, config: crossvit.CrossViTConfig, tmp: str) -> None:
    """The labeling job over files and over shards in object storage, at the proxy's S3 and loopback
    profiles alternately: wall times, their ratio, and GETs per shard."""
    with proxied_local_s3() as proxy:  # before Ray starts: its workers inherit AWS_ENDPOINT_URL
        root = "s3://bench-label"
        storage.ensure_bucket(root)
        _, files = write_inputs(root, args.small, args.large)
        pattern, sizes = write_shards(root, storage.read_bytes(files).decode().split())
        budget = sum(math.ceil(b / 2**20 / 8) + 2 for b in sizes)
        register(f"{tmp}/registry", config)
        connect()
        runs = itertools.count()
        run_job(files, args.large, f"{tmp}/out/{next(runs)}", f"{tmp}/registry", args)  # warm the workers up
        seconds: dict[tuple[str, str], list[float]] = {}
        gets: list[int] = []
        for r in range(args.repeats):
            for profile in (LOOPBACK, S3) if r % 2 == 0 else (S3, LOOPBACK):
                proxy.profile = profile
                for kind, input_ in (("files", files), ("shards", pattern)):
                    print(f"repeat {r + 1}, {profile.name} profile, {kind}:", flush=True)
                    proxy.reset_counts()
                    took = run_job(input_, args.large, f"{tmp}/out/{next(runs)}", f"{tmp}/registry", args)
                    seconds.setdefault((kind, profile.name), []).append(took)
                    if kind == "shards":
                        gets.append(proxy.gets(".tar"))
        ray.shutdown()
    print()
    print(f"{args.model} ({config.img_size} px) on {os.cpu_count()} cores, {args.large} 500x375 JPEGs as files "
          f"and as {len(sizes)} shards of {sum(sizes) / len(sizes) / 2**20:.1f} MB on average")  # fmt: skip
    for kind in ("files", "shards"):
        loop, s3 = (statistics.median(seconds[(kind, p)]) for p in ("loopback", "s3"))
        per_repeat = statistics.median(lo / s for lo, s in zip(seconds[(kind, "loopback")], seconds[(kind, "s3")]))
        print(f"{kind:6s}: loopback {loop:6.1f} s ({args.large / loop:5.1f} img/s), S3 {s3:6.1f} s "
              f"({args.large / s3:5.1f} img/s): S3/loopback = {loop / s3:.2f} (medians), {per_repeat:.2f} (median "
              "of the repeats' ratios; goal >= 0.9)")  # fmt: skip
    print(f"GETs per run over the shards: {max(gets)} for {len(sizes)} shards, {max(gets) / len(sizes):.2f} per "
          f"shard (budget {budget} in all)")  # fmt: skip


def resume_bytes(lst: str, images: int, tmp: str, registry: str, args: argparse.Namespace, proxy) -> None:
    """The large job labeled whole into files of 50 rows, a tenth of the files deleted (a kill at 90 %),
    then run again: the image bytes the rerun fetches against those of the fresh run."""
    out = f"{tmp}/out/resume"
    proxy.reset_counts()
    run_job(lst, images, out, registry, args, rows_per_file=50)
    fresh = proxy.bytes_sent
    fs, path = storage.filesystem(out)
    files = output_files(fs, path)
    gone = files[::10]
    left = sum(pq.read_metadata(f).num_rows for f in gone)
    for f in gone:
        fs.delete_file(f)
    proxy.reset_counts()
    cfg = LabelConfig(input=lst, output=out, registry=registry, model="bench", batch_size=args.batch_size,
                      replicas=args.replicas, use_gpu=args.use_gpu, rows_per_file=50)  # fmt: skip
    result = label(cfg)
    if result.written != left or result.rows != images:
        raise SystemExit(f"the resumed job wrote {result.written} rows for {left} left; {result.rows} in all")
    print(f"resume after deleting {len(gone)} of {len(files)} files ({left} of {images} rows): fetched "
          f"{proxy.bytes_sent:,} bytes in {proxy.gets('.jpg')} GETs of images, against {fresh:,} for the fresh "
          f"run: {proxy.bytes_sent / fresh:.1%} (goal <= 15 %)")  # fmt: skip


def listing(n: int) -> None:
    """Resolve and reduce a list of ``n`` names on the cluster; the driver's memory growth, beside holding
    the same names as units on the driver (the job's way before)."""
    import psutil
    import pyarrow.fs as pafs

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        names = f"{tmp}/names.txt"
        with open(names, "w") as f:
            f.writelines(f"s3://corpus/images/{i:09d}.jpg\n" for i in range(n))
        connect()
        before, start = proc.memory_info().rss, time.perf_counter()
        left = pending_units(resolve(names), [], pafs.LocalFileSystem(), bad_sample_counter()).materialize().count()
        seconds, grown = time.perf_counter() - start, (proc.memory_info().rss - before) / 2**20
        ray.shutdown()
        before, start = proc.memory_info().rss, time.perf_counter()
        with open(names) as f:
            held = [Unit(line.strip(), "image") for line in f]
        held_seconds, held_mb = time.perf_counter() - start, (proc.memory_info().rss - before) / 2**20
    print(f"{n:,} names: {left:,} units to label in {seconds:.1f} s, the driver's memory +{grown:.0f} MiB "
          f"(RSS after, not the peak); held on the driver as units: +{held_mb:.0f} MiB in {held_seconds:.1f} s "
          f"({len(held):,} units): {held_mb / max(grown, 1):.0f}x")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="crossvit_tiny_240", help="a variant name, or 'sample'")
    p.add_argument("--small", type=int, default=200, help="images in the small run")
    p.add_argument("--large", type=int, default=1200, help="images in the large run (also the images written)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call, in the job and raw")
    p.add_argument("--replicas", type=replicas, default=(1, 1), help="the model's actors: N or MIN-MAX")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="pairs of small and large runs")
    p.add_argument("--input-root", help="where to write the JPEGs (a folder or s3:// prefix; default: temporary)")
    p.add_argument("--storage", choices=("local", "s3-profile", "s3-compare"), default="local",
                   help="where the inputs are (see above)")  # fmt: skip
    p.add_argument("--listing", type=int, help="only measure resolving a list of this many names")
    args = p.parse_args()
    if args.listing:
        return listing(args.listing)
    if not 0 < args.small < args.large or args.repeats < 1 or args.batch_size < 1:
        p.error("need 0 < --small < --large, --repeats >= 1 and --batch-size >= 1")
    if args.use_gpu and not torch.cuda.is_available():
        p.error("--use-gpu: torch sees no CUDA device here")
    slots = (os.cpu_count() or 1) - (0 if args.use_gpu else args.replicas[1])
    tasks = math.ceil(args.small / IMAGES_PER_TASK)
    if tasks < slots:
        print(f"warning: --small {args.small} makes {tasks} read task(s) of up to "
              f"{IMAGES_PER_TASK} images for about {slots} decode slots: the steady rate will be overestimated; "
              f"use --small {IMAGES_PER_TASK * slots} or more", flush=True)  # fmt: skip
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipelines.label").setLevel(logging.INFO)  # the job's CPU plan
    config = model_config(args.model)

    if args.storage == "s3-compare":
        with tempfile.TemporaryDirectory() as tmp:
            return through_object_storage(args, config, tmp)
    with (
        tempfile.TemporaryDirectory() as tmp,
        proxied_local_s3() if args.storage == "s3-profile" else nullcontext() as proxy,
    ):
        if proxy is not None:  # before Ray starts: its workers inherit AWS_ENDPOINT_URL
            proxy.profile = S3
            storage.ensure_bucket("s3://bench-label")
        start = time.perf_counter()
        root = "s3://bench-label" if proxy is not None else args.input_root or f"{tmp}/inputs"
        small_list, large_list = write_inputs(root, args.small, args.large)
        print(f"wrote {args.large} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        register(f"{tmp}/registry", config)
        before = raw_batched(config, args.batch_size, args.use_gpu)
        print(f"raw before the jobs: {statistics.median(before):.1f} img/s", flush=True)

        start = time.perf_counter()
        connect()
        ray_start = time.perf_counter() - start
        runs = itertools.count()

        def job(lst: str, images: int) -> float:
            return run_job(lst, images, f"{tmp}/out/{next(runs)}", f"{tmp}/registry", args)

        print("first job (worker processes start):", flush=True)
        cold = job(small_list, args.small)
        small_s, large_s = [], []
        for r in range(args.repeats):
            print(f"repeat {r + 1}:", flush=True)
            order = [(small_list, args.small, small_s), (large_list, args.large, large_s)]
            for lst, images, times in order if r % 2 == 0 else reversed(order):
                times.append(job(lst, images))
        if proxy is not None:
            resume_bytes(large_list, args.large, tmp, f"{tmp}/registry", args, proxy)
        ray.shutdown()
    after = raw_batched(config, args.batch_size, args.use_gpu)
    raw = statistics.median(before + after)

    steady = [(args.large - args.small) / (tl - ts) if tl > ts else float("nan") for ts, tl in zip(small_s, large_s)]
    rate = statistics.median([s for s in steady if not math.isnan(s)] or [math.nan])
    device = "CUDA bf16" if args.use_gpu else "CPU fp32"
    where = "in object storage at the S3 profile" if args.storage == "s3-profile" else "local files"
    print()
    print(f"{args.model} ({config.img_size} px) on {os.cpu_count()} cores, {device}, 500x375 JPEGs ({where}), "
          f"batch {args.batch_size}, model actors {args.replicas[0]}-{args.replicas[1]}")  # fmt: skip
    print(f"raw in-process: {raw:.1f} img/s batched ({statistics.median(before):.1f} before the jobs, "
          f"{statistics.median(after):.1f} after)")  # fmt: skip
    print(f"Ray start-up {ray_start:.1f} s; first job ({args.small} images, cold workers) {cold:.1f} s")
    print(f"repeat  {args.small:>6d} img s  {args.large:>6d} img s  steady img/s")
    for r, (ts, tl, s) in enumerate(zip(small_s, large_s, steady), 1):
        print(f"{r:6d} {ts:13.1f} {tl:13.1f} {s:13.1f}")
    wall = statistics.median(large_s)
    print(f"large run with start-up: {wall:.1f} s wall, {args.large / wall:.1f} img/s (median)")
    print(f"steady-state: {rate:.1f} img/s (median)")
    goal = 0.9 if args.storage == "s3-profile" else GOAL
    print(f"steady/raw = {rate / raw:.2f} (goal >= {goal}): {'met' if rate / raw >= goal else 'not met'}")


if __name__ == "__main__":
    main()
