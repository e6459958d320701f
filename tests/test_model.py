"""The CrossViT network: exactly the published models (parameters, MACs, timm parity) and fast paths."""

from dataclasses import replace

import pytest
import timm
import torch

import crossvit
from crossvit.complexity import PAPER_GMACS, count_macs, count_params
from crossvit.model import ALIASES, CrossAttention, CrossViT, set_fused_attention

PUBLISHED_PARAMS = {
    "crossvit_tiny_240": 7_014_800,
    "crossvit_small_240": 26_856_272,
    "crossvit_base_240": 105_025_232,
    "crossvit_9_240": 8_553_296,
    "crossvit_15_240": 27_528_464,
    "crossvit_18_240": 43_271_408,
    "crossvit_9_dagger_240": 8_776_592,
    "crossvit_15_dagger_240": 28_209_008,
    "crossvit_18_dagger_240": 44_266_976,
    "crossvit_15_dagger_408": 28_500_080,
    "crossvit_18_dagger_408": 44_606_560,
}


def test_every_published_variant_is_listed_with_its_paper_alias():
    assert crossvit.list_models() == list(PUBLISHED_PARAMS)
    assert ALIASES["crossvit_tiny_224"] == "crossvit_tiny_240"
    assert ALIASES["crossvit_18_dagger_384"] == "crossvit_18_dagger_408"
    assert len(ALIASES) == 11
    assert crossvit.create_model("crossvit_9_224", num_classes=0).cfg == replace(
        crossvit.VARIANTS["crossvit_9_240"], num_classes=0
    )
    with pytest.raises(KeyError, match="unknown CrossViT variant"):
        crossvit.create_model("crossvit_99_240")


def test_the_package_names_resolve_on_first_use_and_a_misspelt_one_fails():
    """crossvit's names load their module on first use (so that crossvit.transforms alone imports no torch):
    each one the package lists resolves to what its module defines, and any other name is an error."""
    from crossvit import model, weights

    for name in crossvit.__all__:
        assert getattr(crossvit, name) is getattr(weights if hasattr(weights, name) else model, name)
    with pytest.raises(AttributeError, match="module 'crossvit' has no attribute 'create_modle'"):
        crossvit.create_modle  # noqa: B018


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_variant_matches_timm_exactly(name):
    """Same parameter count as published, timm's weights load strictly, logits agree to 1e-4 in fp32."""
    ref = timm.create_model(name).eval()
    ours = crossvit.create_model(name).eval()
    assert count_params(ours) == PUBLISHED_PARAMS[name]
    crossvit.load_weights(ours, ref.state_dict())
    size = ours.cfg.img_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours_logits = ours(x)
        diff = (ours_logits - ref(x)).abs().max().item()
    assert ours_logits.shape == (2, 1000)
    assert diff <= 1e-4, f"{name}: max |logit difference| {diff}"


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_macs_match_the_paper(name):
    model = crossvit.create_model(name)
    gmacs = count_macs(model, model.cfg.img_size) / 1e9
    assert gmacs == pytest.approx(PAPER_GMACS[name], rel=0.02)


def test_cross_attention_is_linear_in_the_number_of_tokens():
    attn = CrossAttention(dim=64, num_heads=4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)
    x = torch.randn(2, 101, 64)
    assert attn(x).shape == (2, 1, 64)  # only the CLS token is updated
    attn.fused = False
    from fvcore.nn import FlopCountAnalysis

    macs = [FlopCountAnalysis(attn, torch.randn(1, n, 64)).unsupported_ops_warnings(False).total() for n in (200, 400)]
    assert macs[1] / macs[0] == pytest.approx(2.0, rel=0.01)


def test_forward_backward_reaches_every_parameter(tiny_cfg):
    model = CrossViT(replace(tiny_cfg, drop_path_rate=0.1)).train()
    x = torch.randn(4, 3, 48, 48)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.logsumexp(dim=1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_fused_and_explicit_attention_agree(tiny_cfg):
    model = CrossViT(tiny_cfg).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        fused = model(x)
        set_fused_attention(model, False)
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_architecture_details_follow_the_paper():
    model = crossvit.create_model("crossvit_small_240", drop_path_rate=0.1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert model.cfg.branch_img_sizes == (240, 224) and model.cfg.grid_sizes == (20, 14)
    block = model.blocks[0]
    # f and g: LayerNorm, GELU, Linear between the branch widths.
    assert [type(m).__name__ for m in block.projs[0]] == ["LayerNorm", "GELU", "Linear"]
    assert block.projs[0][2].weight.shape == (384, 192) and block.revert_projs[0][2].weight.shape == (192, 384)
    # K=3 multi-scale blocks of [1 small-branch block, 4 large-branch blocks].
    assert len(model.blocks) == 3 and [len(b) for b in block.blocks] == [1, 4]


def test_drop_path_schedule_is_timms_linear_schedule():
    ours = crossvit.create_model("crossvit_15_240", drop_path_rate=0.1)
    ref = timm.create_model("crossvit_15_240", drop_path_rate=0.1)
    ours_rates = [m.p for m in ours.modules() if isinstance(m, crossvit.model.DropPath)]
    # timm gives each Block two DropPaths of one rate (drop_path1/2) and nn.Identity where the rate is 0.
    ref_rates = [
        getattr(m, "drop_prob", 0.0) for n, m in ref.named_modules() if n.endswith(("drop_path1", ".drop_path"))
    ]
    assert ours_rates == pytest.approx(ref_rates)
    assert max(ours_rates) == pytest.approx(0.1) and ours_rates[0] == 0.0


def test_no_weight_decay_names_real_parameters():
    model = crossvit.create_model("crossvit_9_240")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed_0", "pos_embed_1", "cls_token_0", "cls_token_1"}
    assert model.no_weight_decay() <= set(names)


def test_bf16_autocast_and_channels_last(tiny_cfg):
    model = CrossViT(tiny_cfg).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.slow  # inductor compiles in worker processes
def test_torch_compile_matches_eager(tiny_cfg):
    """The whole model is one graph (fullgraph: no break), and inductor's code computes what eager does. One
    multi-scale block (patch embeddings, both branches, the cross-attention fusion, the heads): inductor
    compiles C++ on CPUs, and a second block only adds compile time (22 s instead of 29 s, cold cache)."""
    model = CrossViT(replace(tiny_cfg, depth=((1, 1, 0),))).eval()
    x = torch.randn(2, 3, 48, 48)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_config_round_trips_through_dicts_and_rejects_nonsense(tiny_cfg):
    d = tiny_cfg.to_dict()
    as_lists = {
        k: [list(v) if isinstance(v, tuple) else v for v in val] if isinstance(val, tuple) else val
        for k, val in d.items()
    }  # what YAML or JSON gives back
    assert crossvit.CrossViTConfig.from_dict(as_lists) == tiny_cfg
    with pytest.raises(ValueError, match="unknown CrossViT config keys"):
        crossvit.CrossViTConfig.from_dict({**d, "depht": 3})
    with pytest.raises(ValueError, match="not divisible"):
        replace(tiny_cfg, num_heads=(3, 2))
    with pytest.raises(ValueError, match="not a positive multiple of patch size"):
        replace(tiny_cfg, img_size=50)
