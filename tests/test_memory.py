"""set_memory_efficient: the same gradients, fewer tensors kept for backward, and nothing left behind when off."""

import copy
import gc
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clr_timm
from benchmarks import speed
from clr_timm import memory
from tests._models import make_input, make_model


def _perturbed(name: str, **config) -> nn.Module:
    """Attached, with every trained tensor moved off its initial value: timm zero-initialises the last norm of each
    ResNet block, which would make every gradient inside the residual branches exactly zero (and any check of them
    vacuous)."""
    model = clr_timm.attach(make_model(name), clr_timm.CLRConfig(**config) if config else None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd kept for backward (the model's own weights not counted)."""
    for p in model.parameters():
        p.grad = None
    counter = speed._SavedBytes(model)  # the model's own weights not counted
    with speed.count_saved(model, counter.pack):  # through the memory-efficient hooks too
        loss = F.cross_entropy(model(x), torch.arange(len(x)) % 5)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counter.total


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("resnet18", {}),  # BatchNorm in train mode: the paper's configuration
        ("resnet18", {"update_norm_stats": False}),
        ("tf_efficientnet_lite0", {"update_norm_stats": False}),  # BatchNormAct2d, Conv2dSame, depthwise convs
        ("convnext_atto", {}),  # LayerNorm after a 7x7 depthwise conv: saved as a permuted view, left alone
        ("resnet18", {"depthwise": "scale"}),
    ],
)
def test_same_gradients_and_less_kept(name, config):
    plain = _perturbed(name, **config)
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    loss_a, grads_a, kept_a = _step(plain, x)
    loss_b, grads_b, kept_b = _step(efficient, x)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any(".clr." in k for k in grads_a)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k
    if name.startswith("convnext"):
        assert kept_b <= kept_a
    else:
        assert kept_b < kept_a * 0.95  # the norms' copies of the reprogramming outputs are gone
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), efficient.state_dict().values()))


@pytest.fixture
def nan_layouts(monkeypatch) -> list:
    """Backward gets NaN in place of each frozen conv input it no longer keeps: a read would reach the gradients."""
    made = []

    def nan_filled(layout):
        made.append(layout.shape)
        return torch.full(layout.shape, float("nan"), dtype=layout.dtype).as_strided(layout.shape, layout.stride)

    monkeypatch.setattr(memory._Layout, "__call__", nan_filled)
    return made


