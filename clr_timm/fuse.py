"""Deployment fast path: fold each task's BatchNorm into the reprogramming layer in front of it, and where the layer
allows, fold both into the frozen conv before them.

In eval mode a BatchNorm is a per-channel affine. :func:`fuse` finds, by one traced run, every BatchNorm that directly
consumes a reprogramming layer's output and asks the layer for a folded form (:meth:`ReprogrammingLayer.fold_norm`);
then it asks each layer whether it folds into the conv before it (:meth:`ReprogrammingLayer.fold_into_conv`), and
checks on an example input that the outputs did not change. The folded tensors are copies held by the fused mode: the
adapter's own tensors and the frozen weights are not touched. :func:`unfuse` takes it all back.

Which kinds fold is each layer's own answer: a depthwise kernel takes its BatchNorm (a conv with a bias), a
per-channel scale takes its BatchNorm and folds with it into a ``nn.Conv2d`` or timm ``Conv2dSame`` before it, and
a kind without a fold runs unchanged. GroupNorm / LayerNorm are never folded (their statistics depend on the input).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ._override import conv_computations, override_forward, restore_forward
from .attach import CLR_ATTR
from .errors import CLRError
from .layers import ReprogrammingLayer
from .state import FUSED, MULTITASK, find_state, get_state

__all__ = ["fuse", "unfuse", "is_fused"]


_OWNER = "clr_timm.fuse"


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse` has been applied (and not undone by :func:`unfuse`)."""
    state = find_state(model)
    return state is not None and FUSED in state.modes


def _folded_norm_forward(module: nn.Module, inner, x: torch.Tensor) -> torch.Tensor:
    if module.training:
        raise CLRError(
            "this BatchNorm is folded into a reprogramming layer (clr_timm.fuse); call clr_timm.unfuse first"
        )
    # timm's BatchNormAct2d applies its dropout and activation after the normalisation; keep them.
    if hasattr(module, "act"):
        x = module.act(module.drop(x)) if hasattr(module, "drop") else module.act(x)
    return x


def _folded_layer_forward(folded: dict[str, torch.Tensor], layer: ReprogrammingLayer, inner, x: torch.Tensor):
    return layer.compute_folded(x, folded)


def _passthrough(layer: nn.Module, inner, y: torch.Tensor, *conv_input: torch.Tensor) -> torch.Tensor:
    return y


def _folded_conv_forward(compute, weight, bias, conv: nn.Module, inner, x: torch.Tensor) -> torch.Tensor:
    if conv.training:
        raise CLRError("this conv has its reprogramming layer folded in (clr_timm.fuse); call clr_timm.unfuse first")
    return compute(conv, x, weight, bias)


class _Fused:
    """The fused mode: which modules carry a folded forward (the forwards hold the folded tensors).

    Attributes:
        norms: Conv name -> name of the BatchNorm folded into its reprogramming layer.
        convs: Names of the convs their reprogramming layer (and its norm, if any) is folded into.
    """

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.norms: dict[str, str] = {}
        self.convs: list[str] = []

    def override(self, module: nn.Module, fn) -> None:
        override_forward(module, _OWNER, fn)
        self.modules.append(module)

    def remove(self, model: nn.Module) -> None:
        for module in self.modules:
            restore_forward(module, _OWNER)
        self.modules.clear()


def _example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    p = next(model.parameters())
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)


def _pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, norm) pairs where the norm's input is exactly the reprogramming layer's output, found by a traced run."""
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps every recorded tensor alive, so that ids stay unique during the trace
    consumed: list[tuple[int, str]] = []
    handles = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(getattr(m, CLR_ATTR, None), ReprogrammingLayer):

            def record(mod, args, out, name=name):
                produced[id(out)] = name
                keep.append(out)

            handles.append(m.register_forward_hook(record))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:

            def record_in(mod, args, name=name):
                consumed.append((id(args[0]), name))
                keep.append(args[0])

            handles.append(m.register_forward_pre_hook(record_in))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for tensor_id, norm in consumed:
        if tensor_id in produced:
            pairs.append((produced[tensor_id], norm))
    # A norm called twice on two CLR outputs (shared modules) cannot be folded into both.
    norms = [n for _, n in pairs]
    return [(c, n) for c, n in dict.fromkeys(pairs) if norms.count(n) == 1]


def fuse(model: nn.Module, example_input: torch.Tensor | None = None, atol: float = 1e-4) -> nn.Module:
    """Fold BatchNorms into the reprogramming layers before them, for fast single-task inference (eval mode only).

    Layers that allow it (per-channel scales, ``depthwise="scale"``) are folded, with their BatchNorm, into the conv
    before them as well.

    Args:
        model: An attached model in eval mode (for example after :func:`~clr_timm.load_adapter`).
        example_input: An input the model accepts, used to find which norm follows which layer and to check the
            result; defaults to random data of the model's ``pretrained_cfg["input_size"]``.
        atol: Largest absolute output difference accepted by the check (float rounding only).

    Returns:
        The model, fused in place. The adapter's tensors and ``state_dict()`` are unchanged (the folded copies belong
        to the fused mode), so :func:`~clr_timm.save_adapter` still saves the task exactly. Fuse after moving the
        model to its device and dtype.

    Raises:
        CLRError: If the model is not attached, is in train mode, is already fused, or the fused outputs differ.
    """
    state = get_state(model)
    if MULTITASK in state.modes:
        raise CLRError(
            "this model is served by a MultiTaskModel, whose tasks share it: fusing would fold the current task's "
            "adapter into it under every task. Fuse a single-task model instead (clr_timm.load_adapter into a plain "
            "model, or mt.save_task and load that)"
        )
    if model.training:
        raise CLRError("fuse is for inference: call model.eval() first")
    if FUSED in state.modes:
        raise CLRError("model is already fused; call clr_timm.unfuse(model) first")
    x = _example_input(model, example_input)
    with torch.no_grad():
        reference = model(x)
        norms = dict(_pairs(model, x))
    mode = _Fused()
    state.enter(FUSED, mode)
    try:
        with torch.no_grad():
            _fold(model, norms, mode)
            diff = (model(x) - reference).abs().max().item()
    except BaseException:
        state.leave(model, FUSED)
        raise
    if not diff <= atol:
        state.leave(model, FUSED)
        raise CLRError(f"fusing changed the outputs by {diff:.3g} (> {atol}); the model was left unfused")
    return model


def _fold(model: nn.Module, norms: dict[str, str], mode: _Fused) -> None:
    """Fold each norm into its layer where the layer allows, then each layer into its conv where it allows."""
    modules = dict(model.named_modules())
    convs = conv_computations()
    for name, conv in modules.items():
        layer = getattr(conv, CLR_ATTR, None)
        if not isinstance(layer, ReprogrammingLayer):
            continue
        folded = None
        if name in norms:
            norm = modules[norms[name]]
            scale = (norm.running_var + norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            folded = layer.fold_norm(scale, shift)
            if folded is not None:
                mode.norms[name] = norms[name]
                mode.override(norm, _folded_norm_forward)
                mode.override(layer, functools.partial(_folded_layer_forward, folded))
        compute = convs.get(type(conv).forward)
        into_conv = layer.fold_into_conv(conv.weight, conv.bias, folded) if compute is not None else None
        if into_conv is not None:
            mode.convs.append(name)
            mode.override(conv, functools.partial(_folded_conv_forward, compute, *into_conv))
            mode.override(layer, _passthrough)


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse`: the reprogramming layers and norms compute separately again (and can train)."""
    if not is_fused(model):
        raise CLRError("model is not fused")
    get_state(model).leave(model, FUSED)
    return model
