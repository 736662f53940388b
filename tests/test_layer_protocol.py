"""A new reprogramming-layer kind is one class: defined here, registered, and attach, detach, save/load, mixed
batches, counting and fuse all work with it, with no change to the package."""

import pytest
import torch
from torch import nn

import clr_timm
from clr_timm.layers import ReprogrammingLayer, layer_class, register_layer
from clr_timm.state import FUSED, get_state

from ._models import assert_state_equal, make_input, make_model, state_copy, train_steps


@register_layer
class ChannelBias(ReprogrammingLayer):
    """A toy kind: one learned bias per channel, added to the conv's output (zero, the identity, at attach)."""

    kind = "test-channel-bias"

    def __init__(self, channels, device=None, dtype=None):
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    @classmethod
    def tensor_shapes(cls, target, config):
        return {"bias": (target.channels,)}

    def reset_parameters(self):
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x):
        return self.compute(x, self.bias)

    def compute(self, x, bias):
        return x + bias.to(x.dtype).view(-1, 1, 1)

    def fold_into_conv(self, weight, bias, folded):
        return weight, self.bias.to(weight.dtype) if bias is None else bias + self.bias.to(weight.dtype)


CONFIG = clr_timm.CLRConfig(layer="test-channel-bias", depthwise="test-channel-bias")


def _trained(seed=0):
    model = clr_timm.attach(make_model("resnet18"), CONFIG)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ChannelBias):
                layer.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    train_steps(model, steps=1, seed=seed)
    return model.eval()


def test_the_new_kind_is_registered_and_named_by_the_config():
    assert layer_class("test-channel-bias") is ChannelBias
    assert clr_timm.CLRConfig.from_json(CONFIG.to_json()) == CONFIG
    with pytest.raises(clr_timm.ConfigError, match="layer kind"):
        clr_timm.CLRConfig(layer="no-such-kind")


def test_attach_puts_the_new_kind_after_every_target_as_the_identity_and_detach_takes_it_back():
    model = make_model("resnet18").eval()
    before = state_copy(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        clr_timm.attach(model, CONFIG)
        assert torch.equal(model(x), expected)
    layers = [m for m in model.modules() if isinstance(m, ReprogrammingLayer)]
    assert layers and all(isinstance(m, ChannelBias) for m in layers)
    assert all(m.bias.requires_grad for m in layers)
    clr_timm.detach(model)
    assert_state_equal(before, state_copy(model))


def test_counting_asks_the_kind_for_its_size():
    model = make_model("resnet18")
    plan = clr_timm.plan_targets(model, CONFIG)
    count = clr_timm.count_parameters(model, CONFIG)
    assert count.clr == sum(t.channels for t in plan.targets) and count.num_reprogrammed == len(plan.targets)


def test_the_adapter_saves_and_loads_the_new_kind(tmp_path):
    model = _trained()
    path = clr_timm.save_adapter(model, tmp_path / "bias.safetensors")
    keys = set(clr_timm.read_adapter(path).tensors)
    assert any(k.endswith(".clr.bias") for k in keys) and not any(k.endswith(".clr.weight") for k in keys)
    fresh = clr_timm.load_adapter(make_model("resnet18"), path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_mixed_batch_of_the_new_kind_equals_each_sample_run_alone():
    a, b = _trained(seed=1), _trained(seed=2)
    mt = clr_timm.MultiTaskModel(make_model("resnet18"), CONFIG)
    for name, trained in (("a", a), ("b", b)):
        mt.add_task(name)
        mt.adapters[name].load_state_dict(clr_timm.adapter_state_dict(trained))
    mt.eval()
    x = make_input(batch=4)
    tasks = ["a", "b", "b", "a"]
    with torch.no_grad():
        mixed = mt(x, tasks=tasks)
        alone = [mt(x[i : i + 1], task=t)[0] for i, t in enumerate(tasks)]
    for got, want in zip(mixed, alone):
        assert torch.allclose(got, want, atol=1e-5)


def test_fuse_folds_the_new_kind_into_the_conv_before_it():
    model = _trained()
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        clr_timm.fuse(model, example_input=x)
        fused = model(x)
    mode = get_state(model).modes[FUSED]
    assert len(mode.convs) == clr_timm.count_parameters(model).num_reprogrammed and not mode.norms
    assert torch.allclose(fused, expected, atol=1e-5)
    clr_timm.unfuse(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
