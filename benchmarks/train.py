"""Is the input pipeline the bottleneck? Train-step images/s of the full pipeline (S3 shards -> Ray Data ->
Ray Train) against the same model, batch and workers fed synthetic in-memory uint8 batches, in one run.

    python -m benchmarks.train --epochs 4                    # the sample recipe's tiny 48 px model
    python -m benchmarks.train --epochs 3 --images-per-class 30 model=crossvit_tiny_240 "model_overrides={}" \
        batch_size=16                                          # a published model at 240 px

KEY=VALUE pairs override TrainConfig fields as in jobs.train. Prints the median images/s over the epochs
after the first of each, and the ratio pipeline/synthetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile

import numpy as np
import ray

from pipelines import storage
from pipelines.cluster import connect
from pipelines.data.dataset import load_manifest
from pipelines.data.prepare import prepare
from pipelines.data.sample import SampleSpec, write_sample_dataset
from pipelines.local_s3 import local_s3
from pipelines.train.config import TrainConfig, parse_overrides
from pipelines.train.launch import fit


def images_per_s(run_uri: str) -> float:
    history = json.loads(storage.read_bytes(storage.join(run_uri, "metrics.json")))
    return statistics.median(m["images_per_s"] for m in history[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/sample.yaml")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images-per-class", type=int, default=200)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_s3():
        write_sample_dataset(f"{tmp}/img", SampleSpec(10, args.images_per_class, 20))
        data = "s3://bench/data"
        prepare(f"{tmp}/img", data, shard_size_mb=1)
        connect(logging_level="WARNING")  # the machine's own CPUs, planned by fit
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = TrainConfig.from_yaml(
            args.config, **parse_overrides(args.overrides), data=data, storage="s3://bench/runs", epochs=args.epochs
        )
        size = cfg.model_config().img_size
        n = load_manifest(data)["splits"]["train"]["samples"]
        rng = np.random.default_rng(0)
        synthetic = {
            "train": ray.data.from_numpy(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)).map_batches(
                lambda b: {"image": b["data"], "label": np.arange(len(b["data"])) % 10}, batch_format="numpy"
            ),
            "val": ray.data.from_items([{"image": np.zeros((size, size, 3), np.uint8), "label": 0}] * 20),
        }
        fit(dataclasses.replace(cfg, name="synthetic"), datasets=synthetic)
        fit(dataclasses.replace(cfg, name="pipeline"))
        synthetic_rate, pipeline_rate = (
            images_per_s("s3://bench/runs/synthetic"),
            images_per_s("s3://bench/runs/pipeline"),
        )
        print(f"model {cfg.model} {cfg.model_overrides or ''}, {cfg.num_workers} workers x batch {cfg.batch_size}")
        print(f"synthetic in-memory batches: {synthetic_rate:8.1f} img/s")
        print(f"S3 -> Ray Data -> Ray Train: {pipeline_rate:8.1f} img/s")
        print(f"ratio pipeline/synthetic = {pipeline_rate / synthetic_rate:.2f}")


if __name__ == "__main__":
    main()
