"""Online serving throughput and latency: the Serve application under closed-loop HTTP load, against the same
model's raw batched images/s in-process (already-decoded tensors, the same batch size), in one run.

    python -m benchmarks.serve                               # crossvit_tiny_240 at 240 px, 500x375 JPEGs
    python -m benchmarks.serve --model sample                # the sample recipe's 48 px model

The application is deployed from infra/serve.yaml with one replica given every core of this machine (the
raw figure uses them all too). Each concurrency level (1, 8, 16, 32, 64 clients, each sending its next request
when the last is answered) runs for --seconds; we print requests/s, p50/p95/p99 latency and errors per
level, the CPU per request of the whole machine and of the load generator itself (it shares the cores), the
best served images/s over the levels against raw, and p50 at concurrency 1 against the model's single-image
latency; then the Open Inference Protocol's binary route at 1 and 16 clients (--oip) against /v1/classify.
Goals: served >= 0.75 raw at 16 clients; p50 at 1 <= single-image latency + 5 ms; OIP within 5 % of /v1;
zero errors. --replica-env sets the replica's environment (e.g. OMP_WAIT_POLICY=PASSIVE). The local Ray
gets Serve's fast path (pipelines.cluster.SERVE_ENV: HAProxy ingress, throughput mode); --without-fast-path
measures Serve's own Python proxy instead.

    python -m benchmarks.serve --canary shadow,split --concurrency 1,16 --oip ''

measures what a canary costs (pipelines/serve/rollout.py): the same levels with a second version of the same
model beside production, in shadow (100 %: every request run twice) and split (50 %), against the application
without a canary (the baseline, deployed first, in the same run), and the replica's memory with each.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from ray import serve

import crossvit
from crossvit.model import resolve_name
from crossvit.weights import save_weights
from pipelines.data.sample import draw_sample
from pipelines.local_s3 import free_port
from pipelines.preprocess import eval_transform, normalize
from pipelines.registry.store import Registry, version_meta
from pipelines.serve.deploy import deploy, load_serve_config
from pipelines.train.config import TrainConfig


def model_config(name: str) -> crossvit.CrossViTConfig:
    if name == "sample":
        return dataclasses.replace(TrainConfig.from_yaml("jobs/configs/sample.yaml").model_config(), num_classes=4)
    return crossvit.VARIANTS[resolve_name(name)]


def register(root: str, config: crossvit.CrossViTConfig, alias: str = "production") -> None:
    """An untrained model of ``config`` as the next version of "bench", named by ``alias`` (weights do not
    change the speed)."""
    model = crossvit.CrossViT(config)
    classes = [{"index": i, "wnid": str(i), "name": f"class {i}"} for i in range(config.num_classes)]
    reg = Registry(root)
    with tempfile.TemporaryDirectory() as d:
        save_weights(model, Path(d, "w.safetensors"))
        meta = version_meta("-", "-", {"classes": classes}, {}, config.to_dict())
        version = reg.register("bench", Path(d, "w.safetensors"), meta)
    reg.move_alias("bench", alias, version.number, expected=(None, None), why="benchmark")


def raw_rates(config: crossvit.CrossViTConfig, batch: int, rounds: int = 5) -> tuple[list[float], list[float]]:
    """(images/s at ``batch``, seconds for one image) per round, of the model in this process on decoded
    uint8 images, as a replica runs it (normalise, inference mode), with every core."""
    torch.set_num_threads(os.cpu_count())
    model = crossvit.CrossViT(config).eval()
    size = config.img_size
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8)

    def run(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(normalize(x, channels_last=False)).softmax(-1)

    run(images)
    batched, single = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        run(images)
        batched.append(batch / (time.perf_counter() - start))
        start = time.perf_counter()
        run(images[:1])
        single.append(time.perf_counter() - start)
    return batched, single


def oip_request(image: bytes, model: str = "bench") -> tuple[str, bytes, dict]:
    """An Open Inference Protocol request for one image in the binary extension, as tritonclient sends it."""
    data = struct.pack("<I", len(image)) + image
    spec = {"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}
    head = json.dumps({"inputs": [spec], "outputs": [{"name": "classes", "parameters": {"binary_data": True}}]})
    return f"/v2/models/{model}/infer", head.encode() + data, {"Inference-Header-Content-Length": str(len(head))}


def load(url: str, bodies: list[bytes], clients: int, seconds: float, oip: bool = False) -> dict:
    """Closed-loop load: ``clients`` threads, each sending its next request when the last is answered (to
    /v1/classify, or with ``oip`` to the OIP infer route in the binary extension)."""
    calls = [oip_request(b) if oip else ("/v1/classify", b, {}) for b in bodies]
    latencies: list[float] = []
    errors: list[str] = []
    batches: list[int] = []  # images in the model call that answered each request
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                route, body, headers = calls[i % len(calls)]
                r = session.post(f"{url}{route}", data=body, headers=headers, timeout=120)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    if not oip:
                        batches.append(r.json()["batch"])
                else:
                    errors.append(str(r.status_code))
            except requests.RequestException as e:
                errors.append(type(e).__name__)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    machine, own = _busy(), time.process_time()
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    machine, own = _busy() - machine, time.process_time() - own
    q = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    return {
        "clients": f"{clients} OIP" if oip else str(clients),
        "rps": len(latencies) / took,
        "p50": q[0],
        "p95": q[1],
        "p99": q[2],
        "errors": errors,
        "batch": statistics.median(batches) if batches else 0,
        # CPU seconds per answered request: all cores of the machine, and this process (the load generator)
        "cpu_ms": 1000 * machine / max(len(latencies), 1),
        "loadgen_ms": 1000 * own / max(len(latencies), 1),
    }


def _busy() -> float:
    """CPU seconds the machine has spent busy (all cores, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="crossvit_tiny_240", help="a variant name, or 'sample'")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--concurrency", default="1,8,16,32,64")
    p.add_argument("--config", default="infra/serve.yaml")
    p.add_argument("--without-fast-path", action="store_true", help="Serve's Python proxy, not SERVE_ENV's")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="application settings to override")
    p.add_argument("--replica-env", nargs="*", default=[], metavar="KEY=VALUE", help="the replica's env_vars")
    p.add_argument("--oip", default="1,16", help="concurrency levels for the OIP binary route (none: '')")
    p.add_argument("--canary", default="", help="shadow,split: measure with a canary too, against none")
    args = p.parse_args()
    if any("=" not in kv for kv in args.set):
        p.error("--set takes KEY=VALUE pairs, e.g. --set max_batch_size=32")
    if args.without_fast_path:  # read when the local Ray starts (in deploy)
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="0", RAY_SERVE_THROUGHPUT_OPTIMIZED="0")
    config = model_config(args.model)
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(32):  # ImageNet-like requests: 500x375 JPEGs, quality 90
        buf = io.BytesIO()
        draw_sample(i % 4, 4, 500, 375, rng).save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())

    serve_config = load_serve_config(args.config)
    (options,) = serve_config["applications"][0]["deployments"]
    options["ray_actor_options"]["num_cpus"] = os.cpu_count()
    options.pop("autoscaling_config", None)
    options["num_replicas"] = 1
    if args.replica_env:
        env_vars = dict(kv.split("=", 1) for kv in args.replica_env)
        options["ray_actor_options"].setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
    batch = serve_config["applications"][0]["args"]["max_batch_size"]
    before = raw_rates(config, batch)  # measured before and after serving: this machine's speed drifts
    with tempfile.TemporaryDirectory() as tmp:
        register(f"{tmp}/registry", config)
        settings = {"registry": f"{tmp}/registry", "model": "bench", **dict(kv.split("=", 1) for kv in args.set)}
        if args.canary:
            return compare_canaries(serve_config, settings, bodies, config, args)
        url = deploy(serve_config, settings, port=free_port())
        for body in bodies[:4]:  # warm up: the first requests build the pools
            requests.post(f"{url}/v1/classify", data=body, timeout=120).raise_for_status()
        levels = [load(url, bodies, int(c), args.seconds) for c in args.concurrency.split(",")]
        levels += [load(url, bodies, int(c), args.seconds, oip=True) for c in filter(None, args.oip.split(","))]
        serve.shutdown()
    after = raw_rates(config, batch)
    raw, single = statistics.median(before[0] + after[0]), statistics.median(before[1] + after[1])
    decode = statistics.median(_timed(lambda b=b: eval_transform(b, config.img_size)) for b in bodies)

    ingress = "Serve's Python proxy" if args.without_fast_path else "HAProxy + throughput mode"
    print(f"{args.model} ({config.img_size} px) on {os.cpu_count()} cores, 500x375 JPEG requests, batch {batch}, "
          f"{ingress}")  # fmt: skip
    print(f"raw in-process: {raw:.1f} img/s batched, {1000 * single:.1f} ms for one image; "
          f"decode + preprocess {1000 * decode:.1f} ms per image per core")  # fmt: skip
    print("clients   req/s    p50 ms   p95 ms   p99 ms   errors  batch p50  CPU ms/req  load generator ms/req")
    for lv in levels:
        row = f"{lv['clients']:>7s} {lv['rps']:7.1f} {lv['p50']:8.1f} {lv['p95']:8.1f} {lv['p99']:8.1f}"
        print(f"{row} {len(lv['errors']):8d} {lv['batch']:10g} {lv['cpu_ms']:11.1f} {lv['loadgen_ms']:22.1f}")
    by = {lv["clients"]: lv for lv in levels}
    best = max(lv["rps"] for lv in levels)
    print(f"served/raw at saturation = {best / raw:.2f}")
    if "16" in by:
        print(f"served/raw at 16 clients = {by['16']['rps'] / raw:.2f} (goal >= 0.75)")
    if "1" in by:
        print(f"p50 at 1 client - single-image latency = {by['1']['p50'] - 1000 * single:.1f} ms (goal <= 5 ms)")
    for c in ("1", "16"):
        if c in by and f"{c} OIP" in by:
            print(f"OIP binary / v1 req/s at {c} clients = {by[f'{c} OIP']['rps'] / by[c]['rps']:.2f} (goal >= 0.95)")
    print(f"errors: {sum(len(lv['errors']) for lv in levels)} (goal 0)")


