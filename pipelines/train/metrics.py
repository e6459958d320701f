"""Per-epoch metrics beside the checkpoints: metrics.json, metrics.csv and a PNG of the training curves; and
the run's live figures as Ray metrics (``LiveMetrics``), for Prometheus and Grafana (infra/k8s/monitoring/).

matplotlib draws the curves (its object API with the Agg canvas: no display, no pyplot state).
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterable, Iterator
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


# The run's live figures as Ray metrics. Every node's metrics agent exports them to Prometheus as ray_<name>
# (infra/k8s/monitoring/: the dashboard, and the stall alert on the last one; tests/test_monitoring.py checks
# every name they query against these). All gauges, tagged with the run's name under Ray Train's own tag key.
IMAGES_PER_S = "crossvit_train_images_per_second"
EPOCH_S = "crossvit_train_epoch_seconds"
EPOCHS_DONE = "crossvit_train_epochs_done"
PROGRESS = "crossvit_train_progress_timestamp_seconds"
RUN_TAG = "ray_train_run_name"
# Ray 2.60 sends a gauge to its agent only in the report intervals (metrics_report_interval_ms, 10 s by
# default) in which it was set, and the agent drops a gauge it has not heard of for two of them: set again
# this often, a gauge stays in the export for as long as its worker lives, and leaves it soon after.
REFRESH_S = 5.0


class LiveMetrics:
    """The run's live figures, set by rank 0 alone: its figures are the whole group's (images/s comes from the
    image count summed over every worker), where every rank setting them would export the same figure once per
    worker (each worker's series apart, by its WorkerId label) for queries to de-duplicate. And rank 0's
    progress is the group's: DDP's collectives hold every rank back with the slowest, so a rank that stops
    stops rank 0 too. A thread sets the gauges again every REFRESH_S (see there), the progress time as it
    was: a stalled run keeps showing when it last moved, and a finished one leaves nothing to alert on. A batch
    costs a clock reading."""

    def __init__(self, run: str):
        # Ray imported here: this module is imported before Ray's settings are (the tests' helpers import it
        # before they set RAY_AUTH_MODE, which Ray reads once, when it is first imported).
        from ray.util import metrics

        self.tags = {RUN_TAG: run}
        described = {
            IMAGES_PER_S: "Training images/s of the last epoch, all workers",
            EPOCH_S: "The last epoch's duration, training and evaluation (s)",
            EPOCHS_DONE: "Epochs finished",
            PROGRESS: "When rank 0 last received a batch, or started (Unix time, s)",
        }
        self.gauges = {
            name: metrics.Gauge(name, description=text, tag_keys=(RUN_TAG,)) for name, text in described.items()
        }
        self.values: dict[str, float | None] = dict.fromkeys(self.gauges)  # the keys fixed: read by the thread
        self.beat()  # a group that never gets its first batch is stalled too
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="live-metrics", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.values[PROGRESS] = time.time()

    def batches(self, batches: Iterable) -> Iterator:
        """``batches``, each one marking progress as it arrives (training and validation alike)."""
        for batch in batches:
            self.beat()
            yield batch

    def epoch(self, m: dict) -> None:
        """An epoch's figures (the record that ``record_epoch`` stores), exported at once."""
        self.values.update({IMAGES_PER_S: m["images_per_s"], EPOCH_S: m["epoch_s"], EPOCHS_DONE: m["epoch"] + 1})
        self.export()

    def export(self) -> None:
        for name, value in list(self.values.items()):
            if value is not None:
                self.gauges[name].set(value, self.tags)

    def close(self) -> None:
        """Stop setting the gauges: they leave the export within two report intervals."""
        self._stop.set()

    def _refresh(self) -> None:
        while True:
            self.export()
            if self._stop.wait(REFRESH_S):
                return
