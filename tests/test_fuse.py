"""The deployment fast path: BatchNorm folded into the reprogramming layers, same outputs, and back."""

import pytest
import torch

import clr_timm

from ._models import assert_state_equal, make_input, make_model, state_copy, train_steps


def _trained(name, **config):
    model = clr_timm.attach(make_model(name), **config)
    train_steps(model, steps=2)
    return model.eval()


@pytest.mark.parametrize(
    "name, config",
    [
        ("resnet18", {}),
        ("tf_efficientnet_lite0", {}),
        ("efficientnet_b0", {"depthwise": "scale"}),
        ("convnext_tiny", {}),  # LayerNorm2d: nothing to fold, still correct
    ],
)
def test_fused_model_gives_the_same_outputs(name, config):
    model = _trained(name, **config)
    x = make_input(batch=3)
    with torch.no_grad():
        expected = model(x)
        clr_timm.fuse(model, example_input=x[:2])
        fused = model(x)
    assert clr_timm.is_fused(model)
    assert (fused - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_fuse_folds_every_batchnorm_that_follows_a_reprogramming_layer():
    model = _trained("resnet50")
    clr_timm.fuse(model, example_input=make_input())
    folded = [m for m in model.modules() if "fused_bias" in getattr(m, "_buffers", {})]
    assert len(folded) == clr_timm.count_parameters(model).num_reprogrammed == 17


def test_fusing_leaves_the_adapter_and_state_dict_unchanged_and_unfuse_restores(tmp_path):
    model = _trained("resnet18")
    x = make_input()
    before = state_copy(model)
    with torch.no_grad():
        expected = model(x)
    clr_timm.fuse(model, example_input=x)
    assert_state_equal(before, state_copy(model))
    path = clr_timm.save_adapter(model, tmp_path / "a.safetensors")
    fresh = make_model("resnet18")
    clr_timm.load_adapter(fresh, path)
    assert_state_equal(before, state_copy(fresh))
    clr_timm.unfuse(model)
    assert not clr_timm.is_fused(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_fuse_refuses_train_mode_and_a_fused_model_refuses_to_train():
    model = _trained("resnet18")
    with pytest.raises(clr_timm.CLRError, match="eval"):
        clr_timm.fuse(model.train())
    clr_timm.fuse(model.eval(), example_input=make_input())
    with pytest.raises(clr_timm.CLRError, match="already fused"):
        clr_timm.fuse(model)
    with pytest.raises(clr_timm.CLRError, match="unfuse"):
        model.train()(make_input())
