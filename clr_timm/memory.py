"""Training memory: keep for backward only what a gradient of the adapter needs.

In training, a reprogramming layer keeps its input for its own weight gradient, and the layer that consumes its
output (the norm right after it, whose affine weights train) keeps that output: two feature maps of the conv's size
where full fine-tuning keeps one. And autograd keeps every frozen conv's input, although with the conv's weights
frozen only the gradient with respect to that input is computed, which needs the input's shape but not its values.
With :func:`set_memory_efficient`:

- whenever autograd saves a reprogramming layer's output, a note of the layer and its input (which it keeps anyway)
  is saved instead, and the output is recomputed from it in backward: one depthwise conv per layer, the cheapest op
  of the block;
- whenever a frozen conv (``nn.Conv2d`` or timm's ``Conv2dSame`` whose weights do not require grad) saves an input
  that nothing saved before it (a ReLU keeps its output anyway), only the input's shape, strides and dtype are kept;
  backward gets an uninitialised tensor of that layout, which the input-gradient computation never reads.

Gradients are unchanged (tested bit for bit). Measured in ``benchmarks/speed.py``.

It works through :func:`torch.autograd.graph.saved_tensors_hooks` entered around the model's forward pass, so it
replaces, for that forward pass, any saved-tensor hooks the caller has installed (e.g. activation offloading).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ._override import conv_computations, override_forward, restore_forward
from .layers import ReprogrammingLayer
from .state import MEMORY_EFFICIENT, find_state, get_state

__all__ = ["is_memory_efficient", "set_memory_efficient"]

_OWNER = "clr_timm.memory"


@dataclass(frozen=True)
class _Recompute:
    """Stands in, among autograd's saved tensors, for a reprogramming layer's output."""

    layer: nn.Module
    inputs: tuple[torch.Tensor, ...]
    dtype: torch.dtype

    def __call__(self) -> torch.Tensor:
        params = {n: p.detach().to(self.dtype) for n, p in self.layer.params().items()}
        return self.layer.compute(*(x.detach().to(self.dtype) for x in self.inputs), **params)


@dataclass(frozen=True)
class _Layout:
    """Stands in, among autograd's saved tensors, for a frozen conv's input: backward needs only its layout."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def __call__(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


@dataclass
class _Pass:
    """One thread's state for the forward pass in progress."""

    outputs: dict[int, tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, int]] = field(default_factory=dict)
    contexts: list = field(default_factory=list)  # the model calls in progress (more than one if nested)
    frozen: list[nn.Module] = field(default_factory=list)  # the frozen convs whose forward is running
    kept: set[int] = field(default_factory=set)  # storages autograd keeps as they are (by data pointer)


class _Notes:
    """Per thread: the state (:class:`_Pass`) of the model's forward pass in progress.

    A dict by thread id rather than ``threading.local``, so that a model carrying it can still be deep-copied and
    pickled (it is empty between forward passes).
    """

    def __init__(self) -> None:
        self._threads: dict[int, _Pass] = {}

    def get(self) -> _Pass:
        return self._threads.setdefault(threading.get_ident(), _Pass())

    def peek(self) -> _Pass | None:
        """This thread's state if a forward pass of the model is in progress in it (creates nothing)."""
        return self._threads.get(threading.get_ident())

    def release(self) -> None:
        self._threads.pop(threading.get_ident(), None)


def _frozen(conv: nn.Module) -> bool:
    """No tensor of the conv's own computation requires grad (its reprogramming layer, a child, does not count).

    Parameters under the conv (e.g. a ``torch.nn.utils.parametrize`` parametrization such as LoRA) count.
    """
    return not any(
        p.requires_grad
        for m in conv.modules()
        if not isinstance(m, ReprogrammingLayer)
        for p in m.parameters(recurse=False)
    )