@pytest.mark.parametrize(
    ("name", "config", "not_kept"),
    [
        # every conv input but one is a ReLU's output, which the ReLU keeps anyway; the one: the max-pool's output
        ("resnet18", {}, lambda convs: 1),
        # ReLU6 keeps its input, not its output: every frozen conv but the stem (its input, the image, needs no grad)
        ("tf_efficientnet_lite0", {"depthwise": "scale"}, lambda convs: convs - 1),
    ],
)
def test_no_frozen_conv_reads_the_input_it_no_longer_keeps(name, config, not_kept, nan_layouts):
    plain = _perturbed(name, **config)
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    _, grads_a, _ = _step(plain, x)
    _, grads_b, _ = _step(efficient, x)
    frozen_convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
    assert len(nan_layouts) == not_kept(len(frozen_convs))
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_a_conv_the_caller_unfroze_keeps_its_input(nan_layouts):
    plain = _perturbed("resnet18")
    plain.layer3[0].conv1.weight.requires_grad_(True)  # trained along with the adapter: needs its input
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    _, grads_a, _ = _step(plain, x)
    _, grads_b, _ = _step(efficient, x)
    assert "layer3.0.conv1.weight" in grads_b and nan_layouts
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_a_conv_with_a_trainable_parametrization_keeps_its_input(nan_layouts):
    class Delta(nn.Module):  # LoRA-like: the conv's weight plus a trainable low-rank term
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.a = nn.Parameter(0.01 * torch.randn(w.shape[0], 2))
            self.b = nn.Parameter(0.01 * torch.randn(2, w[0].numel()))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + (self.a @ self.b).view_as(w)

    plain = _perturbed("resnet18")
    conv = plain.layer1[0].conv1  # its input, the max-pool's output, is kept by nothing else
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Delta(conv.weight))
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    _, grads_a, _ = _step(plain, x)
    _, grads_b, _ = _step(efficient, x)
    assert "layer1.0.conv1.parametrizations.weight.0.a" in grads_b
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_an_interrupted_forward_leaves_nothing_on(monkeypatch):
    plain = _perturbed("resnet18")
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4)
    conv_forward = nn.Conv2d._conv_forward

    def interrupted(conv, *args):
        if conv is efficient.layer2[0].conv1:  # inside a frozen conv, where a step spends most of its time
            raise KeyboardInterrupt
        return conv_forward(conv, *args)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):  # skips even always_call hooks: cleanup must not rely on them
        efficient(x)
    monkeypatch.undo()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(1) or t, lambda t: t):
        torch.randn(3, requires_grad=True).exp().sum().backward()
    assert seen  # our saved-tensor hooks are not left on in this thread
    _, grads_a, _ = _step(plain, x)
    _, grads_b, _ = _step(efficient, x)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def test_no_reference_cycle_keeps_a_deleted_model_alive():
    gc.disable()  # freed by reference counting alone, not at the next garbage collection
    try:
        model = clr_timm.set_memory_efficient(_perturbed("resnet18"))
        _step(model, make_input(2))
        refs = [weakref.ref(m) for m in model.modules() if "forward" in m.__dict__]  # the model and its wrapped convs
        assert len(refs) > 10
        del model
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_an_output_changed_in_place_after_being_saved_is_kept_as_is():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=True)  # saves its result: the reprogramming output, changed in place
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.bn(self.act(self.conv(x))).mean((2, 3)))

    plain = _perturbed_custom(Net())
    efficient = clr_timm.set_memory_efficient(copy.deepcopy(plain))
    x = make_input(4, size=8)
    _, grads_a, _ = _step(plain, x)
    _, grads_b, _ = _step(efficient, x)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


def _perturbed_custom(model: nn.Module) -> nn.Module:
    clr_timm.attach(model)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, clr_timm.layers.CLRConv2d):
                layer.weight.add_(0.1 * torch.randn(layer.weight.shape))
    return model.train()


def test_off_detach_errors_and_copies():
    model = _perturbed("resnet18")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    every = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    clr_timm.set_memory_efficient(model)
    wrapped = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    clr_timm.set_memory_efficient(model)  # twice: still one set of wrappers and hooks
    assert clr_timm.is_memory_efficient(model)
    assert wrapped == [n for n, m in model.named_modules() if "forward" in m.__dict__] and "" in wrapped
    copy.deepcopy(model)(make_input(2))  # a deep copy runs
    pickle.loads(pickle.dumps(model))(make_input(2))  # and a pickled one
    clr_timm.set_memory_efficient(model, False)
    assert not clr_timm.is_memory_efficient(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert not any(m._forward_hooks for m in model.modules() if isinstance(m, clr_timm.layers.CLRConv2d))
    assert every == {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    assert not any("forward" in m.__dict__ for m in model.modules())
    clr_timm.set_memory_efficient(model)
    clr_timm.detach(model)
    assert not clr_timm.is_memory_efficient(model)
    with pytest.raises(clr_timm.CLRError, match="attach"):
        clr_timm.set_memory_efficient(make_model("resnet18"))


def test_a_failed_forward_leaves_no_hooks_installed():
    model = clr_timm.set_memory_efficient(_perturbed("resnet18"))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 32, 32))  # wrong channel count: fails inside the forward pass
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(1) or t, lambda t: t):
        torch.randn(3, requires_grad=True).exp().sum().backward()  # our hooks would shadow this pair if left on
    assert seen
    _, grads, _ = _step(model, make_input(2))
    assert grads
