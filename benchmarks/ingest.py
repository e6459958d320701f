"""Input pipeline throughput on the same shards and CPUs, the same augmentation (DeiT's, timm's RandAugment) on
every side, in one run:

(a) our decode + augment function in a single-process loop, times the cores: the limit if cores scaled
    perfectly;
(a') the same function in one process per core at once, nothing else running: the machine's decode limit;
(b) webdataset + torch DataLoader, one worker per core, timm's ``create_transform`` with DeiT's arguments:
    what a user would write, with the cheap wins taken (only the members it needs, decoded once, as RGB);
(c) our Ray Data pipeline (read_split) delivering torch batches to a consumer.

    python -m benchmarks.ingest --images 2000 --rounds 3

Prints images/s of each (median over rounds), (c)/(b) and (c)/(a'); the goals are >= 1.0 and >= 0.8.

    python -m benchmarks.ingest --storage s3-profile --images 2000 --rounds 3

runs (c) alone with the shards in object storage: moto's server behind the storage proxy
(pipelines/storage_proxy.py), at its S3 profile (30 ms to a response's first byte, 90 MB/s per connection:
our assumption from published measurements of S3 Standard) and at its loopback profile, alternately in each
round, the proxy's own CPU on the same cores both times. Prints the images/s of both (median), S3/loopback
(goal >= 0.9), and the GETs per shard against the budget ceil(MB / 8) + 2.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import ray
import torch
import webdataset as wds
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T

from pipelines import storage
from pipelines.cluster import connect
from pipelines.data.augment import (
    DEIT_RAND_AUGMENT,
    AugmentConfig,
    rand_augment,
    sample_rng,
    train_transform,
    with_safe_posterize,
)
from pipelines.data.bad_samples import bad_sample_counter
from pipelines.data.ingest import read_split
from pipelines.data.prepare import prepare
from pipelines.data.sample import SampleSpec, write_sample_dataset
from pipelines.storage_proxy import LOOPBACK, S3, proxied_local_s3


def make_shards(root: Path, images: int) -> Path:
    """ImageNet-like JPEGs (500 x 375) in 4 classes, written as ~16 MB shards (a few hundred images each)."""
    per_class = images // 4
    write_sample_dataset(root / "images", SampleSpec(4, per_class, 1, width=500, height=375, seed=1))
    prepare(str(root / "images"), str(root / "shards"), shard_size_mb=16, workers=os.cpu_count())
    return root / "shards"


def jpeg_bytes(shards: Path) -> list[bytes]:
    out = []
    for path in sorted((shards / "train").glob("*.tar")):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def single_process_limit(data: list[bytes], size: int) -> float:
    """(a): images/s of one process decoding and augmenting, times the number of cores."""
    aug = AugmentConfig()
    start = time.perf_counter()
    for i, d in enumerate(data):
        train_transform(d, size, aug, sample_rng(0, 0, str(i)))  # a generator per sample, as the pipeline does
    return len(data) / (time.perf_counter() - start) * os.cpu_count()


_DATA: list[bytes] = []  # the JPEGs, inherited by the forked processes of all_cores_limit


def _decode_share(args: tuple[int, int, int]) -> int:
    start, step, size = args
    aug = AugmentConfig()
    for i in range(start, len(_DATA), step):
        train_transform(_DATA[i], size, aug, sample_rng(0, 0, str(i)))
    return len(range(start, len(_DATA), step))


def all_cores_limit(pool, cores: int, size: int) -> float:
    """(a'): images/s of one process per core decoding and augmenting its share at the same time, nothing
    else running: the machine's real limit where cores do not scale perfectly (shared caches, a VM's
    neighbours), which (a) assumes they do."""
    start = time.perf_counter()
    n = sum(pool.map(_decode_share, [(k, cores, size) for k in range(cores)]))
    return n / (time.perf_counter() - start)


def rand_augment_cost(data: list[bytes], size: int) -> tuple[float, float]:
    """Milliseconds per image of timm's RandAugment as DeiT builds it, and of torchvision's at the same
    magnitude and number of operations, on the same crops: what using timm's implementation costs."""
    no_ra = AugmentConfig(auto_augment="")
    crops = [Image.fromarray(train_transform(d, size, no_ra, sample_rng(0, 0, str(i)))) for i, d in enumerate(data)]
    timm_ra = rand_augment(DEIT_RAND_AUGMENT, size, "bicubic")
    torchvision_ra = T.RandAugment(2, 27, num_magnitude_bins=31, interpolation=T.InterpolationMode.BICUBIC)
    out = []
    for ra in (timm_ra, torchvision_ra):
        start = time.perf_counter()
        for crop in crops:
            ra(crop)
        out.append(1000 * (time.perf_counter() - start) / len(crops))
    return out[0], out[1]


def webdataset_loader(shards: Path, size: int, batch: int) -> float:
    """(b): webdataset + DataLoader with one worker per core and timm's transform as DeiT builds it (without
    normalisation and random erasing, which ours leaves to the training device too): uint8 CHW out."""
    transform = create_transform(
        size, is_training=True, auto_augment=DEIT_RAND_AUGMENT, interpolation="bicubic", use_prefetcher=True
    )
    with_safe_posterize(transform)  # timm's own would raise for about 1 sample in 700 with Pillow 13
    urls = [str(p) for p in sorted((shards / "train").glob("*.tar"))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .to_tuple("jpg", "cls")  # only the members it needs, decoded once, straight to RGB
        .map_tuple(lambda b: transform(Image.open(io.BytesIO(b)).convert("RGB")), int)
        .batched(batch, partial=True)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=os.cpu_count())
    n = 0
    start = time.perf_counter()
    for _images, labels in loader:
        n += len(labels)
    return n / (time.perf_counter() - start)


