"""Saving and loading CrossViT weights without ever unpickling.

Our own files are safetensors. Foreign ``.pth`` files (timm's, or the official IBM/CrossViT release) are
read with ``torch.load(weights_only=True)`` and converted to our key layout. Anything that does not fit the
model is an error naming the keys, unless the caller asked for that particular change: a new classifier
(``reset_classifier``) or a new input resolution (``resize_pos_embed``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crossvit.model import CrossViT, CrossViTConfig

__all__ = [
    "WeightsMismatchError",
    "convert_official",
    "load_model",
    "load_state_dict",
    "load_weights",
    "resample_pos_embed",
    "save_weights",
]

CLASSIFIER_KEY = re.compile(r"^head\.\d+\.(weight|bias)$")
POS_EMBED_KEY = re.compile(r"^pos_embed_\d+$")


class WeightsMismatchError(ValueError):
    """The checkpoint does not fit the model and the caller did not ask for the difference."""


def save_weights(model: CrossViT, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write the state dict as safetensors, with the model config in the header."""
    meta = {"crossvit_config": json.dumps(model.cfg.to_dict()), **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or (weights-only) PyTorch file into a flat state dict in our key layout."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return convert_official(state)


def convert_official(state: Mapping) -> dict[str, torch.Tensor]:
    """Map the official IBM/CrossViT (or a DDP-wrapped) state dict onto timm's = our key layout.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips ``module.`` prefixes and renames the
    ParameterList keys ``pos_embed.0`` / ``cls_token.0`` to ``pos_embed_0`` / ``cls_token_0``.
    """
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsMismatchError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key.removeprefix("module.")
        key = re.sub(r"^(pos_embed|cls_token)\.(\d+)$", r"\1_\2", key)
        out[key] = value
    return out


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resample a (1, 1 + g*g, C) position embedding to a new_grid x new_grid patch grid (bicubic);
    the CLS position is kept as it is."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise WeightsMismatchError(f"position embedding with {grid.shape[1]} patches is not a square grid")
    if old == new_grid:
        return pos_embed
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, C).to(pos_embed.dtype)
    return torch.cat((cls, grid), dim=1)


def load_weights(
    model: CrossViT,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    reset_classifier: bool = False,
    resize_pos_embed: bool = False,
) -> CrossViT:
    """Load a checkpoint into ``model`` strictly, except for the differences asked for.

    reset_classifier: heads of another shape (another class count) keep the model's fresh initialisation.
    resize_pos_embed: position embeddings of another grid (another resolution) are resampled bicubically.
    Missing, unexpected or other mis-shaped keys raise WeightsMismatchError naming them.
    """
    state = load_state_dict(source) if isinstance(source, (str, Path)) else convert_official(source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsMismatchError(
            f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    grids = dict(zip((f"pos_embed_{b}" for b in range(model.num_branches)), model.cfg.grid_sizes))
    refused = []
    for key, value in state.items():
        if value.shape == own[key].shape:
            continue
        if reset_classifier and CLASSIFIER_KEY.match(key):
            state[key] = own[key]
        elif resize_pos_embed and POS_EMBED_KEY.match(key):
            state[key] = resample_pos_embed(value, grids[key])
        else:
            refused.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    if refused:
        hint = "; pass reset_classifier=True for another class count or resize_pos_embed=True for another image size"
        raise WeightsMismatchError("shape mismatch: " + ", ".join(refused) + hint)
    model.load_state_dict(state, strict=True)
    return model


def saved_config(path: str | Path) -> CrossViTConfig:
    """The model config in the header of a file written by ``save_weights``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "crossvit_config" not in meta:
        raise WeightsMismatchError(f"{path} carries no crossvit_config; build the model and use load_weights")
    return CrossViTConfig.from_dict(json.loads(meta["crossvit_config"]))


def load_model(path: str | Path) -> CrossViT:
    """Rebuild a model from a file written by ``save_weights``: its config travels in the header."""
    return load_weights(CrossViT(saved_config(path)), path)
