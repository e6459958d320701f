"""The model and optimizer a worker trains, built and restored in the order that keeps them on one device.

No Ray here: the GPU checks (benchmarks/gpu.py) run this on machines without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import crossvit
from pipelines.checkpoint import bare_model, load_init, restore
from pipelines.train.config import TrainConfig
from pipelines.train.optim import param_groups


def training_state(
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    peak: float,
    place: Callable[[nn.Module], nn.Module] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, int, int, dict | None]:
    """The model and optimizer a worker trains, and where to start: (model, optimizer, start epoch, step,
    the saved epoch's metrics or None).

    The order keeps everything on one device: build (seeded, so every rank and every run starts from the
    same weights) -> fine-tuning weights (``cfg.init``, fresh runs only) -> ``place`` on the device (Ray
    Train's ``prepare_model``: move + DDP; default ``.to(device)``) -> the optimizer over the placed
    parameters -> the checkpoint, whose optimizer state ``load_state_dict`` moves onto each parameter's
    device. Restoring before placing leaves AdamW's state on the CPU, and the first fused step on a GPU
    fails with "Tensors of the same index must be on the same device".
    """
    torch.manual_seed(cfg.seed)
    model = crossvit.create_model(
        cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_overrides
    )
    if checkpoint_dir is None and cfg.init:
        load_init(model, cfg.init)
    model = place(model) if place is not None else model.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(bare_model(model), cfg.weight_decay), lr=peak, fused=torch.device(device).type == "cuda"
    )
    if checkpoint_dir is None:
        return model, optimizer, 0, 0, None
    start_epoch, step, saved = restore(checkpoint_dir, bare_model(model), optimizer)
    return model, optimizer, start_epoch, step, saved
