"""Every variant of the authors' CLR code is a config of built-in layer kinds, and works everywhere the default does."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clr_timm
from clr_timm.cli import main as cli_main
from clr_timm.config import PRESETS

from ._models import assert_state_equal, make_input, make_model, state_copy, train_steps

# The authors' names (their main.py --method), ours, and what each costs on resnet18: the reprogramming values
# (3,904 channels after the stem and the 3x3 convs, 960 after the three 1x1 downsample convs, 1,024 stem inputs...).
VARIANTS = {
    "Ghost_reduced_v1": ("clr", 35_136),  # 3x3 depthwise after every conv larger than 1x1: 3,904 x 9
    "Ghost": ("clr-full", 43_200),  # ... and after the 1x1 convs: 4,800 x 9
    "Ghost_reduced_v2": ("clr-pointwise-scale", 36_032),  # a per-channel scale after the 1x1 convs: + 896
    "Ghost_a": ("clr-gated", 48_000),  # y + A * ghost(y) after every conv: 4,800 x (9 + 1)
    "li18": ("parallel-1x1", 1_392_832),  # a dense 1x1 conv from every conv's input
}
IDENTITY_AT_ATTACH = {"Ghost_reduced_v1", "Ghost", "Ghost_reduced_v2", "Ghost_a"}


def _moved(model, seed=0):
    """Every reprogramming tensor (and gate) moved off its initial value, so each check sees the layers act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, clr_timm.ReprogrammingLayer):
                for p in layer.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _attached(variant, name="resnet18", seed=0):
    return _moved(clr_timm.attach(make_model(name), clr_timm.CLRConfig.preset(variant)), seed).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_authors_name_and_our_name_give_the_same_ordinary_config(variant):
    ours, _ = VARIANTS[variant]
    config = clr_timm.CLRConfig.preset(variant)
    assert config == clr_timm.CLRConfig.preset(ours) == clr_timm.CLRConfig(**PRESETS[variant])
    assert clr_timm.CLRConfig.from_json(config.to_json()) == config
    assert clr_timm.CLRConfig.preset(variant, kernel_size=5).kernel_size == 5


def test_li50_is_li18_on_another_backbone_and_unknown_names_are_refused():
    assert clr_timm.CLRConfig.preset("li50") == clr_timm.CLRConfig.preset("li18")
    with pytest.raises(clr_timm.ConfigError, match="Ghost_a"):
        clr_timm.CLRConfig.preset("Ghost_b")


def test_the_default_config_is_written_as_before_so_older_readers_still_read_it():
    assert set(json.loads(clr_timm.CLRConfig().to_json())) == {
        "kernel_size", "include", "exclude", "depthwise", "train_norms", "update_norm_stats", "train_head"
    }  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_count_matches_the_authors_arithmetic_on_resnet18(variant):
    _, values = VARIANTS[variant]
    model = make_model("resnet18")
    count = clr_timm.count_parameters(model, clr_timm.CLRConfig.preset(variant))
    assert count.clr == values
    attached = clr_timm.attach(model, clr_timm.CLRConfig.preset(variant))
    layers = [m for m in attached.modules() if isinstance(m, clr_timm.ReprogrammingLayer)]
    assert sum(p.numel() for m in layers for p in m.parameters()) == values
    assert count.norm_affine == (0 if variant == "li18" else 9_600)  # li keeps its BatchNorms frozen


def test_the_count_command_takes_a_variant(capsys):
    assert cli_main(["count", "resnet18", "--variant", "Ghost", "--num-classes", "5"]) == 0
    assert "43,200" in capsys.readouterr().out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attach_is_the_identity_except_for_the_parallel_form_and_detach_is_exact(variant):
    model = make_model("resnet18").eval()
    before = state_copy(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        clr_timm.attach(model, clr_timm.CLRConfig.preset(variant))
        same = torch.equal(model(x), expected)
    assert same == (variant in IDENTITY_AT_ATTACH)
    clr_timm.detach(model)
    assert_state_equal(before, state_copy(model))


def test_the_parallel_form_keeps_batchnorm_frozen_in_training():
    model = clr_timm.attach(make_model("resnet18"), clr_timm.CLRConfig.preset("li18")).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    F.cross_entropy(model(make_input(4)), torch.arange(4) % 5).backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "bn" in n)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_adapter_file_records_the_variant_and_loads_into_a_fresh_model(variant, tmp_path):
    model = _attached(variant)
    path = clr_timm.save_adapter(model, tmp_path / "task.safetensors", task="t")
    assert clr_timm.read_adapter(path).config == clr_timm.CLRConfig.preset(variant)
    fresh = clr_timm.load_adapter(make_model("resnet18", seed=0), path).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_mixed_batch_equals_each_sample_alone(variant, name):
    mt = clr_timm.MultiTaskModel(make_model(name), clr_timm.CLRConfig.preset(variant))
    for seed, task in enumerate(["a", "b"]):
        mt.add_task(task)
        mt.adapters[task].load_state_dict(clr_timm.adapter_state_dict(_attached(variant, name, seed)))
    mt.eval()
    x, tasks = make_input(batch=4), ["a", "b", "b", "a"]
    with torch.no_grad():
        mixed = mt(x, tasks=tasks)
        alone = [mt(x[i : i + 1], task=t)[0] for i, t in enumerate(tasks)]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the two tasks differ
    for got, want in zip(mixed, alone):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fuse_keeps_the_outputs_and_folds_where_the_kind_allows(variant):
    model = _attached(variant)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
        clr_timm.fuse(model, example_input=x)
        fused = model(x)
    folded = clr_timm.state.get_state(model).modes["fused"]
    assert torch.allclose(fused, expected, atol=1e-5)
    # a depthwise kernel or a gated block takes its BatchNorm; a scale also folds into the conv, and so does li's
    # parallel 1x1 conv (into the centre tap), which cannot take the norm
    assert (len(folded.norms) > 0) == (variant != "li18")
    assert (len(folded.convs) > 0) == (variant in ("Ghost_reduced_v2", "li18"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_memory_efficient_training_gives_the_same_gradients(variant):
    plain = _attached(variant).train()
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    grads = []
    for model in (plain, efficient):
        F.cross_entropy(model(x), torch.arange(4) % 5).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".clr." in k for k in grads[0])
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_scripts_with_the_eager_outputs(variant):
    model = _attached(variant)
    x = make_input()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)


