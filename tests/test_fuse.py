"""The deployment fast path: BatchNorm folded into the reprogramming layers, same outputs, and back."""

import pytest
import torch

import clr_timm
from clr_timm.state import FUSED, get_state

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
        ("tf_efficientnet_lite0", {"depthwise": "scale"}),  # scales into nn.Conv2d and timm's Conv2dSame
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
    folded = get_state(model).modes[FUSED].norms
    assert len(folded) == clr_timm.count_parameters(model).num_reprogrammed == 17


def test_fuse_folds_each_scale_and_its_batchnorm_into_the_conv_before_it():
    model = _trained("tf_efficientnet_lite0", depthwise="scale")
    x = make_input()
    convs = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "clr", None), clr_timm.layers.CLRScale)}
    assert {type(m).__name__ for m in convs.values()} == {"Conv2d", "Conv2dSame"}
    frozen = {n: m.weight.clone() for n, m in convs.items()}
    with torch.no_grad():
        expected = model(x)
    clr_timm.fuse(model, example_input=x)
    assert sorted(get_state(model).modes[FUSED].convs) == sorted(convs)
    for n, m in convs.items():
        assert torch.equal(m.weight, frozen[n])  # folded into a copy: the frozen filters are untouched
    with pytest.raises(clr_timm.CLRError, match="unfuse"):
        next(iter(convs.values())).train()(torch.zeros(1, 16, 8, 8))
    clr_timm.unfuse(model)
    assert not any("forward" in m.__dict__ or "forward" in m.clr.__dict__ for m in convs.values())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


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


def test_a_fused_model_refuses_a_new_adapter_and_detach_unfuses_it(tmp_path):
    model = _trained("resnet18")
    x = make_input()
    other = clr_timm.save_adapter(_trained("resnet18"), tmp_path / "other.safetensors")
    clr_timm.fuse(model, example_input=x)
    before = state_copy(model)
    with torch.no_grad():
        fused = model(x)
    for action, match in [
        (lambda: clr_timm.load_adapter(model, other), "unfuse.*loading"),
        (lambda: clr_timm.reset_adapter(model), "unfuse.*resetting"),
        (lambda: clr_timm.MultiTaskModel(model), "unfuse.*MultiTaskModel"),
    ]:
        with pytest.raises(clr_timm.CLRError, match=match):
            action()
        assert_state_equal(before, state_copy(model))  # folded buffers would have gone stale: nothing changed
        with torch.no_grad():
            assert torch.equal(model(x), fused)
    plain = make_model("resnet18").eval()
    with torch.no_grad():
        expected = plain(x)
    clr_timm.detach(model)
    assert not clr_timm.is_fused(model) and not clr_timm.is_attached(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_the_model_a_multitask_model_serves_cannot_be_fused():
    mt = clr_timm.MultiTaskModel(make_model("resnet18"))
    mt.add_task("a", 3)
    mt.set_task("a")
    with pytest.raises(clr_timm.CLRError, match="MultiTaskModel"):
        clr_timm.fuse(mt.model.eval(), example_input=make_input())
    assert not clr_timm.is_fused(mt.model)


def test_a_fused_model_is_freed_without_a_garbage_collection():
    import gc
    import weakref

    gc.disable()
    try:
        model = clr_timm.fuse(_trained("tf_efficientnet_lite0", depthwise="scale"), example_input=make_input())
        refs = [weakref.ref(m) for m in model.modules() if "forward" in m.__dict__]  # the folded convs and norms
        assert len(refs) > 10
        del model
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()
