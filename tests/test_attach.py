"""attach / detach behaviour where users train: configs, freezing, and the PyTorch features models meet."""

import copy
import io

import pytest
import torch
from torch import nn

import clr_timm
from clr_timm.attach import CLR_ATTR

from ._models import assert_state_equal, make_input, make_model, state_copy, train_steps


def _clr_layers(model):
    return [m for m in model.modules() if isinstance(m, (clr_timm.layers.CLRConv2d, clr_timm.layers.CLRScale))]


def test_config_round_trips_through_json():
    config = clr_timm.CLRConfig(kernel_size=5, include=["layer*"], exclude=["layer4.*"], depthwise="scale")
    assert clr_timm.CLRConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"kernel_size": 4}, "odd"),
        ({"depthwise": "fuse"}, "depthwise"),
        ({"kernal_size": 3}, "unknown CLRConfig field"),
        ({"train_norms": "yes"}, "train_norms"),
    ],
)
def test_invalid_config_raises_config_error_naming_the_field(bad, message):
    with pytest.raises(clr_timm.ConfigError, match=message):
        clr_timm.CLRConfig.from_dict(bad)


def test_unparsable_config_json_raises_config_error():
    with pytest.raises(clr_timm.ConfigError, match="does not parse"):
        clr_timm.CLRConfig.from_json("{kernel_size: 3")


def test_reprogramming_layers_are_depthwise_identity_kernels_without_bias():
    model = clr_timm.attach(make_model("resnet18"), kernel_size=5)
    conv1 = model.conv1
    layer = getattr(conv1, CLR_ATTR)
    assert isinstance(layer, clr_timm.layers.CLRConv2d)
    assert layer.weight.shape == (conv1.out_channels, 1, 5, 5)
    expected = torch.zeros(conv1.out_channels, 1, 5, 5)
    expected[:, 0, 2, 2] = 1
    assert torch.equal(layer.weight.detach(), expected)
    assert not [n for n, _ in layer.named_parameters() if n != "weight"]


def test_one_by_one_convs_are_not_reprogrammed():
    model = clr_timm.attach(make_model("resnet50"))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert hasattr(m, CLR_ATTR) == (m.kernel_size != (1, 1)), name


def test_include_and_exclude_patterns_select_convs_by_name():
    model = clr_timm.attach(make_model("resnet18"), include=["layer1.*", "conv1"], exclude=["layer1.1.*"])
    targets = sorted(n for n, m in model.named_modules() if hasattr(m, CLR_ATTR) and not isinstance(m, nn.Sequential))
    assert targets == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]


def test_depthwise_policies_trade_kernels_for_scales_or_nothing():
    counts = {
        p: clr_timm.count_parameters(make_model("efficientnet_b0"), clr_timm.CLRConfig(depthwise=p))
        for p in ("clr", "scale", "skip")
    }
    assert counts["clr"].clr > counts["scale"].clr > counts["skip"].clr > 0
    model = clr_timm.attach(make_model("efficientnet_b0"), depthwise="scale")
    kinds = {type(m).__name__ for m in _clr_layers(model)}
    assert kinds == {"CLRConv2d", "CLRScale"}
    x = make_input()
    model.eval()
    reference = make_model("efficientnet_b0").eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_resnet50_per_task_cost_is_the_papers_under_0_6_percent():
    c = clr_timm.count_parameters(make_model("resnet50", num_classes=0))
    assert (c.clr, c.norm_affine, c.norm_stats, c.per_task) == (34_560, 53_120, 53_120, 140_800)
    assert c.backbone == 23_508_032
    assert round(c.percent_of_backbone, 3) == 0.599


def test_attached_and_planned_counts_agree(capsys):
    planned = clr_timm.count_parameters(make_model("resnet18"))
    attached = clr_timm.print_trainable_parameters(clr_timm.attach(make_model("resnet18")))
    assert planned == attached
    trainable = sum(p.numel() for p in make_model("resnet18").parameters())
    assert attached.backbone + attached.head == trainable
    assert "per task, without head" in capsys.readouterr().out


