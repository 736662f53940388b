"""Per-instance forward overrides: the one mechanism through which a mode changes what one module's forward does.

``fuse`` (folded norms and convs), memory-efficient training (marking where a frozen conv runs) and mixed-task batches
(per-sample forwards) each set a forward on module *instances*, never on classes, and take it back. Overrides chain:
each wraps the forward that was there before (another override or the class's own), each is removed by its owner
alone wherever it sits in the chain, so the order in which modes are entered and left does not matter.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Override", "override_forward", "restore_forward", "is_overridden", "conv_computations"]


class Override:
    """A forward set on one module instance by ``owner``: calls ``fn(module, inner, *args, **kwargs)``.

    ``inner`` is the forward this one wraps (another override, a forward someone else set on the instance, or None
    for the class's own). The module is held weakly, so that module -> ``__dict__`` -> forward ->
    module is no reference cycle (a deleted model is freed at once), and a deep copy or a pickle of the module gets a
    forward bound to the copy.
    """

    def __init__(self, owner: str, fn: Callable, module: nn.Module, inner: Callable | None) -> None:
        self.owner, self.fn, self.inner = owner, fn, inner
        self._module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        inner = self.inner if self.inner is not None else type(module).forward.__get__(module)
        return self.fn(module, inner, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Override:
        module = copy.deepcopy(self._module(), memo)
        return Override(self.owner, copy.deepcopy(self.fn, memo), module, copy.deepcopy(self.inner, memo))

    def __reduce__(self):
        return Override, (self.owner, self.fn, self._module(), self.inner)


def override_forward(module: nn.Module, owner: str, fn: Callable) -> None:
    """Set ``fn(module, inner, *args, **kwargs)`` as ``module``'s forward, wrapping the current one."""
    module.__dict__["forward"] = Override(owner, fn, module, module.__dict__.get("forward"))


def restore_forward(module: nn.Module, owner: str) -> None:
    """Remove ``owner``'s overrides from ``module``, wherever they sit in the chain."""
    chain, tail = [], module.__dict__.get("forward")
    while isinstance(tail, Override):
        chain.append(tail)
        tail = tail.inner
    kept = [o for o in chain if o.owner != owner]
    if len(kept) == len(chain):
        return
    for outer, inner in zip(kept, [*kept[1:], tail]):
        outer.inner = inner
    head = kept[0] if kept else tail  # tail: a forward set on the instance by someone else, or None
    if head is None:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = head


def is_overridden(module: nn.Module, owner: str) -> bool:
    """Whether ``owner`` has an override on ``module``."""
    node = module.__dict__.get("forward")
    while isinstance(node, Override):
        if node.owner == owner:
            return True
        node = node.inner
    return False


def conv_computations() -> dict[Callable, Callable]:
    """``type(conv).forward`` -> ``f(conv, x, weight, bias)``, the same conv with given filters, for the conv classes
    whose forward is exactly one convolution (``nn.Conv2d`` and timm's ``Conv2dSame``, which pads first)."""
    forwards: dict[Callable, Callable] = {nn.Conv2d.forward: _plain_conv}
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # pragma: no cover - every supported timm has it
        return forwards
    forwards[Conv2dSame.forward] = _same_conv
    return forwards


def _plain_conv(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return conv._conv_forward(x, w, b)


def _same_conv(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    from timm.layers.conv2d_same import conv2d_same

    return conv2d_same(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
