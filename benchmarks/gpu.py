"""The checks that need a GPU, in one run of pure torch (no Ray, boto3 or webdataset needed):

    python -m benchmarks.gpu [--out results.json]

1. Resuming on CUDA: a checkpoint restored the way every worker now does it (``training_state``: the model on
   its device first, then the optimizer state) takes a fused AdamW step; restored the old way (before the
   model is moved), the same step fails.
2. Decoding 500x375 JPEGs (ImageNet-like): ``decode_on_device`` (batched nvJPEG, then the evaluation or the
   training transform on the GPU) against the CPU path (``pipelines.data.augment``) on one core, times the cores.
3. The serving and labeling path without Ray: the evaluation preprocessing on N CPU threads feeding bf16
   batched inference of crossvit_small_240, against the same model on already-decoded tensors: how many
   threads keep the GPU fed.

The model's own throughput and MFU come from ``python -m benchmarks.model --model crossvit_small_240
--device cuda --batch 256 --compile-train``. Every figure is a median over rounds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

import crossvit
from pipelines.checkpoint import restore, save_checkpoint
from pipelines.data.augment import AugmentConfig, sample_rng, train_transform
from pipelines.data.sample import draw_sample
from pipelines.device import decode_on_device, to_model_input
from pipelines.preprocess import eval_transform
from pipelines.train.config import TrainConfig
from pipelines.train.optim import param_groups
from pipelines.train.state import training_state

RESULTS: dict = {}


def record(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def jpegs(n: int, width: int = 500, height: int = 375) -> list[bytes]:
    """Procedural ImageNet-sized JPEGs (shapes on noise, quality 90: about 80 KB each)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        draw_sample(i % 20, 20, width, height, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def check_resume_on_cuda(device: torch.device) -> None:
    cfg = TrainConfig(model="crossvit_small_240", drop_path=0.1)
    x = torch.randn(8, 3, 240, 240, device=device)
    y = torch.randint(0, 1000, (8,), device=device)

    def step(model, optimizer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model, optimizer, *_ = training_state(cfg, 1000, device, 1e-4)
    step(model, optimizer)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(__import__("pathlib").Path(d), model, optimizer, {"cfg": {}}, {"epoch": 0, "step": 1})
        # As every worker does now: placed on the GPU, then restored.
        model, optimizer, start, _, _ = training_state(cfg, 1000, device, 1e-4, checkpoint_dir=d)
        states = {t.device.type for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim}
        step(model, optimizer)
        record("resume_new_order", f"ok: start epoch {start}, optimizer state on {sorted(states)}, fused step ran")
        # The old order, as the worker ran it: model and fused AdamW built on the CPU, restored, then moved.
        model = crossvit.create_model(cfg.model, num_classes=1000, drop_path_rate=cfg.drop_path)
        stage = "building a fused AdamW over CPU parameters"
        try:
            old = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, fused=True)
            stage = "restoring"
            restore(d, model, old)
            model.to(device)
            stage = "the first step"
            step(model, old)
            record("resume_old_order", "no error")
        except RuntimeError as e:
            record("resume_old_order", f"fails at {stage}: {str(e).splitlines()[0][:160]}")


def timed(fn, rounds: int = 3) -> float:
    """Median seconds of ``fn`` over rounds, after one warm-up call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def check_decoding(device: torch.device, data: list[bytes], cores: int) -> None:
    size = 240
    aug = AugmentConfig()
    batch = {"key": [f"k{i}" for i in range(len(data))], "encoded": data, "label": [0] * len(data)}
    batch["epoch"] = [0] * len(data)
    n = len(data)
    sample = data[:200]
    cpu_eval = len(sample) / timed(lambda: [eval_transform(d, size) for d in sample], rounds=2)
    cpu_train = len(sample) / timed(
        lambda: [train_transform(d, size, aug, sample_rng(0, 0, str(i))) for i, d in enumerate(sample)], rounds=2
    )
    record("cpu_eval_transform_per_core_img_s", round(cpu_eval, 1))
    record("cpu_train_transform_per_core_img_s", round(cpu_train, 1))
    buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    raw = n / timed(lambda: decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device))
    record("gpu_batched_decode_only_img_s", round(raw, 1))
    for train in (False, True):
        rate = n / timed(lambda train=train: decode_on_device(batch, size=size, train=train, device=device))
        cpu = (cpu_train if train else cpu_eval) * cores
        kind = "train" if train else "eval"
        record(f"gpu_decode_on_device_{kind}_img_s", round(rate, 1))
        record(f"gpu_decode_on_device_{kind}_vs_{cores}_cpu_cores", round(rate / cpu, 2))


def check_serving_path(device: torch.device, data: list[bytes], max_threads: int, batch_size: int) -> None:
    size = 240
    model = crossvit.create_model("crossvit_small_240").to(device).eval().to(memory_format=torch.channels_last)
    ready = torch.randint(0, 255, (batch_size, size, size, 3), dtype=torch.uint8, device=device)

    def infer(images: torch.Tensor) -> None:
        x, _ = to_model_input(
            images, torch.zeros(len(images), dtype=torch.long, device=device), num_classes=1000, train=False
        )
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(x).float().softmax(-1).topk(5)

    raw = batch_size / timed(lambda: infer(ready), rounds=5)
    record("gpu_bf16_inference_decoded_img_s", round(raw, 1))
    stream = (data * ((batch_size * 4) // len(data) + 1))[: batch_size * 4]
    for threads in sorted({1, 2, 4, 8, max_threads}):
        with ThreadPoolExecutor(threads) as pool:

            def end_to_end() -> None:
                # Preprocessing of the next batch overlaps with inference of this one, as in a server.
                pending = pool.map(lambda d: eval_transform(d, size), stream[:batch_size])
                for i in range(batch_size, len(stream) + 1, batch_size):
                    images = torch.from_numpy(np.stack(list(pending))).to(device, non_blocking=True)
                    if i < len(stream):
                        pending = pool.map(lambda d: eval_transform(d, size), stream[i : i + batch_size])
                    infer(images)

            rate = len(stream) / timed(end_to_end, rounds=2)
        record(f"serving_path_{threads}_threads_img_s", round(rate, 1))
        record(f"serving_path_{threads}_threads_vs_decoded", round(rate / raw, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--device", default="cuda", help="cpu: a quick run of the script itself, without meaning")
    p.add_argument("--batch", type=int, default=256, help="inference batch of the serving check")
    args = p.parse_args()
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    record("machine", f"{name}, {cores} CPU cores, torch {torch.__version__}")
    random.seed(0)
    torch.manual_seed(0)
    checks = [
        ("resume", lambda: check_resume_on_cuda(device)),
        ("decoding", lambda: check_decoding(device, jpegs(args.images), cores)),
        ("serving", lambda: check_serving_path(device, jpegs(256), cores, args.batch)),
    ]
    for name, check in checks:
        t = time.perf_counter()
        try:
            check()
        except Exception as e:  # one check failing must not lose the others' figures
            record(f"{name}_error", f"{type(e).__name__}: {e}"[:500])
        record(f"{name}_seconds", round(time.perf_counter() - t, 1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