def compare_canaries(serve_config: dict, settings: dict, bodies: list[bytes], config, args) -> None:
    """The levels without a canary, then with each of ``args.canary`` (a second version of the same model,
    named by the candidate alias); requests/s and p50 as ratios to no canary, and the replica's RSS."""
    root = settings["registry"]
    register(root, config, alias="candidate")  # version 2: the same architecture, other weights
    modes = {"none": {}, "shadow": {"alias": "candidate", "mode": "shadow", "percent": 100},
             "split": {"alias": "candidate", "mode": "split", "percent": 50}}  # fmt: skip
    port, results = free_port(), {}
    for mode in ["none", *args.canary.split(",")]:
        url = deploy(serve_config, {**settings, "canary": modes[mode]}, port=port)
        for body in bodies[:8]:  # warm up, and both versions answer before the figures start
            requests.post(f"{url}/v1/classify", data=body, timeout=120).raise_for_status()
        (replica,) = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:crossvit:Classifier" in
                      " ".join(p.info["cmdline"] or [])]  # fmt: skip
        levels = [load(url, bodies, int(c), args.seconds) for c in args.concurrency.split(",")]
        results[mode] = (levels, replica.memory_info().rss / 2**20)
        serve.delete("crossvit")
    print(f"{args.model} ({config.img_size} px) on {os.cpu_count()} cores, 500x375 JPEG requests, one replica")
    print("canary  clients   req/s    p50 ms   p95 ms  errors  replica RSS MiB   req/s / none   p50 / none")
    for mode, (levels, rss) in results.items():
        for lv, base in zip(levels, results["none"][0]):
            ratios = f"{lv['rps'] / base['rps']:14.2f} {lv['p50'] / base['p50']:12.2f}"
            print(f"{mode:>6s} {lv['clients']:>8s} {lv['rps']:7.1f} {lv['p50']:8.1f} {lv['p95']:8.1f} "
                  f"{len(lv['errors']):7d} {rss:16.0f} {ratios}")  # fmt: skip
    serve.shutdown()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
