"""An attached model goes wherever the plain model goes: TorchScript, torch.fx and torch.export, with equal outputs."""

import warnings

import pytest
import torch

import clr_timm

from ._models import make_input, make_model

FAMILIES = ["resnet18", "mobilenetv3_small_050", "regnetx_002", "convnext_atto", "tf_efficientnet_lite0"]


def _script(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        return torch.jit.script(model)(x)


def _fx(model, x):
    return torch.fx.symbolic_trace(model)(x)


def _export(model, x):
    return torch.export.export(model, (x,)).module()(x)


def _perturbed(model):
    """Kernels away from the identity, so that a tool dropping the reprogramming layers would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, clr_timm.layers.ReprogrammingLayer):
                for p in layer.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _outcome(tool, model, x):
    try:
        with torch.no_grad():
            return tool(model, x)
    except Exception as e:  # what the tool cannot take, reported for the plain and the attached model alike
        return e


@pytest.mark.parametrize("tool", [_script, _fx, _export], ids=["torchscript", "fx", "export"])
@pytest.mark.parametrize("name", FAMILIES)
def test_an_attached_model_compiles_wherever_the_plain_one_does_with_equal_outputs(name, tool):
    x = make_input(batch=2)
    plain = make_model(name).eval()
    plain_result = _outcome(tool, plain, x)
    attached = _perturbed(clr_timm.attach(make_model(name)).eval())
    with torch.no_grad():
        eager = attached(x)
    result = _outcome(tool, attached, x)
    if isinstance(plain_result, Exception):  # e.g. plain torch.fx on timm's Conv2dSame: so does the attached one
        assert isinstance(result, Exception) and type(result) is type(plain_result)
        return
    assert not isinstance(result, Exception), result
    assert torch.allclose(result, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager, plain_result, atol=1e-3)  # the reprogramming layers took part


@pytest.mark.parametrize("tool", [_script, _fx, _export], ids=["torchscript", "fx", "export"])
def test_the_recommended_recipe_with_frozen_norm_statistics_compiles_too(tool):
    # update_norm_stats=False keeps BatchNorm in eval mode through a forward pre-hook, which the tools must take
    model = _perturbed(clr_timm.attach(make_model("resnet18"), update_norm_stats=False)).eval()
    x = make_input(batch=2)
    with torch.no_grad():
        assert torch.allclose(tool(model, x), model(x), atol=1e-5, rtol=1e-5)
