"""Many tasks on one frozen backbone: switch tasks by pointer, and serve batches that mix tasks in one pass.

:class:`MultiTaskModel` wraps an attached timm model. Each task owns a :class:`TaskAdapter`: one tensor for every
tensor a single-task adapter holds (CLR kernels, per-task norm affines and BatchNorm statistics) and its own head
module, of any size. Design choices:

- **The model stays a plain attached timm model.** Only one task is ever *bound* into it. Binding re-points every
  adapter slot of the model at the task's own tensors by dictionary assignment (``norm._parameters["weight"] =
  task_weight``, ``norm._buffers["running_mean"] = task_mean``, ``model.fc = task_head``): no tensor data moves, so
  :meth:`MultiTaskModel.set_task` takes microseconds whatever the adapter's size, and a single-task forward is exactly
  the attached model's forward (same modules and kernels; bit-identical to :func:`~clr_timm.load_adapter` of the
  same file).
- **Isolation by construction.** Every task's tensors are distinct objects. Training runs on the bound task's
  tensors only: its Parameters are the only ones with ``requires_grad=True`` (so ``[p for p in mt.parameters() if
  p.requires_grad]`` is safe), and BatchNorm in train mode updates the bound task's running statistics in place. No
  other task's bits can change.
- **State dict.** ``mt.state_dict()`` holds the frozen backbone under ``model.`` and every task under
  ``adapters.<task>.<key>``, where ``<key>`` is the plain model's own state_dict key. The bound slots of ``model.`` are
  aliases of a task's tensors and are left out, so each tensor appears exactly once. The portable format is one
  single-task adapter file per task (:meth:`~MultiTaskModel.save_pretrained` / :meth:`~MultiTaskModel.from_pretrained`
  and :meth:`~MultiTaskModel.save_task` / :meth:`~MultiTaskModel.load_task`), which :func:`~clr_timm.load_adapter`
  loads into a plain model.
- **Mixed-task batches** (``mt(x, tasks=[...])``, eval mode only) run the backbone once. For that call each CLR
  layer, each per-task norm and the head get a per-sample forward, set on the instance and removed afterwards, so the
  single-task path is never touched: CLR kernels are gathered per sample and applied as one grouped conv with
  ``groups = B * C``; BatchNorm in eval mode is a per-channel affine, applied with a per-sample scale and shift built
  from each sample's task statistics; GroupNorm and LayerNorm (channels-first and channels-last) normalise without
  affine and apply each sample's weight and bias; timm's ``*Act`` norms then apply their own drop and activation.
  Other norm types fall back to running that one norm layer once per task present, on that task's samples.
  Train-mode mixed batches are refused: BatchNorm batch statistics would mix tasks.
- **Head sizes differ**, so a mixed batch returns a **list of per-sample 1-D logits** (``out[i]`` has the size of
  sample ``i``'s head). Internally each task's head runs on its own samples.
- **Task oracles.** By default the caller names the tasks. :class:`EntropyOracle` picks, per sample, the task whose
  head is most confident (lowest normalised softmax entropy): ``mt.predict_task(x)`` or ``mt(x, tasks=oracle)``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import (
    ADAPTER_FILE,
    AdapterFile,
    _check_task_name,
    _resolve,
    _validate,
    read_adapter,
    save_adapter,
)
from .attach import _MULTITASK_ATTR, _adapter_tensors, _refuse_fused, _state, attach, current_plan, is_attached
from .config import CLRConfig
from .errors import AdapterMismatchError, CLRError
from .layers import CLRConv2d, CLRScale

__all__ = ["MultiTaskModel", "TaskAdapter", "TaskOracle", "EntropyOracle"]

_HUB_PREFIX = "hf-hub:"


def _locked(method: Callable) -> Callable:
    """Serialise calls that bind tasks or change the shared model (see "Threads" in the class docstring)."""

    @functools.wraps(method)
    def wrapper(self: MultiTaskModel, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


_MISSING = object()


@dataclass(frozen=True)
class _Slot:
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


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


class TaskAdapter(nn.Module):
    """One task's adapter tensors and head, registered under the plain model's own state_dict keys.

    ``adapter.state_dict()`` has exactly the keys of the task's adapter file. Holds no forward: the
    :class:`MultiTaskModel` binds these tensors into the backbone.

    Attributes:
        num_classes: Size of the task's head (the shared head's when the config has no per-task head).
        label_names: Class names recorded with the task, if any.
    """

    def __init__(self, num_classes: int | None, label_names: list[str] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names is not None else None
        # Aligned with MultiTaskModel._slots / ._head_paths: the containers holding each tensor / head module.
        self._owners: list[nn.Module] = []
        self._head_owners: list[nn.Module] = []
        # Set by MultiTaskModel: (model's dict, this task's dict, name) for every pointer that binding re-points, and
        # the task's Parameters (switching flips their requires_grad).
        self._bindings: list[tuple[dict, dict, str]] = []
        self._params: list[nn.Parameter] = []

    def _put(self, slot: _Slot, tensor: torch.Tensor) -> None:
        owner = _child(self, slot.module)
        slot.table(owner)[slot.attr] = tensor
        self._owners.append(owner)

    def _put_head(self, path: str, head: nn.Module) -> None:
        parent, name = _split(path)
        owner = _child(self, parent)
        owner._modules[name] = head
        self._head_owners.append(owner)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


# ------------------------------------------------------------------------------------------- per-sample forwards


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


def _per_sample(tensors: list[torch.Tensor], inv: torch.Tensor) -> torch.Tensor:
    """Stack the tensors of the tasks present (U, ...) and pick each sample's: (B, ...)."""
    # index_select rather than [inv]: on CPU, advanced indexing goes multi-threaded on far smaller inputs, and waking
    # the threads costs more than the copy (measured ~90 us vs ~4 us for a (32, 240) gather)
    return torch.stack(tensors).index_select(0, inv)


