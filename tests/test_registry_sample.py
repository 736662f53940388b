"""Registry coverage on a fixed sample: one architecture of every timm model file attaches exactly and trains.

The full walk (every architecture, about 1,400) is ``python benchmarks/registry_coverage.py``; this is the same check
(:func:`benchmarks.registry_coverage.check_model`) on the architecture of each model file that was fastest to check in
that walk, built at random init on a 64 px input (larger only where a model needs it).
"""

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model

import clr_timm
from benchmarks.registry_coverage import architectures, check_model
from clr_timm.count import count_model

from ._models import make_input, make_model

SAMPLE = {
    "beit": "beit_base_patch16_384",
    "byoanet": "lambda_resnet26t",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_384",
    "coat": "coat_lite_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_1024_20_ks9_p14",
    "convnext": "test_convnext3",
    "cpubone": "cpubone_t0",
    "crossvit": "crossvit_9_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s1",
    "efficientnet": "test_efficientnet_gn",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m1",
    "eva": "vit_pe_core_tiny_patch16_384",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_100",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevitv2_075",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_siglip",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny_jx",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_distilled_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m_merge",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_080",
    "repvit": "repvit_m0_9",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls60",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_m",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_s",
    "swin_transformer": "swin_s3_tiny_224",
    "swin_transformer_v2": "swinv2_tiny_window16_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim",
    "xception": "legacy_xception",
    "xception_aligned": "xception65p",
    "xcit": "xcit_nano_12_p8_224",
}
"""timm model file -> the architecture checked for it."""

SAMPLE_KWARGS = {
    "deepseek_vit_412m": {"depth": 2},  # the file's only size is 412M parameters: same blocks, fewer of them
    "vgg11": {"mlp_ratio": 0.25},  # a narrower 7x7 pre-logits conv; the smallest VGG is 133M parameters otherwise
}

NO_CONV = {"gemma4_vit", "naflexvit"}
"""Model files whose patch embedding is a Linear layer: no conv larger than 1x1, nothing for CLR to reprogram."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small models on 64 px inputs gain nothing from threads, and lose 10x on a busy 2-core machine to contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(set(SAMPLE) - NO_CONV))
def test_attach_is_exact_and_every_kernel_gets_a_gradient(module):
    name = SAMPLE[module]
    result = check_model(name, module=module, reparam=False, detach=False, **SAMPLE_KWARGS.get(name, {}))
    assert result.status == "passed", result.details or result.reason
    assert result.targets > 0


@pytest.mark.parametrize("module", sorted(NO_CONV))
def test_models_without_convs_have_nothing_to_reprogram(module):
    assert count_model(SAMPLE[module]).count.num_reprogrammed == 0


def test_the_sample_covers_every_timm_model_file():
    missing = sorted(set(architectures()) - set(SAMPLE))
    assert not missing, f"timm has model files the sample does not cover: {missing}; add one architecture of each"
    assert all(timm.is_model(name) for name in SAMPLE.values())


REPARAMETERISABLE = {
    "mobileone_s0": {},  # MobileOneBlock.reparameterize
    "fastvit_t8": {},  # MobileOneBlock and ReparamLargeKernelConv
    "repvit_m0_9": {},  # fuse() of conv + BatchNorm
    "repghostnet_050": {},  # RepGhostModule.switch_to_deploy
    "levit_128s": {"img_size": 64},  # fuse() of ConvNorm / LinearNorm, the head's NormLinear too
}


@pytest.mark.parametrize("name", sorted(REPARAMETERISABLE))
def test_attach_after_reparameterisation_computes_what_the_fused_model_computes(name):
    model = reparameterize_model(make_model(name, **REPARAMETERISABLE[name]).eval(), inplace=True)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        clr_timm.attach(model)
        assert torch.equal(model(x), expected)
    assert clr_timm.count_parameters(model).num_reprogrammed > 0


@pytest.mark.parametrize("name", sorted(REPARAMETERISABLE))
def test_reparameterising_an_attached_model_raises_and_leaves_it_intact(name):
    model = clr_timm.attach(make_model(name, **REPARAMETERISABLE[name]).eval())
    before = clr_timm.adapter_state_dict(model)
    with pytest.raises(clr_timm.CLRError, match=r"while CLR is attached.*Re-parameterise first"):
        reparameterize_model(model, inplace=True)
    assert clr_timm.adapter_state_dict(model).keys() == before.keys()
    clr_timm.detach(model)
    reparameterize_model(model, inplace=True)  # detach lifts the guard
    clr_timm.attach(model)
