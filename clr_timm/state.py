"""The one record an attached model carries: its config, what attach changed, and every mode it is in.

:func:`~clr_timm.attach` sets a :class:`CLRState` on the model; everything else reads it through :func:`get_state`.
A mode (``fuse``, memory-efficient training, being served by a ``MultiTaskModel``) is an object with a
``remove(model)`` method, entered into the record and left through it, so that :func:`~clr_timm.detach` ends them all
with one :meth:`CLRState.teardown` and needs to know none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .config import CLRConfig
from .errors import CLRError

__all__ = ["CLRState", "Mode", "find_state", "get_state", "refuse_fused", "FUSED", "MEMORY_EFFICIENT", "MULTITASK"]

STATE_ATTR = "_clr_state"
FUSED, MEMORY_EFFICIENT, MULTITASK = "fused", "memory_efficient", "multitask"


class Mode(Protocol):
    """What a model is in besides attached; ``remove`` takes back everything entering it changed."""

    def remove(self, model: nn.Module) -> None: ...


class Served:
    """The mode of a model whose adapter slots a ``MultiTaskModel`` re-points between its tasks."""

    def remove(self, model: nn.Module) -> None:
        pass


@dataclass
class CLRState:
    """Everything attach changed (so that detach and reset can undo it), and the modes the model is in.

    Attributes:
        config: The config the model is attached with.
        targets: Names of the convs that carry a reprogramming layer.
        requires_grad: Each parameter's flag before attach.
        base: Original values of the norm and head tensors the adapter owns.
        num_classes: The model's number of classes before attach.
        frozen_norms: Norms kept in eval mode (their statistics are not part of training).
        guarded: (module, method) pairs whose re-parameterisation is blocked while attached.
        task: Task name of the adapter last loaded into the model, if any.
        label_names: Class names of the adapter last loaded into the model, if any.
        modes: The modes the model is in, by name (:data:`FUSED`, :data:`MEMORY_EFFICIENT`, :data:`MULTITASK`).
    """

    config: CLRConfig
    targets: list[str]
    requires_grad: dict[str, bool]
    base: dict[str, torch.Tensor]
    num_classes: int | None
    frozen_norms: list[str]
    guarded: list[tuple[str, str]] = field(default_factory=list)
    task: str | None = None
    label_names: list[str] | None = None
    modes: dict[str, Mode] = field(default_factory=dict)

    def enter(self, name: str, mode: Mode) -> None:
        if name in self.modes:
            raise CLRError(f"the model is already {name.replace('_', '-')}")
        self.modes[name] = mode

    def leave(self, model: nn.Module, name: str) -> None:
        mode = self.modes.pop(name, None)
        if mode is not None:
            mode.remove(model)

    def teardown(self, model: nn.Module) -> None:
        """Leave every mode, the last entered first."""
        for name in reversed(list(self.modes)):
            self.leave(model, name)


def find_state(model: nn.Module) -> CLRState | None:
    """The model's state record, or None when it is not attached."""
    return getattr(model, STATE_ATTR, None)


def get_state(model: nn.Module) -> CLRState:
    """The model's state record; raises :class:`~clr_timm.CLRError` when it is not attached."""
    state = find_state(model)
    if state is None:
        raise CLRError(f"{type(model).__name__} has no CLR adapter attached; call clr_timm.attach(model) first")
    return state


def refuse_fused(model: nn.Module, action: str) -> None:
    """Folded copies of the adapter would go stale if the adapter changed under them."""
    state = find_state(model)
    if state is not None and FUSED in state.modes:
        raise CLRError(f"the model is fused (clr_timm.fuse): call clr_timm.unfuse(model) before {action}")
