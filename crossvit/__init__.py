"""CrossViT in pure PyTorch: the network, its published variants, and safe weight loading.

The names below are loaded on first use (PEP 562's module ``__getattr__``), so that importing a light
submodule (``crossvit.transforms``: the ImageNet mean and the resize rule, which every decode task needs)
does not import torch as well: about 1.5 s of CPU in each Ray process that only decodes images.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossvit.model import VARIANTS, CrossViT, CrossViTConfig, create_model, list_models, set_fused_attention
    from crossvit.weights import WeightsMismatchError, load_model, load_weights, save_weights

__all__ = [
    "VARIANTS",
    "CrossViT",
    "CrossViTConfig",
    "WeightsMismatchError",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
    "set_fused_attention",
]
_WEIGHTS = {"WeightsMismatchError", "load_model", "load_weights", "save_weights"}  # the rest: crossvit.model


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'crossvit' has no attribute {name!r}")
    return getattr(importlib.import_module("crossvit.weights" if name in _WEIGHTS else "crossvit.model"), name)
