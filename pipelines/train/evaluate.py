"""Evaluation over the whole validation split, each sample exactly once, whatever the number of workers.

"val" is split among the workers without evening the parts out (pipelines/train/data_config.py), each
worker counts its part, and one all-reduce sums the counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipelines.device import to_model_input


def evaluate(model: nn.Module, batches: Iterable[dict], num_classes: int, device: torch.device) -> dict:
    """Loss, top-1 and top-5 of ``batches`` ({"image": uint8 NHWC, "label"} on ``device``, this worker's
    part of the split), summed over every worker."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    with torch.no_grad():
        for batch in batches:
            x, y = to_model_input(
                batch["image"],
                batch["label"],
                num_classes=num_classes,
                train=False,
                channels_last=device.type == "cuda",
            )
            logits = model(x).float()
            top5 = logits.topk(min(5, num_classes), dim=1).indices
            totals += torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    (top5[:, 0] == y).sum().double(),
                    (top5 == y[:, None]).any(dim=1).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": 100 * top1 / max(n, 1),
        "val_top5": 100 * top5 / max(n, 1),
        "val_samples": int(n),
    }
