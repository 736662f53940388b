"""Binding one task at a time into a shared attached model: the adapter slots, and each task's own tensors.

A :class:`Binding` knows every adapter *slot* of an attached model (each reprogramming-layer tensor, each per-task
norm tensor, the head modules). Binding a :class:`TaskAdapter` re-points every slot at the task's own tensors by
dictionary assignment (``norm._parameters["weight"] = task_weight``, ``model.fc = task_head``): no tensor data moves,
so switching takes microseconds whatever the adapter's size, and the bound model is exactly a single-task attached
model. :class:`~clr_timm.MultiTaskModel` is the registry of tasks on top of this.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attach import _adapter_tensors, current_plan
from .errors import CLRError
from .state import get_state

__all__ = ["Binding", "TaskAdapter"]


@dataclass(frozen=True)
class Slot:
    """One adapter tensor of the model, e.g. ``layer1.0.bn1.running_mean``: owner module path and attribute name."""

    key: str
    module: str
    attr: str
    is_param: bool
    kind: str  # "clr", "norm_affine" or "norm_stats"

    def table(self, module: nn.Module) -> dict[str, Any]:
        return module._parameters if self.is_param else module._buffers


def _child(root: nn.Module, path: str) -> nn.Module:
    """The container at ``path`` under ``root``, created (as empty modules) where missing."""
    m = root
    for part in path.split(".") if path else []:
        if part not in m._modules:
            m._modules[part] = nn.Module()
        m = m._modules[part]
    return m


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[:i])


class TaskAdapter(nn.Module):
    """One task's adapter tensors and head, registered under the plain model's own state_dict keys.

    ``adapter.state_dict()`` has exactly the keys of the task's adapter file. Holds no forward: a :class:`Binding`
    binds these tensors into the backbone.

    Attributes:
        num_classes: Size of the task's head (the shared head's when the config has no per-task head).
        label_names: Class names recorded with the task, if any.
    """

    def __init__(self, num_classes: int | None, label_names: list[str] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names is not None else None
        # Aligned with Binding.slots / .head_paths: the containers holding each tensor / head module.
        self._owners: list[nn.Module] = []
        self._head_owners: list[nn.Module] = []
        # Set by Binding.register: (model's dict, this task's dict, name) for every pointer that binding re-points,
        # and the task's Parameters (switching flips their requires_grad).
        self._bindings: list[tuple[dict, dict, str]] = []
        self._params: list[nn.Parameter] = []

    def _put(self, slot: Slot, tensor: torch.Tensor) -> None:
        owner = _child(self, slot.module)
        slot.table(owner)[slot.attr] = tensor
        self._owners.append(owner)

    def _put_head(self, path: str, head: nn.Module) -> None:
        parent, name = split(path)
        owner = _child(self, parent)
        owner._modules[name] = head
        self._head_owners.append(owner)

    def tensors_of(self, i: int, slot: Slot) -> torch.Tensor:
        """The task's tensor for slot number ``i``."""
        return slot.table(self._owners[i])[slot.attr]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class Binding:
    """The adapter slots of one attached model, and how to point them at a task's tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        plan = current_plan(model)
        modules = dict(model.named_modules())
        self.slots: list[Slot] = []
        for key, _, kind in _adapter_tensors(model, plan):
            if kind != "head":
                path, attr = split(key)
                self.slots.append(Slot(key, path, attr, attr in modules[path]._parameters, kind))
        self.owners = [modules[s.module] for s in self.slots]
        self.head_paths = list(plan.head) if plan.config.train_head else []
        self.head_parents = [modules[split(h)[0]] for h in self.head_paths]
        ancestors = {p for h in self.head_paths for p in _ancestors(h)}
        self.num_classes_owners = [
            modules[p] for p in sorted(ancestors) if isinstance(getattr(modules[p], "num_classes", None), int)
        ]

    def register(self, adapter: TaskAdapter) -> None:
        """Record which model pointer each of the task's tensors and heads goes to."""
        adapter._bindings = [
            (s.table(m), s.table(o), s.attr) for s, m, o in zip(self.slots, self.owners, adapter._owners)
        ]
        adapter._bindings += [
            (parent._modules, own._modules, split(path)[1])
            for path, parent, own in zip(self.head_paths, self.head_parents, adapter._head_owners)
        ]
        adapter._params = list(adapter.parameters())

    def bind(self, adapter: TaskAdapter) -> None:
        for live, own, attr in adapter._bindings:
            live[attr] = own[attr]
        for m in self.num_classes_owners:
            m.num_classes = adapter.num_classes

    def unbind(self) -> None:
        for slot, live in zip(self.slots, self.owners):
            del slot.table(live)[slot.attr]
        for path, parent in zip(self.head_paths, self.head_parents):
            del parent._modules[split(path)[1]]

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """What the model's adapter slots hold now, under the plain model's keys."""
        live = {s.key: s.table(m)[s.attr] for s, m in zip(self.slots, self.owners)}
        for path, parent in zip(self.head_paths, self.head_parents):
            head = parent._modules[split(path)[1]]
            live.update({f"{path}.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
        return live

    def adopt(self, num_classes: int | None, label_names: list[str] | None) -> TaskAdapter:
        """A task made of the tensors and heads the model holds now (no copy)."""
        adapter = TaskAdapter(num_classes, label_names)
        for slot, live in zip(self.slots, self.owners):
            adapter._put(slot, slot.table(live)[slot.attr])
        for path, parent in zip(self.head_paths, self.head_parents):
            adapter._put_head(path, parent._modules[split(path)[1]])
        return adapter

    def fresh(self, num_classes: int | None, label_names: list[str] | None) -> TaskAdapter:
        """A new task: identity reprogramming layers, the backbone's original norms and a freshly initialised head.

        ``num_classes`` defaults to the model's number of classes before attach.
        """
        state = get_state(self.model)
        if num_classes is None:
            num_classes = state.num_classes
        if not self.head_paths and num_classes != getattr(self.model, "num_classes", None):
            raise CLRError(
                f"the model is attached with train_head=False, so every task shares its {self.model.num_classes}-class "
                f"head; cannot add a task with {num_classes} classes"
            )
        if label_names is not None and num_classes is not None and len(label_names) != num_classes:
            raise CLRError(f"{len(label_names)} label names given for a head of {num_classes} classes")
        base = state.base
        adapter = TaskAdapter(num_classes, label_names)
        fresh_layers = {
            id(live): self._reset_copy(live) for slot, live in zip(self.slots, self.owners) if slot.kind == "clr"
        }
        for slot, live in zip(self.slots, self.owners):
            current = slot.table(live)[slot.attr]
            if slot.kind == "clr":
                new = fresh_layers[id(live)][slot.attr]
            else:
                new = base[slot.key].to(device=current.device, dtype=current.dtype, copy=True)
            adapter._put(slot, nn.Parameter(new, requires_grad=False) if slot.is_param else new)
        for path, head in zip(self.head_paths, self._new_heads(num_classes)):
            adapter._put_head(path, head)
        return adapter

    @staticmethod
    def _reset_copy(layer: nn.Module) -> dict[str, torch.Tensor]:
        """New tensors holding ``layer``'s initial state (its own ``reset_parameters``), the layer left as it was."""
        table = layer._parameters
        current = dict(table)
        new = {n: torch.empty_like(p) for n, p in current.items() if p is not None}
        table.update(new)  # every tensor at once: reset_parameters may set several
        try:
            layer.reset_parameters()
        finally:
            table.update(current)
        return new

    def _new_heads(self, num_classes: int) -> list[nn.Module]:
        """Fresh heads from timm's ``reset_classifier``, leaving the model exactly as it was."""
        if not self.head_paths:
            return []
        model = self.model
        if not hasattr(model, "reset_classifier"):
            raise CLRError(f"{type(model).__name__} has no reset_classifier(); cannot make a head for a new task")
        ref = next(iter(model.parameters()))
        before = dict(model.named_modules())
        sizes = [m.num_classes for m in self.num_classes_owners]
        children = [split(path)[1] for path in self.head_paths]
        # reset_classifier may rebuild a head in place: give it stand-ins, not a task's heads.
        for parent, c in zip(self.head_parents, children):
            parent._modules[c] = copy.deepcopy(parent._modules[c])
        try:
            model.reset_classifier(num_classes)
            heads = [parent._modules[c] for parent, c in zip(self.head_parents, children)]
        finally:
            # timm rebuilds the pooling too (and may reset its type): put back every module as it was.
            for name in sorted(before, key=lambda n: n.count(".")):
                if name:
                    parent, child = split(name)
                    before[parent]._modules[child] = before[name]
            for m, k in zip(self.num_classes_owners, sizes):
                m.num_classes = k
        for head in heads:
            head.to(device=ref.device, dtype=ref.dtype)
            head.requires_grad_(False)
        return heads
