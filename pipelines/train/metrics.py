"""Per-epoch metrics beside the checkpoints: metrics.json, metrics.csv and a PNG of the training curves.

matplotlib draws the curves (its object API with the Agg canvas: no display, no pyplot state).
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING

from pipelines import storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def curves_figure(history: list[dict]) -> Figure:
    """Three panels against the epoch: the losses (train, validation), validation top-1 and top-5 (%), and
    the learning rate (log scale), each with axes, ticks, a grid and a legend. Epochs without an evaluation
    (``eval_every``) leave gaps in the validation lines."""
    from matplotlib.figure import Figure  # here: 0.5 s to import, for the end of a run only

    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")  # no pyplot: no global state, any thread
    loss, accuracy, lr = fig.subplots(1, 3)
    epochs = [m["epoch"] + 1 for m in history]

    def line(ax, key: str, label: str, **style) -> None:
        points = [(e, m[key]) for e, m in zip(epochs, history) if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label, **style)

    line(loss, "train_loss", "train")
    line(loss, "val_loss", "validation")
    line(accuracy, "val_top1", "top-1")
    line(accuracy, "val_top5", "top-5")
    line(lr, "lr", "learning rate", color="tab:purple")
    lr.set_yscale("log")
    for ax, title, unit in ((loss, "loss", "cross-entropy"), (accuracy, "validation accuracy", "%"),
                            (lr, "learning rate", "lr")):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend()
    return fig


def plot_curves(history: list[dict]) -> bytes:
    """The training curves as a PNG (matplotlib, rendered without a display)."""
    buf = io.BytesIO()
    curves_figure(history).savefig(buf, format="png")
    return buf.getvalue()
