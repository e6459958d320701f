"""CrossViT in pure PyTorch: the network, its published variants, and safe weight loading."""

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
