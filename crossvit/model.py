"""CrossViT: Cross-Attention Multi-Scale Vision Transformer (Chen, Fan, Panda, ICCV 2021).

One file, read top to bottom: the building blocks, the network, then the table of published variants.

Two branches see the same image at two patch sizes: the small-patch branch (12 px on the 240 px input)
is narrow and shallow, the large-patch branch (16 px on a 224 px bicubic resize made inside the model)
is wide and deeper. After every multi-scale block the branches exchange information through
cross-attention in which only one CLS token is the query, so fusion costs O(N), not O(N^2).

Parameter names and shapes are identical to timm's ``crossvit_*`` models, so their state dicts load
with ``strict=True``; ``crossvit.weights`` converts the official IBM/CrossViT checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VARIANTS", "CrossViT", "CrossViTConfig", "create_model", "list_models"]

LAYER_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossViTConfig:
    """Everything that defines a CrossViT network; saved beside every checkpoint."""

    img_size: int = 240
    # Each branch sees the input resized to img_size * scale (240 -> 240 and 224 for the published models).
    img_scale: tuple[float, ...] = (1.0, 224 / 240)
    patch_size: tuple[int, ...] = (12, 16)
    embed_dim: tuple[int, ...] = (96, 192)
    # One (small-branch blocks, large-branch blocks, cross-attention depth) triple per multi-scale block.
    depth: tuple[tuple[int, ...], ...] = ((1, 4, 0), (1, 4, 0), (1, 4, 0))
    num_heads: tuple[int, ...] = (3, 3)
    # MLP ratio per branch; the last entry belongs to the (MLP-free) cross-attention and is unused.
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 1.0)
    multi_conv: bool = False  # the "dagger" patch embedding: three convolutions instead of one
    qkv_bias: bool = True
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0  # dropout before the heads
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        # YAML and JSON give lists; normalise to tuples so configs compare and hash.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, f.name, value)
        n = len(self.patch_size)
        for name in ("img_scale", "embed_dim", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per branch ({n}), got {getattr(self, name)}")
        for dim, heads in zip(self.embed_dim, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        for sizes, patch in zip(self.branch_img_sizes, self.patch_size):
            if sizes < patch or sizes % patch:
                raise ValueError(f"branch image size {sizes} is not a positive multiple of patch size {patch}")

    @property
    def num_branches(self) -> int:
        return len(self.patch_size)

    @property
    def branch_img_sizes(self) -> tuple[int, ...]:
        """The square input size of each branch (timm's rounding: ``int(img_size * scale)``)."""
        return tuple(int(self.img_size * s) for s in self.img_scale)

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        """Patches per side in each branch."""
        return tuple(s // p for s, p in zip(self.branch_img_sizes, self.patch_size))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CrossViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CrossViT config keys: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class PatchEmbed(nn.Module):
    """Image to patch tokens: one strided convolution, or the "dagger" stack of three convolutions."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, multi_conv: bool):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        if not multi_conv:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            return
        # Paper, section 4.1 ("dagger"): a 7x7/4 convolution, then 3x3 convolutions reaching stride 12 or 16.
        if patch_size == 12:
            second, third = dict(stride=3, padding=0), dict(stride=1, padding=1)
        elif patch_size == 16:
            second, third = dict(stride=2, padding=1), dict(stride=2, padding=1)
        else:
            raise ValueError(f"the multi-conv patch embedding exists for patch sizes 12 and 16, not {patch_size}")
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 4, kernel_size=7, stride=4, padding=3),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, **second),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, **third),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, fused: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, tokens, head_dim) tensors.

    The fused path (F.scaled_dot_product_attention) is the default; the explicit one exists so that MAC
    counters that only see matmuls (fvcore) count the attention products too.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = F.dropout(attn.softmax(dim=-1), dropout_p)
    return attn @ v


class Attention(nn.Module):
    """Multi-head self-attention over all tokens of one branch."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.fused = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v, self.attn_drop if self.training else 0.0, self.fused)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer encoder block (ViT/DeiT)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Attention in which the first token (the CLS token) is the only query: O(N) in the token count."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.fused = True
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.wq(x[:, :1]).reshape(B, 1, h, C // h).transpose(1, 2)
        k = self.wk(x).reshape(B, N, h, C // h).transpose(1, 2)
        v = self.wv(x).reshape(B, N, h, C // h).transpose(1, 2)
        x = attention(q, k, v, self.attn_drop if self.training else 0.0, self.fused)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, 1, C)))


class CrossAttentionBlock(nn.Module):
    """The CLS token of ``x`` attends to all tokens of ``x``; returns the updated CLS token only."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))


def projection(dim_in: int, dim_out: int) -> nn.Sequential:
    """The paper's f / g: LayerNorm, GELU, Linear, moving a CLS token between branch widths."""
    return nn.Sequential(nn.LayerNorm(dim_in, eps=LAYER_NORM_EPS), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Transformer blocks per branch, then cross-attention fusion of each branch's CLS with the other."""

    def __init__(self, cfg: CrossViTConfig, depth: tuple[int, ...], drop_path: list[float]):
        super().__init__()
        dims, n = cfg.embed_dim, cfg.num_branches
        self.num_branches = n
        common = dict(qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *[
                    Block(dims[b], cfg.num_heads[b], cfg.mlp_ratio[b], drop_path=drop_path[i], **common)
                    for i in range(depth[b])
                ]
            )
            for b in range(n)
        )
        # f: this branch's CLS into the other branch's width; g ("revert"): back again.
        self.projs = nn.ModuleList(projection(dims[b], dims[(b + 1) % n]) for b in range(n))
        fusion_depth = depth[-1]

        def fusion_block(b: int) -> CrossAttentionBlock:
            other = (b + 1) % n
            return CrossAttentionBlock(dims[other], cfg.num_heads[other], drop_path=drop_path[-1], **common)

        # A cross-attention depth of 0 means one block, not wrapped in a Sequential (timm's key layout).
        self.fusion = nn.ModuleList(
            fusion_block(b) if fusion_depth == 0 else nn.Sequential(*[fusion_block(b) for _ in range(fusion_depth)])
            for b in range(n)
        )
        self.revert_projs = nn.ModuleList(projection(dims[(b + 1) % n], dims[b]) for b in range(n))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [block(x) for block, x in zip(self.blocks, xs)]
        outs = []
        for b in range(self.num_branches):
            other = xs[(b + 1) % self.num_branches]
            # This branch's CLS, projected to the other width, queries the other branch's patch tokens.
            cls = self.projs[b](xs[b][:, :1])
            cls = self.fusion[b](torch.cat((cls, other[:, 1:]), dim=1))
            outs.append(torch.cat((self.revert_projs[b](cls), xs[b][:, 1:]), dim=1))
        return outs


# --------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------


class CrossViT(nn.Module):
    def __init__(self, cfg: CrossViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_branches = n = cfg.num_branches
        self.num_classes = cfg.num_classes
        self.branch_img_sizes = cfg.branch_img_sizes
        self.patch_embed = nn.ModuleList(
            PatchEmbed(size, patch, cfg.in_chans, dim, cfg.multi_conv)
            for size, patch, dim in zip(cfg.branch_img_sizes, cfg.patch_size, cfg.embed_dim)
        )
        # Separate attributes, not a ParameterList: the names timm uses (official checkpoints say "pos_embed.0").
        for b in range(n):
            num_tokens = 1 + self.patch_embed[b].num_patches
            self.register_parameter(f"pos_embed_{b}", nn.Parameter(torch.zeros(1, num_tokens, cfg.embed_dim[b])))
            self.register_parameter(f"cls_token_{b}", nn.Parameter(torch.zeros(1, 1, cfg.embed_dim[b])))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        # Linear stochastic-depth schedule over the deepest path through each multi-scale block.
        total = sum(sum(d[-2:]) for d in cfg.depth)
        rates = torch.linspace(0, cfg.drop_path_rate, total).tolist()
        self.blocks = nn.ModuleList()
        start = 0
        for d in cfg.depth:
            span = max(d[:-1]) + d[-1]
            self.blocks.append(MultiScaleBlock(cfg, d, rates[start : start + span]))
            start += span

        self.norm = nn.ModuleList(nn.LayerNorm(dim, eps=LAYER_NORM_EPS) for dim in cfg.embed_dim)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.ModuleList(self._make_head(dim, cfg.num_classes) for dim in cfg.embed_dim)

        for b in range(n):
            nn.init.trunc_normal_(getattr(self, f"pos_embed_{b}"), std=0.02)
            nn.init.trunc_normal_(getattr(self, f"cls_token_{b}"), std=0.02)
        self.apply(_init_weights)

    @staticmethod
    def _make_head(dim: int, num_classes: int) -> nn.Module:
        return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh heads for another label set (fine-tuning)."""
        self.num_classes = num_classes
        self.cfg = replace(self.cfg, num_classes=num_classes)
        device = self.cls_token_0.device
        self.head = nn.ModuleList(self._make_head(d, num_classes) for d in self.cfg.embed_dim).to(device)
        self.head.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (they match ``named_parameters()``)."""
        return {f"{kind}_{b}" for kind in ("pos_embed", "cls_token") for b in range(self.num_branches)}

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-branch token sequences (CLS first) after the last multi-scale block, before the final norm."""
        B = x.shape[0]
        xs = []
        for b, embed in enumerate(self.patch_embed):
            size = self.branch_img_sizes[b]
            x_b = (
                x
                if x.shape[-1] == size and x.shape[-2] == size
                else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            )
            tokens = embed(x_b)
            cls = getattr(self, f"cls_token_{b}").expand(B, -1, -1)
            tokens = torch.cat((cls, tokens), dim=1) + getattr(self, f"pos_embed_{b}")
            xs.append(self.pos_drop(tokens))
        for block in self.blocks:
            xs = block(xs)
        return xs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features: the normalised CLS tokens of all branches, concatenated (B, sum(dims))."""
        xs = self.forward_tokens(x)
        # Only the CLS tokens are normalised: the patch tokens are not used after the last block.
        return torch.cat([norm(t[:, 0]) for norm, t in zip(self.norm, xs)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Average of the per-branch heads' logits (pre-logit features if the model has no classes)."""
        if self.num_classes == 0:
            return features
        parts = features.split(list(self.cfg.embed_dim), dim=1)
        logits = [head(self.head_drop(f)) for head, f in zip(self.head, parts)]
        return torch.stack(logits).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch every attention module between SDPA and explicit matmuls (for MAC counters)."""
    for m in model.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.fused = fused


# --------------------------------------------------------------------------------------------------------
# Published variants (Table 1 of the paper; names as in timm)
# --------------------------------------------------------------------------------------------------------


def _variant(embed_dim: tuple[int, int], heads: int, large_depth: int, mlp: float, **kw) -> CrossViTConfig:
    return CrossViTConfig(
        embed_dim=embed_dim,
        num_heads=(heads, heads),
        depth=((1, large_depth, 0),) * 3,
        mlp_ratio=(mlp, mlp, 1.0),
        **kw,
    )


_AT_408 = dict(img_size=408, img_scale=(1.0, 384 / 408))

VARIANTS: dict[str, CrossViTConfig] = {
    "crossvit_tiny_240": _variant((96, 192), 3, 4, 4.0),
    "crossvit_small_240": _variant((192, 384), 6, 4, 4.0),
    "crossvit_base_240": _variant((384, 768), 12, 4, 4.0),
    "crossvit_9_240": _variant((128, 256), 4, 3, 3.0),
    "crossvit_15_240": _variant((192, 384), 6, 5, 3.0),
    "crossvit_18_240": _variant((224, 448), 7, 6, 3.0),
    "crossvit_9_dagger_240": _variant((128, 256), 4, 3, 3.0, multi_conv=True),
    "crossvit_15_dagger_240": _variant((192, 384), 6, 5, 3.0, multi_conv=True),
    "crossvit_18_dagger_240": _variant((224, 448), 7, 6, 3.0, multi_conv=True),
    "crossvit_15_dagger_408": _variant((192, 384), 6, 5, 3.0, multi_conv=True, **_AT_408),
    "crossvit_18_dagger_408": _variant((224, 448), 7, 6, 3.0, multi_conv=True, **_AT_408),
}

# The paper names its models by the large branch's resolution.
ALIASES: dict[str, str] = {name.replace("_240", "_224").replace("_408", "_384"): name for name in VARIANTS}


def list_models() -> list[str]:
    """The published variants, under timm's names."""
    return list(VARIANTS)


def resolve_name(name: str) -> str:
    if name in VARIANTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise KeyError(f"unknown CrossViT variant {name!r}; known: {', '.join(VARIANTS)} (or the paper's *_224/*_384)")


def create_model(name: str | None = None, *, checkpoint: str | None = None, **overrides) -> CrossViT:
    """Build a published variant, optionally with config fields overridden (num_classes, drop_path_rate,
    or a whole custom shape: embed_dim, depth, num_heads, img_size, patch_size, ...).

    ``checkpoint`` loads weights strictly (see ``crossvit.weights.load_weights`` for fine-tuning loads).
    """
    base = VARIANTS[resolve_name(name)] if name else CrossViTConfig()
    model = CrossViT(replace(base, **overrides))
    if checkpoint is not None:
        from crossvit.weights import load_weights

        load_weights(model, checkpoint)
    return model