def ray_pipeline(shards: Path | str, size: int, batch: int, counter) -> float:
    """(c): our read_split, consumed as torch batches."""
    ds = read_split(str(shards), "train", image_size=size, train=True, counter=counter)
    n = 0
    start = time.perf_counter()
    for b in ds.iter_torch_batches(batch_size=batch):
        n += len(b["label"])
    return n / (time.perf_counter() - start)


def through_object_storage(shards: Path, args: argparse.Namespace) -> None:
    """(c) with the shards in object storage, at the proxy's S3 and loopback profiles alternately."""
    with proxied_local_s3() as proxy:  # before Ray starts: its workers inherit AWS_ENDPOINT_URL
        uri = "s3://bench/shards"
        storage.ensure_bucket(uri)
        files = [p for p in sorted(shards.rglob("*")) if p.is_file()]
        for path in files:
            storage.upload_file(path, storage.join(uri, str(path.relative_to(shards))))
        tars = sorted((shards / "train").glob("*.tar"))  # what (c) reads
        budget = sum(math.ceil(p.stat().st_size / 2**20 / 8) + 2 for p in tars)
        connect(include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        counter = bad_sample_counter()
        ray_pipeline(uri, args.size, args.batch, counter)  # warm the workers up
        rates: dict[str, list[float]] = {"loopback": [], "s3": []}
        gets: dict[str, list[int]] = {"loopback": [], "s3": []}
        for r in range(args.rounds):
            for profile in (LOOPBACK, S3) if r % 2 == 0 else (S3, LOOPBACK):
                proxy.profile = profile
                proxy.reset_counts()
                rates[profile.name].append(ray_pipeline(uri, args.size, args.batch, counter))
                gets[profile.name].append(proxy.gets(".tar"))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} img/s ({gets[k][-1]} GETs)" for k, v in rates.items()),
                  flush=True)  # fmt: skip
        loop, s3 = statistics.median(rates["loopback"]), statistics.median(rates["s3"])
        per_round = statistics.median(s / lo for s, lo in zip(rates["s3"], rates["loopback"]))
        mb = sum(p.stat().st_size for p in tars) / 2**20 / len(tars)
        print(f"{len(tars)} shards of {mb:.1f} MB on average, {os.cpu_count()} cores, output {args.size}px")
        print(f"(c) through the proxy, loopback profile: {loop:8.1f} img/s")
        print(f"(c) through the proxy, S3 profile:       {s3:8.1f} img/s")
        print(f"S3/loopback = {s3 / loop:.2f} (medians), {per_round:.2f} (median of the rounds' ratios; goal >= 0.9)")
        print(f"GETs per epoch: {max(gets['s3'])} for {len(tars)} "
              f"shards, {max(gets['s3']) / len(tars):.2f} per shard (budget {budget} in all)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where to write the images and shards (default: a temp dir)")
    p.add_argument("--storage", choices=("local", "s3-profile"), default="local",
                   help="s3-profile: (c) alone, from object storage at the S3 profile against loopback")  # fmt: skip
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shards = make_shards(root, args.images)
        if args.storage == "s3-profile":
            return through_object_storage(shards, args)
        data = jpeg_bytes(shards)
        mean_kb = sum(map(len, data)) / len(data) / 1024
        w, h = Image.open(io.BytesIO(data[0])).size
        print(
            f"{len(data)} JPEGs of {w}x{h} ({mean_kb:.0f} KB on average), {os.cpu_count()} cores, output {args.size}px"
        )
        # Forked before Ray starts (no threads to inherit), idle while (b) and (c) run.
        _DATA[:] = data
        cores = os.cpu_count()
        pool = multiprocessing.get_context("fork").Pool(cores)
        pool.map(_decode_share, [(k, len(data), args.size) for k in range(cores)])  # imports, first calls
        connect(include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False

        counter = bad_sample_counter()  # one per dataset, as in training, where each epoch re-executes it
        ray_pipeline(shards, args.size, args.batch, counter)  # warm the workers up (imports, first tasks)
        results: dict[str, list[float]] = {"a": [], "a'": [], "b": [], "c": []}
        for r in range(args.rounds):
            results["a"].append(single_process_limit(data, args.size))
            results["a'"].append(all_cores_limit(pool, cores, args.size))
            results["b"].append(webdataset_loader(shards, args.size, args.batch))
            results["c"].append(ray_pipeline(shards, args.size, args.batch, counter))
            print(f"round {r}: " + ", ".join(f"({k}) {v[-1]:.0f}" for k, v in results.items()), flush=True)
        pool.close()
        a, a_all, b, c = (statistics.median(results[k]) for k in ("a", "a'", "b", "c"))
        print(f"(a) single process x {os.cpu_count()} cores: {a:8.1f} img/s")
        print(f"(a') {os.cpu_count()} processes at once:      {a_all:8.1f} img/s  (scaling {a_all / a:.2f} of ideal)")
        print(f"(b) webdataset + DataLoader:      {b:8.1f} img/s")
        print(f"(c) Ray Data pipeline:            {c:8.1f} img/s")
        print(f"(c)/(b) = {c / b:.2f}   (c)/(a') = {c / a_all:.2f}   (c)/(a) = {c / a:.2f}")
        timm_ms, torchvision_ms = rand_augment_cost(data[:400], args.size)
        per_image_ms = 1000 * os.cpu_count() / a
        print(
            f"RandAugment per image: timm's {timm_ms:.2f} ms, torchvision's {torchvision_ms:.2f} ms; timm's costs "
            f"{100 * (timm_ms - torchvision_ms) / per_image_ms:+.1f} % of a decode + augment ({per_image_ms:.2f} ms)"
        )


if __name__ == "__main__":
    main()
