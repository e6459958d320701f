"""Per-epoch metrics beside the checkpoints: metrics.json, metrics.csv and a PNG of the training curves.

Pillow draws the curves, so plotting needs no extra dependency.
"""

from __future__ import annotations

import csv
import io
import json

from PIL import Image, ImageDraw

from pipelines import storage

COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "images_per_s",
    "epoch_s",
    "workers",  # the worker group's size in this epoch (elastic runs resize)
    "step",  # optimizer steps since the start of the run
    "resumed",  # this epoch started the run again from a checkpoint (after a failure, a resize or a restart)
)


def load_history(run_uri: str) -> list[dict]:
    try:
        return json.loads(storage.read_bytes(storage.join(run_uri, "metrics.json")))
    except FileNotFoundError:
        return []


def record_epoch(run_uri: str, metrics: dict) -> list[dict]:
    """Add one epoch (replacing an earlier record of the same epoch, as after a restart) and rewrite the files."""
    history = [m for m in load_history(run_uri) if m["epoch"] != metrics["epoch"]]
    history = sorted([*history, {k: metrics.get(k) for k in COLUMNS}], key=lambda m: m["epoch"])
    storage.write_bytes(storage.join(run_uri, "metrics.json"), json.dumps(history, indent=1).encode())
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    storage.write_bytes(storage.join(run_uri, "metrics.csv"), out.getvalue().encode())
    return history


def format_epoch(m: dict, epochs: int) -> str:
    """The concise line the driver prints per epoch."""
    eta = (epochs - m["epoch"] - 1) * m["epoch_s"]
    evaluated = m.get("val_top1") is not None  # epochs between evaluations (eval_every) have none
    val = f" val {m['val_loss']:.3f} top1 {m['val_top1']:5.1f} top5 {m['val_top5']:5.1f}" if evaluated else ""
    return (
        f"epoch {m['epoch'] + 1}/{epochs} lr {m['lr']:.2e} train {m['train_loss']:.3f}{val} "
        f"{m['images_per_s']:.0f} img/s {m['epoch_s']:.0f}s ETA {eta / 60:.1f} min"
    )


def plot_curves(history: list[dict], width: int = 640, height: int = 360) -> bytes:
    """Two panels as a PNG: losses (train, val) and validation top-1 (%), against the epoch."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    epochs = [m["epoch"] + 1 for m in history]
    panels = [
        ("loss", [("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14))], 0),
        ("val top-1 %", [("val_top1", (44, 160, 44))], width // 2),
    ]
    for title, series, x0 in panels:
        left, top, right, bottom = x0 + 40, 30, x0 + width // 2 - 15, height - 30
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 10), title, fill="black")
        for i, (key, colour) in enumerate(series):  # the legend: each series' name in its colour
            draw.text((left + 90 + 80 * i, 10), key, fill=colour)
        values = [m[k] for k, _ in series for m in history if m.get(k) is not None]
        if not values or not epochs:
            continue
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        draw.text((x0 + 2, top), f"{hi:.2f}", fill="black")
        draw.text((x0 + 2, bottom - 10), f"{lo:.2f}", fill="black")
        span = max(epochs[-1] - epochs[0], 1)
        for key, colour in series:
            points = [
                (left + (e - epochs[0]) / span * (right - left), bottom - (m[key] - lo) / (hi - lo) * (bottom - top))
                for e, m in zip(epochs, history)
                if m.get(key) is not None
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left, bottom + 8), f"epoch {epochs[0]} .. {epochs[-1]}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
