"""What a tiny hostile image costs the Serve application to decode: for each accepted format, a file that
declares as many pixels as ``max_pixels`` allows (50 MP) and compresses to almost nothing, through the
replica's own path (pipelines/serve/images.py: header checks, then the evaluation preprocessing at 240 px),
against an ordinary 500x375 photo JPEG measured the same way. Each case runs in a fresh process, its RSS
sampled every 2 ms while it decodes (Linux: /proc/self/statm).

    python -m benchmarks.hostile
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.sample import draw_sample
from pipelines.preprocess import MAX_PIXELS

SIDE = (8000, 6250)  # 50 MP: the most the default limit lets through


def make(case: str) -> bytes:
    buf = io.BytesIO()
    flat, other = Image.new("RGB", SIDE, (10, 20, 30)), Image.new("RGB", SIDE, (40, 20, 30))
    if case == "photo 500x375 JPEG (baseline)":
        draw_sample(0, 4, 500, 375, np.random.default_rng(0)).save(buf, format="JPEG", quality=90)
    elif case == "JPEG":
        flat.save(buf, format="JPEG", quality=10)
    elif case == "MPO (2 frames)":
        flat.save(buf, format="MPO", save_all=True, append_images=[other])
    elif case == "PNG":
        flat.save(buf, format="PNG", optimize=True)
    elif case == "WebP (lossless)":
        flat.save(buf, format="WEBP", lossless=True)
    elif case == "WebP (animated, 20 frames)":
        flat.save(buf, format="WEBP", lossless=True, save_all=True, append_images=[other] * 19, duration=10)
    return buf.getvalue()


CASES = [
    "photo 500x375 JPEG (baseline)",
    "JPEG",
    "MPO (2 frames)",
    "PNG",
    "WebP (lossless)",
    "WebP (animated, 20 frames)",
]


def one(path: str) -> dict:
    """Decode the file at ``path`` as a replica does; CPU seconds and the peak RSS it added."""
    from pipelines.serve import images

    data = Path(path).read_bytes()
    images.decode(make("photo 500x375 JPEG (baseline)"), 240, MAX_PIXELS)  # imports and first-call costs
    before = peak = _rss()
    done = threading.Event()

    def watch() -> None:  # the peak while decoding (ru_maxrss would be the imports' peak)
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.process_time()
    images.decode(data, 240, MAX_PIXELS)
    cpu = time.process_time() - start
    done.set()
    watcher.join()
    return {"bytes": len(data), "cpu_s": cpu, "peak_mb": (peak - before) / 2**20}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def main() -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            path = f"{tmp}/{CASES.index(case)}"
            with open(path, "wb") as f:
                f.write(make(case))
            out = subprocess.run([sys.executable, "-m", "benchmarks.hostile", "--one", path], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            rows.append((case, json.loads(out.stdout.splitlines()[-1])))
    base = rows[0][1]
    print(f"decoding through pipelines/serve/images.py at 240 px, max_pixels {MAX_PIXELS:,}")
    print(f"{'file':30s} {'bytes':>10s} {'CPU s':>7s} {'peak MB':>8s} {'CPU x photo':>12s}")
    for case, r in rows:
        print(f"{case:30s} {r['bytes']:10,d} {r['cpu_s']:7.3f} {r['peak_mb']:8.0f} {r['cpu_s'] / base['cpu_s']:12.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
    else:
        main()
