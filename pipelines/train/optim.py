"""The recipe's optimiser: AdamW parameter groups and the learning-rate schedule.

The schedule is a pure function of (fractional) epochs, so checkpoints need no scheduler state and an
elastic run that changes its number of workers (and so its steps per epoch) stays on the same curve.
"""

from __future__ import annotations

import math

from torch import nn

from pipelines.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, class tokens and position embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(epoch_progress: float, cfg: TrainConfig, peak: float) -> float:
    """Linear warmup from warmup_lr, then cosine to min_lr, at ``epoch_progress`` (fractional) epochs done."""
    if epoch_progress < cfg.warmup_epochs:
        return cfg.warmup_lr + (peak - cfg.warmup_lr) * epoch_progress / cfg.warmup_epochs
    progress = (epoch_progress - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def peak_lr(cfg: TrainConfig, workers: int) -> float:
    """The linear scaling rule: lr is for a global batch of 512, scaled to this run's (batch x workers)."""
    return cfg.lr * cfg.batch_size * workers / 512