def test_a_new_task_of_the_gated_form_starts_closed_and_leaves_the_bound_task_alone():
    mt = clr_timm.MultiTaskModel(make_model("resnet18"), clr_timm.CLRConfig.preset("Ghost_a"))
    mt.add_task("a")
    _moved(mt.model)  # trains task a's tensors, which are bound
    a = {k: v.clone() for k, v in mt.adapter_state_dict("a").items()}
    mt.add_task("b")
    assert all(torch.equal(a[k], v) for k, v in mt.adapter_state_dict("a").items())
    gates = [v for k, v in mt.adapter_state_dict("b").items() if k.endswith(".clr.gate")]
    assert gates and all(not g.any() for g in gates)


# A reference for each variant written from the authors' semantics with plain torch modules, independent of
# clr_timm's hooks and layer classes: which convs each variant wraps, and what the wrapped conv computes.
class _Serial(nn.Module):  # their ReGhos_Block: ghost(conv(x))
    def __init__(self, conv, ghost):
        super().__init__()
        self.conv, self.ghost = conv, ghost

    def forward(self, x):
        return self.ghost(self.conv(x))


class _Gated(nn.Module):  # their Ghost_Block_Combine: y + A * ghost(y)
    def __init__(self, conv, ghost):
        super().__init__()
        self.conv, self.ghost = conv, ghost
        self.a = nn.Parameter(torch.zeros(1, conv.out_channels, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        return y + self.a * self.ghost(y)


class _Parallel(nn.Module):  # their Residule_block: conv(x) + re(x)
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.re = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)

    def forward(self, x):
        return self.conv(x) + self.re(x)


def _depthwise(c, k):
    return nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False)


def _reference(plain, variant):
    """The authors' wrapping of every nn.Conv2d: (wrapped conv name -> reprogramming tensors by clr_timm name)."""
    ref = copy.deepcopy(plain)
    tensors = {}
    for name, conv in [(n, m) for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)]:
        c, pointwise = conv.out_channels, conv.kernel_size == (1, 1)
        if variant == "Ghost_reduced_v1" and pointwise:
            continue
        if variant == "li18":
            block = _Parallel(conv)
            tensors[name] = {"weight": block.re.weight}
        elif variant == "Ghost_a":
            block = _Gated(conv, _depthwise(c, 3))
            tensors[name] = {"weight": block.ghost.weight, "gate": block.a}
        else:
            block = _Serial(conv, _depthwise(c, 1 if variant == "Ghost_reduced_v2" and pointwise else 3))
            tensors[name] = {"weight": block.ghost.weight}
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, block)
    return ref, tensors


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_gradients_equal_a_reference_written_from_the_authors_semantics(variant, name):
    plain = make_model(name)
    reference, ref_tensors = _reference(plain, variant)
    model = clr_timm.attach(copy.deepcopy(plain), clr_timm.CLRConfig.preset(variant))
    layers = {n: m.clr for n, m in model.named_modules() if isinstance(getattr(m, "clr", None), nn.Module)}
    assert set(layers) == set(ref_tensors)  # the same convs are reprogrammed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same tensors, away from their initial values, on both sides
        for conv, tensors in ref_tensors.items():
            for pname, ref_tensor in tensors.items():
                ref_tensor.copy_(torch.randn(ref_tensor.shape, generator=g) * 0.1 + ref_tensor)
                getattr(layers[conv], pname).copy_(ref_tensor.reshape(getattr(layers[conv], pname).shape))
    x, target = make_input(4), torch.arange(4) % 5
    for mode in ("train", "eval"):
        outs = []
        # the authors train li18 with model.eval() (BatchNorm frozen), the other variants with model.train()
        ref_mode = mode == "train" and variant != "li18"
        for m in (reference.train(ref_mode), model.train(mode == "train")):
            m.zero_grad()
            out = m(x)
            F.cross_entropy(out, target).backward()
            outs.append(out.detach())
        assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4), (mode, (outs[0] - outs[1]).abs().max())
    for conv, tensors in ref_tensors.items():
        for pname, ref_tensor in tensors.items():
            ours = getattr(layers[conv], pname).grad
            assert torch.allclose(ref_tensor.grad.reshape(ours.shape), ours, atol=1e-5, rtol=1e-4), (conv, pname)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_one_task_leaves_another_bit_identical(variant):
    mt = clr_timm.MultiTaskModel(make_model("resnet18"), clr_timm.CLRConfig.preset(variant))
    mt.add_task("a")
    mt.add_task("b")
    before = {t: {k: v.clone() for k, v in mt.adapter_state_dict(t).items()} for t in ("a", "b")}
    mt.set_task("b")
    train_steps(mt, steps=2)
    after = {t: mt.adapter_state_dict(t) for t in ("a", "b")}
    assert any(not torch.equal(before["b"][k], v) for k, v in after["b"].items() if ".clr." in k)  # b trained
    assert all(torch.equal(before["a"][k], v) for k, v in after["a"].items())  # a untouched, bit for bit