def _check_batch(x: torch.Tensor, inv: torch.Tensor, where: str) -> None:
    if x.shape[0] != inv.shape[0]:
        raise CLRError(
            f"{where!r} sees a batch of {x.shape[0]}, not the {inv.shape[0]} samples of the mixed batch: this model "
            "reshapes the batch dimension, so it cannot serve mixed-task batches; run one task at a time"
        )


def _clr_per_sample(
    where: str, layer: nn.Module, weights: list[torch.Tensor], inv: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    _check_batch(x, inv, where)
    b, c = x.shape[:2]
    w = _per_sample(weights, inv)
    if isinstance(layer, CLRScale):
        return x * w.to(x.dtype).view(b, c, *([1] * (x.ndim - 2)))
    k = layer.kernel_size
    # One depthwise conv per (sample, channel): a grouped conv over the batch folded into the channels.
    y = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), w.reshape(b * c, 1, k, k), None, 1, k // 2, 1, b * c)
    return y.view(b, c, *y.shape[2:])


def _affine(
    y: torch.Tensor, t: dict[str, list[torch.Tensor]], inv: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    if "weight" in t and "bias" in t:  # one pass over y
        return torch.addcmul(_per_sample(t["bias"], inv).view(shape), y, _per_sample(t["weight"], inv).view(shape))
    if "weight" in t:
        y = y * _per_sample(t["weight"], inv).view(shape)
    if "bias" in t:
        y = y + _per_sample(t["bias"], inv).view(shape)
    return y


def _norm_per_sample(
    where: str,
    m: nn.Module,
    family: str,
    act: bool,
    t: dict[str, list[torch.Tensor]],
    inv: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """Eval-mode norm with each sample's own affine (and statistics), then the module's own drop and act."""
    _check_batch(x, inv, where)
    b = x.shape[0]
    if family == "bn" and x.is_contiguous() and x.ndim > 2:
        # The samples' channels side by side as one sample of B x C channels: one eval batch_norm with each sample's
        # statistics and affine, ATen's own kernel and arithmetic, one pass over x.
        def per(name: str) -> torch.Tensor | None:
            return _per_sample(t[name], inv).reshape(-1) if name in t else None

        xs = x.view(1, b * x.shape[1], *x.shape[2:])
        y = F.batch_norm(xs, per("running_mean"), per("running_var"), per("weight"), per("bias"), False, 0.0, m.eps)
        y = y.view_as(x)
    elif family == "bn":
        # Eval BatchNorm is the per-channel affine x * a + c, a = w / sqrt(var + eps), c = bias - mean * a.
        a = 1.0 / torch.sqrt(torch.stack(t["running_var"]) + m.eps)
        if "weight" in t:
            a = a * torch.stack(t["weight"])
        c = -torch.stack(t["running_mean"]) * a
        if "bias" in t:
            c = c + torch.stack(t["bias"])
        shape = (b, x.shape[1]) + (1,) * (x.ndim - 2)
        y = x * a.index_select(0, inv).view(shape) + c.index_select(0, inv).view(shape)
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


def _groups(inv: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [torch.nonzero(inv == u).squeeze(1) for u in range(n)]


def _norm_per_task(
    where: str,
    m: nn.Module,
    forward: Callable,
    slots: list[_Slot],
    per_task: list[list[torch.Tensor]],
    inv: torch.Tensor,
    groups: list[torch.Tensor],
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


# ------------------------------------------------------------------------------------------- state_dict hooks


def _drop_aliases(module: MultiTaskModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The bound slots of ``model.`` alias a task's tensors (saved under ``adapters.``): keep each tensor once."""
    base = prefix + "model."
    slots = {base + s.key for s in module._slots}
    heads = tuple(base + h + "." for h in module._head_paths)
    for k in [k for k in state_dict if k in slots or k.startswith(heads)]:
        del state_dict[k]


def _alias_bound(module: MultiTaskModel, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading: feed the model's bound slots the bound task's values, so strict loading sees every key once."""
    bound = module._bound_task
    for key, live in module._live_tensors().items():
        src = f"{prefix}adapters.{bound}.{key}"
        state_dict[f"{prefix}model.{key}"] = state_dict[src] if bound is not None and src in state_dict else live


def _after_load(module: MultiTaskModel, incompatible_keys: Any) -> None:
    module._refresh()  # load_state_dict(assign=True) replaces tensors


def _set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad = flag


# ------------------------------------------------------------------------------------------- oracles


@runtime_checkable
class TaskOracle(Protocol):
    """Anything that names a task for each sample of a batch: ``oracle(mt, x) -> [task, ...]``."""

    def __call__(self, model: MultiTaskModel, x: torch.Tensor) -> Sequence[str]: ...


class EntropyOracle:
    """Task-agnostic routing: each sample goes to the task whose head is most confident on it.

    Confidence is the softmax entropy of the task's logits, divided by ``log(num_classes)`` when ``normalize`` so that
    heads of different sizes compare fairly (0: one-hot, 1: uniform). Costs one backbone pass per candidate task.

    Args:
        tasks: Candidate tasks (default: every task of the model).
        normalize: Divide each entropy by the log of its head's size.
    """

    def __init__(self, tasks: Sequence[str] | None = None, normalize: bool = True) -> None:
        self.tasks = list(tasks) if tasks is not None else None
        self.normalize = normalize

    def scores(self, model: MultiTaskModel, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The candidate tasks and a (B, T) tensor of each sample's entropy under each task (lower: more confident)."""
        tasks = self.tasks if self.tasks is not None else model.tasks
        if not tasks:
            raise CLRError("the model has no tasks to route to; add or load tasks first")
        columns = []
        with torch.no_grad():
            for name in tasks:
                logits = model(x, task=name).flatten(1).float()
                h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
                k = logits.shape[1]
                columns.append(h / math.log(k) if self.normalize and k > 1 else h)
        return list(tasks), torch.stack(columns, 1)

    def __call__(self, model: MultiTaskModel, x: torch.Tensor) -> list[str]:
        tasks, h = self.scores(model, x)
        return [tasks[i] for i in h.argmin(1).tolist()]

    def __repr__(self) -> str:
        return f"EntropyOracle(tasks={self.tasks}, normalize={self.normalize})"


_ORACLES: dict[str, Callable[[], TaskOracle]] = {"entropy": EntropyOracle}


# ------------------------------------------------------------------------------------------- the model


class MultiTaskModel(nn.Module):
    """One frozen backbone and any number of task adapters, each with its own head size.

    Args:
        model: A timm model, attached or not (it is attached with ``config`` if not).
        config: The CLR config to attach with when ``model`` is not attached yet.
        task: Adopt the model's current adapter (e.g. one just trained or loaded) as this task, without copying it.
            Without it the model starts with no task; the first task added becomes the current one.
        label_names: Class names of the adopted task.

    Example::

        mt = clr_timm.MultiTaskModel(timm.create_model("resnet50", pretrained=True))
        mt.add_task("pets", 37)
        mt.add_task("flowers", 102)
        mt.set_task("pets")          # train as usual: only pets' tensors require grad
        mt.save_pretrained("zoo")    # zoo/pets/clr_adapter.safetensors, zoo/flowers/...
        mt.eval()
        logits = mt(x, tasks=["pets", "flowers", "pets"])   # one pass; a list of per-sample logits

    The wrapped ``mt.model`` is the live backbone: move and convert ``mt`` (``mt.cuda()``, ``mt.half()``), not
    ``mt.model`` alone, and load or save tasks through ``mt`` (:meth:`load_task`, :meth:`save_task`) rather than with
    ``clr_timm.load_adapter(mt.model, ...)``, which would write into whichever task is bound. One MultiTaskModel per
    model.

    Threads: every call that binds a task or changes the shared model (``mt(x)``, ``mt(x, task=...)``,
    ``mt(x, tasks=[...])``, ``set_task``, ``add_task``, ``remove_task``, loading, saving, ``.to()``) holds one
    re-entrant lock of this instance, so calls from several threads are safe and run one at a time. For parallel
    inference, give each thread its own ``copy.deepcopy(mt)``, or compile / serve ``mt.model`` after ``set_task``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CLRConfig | None = None,
        *,
        task: str | None = None,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self._lock = threading.RLock()
        _refuse_fused(model, "serving it as a MultiTaskModel")
        if is_attached(model) and config is not None and config != _state(model).config:
            raise AdapterMismatchError(
                f"the model is attached with {_state(model).config}, not {config}; call clr_timm.detach(model) first"
            )
        if not is_attached(model):
            attach(model, config)
        self.model = model
        object.__setattr__(model, _MULTITASK_ATTR, True)  # tells clr_timm.fuse that the tasks share this model
        self.adapters = nn.ModuleDict()
        plan = current_plan(model)
        self.config = plan.config
        modules = dict(model.named_modules())
        self._slots: list[_Slot] = []
        for key, _, kind in _adapter_tensors(model, plan):
            if kind == "head":
                continue
            path, attr = _split(key)
            self._slots.append(_Slot(key, path, attr, attr in modules[path]._parameters, kind))
        self._owners = [modules[s.module] for s in self._slots]
        self._head_paths = list(plan.head) if plan.config.train_head else []
        self._head_parents = [modules[_split(h)[0]] for h in self._head_paths]
        ancestors = {p for h in self._head_paths for p in self._ancestors(h)}
        self._num_classes_owners = [
            modules[p] for p in sorted(ancestors) if isinstance(getattr(modules[p], "num_classes", None), int)
        ]
        self._bound_task: str | None = None  # whose tensors the model's slots point at (None: the model's own)
        self._current: str | None = None  # the task forward uses and training changes
        register_post = getattr(self, "register_state_dict_post_hook", self._register_state_dict_hook)
        register_post(_drop_aliases)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_alias_bound)
        else:  # torch < 2.5
            self._register_load_state_dict_pre_hook(_alias_bound, with_module=True)
        self.register_load_state_dict_post_hook(_after_load)
        if task is not None:
            self._adopt(task, label_names)
        else:
            for _, t in self._live_tensors().items():
                t.requires_grad_(False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)  # locks do not pickle or deepcopy; each copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    @staticmethod
    def _ancestors(path: str) -> Iterator[str]:
        parts = path.split(".")
        for i in range(len(parts)):
            yield ".".join(parts[:i])

    # -------------------------------------------------------------------------------- tasks

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks, in the order they were added."""
        return list(self.adapters.keys())

    @property
    def current_task(self) -> str | None:
        """The task a plain ``mt(x)`` runs and training changes."""
        return self._current

    @property
    def num_classes(self) -> int | None:
        """Head size of the current task."""
        return self.adapters[self._current].num_classes if self._current is not None else None

    def _check_name(self, name: str) -> None:
        _check_task_name(name)
        if name is None or "." in name:
            raise CLRError(f"task name must be a non-empty string without '.' or slashes, got {name!r}")

    def _adapter(self, name: str) -> TaskAdapter:
        if name not in self.adapters:
            raise CLRError(f"no task {name!r}; tasks: {self.tasks}")
        return self.adapters[name]

    def _register(self, name: str, adapter: TaskAdapter) -> None:
        self.adapters._modules[name] = adapter  # not add_module: a task may be called "train" or "items"
        adapter._bindings = [
            (s.table(m), s.table(o), s.attr) for s, m, o in zip(self._slots, self._owners, adapter._owners)
        ]
        adapter._bindings += [
            (parent._modules, own._modules, _split(path)[1])
            for path, parent, own in zip(self._head_paths, self._head_parents, adapter._head_owners)
        ]
        adapter._params = list(adapter.parameters())

    def _adopt(self, name: str, label_names: list[str] | None) -> None:
        self._check_name(name)
        state = _state(self.model)
        num_classes = getattr(self.model, "num_classes", None)
        adapter = TaskAdapter(num_classes, label_names if label_names is not None else state.label_names)
        for slot, live in zip(self._slots, self._owners):
            adapter._put(slot, slot.table(live)[slot.attr])
        for path, parent in zip(self._head_paths, self._head_parents):
            adapter._put_head(path, parent._modules[_split(path)[1]])
        self._register(name, adapter)
        self._bound_task = name
        self.set_task(name)

    @_locked
    def add_task(
        self, name: str, num_classes: int | None = None, *, label_names: list[str] | None = None
    ) -> TaskAdapter:
        """Add a new task: identity kernels, the backbone's original norms and a freshly initialised head.

        Args:
            name: The task's name (no '.' or slashes: it is a state_dict prefix and a folder name).
            num_classes: Size of its head (default: the backbone's original number of classes). Must be left out,
                or equal the model's, when the config has no per-task head.
            label_names: Class names, recorded when the task is saved.

        Returns:
            The task's :class:`TaskAdapter`. The first task added becomes the current one.
        """
        self._check_name(name)
        if name in self.adapters:
            raise CLRError(f"task {name!r} already exists; remove_task({name!r}) first to replace it")
        state = _state(self.model)
        if num_classes is None:
            num_classes = state.num_classes
        if not self._head_paths and num_classes != getattr(self.model, "num_classes", None):
            raise CLRError(
                f"the model is attached with train_head=False, so every task shares its {self.model.num_classes}-class "
                f"head; cannot add a task with {num_classes} classes"
            )
        if label_names is not None and num_classes is not None and len(label_names) != num_classes:
            raise CLRError(f"{len(label_names)} label names given for a head of {num_classes} classes")
        adapter = TaskAdapter(num_classes, label_names)
        for slot, live in zip(self._slots, self._owners):
            table = slot.table(live)
            current = table[slot.attr]
            if slot.kind == "clr":
                new = torch.empty_like(current)
                table[slot.attr] = new
                try:
                    live.reset_parameters()  # the layer's own identity, written into the new tensor
                finally:
                    table[slot.attr] = current
            else:
                new = state.base[slot.key].to(device=current.device, dtype=current.dtype, copy=True)
            adapter._put(slot, nn.Parameter(new, requires_grad=False) if slot.is_param else new)
        for path, head in zip(self._head_paths, self._new_heads(num_classes)):
            adapter._put_head(path, head)
        self._register(name, adapter)
        if self._current is None:
            self.set_task(name)
        return adapter

    def _new_heads(self, num_classes: int) -> list[nn.Module]:
        """Fresh heads from timm's ``reset_classifier``, leaving the model exactly as it was."""
        if not self._head_paths:
            return []
        model = self.model
        if not hasattr(model, "reset_classifier"):
            raise CLRError(f"{type(model).__name__} has no reset_classifier(); cannot make a head for a new task")
        ref = next(iter(model.parameters()))
        before = dict(model.named_modules())
        sizes = [m.num_classes for m in self._num_classes_owners]
        children = [_split(path)[1] for path in self._head_paths]
        bound = [parent._modules[c] for parent, c in zip(self._head_parents, children)]
        # reset_classifier may rebuild a head in place: give it stand-ins, not a task's heads.
        for parent, c, head in zip(self._head_parents, children, bound):
            parent._modules[c] = copy.deepcopy(head)
        try:
            model.reset_classifier(num_classes)
            heads = [parent._modules[c] for parent, c in zip(self._head_parents, children)]
        finally:
            # timm rebuilds the pooling too (and may reset its type): put back every module as it was.
            for name in sorted(before, key=lambda n: n.count(".")):
                if name:
                    parent, child = _split(name)
                    before[parent]._modules[child] = before[name]
            for m, k in zip(self._num_classes_owners, sizes):
                m.num_classes = k
        for head in heads:
            head.to(device=ref.device, dtype=ref.dtype)
            head.requires_grad_(False)
        return heads

    @_locked
    def remove_task(self, name: str) -> None:
        """Forget a task. Removing the current task leaves no current task until :meth:`set_task`."""
        adapter = self._adapter(name)
        _set_requires_grad(adapter._params, False)
        del self.adapters[name]
        if self._current == name:
            self._current = None
        if self._bound_task == name:
            self._bound_task = None  # its tensors stay in the model's slots until another task is bound

    @_locked
    def set_task(self, name: str) -> None:
        """Make ``name`` the current task: re-point the model's adapter slots at its tensors (no data is copied).

        Only the current task's Parameters require grad afterwards, so a plain training loop trains this task only.
        """
        adapter = self._adapter(name)
        if self._current is not None and self._current != name:
            _set_requires_grad(self.adapters[self._current]._params, False)
        self._bind(name)
        _set_requires_grad(adapter._params, True)
        self._current = name

    def _bind(self, name: str) -> None:
        adapter = self.adapters[name]
        for live, own, attr in adapter._bindings:
            live[attr] = own[attr]
        for m in self._num_classes_owners:
            m.num_classes = adapter.num_classes
        self._bound_task = name

    def _unbind(self) -> None:
        for slot, live in zip(self._slots, self._owners):
            del slot.table(live)[slot.attr]
        for path, parent in zip(self._head_paths, self._head_parents):
            del parent._modules[_split(path)[1]]

    @contextmanager
    def _bound(self, name: str) -> Iterator[None]:
        """Bind a task for the duration of a call, and the previously bound one after."""
        previous = self._bound_task
        if name != previous:
            self._bind(name)
        try:
            yield
        finally:
            if previous is not None and previous != name:
                self._bind(previous)

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """What the model's adapter slots hold now, under the plain model's keys."""
        live = {s.key: s.table(m)[s.attr] for s, m in zip(self._slots, self._owners)}
        for path, parent in zip(self._head_paths, self._head_parents):
            head = parent._modules[_split(path)[1]]
            live.update({f"{path}.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
        return live

    @_locked
    def _apply(self, fn: Callable, recurse: bool = True) -> MultiTaskModel:
        # .to() / .half() / .cuda() visit every tensor once, through its task, then the bound task is re-pointed
        # (buffers become new tensors on conversion, and the model's aliases must follow).
        bound = self._bound_task
        if bound is not None:
            self._unbind()
        try:
            super()._apply(fn, recurse)
        finally:
            self._refresh()
        return self

    def _refresh(self) -> None:
        """After tensors may have been replaced (conversion, ``load_state_dict(assign=True)``): re-point and re-flag."""
        for name, adapter in self.adapters.items():
            adapter._params = list(adapter.parameters())
            _set_requires_grad(adapter._params, name == self._current)
        if self._bound_task is not None:
            self._bind(self._bound_task)

    def trainable_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """The Parameters of one task (default: the current one), for an optimizer's param groups."""
        name = task if task is not None else self._require_current()
        return list(self._adapter(name)._params)

    def adapter_state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """One task's adapter (default: the current one), keyed as in the plain model's state_dict."""
        name = task if task is not None else self._require_current()
        return {k: v.detach() for k, v in self._adapter(name).state_dict(keep_vars=True).items()}

    def _require_current(self) -> str:
        if self._current is None:
            raise CLRError(f"no current task; call set_task(name) (tasks: {self.tasks}) or add_task(name, num_classes)")
        return self._current

    # -------------------------------------------------------------------------------- forward

    @_locked
    def forward(
        self,
        x: torch.Tensor,
        tasks: Sequence[str] | TaskOracle | None = None,
        *,
        task: str | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the current task, one named task, or a batch that mixes tasks.

        Args:
            x: A batch of images.
            tasks: One task name per sample, or a :class:`TaskOracle` that names them. Needs eval mode. The backbone
                runs once for the whole batch.
            task: Run this task instead of the current one (eval mode, unless it is the current task).

        Returns:
            A logits tensor for the current task or ``task``; with ``tasks``, a list of per-sample 1-D logits, each
            the size of its task's head.
        """
        if tasks is None:
            if task is None:
                self._require_current()
                return self.model(x)
            self._adapter(task)
            if self.model.training and task != self._current:
                raise CLRError(
                    f"mt(x, task={task!r}) in train mode would train a task that is not the current one; call "
                    f"mt.set_task({task!r}) to train it, or mt.eval() to run it"
                )
            with self._bound(task):
                return self.model(x)
        if task is not None:
            raise CLRError("pass either task= (one task for the batch) or tasks= (one per sample), not both")
        if isinstance(tasks, str):
            raise CLRError(
                f"tasks= takes one task name per sample; for one task for the whole batch use task={tasks!r}"
            )
        names = list(tasks(self, x)) if callable(tasks) else list(tasks)
        if len(names) != x.shape[0]:
            raise CLRError(f"tasks= names {len(names)} tasks for a batch of {x.shape[0]} samples")
        for name in dict.fromkeys(names):
            self._adapter(name)
        if self.model.training:
            raise CLRError(
                "mixed-task batches need eval mode (BatchNorm batch statistics would mix tasks): call mt.eval(), or "
                "train one task at a time with set_task"
            )
        unique = list(dict.fromkeys(names))
        if len(unique) == 1:
            with self._bound(unique[0]):
                out = self.model(x)
        else:
            inv = torch.tensor([unique.index(n) for n in names], device=x.device)
            with self._mixed([self.adapters[u] for u in unique], inv):
                out = self.model(x)
        sizes = {u: self.adapters[u].num_classes for u in unique}
        return [out[i, : sizes[n]] if sizes[n] else out[i] for i, n in enumerate(names)]

    @contextmanager
    def _mixed(self, adapters: list[TaskAdapter], inv: torch.Tensor) -> Iterator[None]:
        """Per-sample forwards on the CLR layers, the per-task norms and the head, for one mixed call."""
        kinds = _norm_kinds()
        groups = _groups(inv, len(adapters))
        overridden: list[tuple[nn.Module, Any]] = []
        heads: list[tuple[nn.Module, str, nn.Module]] = []

        def override(module: nn.Module, forward: Callable) -> None:
            overridden.append((module, module.__dict__.get("forward", _MISSING)))
            module.__dict__["forward"] = forward

        def tensors(i: int) -> list[torch.Tensor]:
            slot = self._slots[i]
            return [slot.table(a._owners[i])[slot.attr] for a in adapters]

        try:
            by_module: dict[int, list[int]] = {}
            for i, slot in enumerate(self._slots):
                if slot.kind == "clr":
                    layer = self._owners[i]
                    if not isinstance(layer, (CLRConv2d, CLRScale)):
                        raise CLRError(f"no per-sample forward for {type(layer).__name__} at {slot.module!r}")
                    override(layer, functools.partial(_clr_per_sample, slot.module, layer, tensors(i), inv))
                else:
                    by_module.setdefault(id(self._owners[i]), []).append(i)
            for indices in by_module.values():
                m, where = self._owners[indices[0]], self._slots[indices[0]].module
                kind = kinds.get(type(m).forward)
                if m.training:
                    raise CLRError(f"{where!r} is in train mode; mixed-task batches need eval mode: call mt.eval()")
                if kind is not None and kind[0] == "bn" and m.running_mean is None:
                    raise CLRError(
                        f"{where!r} is a BatchNorm without running statistics: it normalises with batch statistics "
                        "even in eval mode, so the samples of a mixed batch cannot be independent"
                    )
                if kind is not None and not getattr(m, "_fast_norm", False):
                    t = {self._slots[i].attr: tensors(i) for i in indices}
                    override(m, functools.partial(_norm_per_sample, where, m, kind[0], kind[1], t, inv))
                else:
                    slots = [self._slots[i] for i in indices]
                    per_task = [list(ts) for ts in zip(*(tensors(i) for i in indices))]
                    override(m, functools.partial(_norm_per_task, where, m, m.forward, slots, per_task, inv, groups))
            if len(self._head_paths) > 1:
                raise CLRError(f"mixed-task batches need a single classifier module, the model has {self._head_paths}")
            for j, (path, parent) in enumerate(zip(self._head_paths, self._head_parents)):
                child = _split(path)[1]
                task_heads = [a._head_owners[j]._modules[child] for a in adapters]
                heads.append((parent, child, parent._modules[child]))
                parent._modules[child] = _MixedHead(task_heads, groups)
            yield
        finally:
            for module, previous in reversed(overridden):
                if previous is _MISSING:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = previous
            for parent, child, head in heads:
                parent._modules[child] = head

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, oracle: str | TaskOracle = "entropy") -> list[str]:
        """Name a task for each sample with a task-agnostic oracle (``"entropy"``: :class:`EntropyOracle`)."""
        if isinstance(oracle, str):
            if oracle not in _ORACLES:
                raise CLRError(f"unknown oracle {oracle!r}; known: {sorted(_ORACLES)}, or pass a TaskOracle")
            oracle = _ORACLES[oracle]()
        return list(oracle(self, x))

    # -------------------------------------------------------------------------------- files and the Hub

    @_locked
    def save_task(
        self,
        name: str,
        path: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write one task's adapter file, in the single-task format that :func:`~clr_timm.load_adapter` reads."""
        adapter = self._adapter(name)
        with self._bound(name), self._keeping_state():
            return save_adapter(
                self.model, path, dtype, task=name, label_names=adapter.label_names, overwrite=overwrite
            )

    @_locked
    def save_pretrained(
        self,
        folder: str | os.PathLike,
        tasks: Sequence[str] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save tasks (default: all) in the Hub layout, ``<folder>/<task>/clr_adapter.safetensors``, with a card.

        The folder loads back with :meth:`from_pretrained`, one task with ``clr_timm.load_adapter(model, folder,
        task=name)``, and uploads with :func:`~clr_timm.push_folder`.
        """
        from .hub import save_pretrained

        for name in tasks if tasks is not None else self.tasks:
            adapter = self._adapter(name)
            with self._bound(name), self._keeping_state():
                save_pretrained(
                    self.model, folder, name, dtype=dtype, label_names=adapter.label_names, overwrite=overwrite
                )
        return Path(folder)

    def push_to_hub(self, repo_id: str, tasks: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Upload tasks (default: all) to one Hub repo, one folder per task, in a single commit.

        ``kwargs`` go to :func:`~clr_timm.push_folder` (``revision``, ``private``, ``token``, ``commit_message``, ...),
        except ``dtype``, which sets the storage dtype.
        """
        import tempfile

        from .hub import push_folder

        dtype = kwargs.pop("dtype", None)
        with tempfile.TemporaryDirectory(prefix="clr_timm-push-") as tmp:
            self.save_pretrained(tmp, tasks, dtype=dtype)
            (Path(tmp) / "README.md").unlink(missing_ok=True)  # the card is rebuilt from the repo's own
            return push_folder(tmp, repo_id, **kwargs)

    @contextmanager
    def _keeping_state(self) -> Iterator[None]:
        # save_adapter records the task and labels it saved on the model; they belong to the tasks here.
        state = _state(self.model)
        kept = state.task, state.label_names
        try:
            yield
        finally:
            state.task, state.label_names = kept

    def load_task(
        self,
        name: str | None,
        source: str | os.PathLike,
        *,
        task: str | None = None,
        check_backbone: bool = True,
        **hub_kwargs: Any,
    ) -> str:
        """Load an adapter file, a ``save_pretrained`` folder's task or a Hub task as a new task.

        Args:
            name: Name of the new task (default: the task recorded in the file, else the file's or folder's name).
            source: An adapter file, a folder, or ``"hf-hub:org/name"``.
            task: The task's subfolder in a folder or Hub repo, as in :func:`~clr_timm.load_adapter`.
            check_backbone: Refuse an adapter recorded for other backbone weights.
            **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.

        Returns:
            The task's name. On any error no task is added.
        """
        adapter = read_adapter(_resolve(source, task, hub_kwargs))
        name = name or _name_of(adapter, task)
        _validate(self.model, adapter, check_backbone)
        return self._load(name, adapter)

    @_locked
    def _load(self, name: str, adapter: AdapterFile) -> str:
        self._check_name(name)
        if name in self.adapters:
            raise CLRError(f"task {name!r} already exists; remove_task({name!r}) first to replace it")
        num_classes = adapter.num_classes if self._head_paths else None
        created = self.add_task(name, num_classes, label_names=adapter.label_names)
        try:
            tensors = created.state_dict(keep_vars=True)
            differ = sorted(set(tensors) ^ set(adapter.tensors))
            if differ:
                raise AdapterMismatchError(f"{adapter.path}: tensor {differ[0]!r} does not fit task {name!r}")
            with torch.no_grad():
                for k, v in adapter.tensors.items():
                    tensors[k].copy_(v)
        except BaseException:
            self.remove_task(name)
            raise
        return name

    @classmethod
    def from_adapters(
        cls,
        model: nn.Module,
        sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
        *,
        check_backbone: bool = True,
        **hub_kwargs: Any,
    ) -> MultiTaskModel:
        """A model serving many adapters at once: ``{"pets": "pets.safetensors", "birds": "hf-hub:org/birds"}``.

        Every adapter is read and checked against ``model`` before anything changes; the first one becomes the
        current task. A list of sources names each task after its file's metadata (else its file or folder). An
        attached ``model``'s own adapter is not kept: wrap it with ``MultiTaskModel(model, task=...)`` and
        :meth:`load_task` the others to keep it.
        """
        items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
        return cls._from_files(model, [(n, s, None) for n, s in items], check_backbone, hub_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        source: str | os.PathLike,
        tasks: Sequence[str] | None = None,
        *,
        check_backbone: bool = True,
        **hub_kwargs: Any,
    ) -> MultiTaskModel:
        """Load tasks (default: all) from a ``save_pretrained`` folder or a Hub repo (``"hf-hub:org/name"``).

        Every adapter is read and checked against ``model`` before anything changes; the first task becomes the
        current one. A folder with only a root adapter gives one task, named after the task recorded in it.
        """
        if tasks is None:
            if isinstance(source, str) and source.startswith(_HUB_PREFIX):
                from .hub import list_tasks

                kw = {k: hub_kwargs[k] for k in ("revision", "token") if k in hub_kwargs}
                tasks = list_tasks(source[len(_HUB_PREFIX) :], **kw)
            else:
                folder = Path(source)
                if not folder.is_dir():
                    raise CLRError(f"{folder} is not a folder; use from_adapters for adapter files")
                tasks = sorted(p.parent.name for p in folder.glob(f"*/{ADAPTER_FILE}"))
                if not tasks and (folder / ADAPTER_FILE).is_file():
                    return cls._from_files(model, [(None, folder, None)], check_backbone, hub_kwargs)
            if not tasks:
                raise CLRError(f"no task folders (<task>/{ADAPTER_FILE}) in {source}")
        return cls._from_files(model, [(t, source, t) for t in tasks], check_backbone, hub_kwargs)

    @classmethod
    def _from_files(
        cls,
        model: nn.Module,
        items: list[tuple[str | None, str | os.PathLike, str | None]],
        check_backbone: bool,
        hub_kwargs: dict[str, Any],
    ) -> MultiTaskModel:
        if not items:
            raise CLRError("no adapters given")
        loaded: list[tuple[str, AdapterFile]] = []
        for name, source, sub in items:
            adapter = read_adapter(_resolve(source, sub, dict(hub_kwargs)))
            name = name or _name_of(adapter, sub)
            if name in (n for n, _ in loaded):
                raise CLRError(f"two adapters for task {name!r}; name them with a dict {{name: source}}")
            if loaded and adapter.config != loaded[0][1].config:
                raise AdapterMismatchError(
                    f"{adapter.path} was made with {adapter.config}, but {loaded[0][1].path} with "
                    f"{loaded[0][1].config}: one MultiTaskModel serves adapters of one config"
                )
            _validate(model, adapter, check_backbone)
            loaded.append((name, adapter))
        was_attached = is_attached(model)
        mt = cls(model, loaded[0][1].config)
        try:
            for name, adapter in loaded:
                mt._load(name, adapter)
        except BaseException:
            if not was_attached:
                from .attach import detach

                detach(model)
            raise
        return mt

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, current_task={self._current!r}"


def _name_of(adapter: AdapterFile, sub: str | None) -> str:
    if sub:
        return sub
    if adapter.task:
        return adapter.task
    path = Path(adapter.path)
    return path.parent.name if path.name == ADAPTER_FILE else path.stem
