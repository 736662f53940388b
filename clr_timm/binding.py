"""Binding one task at a time into a shared attached model: the adapter slots, and each task's own tensors.

A :class:`Binding` knows every adapter *slot* of an attached model (each reprogramming-layer tensor, each per-task
norm tensor, the head modules). Binding a :class:`TaskAdapter` re-points every slot at the task's own tensors by
dictionary assignment (``norm._parameters["weight"] = task_weight``, ``model.fc = task_head``): no tensor data moves,
so switching takes microseconds whatever the adapter's size, and the bound model is exactly a single-task attached
model. :class:`~clr_timm.MultiTaskModel` is the registry of tasks on top of this.

A task stores its tensors in one flat tensor per dtype, placed by the :class:`Slot` layout the binding computes once
for the model; the per-slot tensors are views of it (see :class:`TaskAdapter`). Mixed-task batches
(:mod:`clr_timm.mixed`) read the flat storage of the tasks present directly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
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
    """One adapter tensor of the model, e.g. ``layer1.0.bn1.running_mean``, and where a task stores it.

    ``module`` and ``attr`` name the model's pointer to re-point; ``group``, ``start`` and ``shape`` place the tensor in
    a task's flat storage (one 1-D tensor per dtype, shared by every slot of that dtype).
    """

    key: str
    module: str
    attr: str
    is_param: bool
    kind: str  # "clr", "norm_affine" or "norm_stats"
    group: int
    start: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def table(self, module: nn.Module) -> dict[str, Any]:
        return module._parameters if self.is_param else module._buffers


def split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[:i])


def _view(flats: list[torch.Tensor], slot: Slot) -> torch.Tensor:
    return flats[slot.group][slot.start : slot.start + slot.numel].view(slot.shape)


class TaskAdapter(nn.Module):
    """One task: its adapter tensors in one flat tensor per dtype, and its head modules.

    A thousand tasks on one backbone are a thousand flat tensors, not a thousand copies of the model's module tree:
    few Python objects (no garbage-collection pauses, little memory beyond the tensors' bytes). The per-slot tensors
    (views of the flat storage, Parameters where the model has Parameters) are made when the task is bound into the
    model, and kept while it is bound, recently bound, or *pinned*: once its Parameters have been handed out
    (:meth:`~clr_timm.MultiTaskModel.set_task`, ``trainable_parameters``, ``parameters()``), a task keeps the same
    Parameter objects, so an optimizer built on them stays valid.

    ``adapter.state_dict()`` has exactly the keys of the task's adapter file, and ``load_state_dict`` takes them.
    Holds no forward: a :class:`Binding` binds these tensors into the backbone.

    Attributes:
        num_classes: Size of the task's head (the shared head's when the config has no per-task head).
        label_names: Class names recorded with the task, if any.
    """

    def __init__(
        self,
        slots: list[Slot],
        sizes: list[list[int]],
        flats: list[torch.Tensor],
        heads: dict[str, nn.Module],
        num_classes: int | None,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names is not None else None
        self._slots = slots  # shared by every task of one model
        self._sizes = sizes  # shared too: each flat tensor's slot sizes, in order
        self._flats = flats
        self._views: list[torch.Tensor] | None = None
        self.pinned = False
        for path, head in heads.items():
            self._modules[path] = head  # the model's own path ("fc", "head.fc"): state_dict keys come out right

    # ---------------------------------------------------------------------------------------- per-slot tensors

    def views(self) -> list[torch.Tensor]:
        """The task's tensor for every slot (made once, then kept until :meth:`release`)."""
        if self._views is None:
            # one split per flat tensor cuts every slot (they lie one after the other), then a view gives the shape
            pieces = [iter(flat.split(sizes)) for flat, sizes in zip(self._flats, self._sizes)]
            views = []
            for slot in self._slots:
                v = next(pieces[slot.group]).view(slot.shape)
                views.append(nn.Parameter(v, requires_grad=False) if slot.is_param else v)
            self._views = views
            for slot, v in zip(self._slots, views):
                slot.table(self)[slot.key] = v
        return self._views

    def tensor(self, i: int) -> torch.Tensor:
        """The task's tensor for slot ``i``, without making the others."""
        views = self._views  # read once: another thread may release them meanwhile
        return views[i] if views is not None else _view(self._flats, self._slots[i])

    def pin(self) -> None:
        """Keep the per-slot tensors for good: their Parameters have been handed out."""
        self.views()
        self.pinned = True

    def release(self) -> None:
        """Drop the per-slot tensors of a task that is not pinned (its values stay in the flat storage)."""
        if not self.pinned and self._views is not None:
            self._views = None
            self._parameters.clear()
            self._buffers.clear()

    def heads(self) -> list[nn.Module]:
        return list(self._modules.values())

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The heads' tensors, under the plain model's keys."""
        return {f"{p}.{k}": v for p, h in self._modules.items() for k, v in h.state_dict(keep_vars=True).items()}

    def copy_from(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set every tensor of the task from ``tensors``, which has exactly its keys and shapes (the caller checks):
        one concatenation per flat tensor, whatever the number of slots."""
        with torch.no_grad():
            for g, flat in enumerate(self._flats):
                torch.cat([tensors[s.key].reshape(-1) for s in self._slots if s.group == g], out=flat)
            for key, t in self.head_tensors().items():
                t.copy_(tensors[key])

    # ---------------------------------------------------------------------------------------- nn.Module protocol

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        self.pin()
        return super().named_parameters(*args, **kwargs)

    def get_parameter(self, target: str) -> nn.Parameter:
        self.pin()
        if target in self._parameters:
            return self._parameters[target]
        for path, head in self._modules.items():
            if target.startswith(path + "."):
                return head.get_parameter(target[len(path) + 1 :])
        return super().get_parameter(target)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for i, slot in enumerate(self._slots):
            t = self.tensor(i)
            destination[prefix + slot.key] = t if keep_vars else t.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing: list,
        unexpected: list,
        error_msgs: list,
    ) -> None:
        # Always a copy into the flat storage, also under assign=True: the task's tensors stay views of it.
        with torch.no_grad():
            for i, slot in enumerate(self._slots):
                key = prefix + slot.key
                if key not in state_dict:
                    if strict:
                        missing.append(key)
                    continue
                value, target = state_dict[key], self.tensor(i)
                if tuple(value.shape) != slot.shape:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                        f"the shape in current model is {slot.shape}."
                    )
                    continue
                target.copy_(value)
        if strict:
            keys = {s.key for s in self._slots}
            heads = tuple(h + "." for h in self._modules)
            for key in state_dict:
                rest = key[len(prefix) :]
                if key.startswith(prefix) and rest not in keys and not rest.startswith(heads):
                    unexpected.append(key)

    def _apply(self, fn: Callable, recurse: bool = True) -> TaskAdapter:
        self._flats = [fn(f) for f in self._flats]
        if self._views is not None:
            for slot, v in zip(self._slots, self._views):
                new = _view(self._flats, slot)
                if not torch._has_compatible_shallow_copy_type(v, new):  # e.g. another device: new objects
                    self._views = None
                    self.views()
                    break
                v.data = new  # the same objects (an optimizer's Parameters stay valid), as nn.Module._apply does
        for head in self._modules.values():
            head._apply(fn)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # copies and pickles hold the flat storage only; their views are made anew
        state.update(_views=None, _parameters={}, _buffers={})
        return state

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tensors={len(self._slots)}"


