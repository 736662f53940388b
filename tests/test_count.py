"""Parameter accounting: the paper's headline on ResNet-50, the depthwise policies, weightless (meta) counting."""

import pytest
import timm

import clr_timm
from clr_timm import CLRConfig, CLRError
from clr_timm.count import CURATED_MODELS, count_model, format_table, resolve_model_names


def test_resnet50_reproduces_the_papers_headline():
    c = count_model("resnet50").count
    assert (c.clr, c.norm_affine, c.norm_stats) == (34_560, 53_120, 53_120)
    assert c.per_task == 140_800
    assert c.backbone == 23_508_032
    assert f"{c.percent_of_backbone:.3f}" == "0.599"
    assert c.percent_of_backbone < 0.6  # the paper: "less than 0.6%"
    assert c.num_reprogrammed == 17  # the 7x7 stem and the sixteen 3x3 bottleneck convs


def test_count_on_the_meta_device_equals_the_count_on_a_real_model():
    meta = count_model("resnet50", num_classes=10)
    assert meta.built_on == "meta"
    real = timm.create_model("resnet50", pretrained=False, num_classes=10)
    assert clr_timm.count_parameters(real) == meta.count
    clr_timm.attach(real)
    assert clr_timm.count_parameters(real) == meta.count


def test_count_with_a_depthwise_policy_equals_the_count_of_the_attached_model():
    config = CLRConfig(depthwise="scale", train_norms=False)
    real = clr_timm.attach(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), config)
    assert clr_timm.count_parameters(real) == count_model("efficientnet_b0", config, num_classes=10).count


def test_depthwise_policies_lower_the_count_on_efficientnet():
    clr, scale, skip = (count_model("efficientnet_b0", CLRConfig(depthwise=p)).count for p in ("clr", "scale", "skip"))
    assert clr.clr > scale.clr > skip.clr
    assert clr.percent_of_backbone > 4  # a CLR kernel after a depthwise conv costs as much as the conv
    assert skip.clr == 32 * 9  # only the 3x3 stem conv is not depthwise
    assert skip.num_reprogrammed == 1 and scale.num_reprogrammed == clr.num_reprogrammed == 17


def test_frozen_norms_leave_only_the_kernels_per_task():
    c = count_model("efficientnet_b0", CLRConfig(depthwise="skip", train_norms=False)).count
    assert c.norm_affine == c.norm_stats == 0
    assert c.per_task == c.clr
    assert c.percent_of_backbone < 0.6


def test_models_without_norm_layers_have_no_norm_cost():
    # NFNets have no normalisation layers; NormFreeBlock's scalar skipinit gain is not one.
    c = count_model("dm_nfnet_f0").count
    assert c.norm_affine == c.norm_stats == 0


def test_layernorm_and_groupnorm_models_have_no_statistics():
    assert count_model("convnext_tiny").count.norm_stats == 0
    assert count_model("resnetv2_50x1_bit").count.norm_stats == 0


def test_unknown_model_names_get_close_suggestions():
    with pytest.raises(CLRError, match=r"unknown timm model 'resnet5'.*resnet50"):
        count_model("resnet5")
    with pytest.raises(CLRError, match=r"did you mean.*efficientnet_b0"):
        resolve_model_names(["efficentnet_b0"])


def test_wildcards_expand_through_timm():
    names = resolve_model_names(["resnet1*", "vgg11"])
    assert "resnet18" in names and names[-1] == "vgg11"
    with pytest.raises(CLRError, match="no timm model matches"):
        resolve_model_names(["no_such_model_*"])


def test_curated_models_are_all_timm_models():
    assert len(CURATED_MODELS) >= 20
    assert all(timm.is_model(n) for n in CURATED_MODELS)


def test_format_table_is_a_markdown_table():
    table = format_table([count_model("resnet50", num_classes=10)])
    header, rule, row = table.splitlines()
    assert "head (10 classes)" in header and "% of backbone" in header
    assert header.count("|") == rule.count("|") == row.count("|") == 10
    assert row == (
        "| `resnet50` | 23,508,032 | 34,560 | 53,120 | 53,120 | 20,490 | 140,800 | 0.599% | 0.65 MB / 0.32 MB |"
    )


def test_counting_does_not_allocate_weights():
    row = count_model("convnext_xxlarge")  # 846M parameters: meta only
    assert row.built_on == "meta"
    assert row.count.backbone > 800_000_000