def test_only_adapter_parameters_require_grad():
    model = clr_timm.attach(make_model("resnet18"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {n for n, _ in model.named_parameters() if n.startswith("fc.") or f".{CLR_ATTR}." in n}
    expected |= {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in norms}
    assert trainable == expected
    buffers = set(clr_timm.adapter_state_dict(model)) - trainable
    assert buffers == {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[0] in norms}


def test_frozen_norms_keep_their_statistics_when_the_model_trains():
    model = clr_timm.attach(make_model("resnet18"), train_norms=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_steps(model, steps=1)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = make_input(batch=4)
    with torch.no_grad():
        in_eval = model.eval()(x)
        in_train = model.train()(x)  # frozen BatchNorm normalises with its running statistics even in train mode
    assert torch.equal(in_eval, in_train)


def test_frozen_norm_statistics_with_trained_affines():
    model = clr_timm.attach(make_model("resnet18"), update_norm_stats=False)
    stats, affine = model.bn1.running_mean.clone(), model.bn1.weight.detach().clone()
    assert model.bn1.weight.requires_grad and "bn1.running_mean" in clr_timm.adapter_state_dict(model)
    train_steps(model, steps=1)
    assert torch.equal(stats, model.bn1.running_mean)
    assert not torch.equal(affine, model.bn1.weight)


def test_per_task_batchnorm_statistics_update_in_train_mode():
    model = clr_timm.attach(make_model("resnet18"))
    before = model.bn1.running_mean.clone()
    train_steps(model, steps=1)
    assert not torch.equal(before, model.bn1.running_mean)


def test_frozen_head_is_not_trained_when_train_head_is_false():
    model = clr_timm.attach(make_model("resnet18"), train_head=False)
    assert not model.fc.weight.requires_grad
    assert not any(k.startswith("fc.") for k in clr_timm.adapter_state_dict(model))


def test_a_plain_timm_checkpoint_loads_strictly_into_an_attached_model():
    checkpoint = make_model("resnet18", seed=5).state_dict()
    model = clr_timm.attach(make_model("resnet18"))
    result = model.load_state_dict(checkpoint)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.conv1.weight, checkpoint["conv1.weight"])


def test_attach_twice_with_the_same_config_is_a_no_op_and_another_config_is_an_error():
    model = clr_timm.attach(make_model("resnet18"))
    assert clr_timm.attach(model) is model
    with pytest.raises(clr_timm.CLRError, match="already attached"):
        clr_timm.attach(model, kernel_size=5)


def test_detach_of_a_plain_model_raises():
    with pytest.raises(clr_timm.CLRError, match="no CLR adapter attached"):
        clr_timm.detach(make_model("resnet18"))


def test_detach_restores_frozen_flags_the_user_had_set():
    model = make_model("resnet18")
    model.conv1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    clr_timm.detach(clr_timm.attach(model))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_reset_adapter_starts_a_new_task_from_the_original_weights():
    model = clr_timm.attach(make_model("resnet18"))
    fresh = state_copy(model)
    train_steps(model)
    clr_timm.reset_adapter(model, num_classes=3)
    assert model.num_classes == 3 and model.fc.weight.requires_grad
    now = state_copy(model)
    assert_state_equal(
        {k: v for k, v in fresh.items() if not k.startswith("fc.")},
        {k: v for k, v in now.items() if not k.startswith("fc.")},
    )


def test_forward_features_and_forward_head_are_reprogrammed():
    model = clr_timm.attach(make_model("resnet18")).eval()
    for layer in _clr_layers(model):
        with torch.no_grad():
            layer.weight.mul_(1.5)
    x = make_input()
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
        assert not torch.equal(model(x), make_model("resnet18").eval()(x))


def test_deepcopy_and_whole_module_torch_save_keep_clr_working():
    model = clr_timm.attach(make_model("resnet18")).eval()
    with torch.no_grad():
        model.conv1.clr.weight.mul_(2)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
        assert torch.equal(restored(x), expected)
    assert clr_timm.is_attached(restored)
    clr_timm.detach(restored)
    assert not clr_timm.is_attached(restored)


def test_channels_last_and_no_grad_give_the_same_outputs():
    model = clr_timm.attach(make_model("convnext_tiny")).eval()
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(cl, expected, atol=1e-4)


def test_cpu_bf16_autocast_runs_and_backpropagates_into_clr():
    model = clr_timm.attach(make_model("resnet18")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_input())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.conv1.clr.weight.grad is not None and torch.isfinite(model.conv1.clr.weight.grad).all()


@pytest.mark.slow
def test_torch_compile_gives_the_eager_outputs():
    model = clr_timm.attach(make_model("resnet18")).eval()
    with torch.no_grad():
        model.layer1[0].conv1.clr.weight.mul_(0.5)
        x = make_input()
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert torch.allclose(compiled, eager, atol=1e-5)
