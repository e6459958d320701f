"""Weights: safetensors round trips, foreign checkpoints, and loud errors for differences nobody asked for."""

import pickle
from dataclasses import replace

import pytest
import torch

import crossvit
from crossvit import CrossViT, WeightsMismatchError, load_weights, save_weights
from crossvit.weights import load_model, resample_pos_embed


def _same_outputs(a: CrossViT, b: CrossViT, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_safetensors_round_trip_rebuilds_the_model_from_its_header(tiny_cfg, tmp_path):
    model = CrossViT(tiny_cfg)
    save_weights(model, tmp_path / "w.safetensors")
    again = load_model(tmp_path / "w.safetensors")
    assert again.cfg == tiny_cfg
    _same_outputs(model, again, 48)
    fresh = CrossViT(tiny_cfg)
    load_weights(fresh, tmp_path / "w.safetensors")
    _same_outputs(model, fresh, 48)


def test_official_checkpoint_layout_is_converted(tiny_cfg, tmp_path):
    """IBM/CrossViT saves {"model": state} with ParameterList keys pos_embed.0 / cls_token.0."""
    model = CrossViT(tiny_cfg)
    official = {
        k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
        for k, v in model.state_dict().items()
    }
    assert "pos_embed.0" in official
    torch.save({"model": official, "epoch": 300}, tmp_path / "official.pth")
    fresh = load_weights(CrossViT(tiny_cfg), tmp_path / "official.pth")
    _same_outputs(model, fresh, 48)
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP-wrapped state dict
    _same_outputs(model, load_weights(CrossViT(tiny_cfg), ddp), 48)


def test_pth_files_are_never_unpickled(tiny_cfg, tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_weights(CrossViT(tiny_cfg), tmp_path / "evil.pth")


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_other_class_count_is_an_error_unless_asked_for(tiny_cfg):
    source = CrossViT(replace(tiny_cfg, num_classes=1000)).state_dict()
    with pytest.raises(WeightsMismatchError, match=r"head\.0\.weight.*reset_classifier"):
        load_weights(CrossViT(tiny_cfg), source)
    model = load_weights(CrossViT(tiny_cfg), source, reset_classifier=True)
    own = model.state_dict()
    assert own["head.0.weight"].shape == (10, 32)
    assert all(torch.equal(own[k], v) for k, v in source.items() if not k.startswith("head."))


def test_missing_and_unexpected_keys_are_named(tiny_cfg):
    state = CrossViT(tiny_cfg).state_dict()
    state.pop("norm.0.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"missing keys \['norm\.0\.weight'\].*\['extra\.weight'\]"):
        load_weights(CrossViT(tiny_cfg), state)


def test_a_240_model_runs_at_408_with_resampled_position_embeddings():
    small = crossvit.create_model("crossvit_9_240", num_classes=5)
    source = small.state_dict()
    big = crossvit.create_model("crossvit_9_240", num_classes=5, img_size=408, img_scale=(1.0, 384 / 408))
    with pytest.raises(
        WeightsMismatchError, match=r"pos_embed_0: checkpoint \(1, 401, 128\) vs model \(1, 1157, 128\)"
    ):
        load_weights(big, source)
    load_weights(big, source, resize_pos_embed=True)
    own = big.state_dict()
    assert own["pos_embed_0"].shape == (1, 1 + 34 * 34, 128)
    assert own["pos_embed_1"].shape == (1, 1 + 24 * 24, 256)
    assert torch.equal(own["pos_embed_0"][:, :1], source["pos_embed_0"][:, :1])  # the CLS position is kept
    assert all(torch.equal(own[k], v) for k, v in source.items() if not k.startswith("pos_embed"))
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 3, 408, 408)).shape == (1, 5)


def test_resampling_keeps_the_same_grid_and_a_smooth_field_smooth():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert resample_pos_embed(pos, 14) is pos
    ramp = torch.linspace(0, 1, 10).repeat(10, 1).reshape(1, 100, 1)  # varies along x only
    up = resample_pos_embed(torch.cat((torch.zeros(1, 1, 1), ramp), dim=1), 20)[0, 1:, 0].reshape(20, 20)
    assert torch.allclose(up[0], up[-1])
    assert bool((up[0].diff() >= -1e-6).all())
