"""CLRConfig.recommended: the measured config per model family, found from a model or its name, and the paper's
default elsewhere. Random-init timm models at 32 px: only the family detection and the config's cost matter."""

import pytest
import timm
import torch
from torch import nn

import clr_timm
from clr_timm import CLRConfig, ConfigError


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", num_classes=4).eval()


def test_a_family_gets_one_config_from_a_model_or_any_spelling_of_its_name(lite0):
    config = CLRConfig.recommended(lite0)
    for name in (
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "timm/tf_efficientnet_lite0.in1k",
        "efficientnet_lite0",
    ):
        assert CLRConfig.recommended(name) == config
    mobilenet = timm.create_model("mobilenetv2_100", num_classes=4)
    # timm builds MobileNetV2 with its EfficientNet class: the family comes from pretrained_cfg, not the class name
    assert type(mobilenet).__name__ == type(lite0).__name__
    assert CLRConfig.recommended(mobilenet) == CLRConfig.recommended("hf-hub:timm/mobilenetv2_100.ra_in1k")
    assert not config.update_norm_stats  # every measured family keeps the pretrained BatchNorm statistics


def test_unmeasured_families_get_the_papers_default():
    for model in ("resnet50", "mobilenetv3_large_100", "convnext_tiny", nn.Sequential(nn.Conv2d(3, 4, 3))):
        assert CLRConfig.recommended(model) == CLRConfig()


def test_each_call_returns_a_fresh_config(lite0):
    first = CLRConfig.recommended(lite0)
    first.exclude.append("conv_stem")
    assert CLRConfig.recommended(lite0).exclude == []


def test_the_recommended_config_attaches_as_the_identity_and_stores_at_most_5_percent(lite0):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = lite0(x)
    model = clr_timm.attach(lite0, CLRConfig.recommended(lite0))
    try:
        with torch.no_grad():
            assert torch.equal(model(x), before)
        counts = clr_timm.count_parameters(model)
        assert 0 < counts.per_task <= 0.05 * counts.backbone
    finally:
        clr_timm.detach(model)


@pytest.mark.parametrize("bad", [None, 3, b"tf_efficientnet_lite0", ["tf_efficientnet_lite0"]])
def test_anything_but_a_model_or_a_name_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"CLRConfig\.recommended takes a timm model or a model name"):
        CLRConfig.recommended(bad)
