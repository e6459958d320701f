"""Input pipeline throughput on the same shards and CPUs, in one run:

(a) our decode + augment function in a single-process loop, times the cores: the machine's limit;
(b) webdataset + torch DataLoader, one worker per core, torchvision transforms: what a user would pick;
(c) our Ray Data pipeline (read_split) delivering torch batches to a consumer.

    python -m benchmarks.ingest --images 2000 --rounds 3

Prints images/s of each (median over rounds), (c)/(b) and (c)/(a).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from pipelines.augment import AugmentConfig, sample_rng, train_transform
from pipelines.bad_samples import bad_sample_counter
from pipelines.cluster import connect
from pipelines.sample_data import SampleSpec, write_sample_dataset
from pipelines.shards import prepare


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


def webdataset_loader(shards: Path, size: int, batch: int) -> float:
    """(b): webdataset + DataLoader with one worker per core and the usual torchvision pipeline."""
    import webdataset as wds
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandAugment(2, 9, interpolation=T.InterpolationMode.BILINEAR),
            T.PILToTensor(),
        ]
    )
    urls = [str(p) for p in sorted((shards / "train").glob("*.tar"))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, lambda y: y)
        .batched(batch, partial=True)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=os.cpu_count())
    n = 0
    start = time.perf_counter()
    for _images, labels in loader:
        n += len(labels)
    return n / (time.perf_counter() - start)


def ray_pipeline(shards: Path, size: int, batch: int, counter) -> float:
    """(c): our read_split, consumed as torch batches."""
    from pipelines.ingest import read_split

    ds = read_split(str(shards), "train", image_size=size, train=True, counter=counter)
    n = 0
    start = time.perf_counter()
    for b in ds.iter_torch_batches(batch_size=batch):
        n += len(b["label"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where to write the images and shards (default: a temp dir)")
    args = p.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shards = make_shards(root, args.images)
        data = jpeg_bytes(shards)
        mean_kb = sum(map(len, data)) / len(data) / 1024
        w, h = Image.open(io.BytesIO(data[0])).size
        print(
            f"{len(data)} JPEGs of {w}x{h} ({mean_kb:.0f} KB on average), {os.cpu_count()} cores, output {args.size}px"
        )
        connect(include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False

        counter = bad_sample_counter()  # one per dataset, as in training, where each epoch re-executes it
        ray_pipeline(shards, args.size, args.batch, counter)  # warm the workers up (imports, first tasks)
        results: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for r in range(args.rounds):
            results["a"].append(single_process_limit(data, args.size))
            results["b"].append(webdataset_loader(shards, args.size, args.batch))
            results["c"].append(ray_pipeline(shards, args.size, args.batch, counter))
            print(f"round {r}: " + ", ".join(f"({k}) {v[-1]:.0f}" for k, v in results.items()), flush=True)
        a, b, c = (statistics.median(results[k]) for k in "abc")
        print(f"(a) single process x {os.cpu_count()} cores: {a:8.1f} img/s")
        print(f"(b) webdataset + DataLoader:      {b:8.1f} img/s")
        print(f"(c) Ray Data pipeline:            {c:8.1f} img/s")
        print(f"(c)/(b) = {c / b:.2f}   (c)/(a) = {c / a:.2f}")


if __name__ == "__main__":
    main()
