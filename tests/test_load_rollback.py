"""A load that fails leaves the model as it was: the same objects, flags, hooks and modes, not only equal values.

An optimizer built before the load holds the head's Parameter objects: if a failed load put back new ones (equal in
value), the optimizer would silently stop training the head. Each test holds such an optimizer, a hook and a mixed
training mode, makes a load fail at a different point, and checks all of it after.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import clr_timm
from clr_timm import adapter as adapter_module

from ._models import assert_state_equal, make_input, make_model, state_copy

MODEL = "test_resnet"


def _identity(model: torch.nn.Module) -> dict:
    """Everything a load must leave as it was, by object: parameters, buffers, modules, flags, hooks, modes."""
    return {
        "parameters": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "modules": [
            (n, id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m)))
            for n, m in model.named_modules()
        ],
        "attached": clr_timm.is_attached(model),
        "num_classes": model.num_classes,
    }


class _Watched:
    """A model as a training script holds it: an optimizer over its head, a hook on it, mixed training modes."""

    def __init__(self, attached: bool) -> None:
        self.model = make_model(MODEL, num_classes=3)
        if attached:
            clr_timm.attach(self.model)
        self.model.train()
        self.model.layer1.eval()  # a mode of its own, which a careless rollback would reset
        self.head = [self.model.fc.weight, self.model.fc.bias]
        self.optimizer = torch.optim.SGD(self.head, lr=0.1)
        self.calls = 0
        self.handle = self.model.fc.register_forward_hook(self._count)
        self.identity = _identity(self.model)
        self.state = state_copy(self.model)

    def _count(self, *args) -> None:
        self.calls += 1

    def assert_untouched(self) -> None:
        assert _identity(self.model) == self.identity
        assert_state_equal(self.state, state_copy(self.model))
        assert self.model.fc.weight is self.head[0] and self.model.fc.bias is self.head[1]
        # The hook still fires, and its handle still removes it.
        self.model(make_input(batch=2, size=32))
        assert self.calls == 1
        # The optimizer still trains the model's head.
        before = self.model.fc.weight.detach().clone()
        self.optimizer.zero_grad()
        self.model(make_input(batch=2, size=32)).sum().backward()
        self.optimizer.step()
        assert not torch.equal(self.model.fc.weight, before)
        self.handle.remove()
        assert len(self.model.fc._forward_hooks) == 0


def _adapter(tmp_path, num_classes: int = 5):
    """A valid adapter of test_resnet for ``num_classes`` classes (same backbone as every model here)."""
    model = clr_timm.attach(make_model(MODEL, num_classes=3))
    clr_timm.resize_head(model, num_classes)  # the same backbone weights as every 3-class model made here
    with torch.no_grad():
        for t in clr_timm.adapter_state_dict(model).values():
            if t.is_floating_point():
                t.add_(0.01)
    return clr_timm.save_adapter(model, tmp_path / f"{num_classes}.safetensors", task="t")


def _zero_classes(tmp_path):
    """The crafted file of the issue: a head of 0 classes, with empty head tensors that match it."""
    path = _adapter(tmp_path, 3)
    tensors = load_file(str(path))
    tensors["fc.weight"], tensors["fc.bias"] = tensors["fc.weight"][:0].clone(), tensors["fc.bias"][:0].clone()
    meta = {**clr_timm.read_adapter(path).metadata, "num_classes": "0", "label_names": "null"}
    crafted = tmp_path / "zero.safetensors"
    save_file(tensors, str(crafted), metadata=meta)
    return crafted


@pytest.mark.parametrize("attached", [False, True], ids=["fresh", "attached"])
def test_an_adapter_with_zero_classes_is_refused_before_anything_changes(tmp_path, attached):
    watched = _Watched(attached)
    with pytest.raises(clr_timm.AdapterMismatchError, match="head of 0 classes"):
        clr_timm.load_adapter(watched.model, _zero_classes(tmp_path))
    watched.assert_untouched()


def test_a_model_without_a_head_to_size_refuses_an_adapter_with_one(tmp_path):
    model = make_model(MODEL, num_classes=0)  # a feature extractor: its head is an Identity
    before = state_copy(model)
    with pytest.raises(clr_timm.AdapterMismatchError, match="num_classes=5"):
        clr_timm.load_adapter(model, _adapter(tmp_path, 5))
    assert not clr_timm.is_attached(model)
    assert_state_equal(before, state_copy(model))


def _fail_after_the_resize(monkeypatch, tmp_path):
    """The crafted file loaded with the zero-class check taken out: it now fails after timm replaced the head."""
    monkeypatch.setattr(adapter_module, "_check_fits", lambda model, adapter: None)
    return _zero_classes(tmp_path), clr_timm.AdapterMismatchError


def _interrupt_after_the_copy(monkeypatch, tmp_path):
    """Ctrl-C once every tensor of a 5-class adapter is copied in (the head resized, the values overwritten)."""

    def interrupt(model):
        raise KeyboardInterrupt

    path = _adapter(tmp_path, 5)
    monkeypatch.setattr(adapter_module, "get_state", interrupt)
    return path, KeyboardInterrupt


def _crash_in_the_resize(monkeypatch, tmp_path):
    """An error that is not clr_timm's (a device out of memory, say) once timm has replaced the head."""
    resize = adapter_module.resize_head

    def crash(model, num_classes):
        resize(model, num_classes)
        raise RuntimeError("out of memory (simulated)")

    path = _adapter(tmp_path, 5)
    monkeypatch.setattr(adapter_module, "resize_head", crash)
    return path, clr_timm.AdapterError


@pytest.mark.parametrize("attached", [False, True], ids=["fresh", "attached"])
@pytest.mark.parametrize("failure", [_fail_after_the_resize, _interrupt_after_the_copy, _crash_in_the_resize])
def test_a_load_failing_midway_leaves_the_same_objects_flags_hooks_and_modes(tmp_path, monkeypatch, attached, failure):
    path, raised = failure(monkeypatch, tmp_path)
    watched = _Watched(attached)
    with pytest.raises(raised):
        clr_timm.load_adapter(watched.model, path)
    monkeypatch.undo()
    watched.assert_untouched()
    clr_timm.load_adapter(watched.model, _adapter(tmp_path, 5))  # and it still loads what fits
    assert watched.model.num_classes == 5


def test_the_old_rollback_gave_back_equal_values_but_other_objects(tmp_path, monkeypatch):
    """The weakened copy: rolling back by detaching (re-creating the head) passes a value check but not this one."""
    path, _ = _fail_after_the_resize(monkeypatch, tmp_path)
    watched = _Watched(attached=False)
    monkeypatch.setattr(adapter_module._Undo, "restore", lambda self: clr_timm.detach(watched.model))
    with pytest.raises(clr_timm.CLRError):
        clr_timm.load_adapter(watched.model, path)
    assert_state_equal(watched.state, state_copy(watched.model))  # the values are all back...
    assert watched.model.fc.weight is not watched.head[0]  # ...in new Parameter objects the optimizer never sees
    with pytest.raises(AssertionError):
        watched.assert_untouched()


def test_a_successful_load_still_gives_the_model_the_files_head(tmp_path):
    model = make_model(MODEL, num_classes=3)
    path = _adapter(tmp_path, 5)
    clr_timm.load_adapter(model, path)
    loaded = clr_timm.adapter_state_dict(model)
    for k, v in load_file(str(path)).items():
        assert torch.equal(loaded[k], v), k
    assert model.num_classes == 5 and model.eval()(make_input(batch=1, size=32)).shape == (1, 5)
