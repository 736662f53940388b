"""Mixed-task batches: one backbone pass for a batch whose samples belong to different tasks (eval mode).

For the duration of one call, each reprogramming layer, each per-task norm and the head get a per-sample forward
(through :mod:`clr_timm._override`, removed afterwards, so the single-task path is never touched):

- a reprogramming layer gets its tensors stacked per sample and runs its own
  :meth:`~clr_timm.layers.ReprogrammingLayer.forward_per_sample` (a grouped conv with ``groups = B * C`` for the
  depthwise kernel; any kind without one falls back to one call per sample);
- BatchNorm in eval mode is one ``batch_norm`` over the samples' channels side by side, each with its task's
  statistics and affine; GroupNorm and LayerNorm (channels-first and channels-last) normalise without affine and apply
  each sample's weight and bias; timm's ``*Act`` norms then apply their own drop and activation. Other norm types
  fall back to running that one norm layer once per task present, on that task's samples;
- the head runs each task's head on its own samples, zero-padded to one tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ._override import override_forward, restore_forward
from .binding import Binding, Slot, TaskAdapter, split
from .errors import CLRError

__all__ = ["mixed_batch"]

_OWNER = "clr_timm.mixed"


@functools.cache
def _norm_kinds() -> dict[Callable, tuple[str, bool]]:
    """``type(norm).forward`` -> (family, has drop+act) for the norms with a vectorised per-sample forward."""
    from torch.nn.modules.batchnorm import _BatchNorm

    kinds: dict[Callable, tuple[str, bool]] = {
        _BatchNorm.forward: ("bn", False),
        nn.GroupNorm.forward: ("gn", False),
        nn.LayerNorm.forward: ("ln", False),
    }
    import timm.layers.norm as tn
    import timm.layers.norm_act as tna

    for module, name, kind in [
        (tna, "BatchNormAct2d", ("bn", True)),
        (tn, "GroupNorm", ("gn", False)),
        (tn, "GroupNorm1", ("gn", False)),
        (tna, "GroupNormAct", ("gn", True)),
        (tna, "GroupNorm1Act", ("gn", True)),
        (tn, "LayerNorm", ("ln", False)),
        (tna, "LayerNormAct", ("ln", True)),
        (tn, "LayerNorm2d", ("ln2d", False)),
        (tna, "LayerNormAct2d", ("ln2d", True)),
    ]:
        cls = getattr(module, name, None)  # absent from some timm versions
        if cls is not None:
            kinds[cls.forward] = kind
    return kinds


def _per_sample(stacked: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """From the tensors of the tasks present (U, ...), pick each sample's: (B, ...)."""
    # index_select rather than [inv]: on CPU, advanced indexing goes multi-threaded on far smaller inputs, and waking
    # the threads costs more than the copy (measured ~90 us vs ~4 us for a (32, 240) gather)
    return stacked.index_select(0, inv)


def _check_batch(x: torch.Tensor, inv: torch.Tensor, where: str) -> None:
    if x.shape[0] != inv.shape[0]:
        raise CLRError(
            f"{where!r} sees a batch of {x.shape[0]}, not the {inv.shape[0]} samples of the mixed batch: this model "
            "reshapes the batch dimension, so it cannot serve mixed-task batches; run one task at a time"
        )


def _layer_per_sample(
    where: str, t: dict[str, torch.Tensor], inv: torch.Tensor, layer: nn.Module, inner, *inputs: torch.Tensor
) -> torch.Tensor:
    _check_batch(inputs[0], inv, where)
    return layer.forward_per_sample({name: _per_sample(tensors, inv) for name, tensors in t.items()}, *inputs)


