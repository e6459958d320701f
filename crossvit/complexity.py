"""Parameters and multiply-accumulates per variant: ``python -m crossvit.complexity``.

MACs are counted the way the paper's table was (fvcore), on the explicit-matmul attention path so that
the attention products q k^T and attn v are included. fvcore is a development dependency.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from crossvit.model import create_model, list_models, set_fused_attention

# The paper's Table 1 / Table 3 (GFLOPs there are multiply-accumulates), in G.
PAPER_GMACS = {
    "crossvit_tiny_240": 1.57,
    "crossvit_small_240": 5.63,
    "crossvit_base_240": 21.22,
    "crossvit_9_240": 1.85,
    "crossvit_15_240": 5.81,
    "crossvit_18_240": 9.05,
    "crossvit_9_dagger_240": 1.99,
    "crossvit_15_dagger_240": 6.13,
    "crossvit_18_dagger_240": 9.50,
    "crossvit_15_dagger_408": 21.45,
    "crossvit_18_dagger_408": 32.47,
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-accumulates of one forward pass on one image."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise ImportError("counting MACs needs fvcore: pip install -e '.[dev]'") from e
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    set_fused_attention(model, False)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, img_size, img_size))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        set_fused_attention(model, True)


def main() -> None:
    print("| model | input | params | GMACs | paper GMACs |\n|---|---|---:|---:|---:|")
    for name in list_models():
        model = create_model(name)
        size = model.cfg.img_size
        macs = count_macs(model, size) / 1e9
        print(f"| {name} | {size} | {count_params(model):,} | {macs:.2f} | {PAPER_GMACS[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
