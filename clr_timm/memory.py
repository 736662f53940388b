"""Training memory: recompute each reprogramming layer's output in backward instead of keeping it.

In training, a reprogramming layer keeps its input for its own weight gradient, and the layer that consumes its
output (the norm right after it, whose affine weights train) keeps that output: two feature maps of the conv's size
where full fine-tuning keeps one. With :func:`set_memory_efficient` the second one is not kept: whenever autograd
saves a reprogramming layer's output, a note of the layer and its input (which it keeps anyway) is saved instead, and
the output is recomputed from it in backward: one depthwise conv per layer, the cheapest op of the block. Gradients
are unchanged (the recomputation is the same op on the same tensors). Measured in ``benchmarks/speed.py``.

It works through :func:`torch.autograd.graph.saved_tensors_hooks` entered around the model's forward pass, so it
replaces, for that forward pass, any saved-tensor hooks the caller has installed (e.g. activation offloading).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CLRError
from .layers import CLR_LAYERS, CLRConv2d

__all__ = ["is_memory_efficient", "set_memory_efficient"]

_ATTR = "_clr_memory_efficient"


@dataclass(frozen=True)
class _Recompute:
    """Stands in, among autograd's saved tensors, for a reprogramming layer's output."""

    layer: nn.Module
    x: torch.Tensor
    dtype: torch.dtype

    def __call__(self) -> torch.Tensor:
        w = self.layer.weight.detach().to(self.dtype)
        x = self.x.detach().to(self.dtype)
        if isinstance(self.layer, CLRConv2d):
            return F.conv2d(x, w, None, 1, self.layer.kernel_size // 2, 1, self.layer.channels)
        return x * w.view(-1, 1, 1)


class _Notes:
    """Per thread: the reprogramming outputs of the forward pass in progress (by data pointer) and its hooks context.

    A dict by thread id rather than ``threading.local``, so that a model carrying it can still be deep-copied and
    pickled (it is empty between forward passes).
    """

    def __init__(self) -> None:
        self._threads: dict[int, tuple[dict, list]] = {}

    def get(self) -> tuple[dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor, int]], list]:
        return self._threads.setdefault(threading.get_ident(), ({}, []))

    def release(self) -> None:
        self._threads.pop(threading.get_ident(), None)


class _MemoryEfficient:
    """The hooks one model carries while memory-efficient training is on."""

    def __init__(self, model: nn.Module) -> None:
        self.notes = _Notes()
        self.handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]
        self.handles += [m.register_forward_hook(self._note) for m in model.modules() if isinstance(m, CLR_LAYERS)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _enter(self, module: nn.Module, args) -> None:
        outputs, contexts = self.notes.get()
        outputs.clear()
        ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ctx.__enter__()
        contexts.append(ctx)

    def _exit(self, module: nn.Module, args, output) -> None:
        outputs, contexts = self.notes.get()
        if contexts:
            contexts.pop().__exit__(None, None, None)
        outputs.clear()  # drop the references to this pass's tensors
        if not contexts:
            self.notes.release()

    def _note(self, layer: nn.Module, args, output: torch.Tensor) -> None:
        outputs, contexts = self.notes.get()
        if torch.is_grad_enabled() and output.requires_grad and contexts:
            outputs[output.data_ptr()] = (layer, args[0], output, output._version)

    def _pack(self, t: torch.Tensor):
        entry = self.notes.get()[0].get(t.data_ptr())
        if entry is not None:
            layer, x, y, version = entry
            # the very tensor the layer returned, unchanged since: same view of the same memory, same version
            if t.shape == y.shape and t.stride() == y.stride() and t.dtype == y.dtype and t._version == version:
                return _Recompute(layer, x, t.dtype)
        return t

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, _Recompute):
            with torch.no_grad():
                return saved()
        return saved


def set_memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Train an attached model without keeping the reprogramming layers' outputs for backward (recomputed instead).

    Saves one feature map per reprogramming layer in training memory, for one depthwise conv per layer in backward;
    outputs and gradients are unchanged. No effect in inference (nothing is saved without gradients). Turning it on
    twice is a no-op; ``enabled=False`` turns it off. :func:`clr_timm.detach` turns it off too.

    Returns:
        The model.
    """
    current = getattr(model, _ATTR, None)
    if enabled and current is None:
        if not any(isinstance(m, CLR_LAYERS) for m in model.modules()):
            raise CLRError(f"{type(model).__name__} has no reprogramming layers: call clr_timm.attach(model) first")
        object.__setattr__(model, _ATTR, _MemoryEfficient(model))
    elif not enabled and current is not None:
        current.remove()
        object.__delattr__(model, _ATTR)
    return model


def is_memory_efficient(model: nn.Module) -> bool:
    """Whether :func:`set_memory_efficient` is on for ``model``."""
    return getattr(model, _ATTR, None) is not None
