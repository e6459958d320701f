"""The checkpoint format, written by training and read by training (resume, fine-tuning) and the registry.

A checkpoint is a folder (``<storage>/<run>/checkpoint_*/``):
- ``weights.safetensors``: the bare model (no DDP or compile wrapper), its CrossViT config in the header;
- ``state.pt``: optimizer state, epoch and step, read back with ``torch.load(weights_only=True)``;
- ``config.json``: {"cfg": the run's TrainConfig as a dict (with its version), "classes": [{index, wnid,
  name}], "train_samples", "data_fingerprint"};
- ``metrics.json``: the epoch's metrics (val_* are null when the epoch was not evaluated).

Not stored, on purpose: the learning-rate schedule is a pure function of the epoch, bf16 autocast needs no
gradient scaler, and the RNG is re-derived from (seed, rank, epoch) at every epoch start. Nothing is ever
unpickled: weights are safetensors, the rest JSON or a weights-only torch file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from crossvit.weights import load_weights, save_weights
from pipelines import storage


def bare_model(model: nn.Module) -> nn.Module:
    """The CrossViT inside a DDP and/or torch.compile wrapper."""
    inner = model.module if hasattr(model, "module") else model
    return getattr(inner, "_orig_mod", inner)


def save_checkpoint(folder: Path, model: nn.Module, optimizer, run_config: dict, metrics: dict) -> None:
    """Write the four files of a checkpoint into ``folder``."""
    save_weights(bare_model(model), folder / "weights.safetensors")
    state = {"optimizer": optimizer.state_dict(), "epoch": metrics["epoch"], "step": metrics["step"]}
    torch.save(state, folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(run_config, indent=1))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))


def restore(folder: str | Path, model: nn.Module, optimizer) -> tuple[int, int, dict]:
    """Load a checkpoint folder into a model and optimizer that are on their device already (the optimizer
    state follows each parameter's device); returns (the epoch to start at, the step, the saved metrics)."""
    folder = Path(folder)
    load_weights(model, folder / "weights.safetensors")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    metrics = json.loads((folder / "metrics.json").read_text())
    return state["epoch"] + 1, state["step"], metrics


def load_init(model: nn.Module, uri: str) -> None:
    """Fine-tuning start: a weights file (safetensors, or a timm/official PyTorch file, whatever its name:
    .pth, .pt, .bin), or a folder holding weights.safetensors (a checkpoint of another run, a registered
    model version), from any URI. Another class count (a new classifier) and another resolution (resampled
    position embeddings) are adapted; any other mismatch is an error."""
    if storage.head(uri) is None:  # not a file: a folder
        uri = storage.join(uri, "weights.safetensors")
    data = storage.read_bytes(uri)
    # Told apart by content, not by name: a safetensors file starts with its header's length and "{".
    suffix = ".safetensors" if data[8:9] == b"{" else ".pth"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        load_weights(model, f.name, reset_classifier=True, resize_pos_embed=True)
