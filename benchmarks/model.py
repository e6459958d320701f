"""Model throughput: our CrossViT against timm's same variant, same batch, same process, interleaved.

    python -m benchmarks.model --model crossvit_tiny_240 --batch 32            # CPU, fp32 eager + best config
    python -m benchmarks.model --model crossvit_small_240 --device cuda --batch 256 --bf16 --compile

Each round times our model and timm's back to back, so machine noise hits both alike; we print the
median images/s of each and the median of the per-round ratios ours/timm.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

import crossvit
from crossvit.complexity import PAPER_GMACS, count_macs
from crossvit.model import resolve_name

# Dense bf16 peak of the accelerators we quote model FLOP utilisation for (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 3090": 71.0}


def make_step(model: nn.Module, x: torch.Tensor, train: bool, bf16: bool) -> Callable[[], None]:
    """One inference forward, or one full train step (forward, backward, AdamW update)."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast:
                model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def train_step() -> None:
        with autocast:
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def images_per_s(step: Callable[[], None], batch: int, iters: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return batch * iters / (time.perf_counter() - t0)


def compare(steps: dict[str, Callable[[], None]], batch: int, iters: int, rounds: int, device) -> dict[str, list]:
    """Warm every step up, then time them round-robin; returns images/s per round for each."""
    for step in steps.values():
        for _ in range(2):
            step()
    results: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(rounds):
        # Alternate the order so that neither side always runs right after the other.
        for name in order if r % 2 == 0 else reversed(order):
            results[name].append(images_per_s(steps[name], batch, iters, device))
    return results


def report(title: str, results: dict[str, list[float]], baseline: str) -> None:
    print(f"\n{title}")
    base = results[baseline]
    for name, values in results.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"  {name:32s} {statistics.median(values):9.1f} img/s   ratio vs {baseline}: {ratio:.3f}")


def build(args, name: str, device: torch.device, ours: bool, channels_last: bool = False) -> nn.Module:
    model = crossvit.create_model(name) if ours else timm.create_model(name)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="crossvit_tiny_240")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="steps per timed measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-best", action="store_true", help="only the fp32 eager comparison")
    p.add_argument("--compile-train", action="store_true", help="also compile the train step (slow to build on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = crossvit.VARIANTS[resolve_name(args.model)].img_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    print(f"{args.model} batch {args.batch} on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")

    cuda = device.type == "cuda"
    for train in (False, True):
        kind = "train step" if train else "inference"
        steps = {
            "timm fp32 eager": make_step(build(args, args.model, device, False), x, train, False),
            "ours fp32 eager": make_step(build(args, args.model, device, True), x, train, False),
        }
        if cuda:
            steps["timm bf16 eager"] = make_step(build(args, args.model, device, False), x, train, True)
            steps["ours bf16 eager"] = make_step(build(args, args.model, device, True), x, train, True)
        if not args.skip_best:
            # The fastest configurations we offer: bf16 autocast, channels_last, torch.compile.
            cl = x.to(memory_format=torch.channels_last)
            steps["ours bf16 channels_last"] = make_step(build(args, args.model, device, True, True), cl, train, True)
            if not train or args.compile_train:
                compiled = torch.compile(build(args, args.model, device, True, True))
                steps["ours bf16 channels_last compile"] = make_step(compiled, cl, train, True)
        results = compare(steps, args.batch, args.iters, args.rounds, device)
        report(f"{kind} (median of {args.rounds} rounds x {args.iters} steps)", results, "timm fp32 eager")
        if cuda:
            try:
                macs = count_macs(crossvit.create_model(args.model), size)
            except ImportError:  # fvcore (a dev dependency) is not installed: the paper's count, which ours matches
                macs = PAPER_GMACS[resolve_name(args.model)] * 1e9
            flops_per_img = 2 * macs * (3 if train else 1)
            gpu = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
            for name, values in results.items():
                if "bf16" in name and peak:
                    mfu = statistics.median(values) * flops_per_img / (peak * 1e12)
                    print(f"  MFU {name}: {100 * mfu:.1f}% of {peak:.0f} TFLOP/s ({gpu})")


if __name__ == "__main__":
    main()
