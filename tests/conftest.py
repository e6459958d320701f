"""Shared test fixtures: tiny model configurations that run in milliseconds on 2 CPU cores."""

import pytest
import torch

from crossvit import CrossViTConfig

# Two branches (patch 12 on 48 px, patch 16 on 48 px), two multi-scale blocks: every code path of the
# published models, at a size that trains on a laptop CPU in seconds.
TINY = CrossViTConfig(
    img_size=48,
    img_scale=(1.0, 1.0),
    patch_size=(12, 16),
    embed_dim=(32, 64),
    depth=((1, 2, 0), (1, 2, 0)),
    num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0, 1.0),
    num_classes=10,
)


@pytest.fixture
def tiny_cfg() -> CrossViTConfig:
    return TINY


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
