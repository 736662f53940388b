"""Deployment fast path: fold each task's BatchNorm into the reprogramming layer in front of it.

In eval mode a BatchNorm is a per-channel affine, and a reprogramming layer (a depthwise conv or a per-channel
scale) followed by a per-channel affine is again one such layer, with a bias. :func:`fuse` folds every BatchNorm
that directly consumes a reprogramming layer's output into it, so that pass over the feature map disappears, and
checks on an example input that the outputs did not change. :func:`unfuse` takes it back.

A per-channel scale (``depthwise="scale"``) goes one step further: a conv followed by a per-channel affine is the
same conv with scaled filters and a bias, so the scale and the BatchNorm are folded into the frozen conv's filters
(into copies: the frozen weights are not touched) and the reprogramming layer and the norm both disappear from the
fused model's work. This is done for ``nn.Conv2d`` and timm's ``Conv2dSame``, whose forwards are known.

What cannot be folded exactly, and is left alone: GroupNorm / LayerNorm (their statistics depend on the input), and
a reprogramming kernel into the conv before it (a dense k x k conv followed by a 3 x 3 depthwise one is a
(k + 2) x (k + 2) conv, more work, not less; two 'same'-padded depthwise convs compose into a larger one everywhere
except on the one-pixel border, where the zero padding of the intermediate map differs).
"""

from __future__ import annotations

import torch
from torch import nn

from .attach import _FUSED_ATTR, _MULTITASK_ATTR, CLR_ATTR, _state, is_fused
from .errors import CLRError
from .layers import CLR_LAYERS, CLRScale, InstanceForward, conv_computations

__all__ = ["fuse", "unfuse", "is_fused"]


def _folded_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.training:
        raise CLRError(
            "this BatchNorm is folded into a reprogramming layer (clr_timm.fuse); call clr_timm.unfuse first"
        )
    # timm's BatchNormAct2d applies its dropout and activation after the normalisation; keep them.
    if hasattr(module, "act"):
        x = module.act(module.drop(x)) if hasattr(module, "drop") else module.act(x)
    return x


def _folded_conv_forward(conv: nn.Module, compute, x: torch.Tensor) -> torch.Tensor:
    if conv.training:
        raise CLRError("this conv has its reprogramming scale folded in (clr_timm.fuse); call clr_timm.unfuse first")
    layer = getattr(conv, CLR_ATTR)
    return compute(conv, x, layer._buffers["fused_conv_weight"], layer._buffers["fused_conv_bias"])


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
        if isinstance(getattr(m, CLR_ATTR, None), CLR_LAYERS):

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

    Per-channel scales (``depthwise="scale"``) are folded, with their BatchNorm, into the conv before them as well.

    Args:
        model: An attached model in eval mode (for example after :func:`~clr_timm.load_adapter`).
        example_input: An input the model accepts, used to find which norm follows which layer and to check the
            result; defaults to random data of the model's ``pretrained_cfg["input_size"]``.
        atol: Largest absolute output difference accepted by the check (float rounding only).

    Returns:
        The model, fused in place. The adapter's tensors and ``state_dict()`` are unchanged (the folded kernels are
        non-persistent buffers), so :func:`~clr_timm.save_adapter` still saves the task exactly.

    Raises:
        CLRError: If the model is not attached, is in train mode, is already fused, or the fused outputs differ.
    """
    _state(model)
    if getattr(model, _MULTITASK_ATTR, False):
        raise CLRError(
            "this model is served by a MultiTaskModel, whose tasks share it: fusing would fold the current task's "
            "adapter into it under every task. Fuse a single-task model instead (clr_timm.load_adapter into a plain "
            "model, or mt.save_task and load that)"
        )
    if model.training:
        raise CLRError("fuse is for inference: call model.eval() first")
    if is_fused(model):
        raise CLRError("model is already fused; call clr_timm.unfuse(model) first")
    x = _example_input(model, example_input)
    with torch.no_grad():
        reference = model(x)
    pairs = _pairs(model, x)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            layer, norm = getattr(modules[conv_name], CLR_ATTR), modules[norm_name]
            scale = (norm.running_var + norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            shape = (-1, 1, 1, 1) if layer.weight.dim() == 4 else (-1,)
            layer.register_buffer("fused_weight", layer.weight * scale.reshape(shape), persistent=False)
            layer.register_buffer("fused_bias", shift.to(layer.weight.dtype), persistent=False)
            norm.forward = InstanceForward(_folded_norm_forward, norm)  # holds the norm weakly: no cycle
        convs = _fold_scales_into_convs(modules)
    setattr(model, _FUSED_ATTR, (pairs, convs))
    with torch.no_grad():
        diff = (model(x) - reference).abs().max().item()
    if not diff <= atol:
        unfuse(model)
        raise CLRError(f"fusing changed the outputs by {diff:.3g} (> {atol}); the model was left unfused")
    return model


def _fold_scales_into_convs(modules: dict[str, nn.Module]) -> list[str]:
    """Fold each per-channel scale (with the norm already folded into it, if any) into the conv before it.

    The scaled filters and the bias are non-persistent buffers of the scale layer; the conv's forward is replaced on
    the instance by the same computation with them, and the scale layer then passes its input through.
    """
    forwards = conv_computations()
    folded = []
    for name, conv in modules.items():
        layer = getattr(conv, CLR_ATTR, None)
        compute = forwards.get(type(conv).forward)
        if not isinstance(layer, CLRScale) or compute is None or "forward" in conv.__dict__:
            continue
        scale = layer._buffers.get("fused_weight", layer.weight)
        shift = layer._buffers.get("fused_bias")
        if shift is None:
            shift = torch.zeros_like(scale)
        w = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
        b = shift.to(conv.weight.dtype)
        if conv.bias is not None:
            b = b + conv.bias * scale.to(conv.weight.dtype)
        layer.register_buffer("fused_conv_weight", w, persistent=False)
        layer.register_buffer("fused_conv_bias", b, persistent=False)
        conv.forward = InstanceForward(_folded_conv_forward, conv, compute)
        folded.append(name)
    return folded


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse`: the reprogramming layers and norms compute separately again (and can train)."""
    fused = getattr(model, _FUSED_ATTR, None)
    if fused is None:
        raise CLRError("model is not fused")
    pairs, convs = fused
    modules = dict(model.named_modules())
    for conv_name in [c for c, _ in pairs] + convs:
        layer = getattr(modules[conv_name], CLR_ATTR)
        for buf in ("fused_weight", "fused_bias", "fused_conv_weight", "fused_conv_bias"):
            if buf in layer._buffers:
                del layer._buffers[buf]
    for name in [n for _, n in pairs] + convs:
        module = modules[name]
        if "forward" in module.__dict__:
            del module.__dict__["forward"]
    delattr(model, _FUSED_ATTR)
    return model