def _affine(y: torch.Tensor, t: dict[str, torch.Tensor], inv: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if "weight" in t and "bias" in t:  # one pass over y
        return torch.addcmul(_per_sample(t["bias"], inv).view(shape), y, _per_sample(t["weight"], inv).view(shape))
    if "weight" in t:
        y = y * _per_sample(t["weight"], inv).view(shape)
    if "bias" in t:
        y = y + _per_sample(t["bias"], inv).view(shape)
    return y


def _bn_per_sample(m: nn.Module, t: dict[str, torch.Tensor], inv: torch.Tensor, x: torch.Tensor):
    b = x.shape[0]
    if x.is_contiguous() and x.ndim > 2:
        # The samples' channels side by side as one sample of B x C channels: one eval batch_norm with each sample's
        # statistics and affine, ATen's own kernel and arithmetic, one pass over x.
        def per(name: str) -> torch.Tensor | None:
            return _per_sample(t[name], inv).reshape(-1) if name in t else None

        xs = x.view(1, b * x.shape[1], *x.shape[2:])
        y = F.batch_norm(xs, per("running_mean"), per("running_var"), per("weight"), per("bias"), False, 0.0, m.eps)
        return y.view_as(x)
    # Eval BatchNorm is the per-channel affine x * a + c, a = w / sqrt(var + eps), c = bias - mean * a.
    a = 1.0 / torch.sqrt(t["running_var"] + m.eps)
    if "weight" in t:
        a = a * t["weight"]
    c = -t["running_mean"] * a
    if "bias" in t:
        c = c + t["bias"]
    shape = (b, x.shape[1]) + (1,) * (x.ndim - 2)
    return x * a.index_select(0, inv).view(shape) + c.index_select(0, inv).view(shape)


def _norm_per_sample(
    where: str,
    family: str,
    act: bool,
    t: dict[str, torch.Tensor],
    inv: torch.Tensor,
    m: nn.Module,
    inner,
    x: torch.Tensor,
) -> torch.Tensor:
    """Eval-mode norm with each sample's own affine (and statistics), then the module's own drop and act."""
    _check_batch(x, inv, where)
    b = x.shape[0]
    if family == "bn":
        y = _bn_per_sample(m, t, inv, x)
    elif family == "gn":
        y = F.group_norm(x, m.num_groups, None, None, m.eps)
        y = _affine(y, t, inv, (b, x.shape[1]) + (1,) * (x.ndim - 2))
    else:
        h = x.permute(0, 2, 3, 1) if family == "ln2d" else x
        ns = tuple(m.normalized_shape)
        h = F.layer_norm(h, ns, None, None, m.eps)
        h = _affine(h, t, inv, (b,) + (1,) * (h.ndim - 1 - len(ns)) + ns)
        y = h.permute(0, 3, 1, 2) if family == "ln2d" else h
    if act:
        y = m.act(m.drop(y))
    return y


def _norm_per_task(
    where: str,
    slots: list[Slot],
    per_task: list[list[torch.Tensor]],
    inv: torch.Tensor,
    groups: list[torch.Tensor],
    m: nn.Module,
    forward,
    x: torch.Tensor,
) -> torch.Tensor:
    """Fallback for other norms: run this one layer once per task present, on that task's samples."""
    _check_batch(x, inv, where)
    live = [s.table(m)[s.attr] for s in slots]
    out = None
    try:
        for tensors, idx in zip(per_task, groups):
            for s, t in zip(slots, tensors):
                s.table(m)[s.attr] = t
            y = forward(x[idx])
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
    finally:
        for s, t in zip(slots, live):
            s.table(m)[s.attr] = t
    return out


class _MixedHead(nn.Module):
    """Stands in for the classifier during a mixed batch: each task's head on its samples, zero-padded to one tensor."""

    def __init__(self, heads: list[nn.Module], groups: list[torch.Tensor]) -> None:
        super().__init__()
        self._heads, self._groups = heads, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [head(x[idx]) for head, idx in zip(self._heads, self._groups)]
        width = max(o.shape[1] for o in outs)
        out = outs[0].new_zeros((x.shape[0], width, *outs[0].shape[2:]))
        for o, idx in zip(outs, self._groups):
            out[idx, : o.shape[1]] = o
        return out


def _per_sample_forward(
    where: str, m: nn.Module, kind: str, t: dict[str, torch.Tensor], inv: torch.Tensor, groups, slots
) -> Callable:
    """The per-sample forward of one module whose adapter tensors are ``t`` (name -> (U, ...): one per task)."""
    if kind == "clr":
        return functools.partial(_layer_per_sample, where, t, inv)
    family = _norm_kinds().get(type(m).forward)
    if m.training:
        raise CLRError(f"{where!r} is in train mode; mixed-task batches need eval mode: call mt.eval()")
    if family is not None and family[0] == "bn" and m.running_mean is None:
        raise CLRError(
            f"{where!r} is a BatchNorm without running statistics: it normalises with batch statistics even in eval "
            "mode, so the samples of a mixed batch cannot be independent"
        )
    if family is not None and not getattr(m, "_fast_norm", False):
        return functools.partial(_norm_per_sample, where, family[0], family[1], t, inv)
    per_task = [list(ts) for ts in zip(*(t[s.attr].unbind(0) for s in slots))]
    return functools.partial(_norm_per_task, where, slots, per_task, inv, groups)


@contextmanager
def mixed_batch(binding: Binding, adapters: list[TaskAdapter], inv: torch.Tensor) -> Iterator[None]:
    """Per-sample forwards on the reprogramming layers, the per-task norms and the head, for one mixed call.

    Args:
        binding: The slots of the shared model.
        adapters: The tasks present in the batch.
        inv: For each sample, the index of its task in ``adapters``.
    """
    groups = [torch.nonzero(inv == u).squeeze(1) for u in range(len(adapters))]
    # Each task's storage is one flat tensor per dtype: stack them once, every slot is a (U, ...) view of that.
    stacked = [torch.stack(flats) for flats in zip(*(a._flats for a in adapters))]
    u = len(adapters)
    by_module: dict[int, list[int]] = {}
    for i in range(len(binding.slots)):
        by_module.setdefault(id(binding.owners[i]), []).append(i)
    if len(binding.head_paths) > 1:
        raise CLRError(f"mixed-task batches need a single classifier module, the model has {binding.head_paths}")
    overridden: list[nn.Module] = []
    heads: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for indices in by_module.values():
            m, first = binding.owners[indices[0]], binding.slots[indices[0]]
            slots = [binding.slots[i] for i in indices]
            t = {s.attr: stacked[s.group][:, s.start : s.start + s.numel].view(u, *s.shape) for s in slots}
            forward = _per_sample_forward(first.module, m, first.kind, t, inv, groups, slots)
            override_forward(m, _OWNER, forward)
            overridden.append(m)
        for j, (path, parent) in enumerate(zip(binding.head_paths, binding.head_parents)):
            child = split(path)[1]
            task_heads = [a.heads()[j] for a in adapters]
            for head in task_heads:
                if head.training:  # a head keeps the mode of when it was last bound; mixed batches are eval only
                    head.train(False)
            heads.append((parent, child, parent._modules[child]))
            parent._modules[child] = _MixedHead(task_heads, groups)
        yield
    finally:
        for m in overridden:
            restore_forward(m, _OWNER)
        for parent, child, head in heads:
            parent._modules[child] = head