class Binding:
    """The adapter slots of one attached model, and how to point them at a task's tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        plan = current_plan(model)
        modules = dict(model.named_modules())
        self.slots: list[Slot] = []
        dtypes: list[torch.dtype] = []
        sizes: list[int] = []
        for key, t, kind in _adapter_tensors(model, plan):
            if kind == "head":
                continue
            path, attr = split(key)
            if t.dtype not in dtypes:
                dtypes.append(t.dtype)
                sizes.append(0)
            g = dtypes.index(t.dtype)
            self.slots.append(
                Slot(key, path, attr, attr in modules[path]._parameters, kind, g, sizes[g], tuple(t.shape))
            )
            sizes[g] += t.numel()
        self.sizes = sizes
        self.split_sizes = [[s.numel for s in self.slots if s.group == g] for g in range(len(sizes))]
        self.owners = [modules[s.module] for s in self.slots]
        self.first_slots = [next(i for i, s in enumerate(self.slots) if s.group == g) for g in range(len(sizes))]
        self.head_paths = list(plan.head) if plan.config.train_head else []
        self.head_parents = [modules[split(h)[0]] for h in self.head_paths]
        ancestors = {p for h in self.head_paths for p in _ancestors(h)}
        self.num_classes_owners = [
            modules[p] for p in sorted(ancestors) if isinstance(getattr(modules[p], "num_classes", None), int)
        ]

    def bind(self, adapter: TaskAdapter) -> None:
        """Point every slot of the model at the task's tensors, and its head modules in place of the model's."""
        for slot, owner, v in zip(self.slots, self.owners, adapter.views()):
            slot.table(owner)[slot.attr] = v
        training = self.model.training
        for path, parent, head in zip(self.head_paths, self.head_parents, adapter.heads()):
            if head.training != training:
                head.train(training)
            parent._modules[split(path)[1]] = head
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

    def _empty_flats(self) -> list[torch.Tensor]:
        """Uninitialised flat storage for one task, each group in the dtype and device its slots have now."""
        firsts = {}
        for i in self.first_slots:
            slot = self.slots[i]
            firsts[slot.group] = slot.table(self.owners[i])[slot.attr]
        return [torch.empty(n, dtype=firsts[g].dtype, device=firsts[g].device) for g, n in enumerate(self.sizes)]

    def adopt(self, num_classes: int | None, label_names: list[str] | None) -> TaskAdapter:
        """A task made of the tensors and heads the model holds now: the same objects, their values moved into the
        task's flat storage (``tensor.data`` re-pointed, as ``nn.Module.to`` does)."""
        flats = self._empty_flats()
        live = [slot.table(owner)[slot.attr] for slot, owner in zip(self.slots, self.owners)]
        with torch.no_grad():
            for slot, t in zip(self.slots, live):
                view = _view(flats, slot)
                view.copy_(t)
                t.data = view
        heads = {path: parent._modules[split(path)[1]] for path, parent in zip(self.head_paths, self.head_parents)}
        adapter = TaskAdapter(self.slots, self.split_sizes, flats, heads, num_classes, label_names)
        adapter._views = live
        for slot, t in zip(self.slots, live):
            slot.table(adapter)[slot.key] = t
        adapter.pinned = True  # whoever made the model may hold these tensors (an optimizer): keep them
        return adapter

    def fresh(self, num_classes: int | None, label_names: list[str] | None, *, init: bool = True) -> TaskAdapter:
        """A new task: identity reprogramming layers, the backbone's original norms and a freshly initialised head.

        ``num_classes`` defaults to the model's number of classes before attach. ``init=False`` leaves the
        reprogramming layers and norms uninitialised, for a task whose tensors are about to be loaded.
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
        flats = self._template(state.base) if init else self._empty_flats()
        heads = dict(zip(self.head_paths, self._new_heads(num_classes) if init else self._blank_heads(num_classes)))
        return TaskAdapter(self.slots, self.split_sizes, flats, heads, num_classes, label_names)

    def _template(self, base: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """A new task's storage: each reprogramming layer's own initial state, the norms' original values.

        When the layers' initial state draws no random numbers (the identity of the paper's kinds), it is the same
        for every task: it is made once (per dtype and device) and copied.
        """
        flats = self._empty_flats()
        key = tuple((f.dtype, f.device) for f in flats)
        cached = getattr(self, "_fresh", None)
        if cached is not None and cached[0] == key:
            return [f.clone() for f in cached[1]]
        layers: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
        rng = torch.random.get_rng_state()
        with torch.no_grad():
            for slot, owner in zip(self.slots, self.owners):
                if slot.kind == "clr":
                    layers.setdefault(id(owner), (owner, {}))[1][slot.attr] = _view(flats, slot)
                else:
                    _view(flats, slot).copy_(base[slot.key])
            for layer, views in layers.values():
                self._reset_into(layer, views)
        on_cpu = all(f.device.type == "cpu" for f in flats)
        if on_cpu and torch.equal(rng, torch.random.get_rng_state()):  # deterministic: the same for every task
            self._fresh = (key, [f.clone() for f in flats])
        return flats

    @staticmethod
    def _reset_into(layer: nn.Module, views: dict[str, torch.Tensor]) -> None:
        """Write ``layer``'s initial state (its own ``reset_parameters``) into ``views``, the layer left as it was."""
        table = layer._parameters
        current = dict(table)
        table.update(views)  # every tensor at once: reset_parameters may set several, in place
        try:
            layer.reset_parameters()
        finally:
            table.update(current)

    def _blank_heads(self, num_classes: int) -> list[nn.Module]:
        """Heads of the right size whose values are about to be loaded: copies of one made once per size."""
        ref = next(iter(self.model.parameters()))
        key = (num_classes, ref.dtype, ref.device)
        blanks = self.__dict__.setdefault("_blanks", {})
        if key not in blanks:
            blanks[key] = self._new_heads(num_classes)
        return [copy.deepcopy(head) for head in blanks[key]]

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