class _MemoryEfficient:
    """What one model carries while memory-efficient training is on: forward wrappers and one hook per CLR layer.

    The model's forward and each conv's forward are wrapped on the instance rather than hooked, so that their state
    is undone in a ``finally`` clause: a KeyboardInterrupt skips even ``always_call`` hooks, and a mark left on would
    apply to every tensor saved afterwards in the thread. For a conv the wrapper also bounds the marked region to the
    conv's own computation, not whatever other hooks run around it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.notes = _Notes()
        layers = [m for m in model.modules() if isinstance(m, ReprogrammingLayer)]
        self.handles = [m.register_forward_hook(self._note) for m in layers]
        # overrides hold their module weakly and this object holds none: no reference cycle through the model
        override_forward(model, _OWNER, self._model_forward)
        convs = conv_computations()
        for conv in model.modules():
            if conv is not model and type(conv).forward in convs:
                override_forward(conv, _OWNER, self._conv_forward)

    def remove(self, model: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        for module in model.modules():
            restore_forward(module, _OWNER)

    def _model_forward(self, model: nn.Module, forward, *args, **kwargs):
        state = self.notes.get()
        state.outputs.clear()
        state.kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            state.contexts.append(model)
            try:
                return forward(*args, **kwargs)
            finally:
                state.contexts.pop()
                state.outputs.clear()  # drop the references to this pass's tensors
                state.kept.clear()
                if not state.contexts:
                    self.notes.release()

    def _conv_forward(self, conv: nn.Module, forward, *args, **kwargs) -> torch.Tensor:
        state = self.notes.peek()
        if state is None or not state.contexts or not torch.is_grad_enabled() or not _frozen(conv):
            return forward(*args, **kwargs)
        state.frozen.append(conv)
        try:
            return forward(*args, **kwargs)
        finally:
            state.frozen.pop()

    def _note(self, layer: nn.Module, args, output: torch.Tensor) -> None:
        state = self.notes.peek()
        if state is not None and torch.is_grad_enabled() and output.requires_grad and state.contexts:
            state.outputs[output.data_ptr()] = (layer, tuple(args), output, output._version)

    def _pack(self, t: torch.Tensor):
        state = self.notes.get()
        storage = t.untyped_storage().data_ptr()
        if state.frozen and t.requires_grad and storage not in state.kept:
            # saved by a frozen conv (its weights do not require grad, so this is its input) and kept by nothing
            # before it (e.g. a ReLU keeps its output anyway): the input gradient needs only the layout
            return _Layout(t.shape, t.stride(), t.dtype, t.device)
        entry = state.outputs.get(t.data_ptr())
        if entry is not None:
            layer, x, y, version = entry
            # the very tensor the layer returned, unchanged since: same view of the same memory, same version
            if t.shape == y.shape and t.stride() == y.stride() and t.dtype == y.dtype and t._version == version:
                return _Recompute(layer, x, t.dtype)
        state.kept.add(storage)
        return t

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, (_Recompute, _Layout)):
            with torch.no_grad():
                return saved()
        return saved


def set_memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Train an attached model without keeping the reprogramming layers' outputs or the frozen convs' inputs.

    Saves one feature map per reprogramming layer in training memory, for one depthwise conv per layer in backward,
    and the input of every frozen conv that nothing else keeps, for an uninitialised allocation in backward; outputs
    and gradients are unchanged. No effect in inference (nothing is saved without gradients). Turning it on twice is
    a no-op; ``enabled=False`` turns it off. :func:`clr_timm.detach` turns it off too.

    Returns:
        The model.
    """
    state = get_state(model)
    if enabled and MEMORY_EFFICIENT not in state.modes:
        state.enter(MEMORY_EFFICIENT, _MemoryEfficient(model))
    elif not enabled:
        state.leave(model, MEMORY_EFFICIENT)
    return model


def is_memory_efficient(model: nn.Module) -> bool:
    """Whether :func:`set_memory_efficient` is on for ``model``."""
    state = find_state(model)
    return state is not None and MEMORY_EFFICIENT in state.modes
