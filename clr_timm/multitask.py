"""Many tasks on one frozen backbone: switch tasks by pointer, and serve batches that mix tasks in one pass.

:class:`MultiTaskModel` wraps an attached timm model and is the registry of its tasks. Each task owns a
:class:`~clr_timm.binding.TaskAdapter`: everything a single-task adapter holds (reprogramming layers, per-task norm
affines and BatchNorm statistics) in one flat tensor per dtype, and its own head module, of any size. Design choices:

- **A thousand tasks cost their bytes.** A task is a flat tensor and a head, a few dozen Python objects: memory
  stays within a few percent of the adapters' size, adding a task takes milliseconds and causes no long
  garbage-collection passes, ``eval()`` / ``train()`` set the shared model only, and saving k tasks into a folder
  reads and writes k tasks' files (``benchmarks/many_tasks.py``). The per-slot tensors a bound model points at are
  views of the flat storage, made when a task is bound and kept for the last few tasks bound and for every task whose
  Parameters were handed out (``set_task``, ``trainable_parameters``, ``parameters()``), so that an optimizer's
  Parameters stay the task's own.

- **The model stays a plain attached timm model.** Only one task is ever *bound* into it (:mod:`clr_timm.binding`
  re-points the model's adapter slots at the task's tensors; no data moves), so :meth:`MultiTaskModel.set_task` takes
  microseconds and a single-task forward is exactly the attached model's forward (bit-identical to
  :func:`~clr_timm.load_adapter` of the same file).
- **Isolation by construction.** Every task's tensors are its own storage. Training runs on the bound task's
  tensors only: its Parameters are the only ones with ``requires_grad=True`` (so ``[p for p in mt.parameters() if
  p.requires_grad]`` is safe), and BatchNorm in train mode updates the bound task's running statistics in place. No
  other task's bits can change.
- **State dict.** ``mt.state_dict()`` holds the frozen backbone under ``model.`` and every task under
  ``adapters.<task>.<key>``, where ``<key>`` is the plain model's own state_dict key. The bound slots of ``model.`` are
  aliases of a task's tensors and are left out, so each tensor appears exactly once. The portable format is one
  single-task adapter file per task (:meth:`~MultiTaskModel.save_pretrained` / :meth:`~MultiTaskModel.from_pretrained`
  and :meth:`~MultiTaskModel.save_task` / :meth:`~MultiTaskModel.load_task`), which :func:`~clr_timm.load_adapter`
  loads into a plain model.
- **Mixed-task batches** (``mt(x, tasks=[...])``, eval mode only) run the backbone once (:mod:`clr_timm.mixed`).
  Train-mode mixed batches are refused: BatchNorm batch statistics would mix tasks.
- **Head sizes differ**, so a mixed batch returns a **list of per-sample 1-D logits** (``out[i]`` has the size of
  sample ``i``'s head).
- **Threads.** Every call that binds a task or changes the shared model (``mt(x)``, ``mt(x, task=...)``,
  ``mt(x, tasks=[...])``, ``set_task``, ``add_task``, ``remove_task``, loading, saving, ``.to()``) holds one re-entrant
  lock of the instance, so calls from several threads are safe and run one at a time; so do ``copy.deepcopy(mt)``,
  pickling, ``state_dict`` / ``load_state_dict`` and ``load_task``'s check against the model, which therefore never
  see a mixed batch's per-sample forwards. For parallel inference, give each thread its own ``copy.deepcopy(mt)``
  (copy ``mt``, not ``mt.model``: only ``mt`` holds the lock), or compile / serve ``mt.model`` after ``set_task``.
- **Task oracles.** By default the caller names the tasks. :class:`EntropyOracle` picks, per sample, the task whose
  head is most confident (lowest normalised softmax entropy): ``mt.predict_task(x)`` or ``mt(x, tasks=oracle)``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import multitask_io
from .adapter import AdapterFile, _check_task_name, validate_adapter
from .attach import attach, detach, is_attached
from .binding import Binding, TaskAdapter
from .config import CLRConfig
from .errors import AdapterMismatchError, CLRError
from .mixed import mixed_batch
from .state import MULTITASK, Served, get_state, refuse_fused

__all__ = ["MultiTaskModel", "TaskAdapter", "TaskOracle", "EntropyOracle"]  # TaskAdapter: see clr_timm.binding


def _locked(method: Callable) -> Callable:
    """Serialise calls that bind tasks or change the shared model (see "Threads" in the module docstring)."""

    @functools.wraps(method)
    def wrapper(self: TaskSet, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------- state_dict hooks


def _drop_aliases(module: TaskSet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The bound slots of ``model.`` alias a task's tensors (saved under ``adapters.``): keep each tensor once."""
    base = prefix + "model."
    slots = {base + s.key for s in module._binding.slots}
    heads = tuple(base + h + "." for h in module._binding.head_paths)
    for k in [k for k in state_dict if k in slots or k.startswith(heads)]:
        del state_dict[k]


def _alias_bound(module: TaskSet, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading: feed the model's bound slots the bound task's values, so strict loading sees every key once."""
    bound = module._bound_task
    for key, live in module._binding.live_tensors().items():
        src = f"{prefix}adapters.{bound}.{key}"
        state_dict[f"{prefix}model.{key}"] = state_dict[src] if bound is not None and src in state_dict else live


def _after_load(module: TaskSet, incompatible_keys: Any) -> None:
    module._refresh()  # load_state_dict(assign=True) replaces tensors


def _register_state_dict_hooks(module: TaskSet) -> None:
    register_post = getattr(module, "register_state_dict_post_hook", module._register_state_dict_hook)
    register_post(_drop_aliases)
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(_alias_bound)
    else:  # torch < 2.5
        module._register_load_state_dict_pre_hook(_alias_bound, with_module=True)
    module.register_load_state_dict_post_hook(_after_load)


def _same_object(obj: Any) -> Any:
    """Unpickling a :class:`TaskSet`: the copy pickled in its place (see ``TaskSet.__reduce_ex__``)."""
    return obj


def _set_requires_grad(adapter: TaskAdapter, flag: bool) -> None:
    """Flip a task's Parameters, those it has made (a task whose per-slot tensors are not made has none to flip)."""
    for v in adapter._views or ():
        if isinstance(v, nn.Parameter):
            v.requires_grad = flag
    for head in adapter.heads():
        head.requires_grad_(flag)


_RECENT = 8
"""How many recently bound tasks keep their per-slot tensors (switching back to one of them makes none)."""


def _sample_tasks(mt: MultiTaskModel, x: torch.Tensor, tasks: Sequence[str] | TaskOracle) -> list[str]:
    """Each sample's task for a mixed batch, checked."""
    if isinstance(tasks, str):
        raise CLRError(f"tasks= takes one task name per sample; for one task for the whole batch use task={tasks!r}")
    names = list(tasks(mt, x)) if callable(tasks) else list(tasks)
    if len(names) != x.shape[0]:
        raise CLRError(f"tasks= names {len(names)} tasks for a batch of {x.shape[0]} samples")
    for name in dict.fromkeys(names):
        mt._adapter(name)
    if mt.model.training:
        raise CLRError(
            "mixed-task batches need eval mode (BatchNorm batch statistics would mix tasks): call mt.eval(), or "
            "train one task at a time with set_task"
        )
    return names


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


class TaskSet(nn.Module):
    """The task registry under :class:`MultiTaskModel`: the shared model, each task's tensors, which task is bound.

    Adding, removing and switching tasks, converting (``.to()``), the state dict and the lock live here; running tasks
    and their files live in :class:`MultiTaskModel`, the class to use.
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
        refuse_fused(model, "serving it as a MultiTaskModel")
        if is_attached(model) and config is not None and config != get_state(model).config:
            raise AdapterMismatchError(
                f"the model is attached with {get_state(model).config}, not {config}; call clr_timm.detach(model) first"
            )
        if not is_attached(model):
            attach(model, config)
        self.model = model
        state = get_state(model)
        if MULTITASK not in state.modes:
            state.enter(MULTITASK, Served())  # tells clr_timm.fuse that the tasks share this model
        self.adapters = nn.ModuleDict()
        self.config = state.config
        self._binding = Binding(model)
        self._bound_task: str | None = None  # whose tensors the model's slots point at (None: the model's own)
        self._current: str | None = None  # the task forward uses and training changes
        self._recent: OrderedDict[str, None] = OrderedDict()  # tasks bound lately, the latest last
        _register_state_dict_hooks(self)
        if task is not None:
            self._check_name(task)
            num_classes = getattr(model, "num_classes", None)
            labels = label_names if label_names is not None else state.label_names
            self._register(task, self._binding.adopt(num_classes, labels))
            self._bound_task = task
            self.set_task(task)
        else:
            for t in self._binding.live_tensors().values():
                t.requires_grad_(False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)  # locks do not pickle or deepcopy; each copy gets its own
        state.pop("_snapshot", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()
        self._refresh()  # the copied tasks hold their flat storage only: bind the bound one's views anew

    def __deepcopy__(self, memo: dict) -> TaskSet:
        # Under the lock: a mixed batch in another thread installs per-sample forwards on the shared model for the
        # duration of its call, which a copy taken meanwhile would keep.
        with self._lock:
            copied = type(self).__new__(type(self))
            memo[id(self)] = copied
            copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
            return copied

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # Pickling walks the model after this returns: hand it a copy taken under the lock, not the live model.
        if self.__dict__.get("_snapshot"):
            return super().__reduce_ex__(protocol)
        snapshot = copy.deepcopy(self)
        snapshot.__dict__["_snapshot"] = True
        return _same_object, (snapshot,)

    @_locked
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return super().state_dict(*args, **kwargs)

    @_locked
    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return super().load_state_dict(*args, **kwargs)

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

    @_locked
    def add_task(
        self, name: str, num_classes: int | None = None, *, label_names: list[str] | None = None
    ) -> TaskAdapter:
        """Add a new task: identity reprogramming layers, the backbone's original norms and a fresh head.

        Args:
            name: The task's name (no '.' or slashes: it is a state_dict prefix and a folder name).
            num_classes: Size of its head (default: the backbone's original number of classes). Must be left out,
                or equal the model's, when the config has no per-task head.
            label_names: Class names, recorded when the task is saved.

        Returns:
            The task's :class:`~clr_timm.binding.TaskAdapter`. The first task added becomes the current one.
        """
        return self._add_task(name, num_classes, label_names, init=True)

    def _add_task(
        self, name: str, num_classes: int | None, label_names: list[str] | None, *, init: bool
    ) -> TaskAdapter:
        self._check_name(name)
        if name in self.adapters:
            raise CLRError(f"task {name!r} already exists; remove_task({name!r}) first to replace it")
        adapter = self._binding.fresh(num_classes, label_names, init=init)
        self._register(name, adapter)
        if self._current is None:
            self.set_task(name)
        return adapter

    @_locked
    def remove_task(self, name: str) -> None:
        """Forget a task. Removing the current task leaves no current task until :meth:`set_task`."""
        adapter = self._adapter(name)
        _set_requires_grad(adapter, False)
        del self.adapters[name]
        self._recent.pop(name, None)
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
            _set_requires_grad(self.adapters[self._current], False)
        adapter.pin()  # what training holds (an optimizer's Parameters) stays the task's own for good
        self._bind(name)
        _set_requires_grad(adapter, True)
        self._current = name

    def _bind(self, name: str) -> None:
        self._binding.bind(self.adapters[name])
        self._bound_task = name
        self._recent[name] = None
        self._recent.move_to_end(name)
        while len(self._recent) > _RECENT:
            self.adapters[self._recent.popitem(last=False)[0]].release()

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

    @_locked
    def _apply(self, fn: Callable, recurse: bool = True) -> TaskSet:
        # .to() / .half() / .cuda() visit every tensor once, through its task, then the bound task is re-pointed
        # (buffers become new tensors on conversion, and the model's aliases must follow).
        if self._bound_task is not None:
            self._binding.unbind()
        try:
            super()._apply(fn, recurse)
        finally:
            self._refresh()
        return self

    def _refresh(self) -> None:
        """After tensors may have been replaced (conversion, ``load_state_dict(assign=True)``, a copy): re-point
        the model at the bound task and re-flag the current one."""
        if self._bound_task is not None:
            self._bind(self._bound_task)
        if self._current is not None:
            _set_requires_grad(self.adapters[self._current], True)

    def train(self, mode: bool = True) -> TaskSet:
        """Train or eval mode for the shared model; a task's head takes the model's mode when it is bound.

        Takes the same time whatever the number of tasks (``nn.Module.train`` would visit every task's modules).
        """
        if not isinstance(mode, bool):
            raise CLRError(f"train(mode) takes a bool, got {type(mode).__name__}")
        self.training = mode
        self.model.train(mode)
        return self

    @_locked
    def trainable_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """The Parameters of one task (default: the current one), for an optimizer's param groups."""
        name = task if task is not None else self._require_current()
        return list(self._adapter(name).parameters())

    @_locked
    def adapter_state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """One task's adapter (default: the current one), keyed as in the plain model's state_dict."""
        name = task if task is not None else self._require_current()
        return {k: v.detach() for k, v in self._adapter(name).state_dict(keep_vars=True).items()}

    def _require_current(self) -> str:
        if self._current is None:
            raise CLRError(f"no current task; call set_task(name) (tasks: {self.tasks}) or add_task(name, num_classes)")
        return self._current


class MultiTaskModel(TaskSet):
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

    Threads: see the module's docstring.
    """

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
            if task is not None:
                self._adapter(task)
            name = task if task is not None else self._require_current()
            if self.model.training and name != self._current:
                raise CLRError(
                    f"mt(x, task={task!r}) in train mode would train a task that is not the current one; call "
                    f"mt.set_task({task!r}) to train it, or mt.eval() to run it"
                )
            with self._bound(name):
                return self.model(x)
        if task is not None:
            raise CLRError("pass either task= (one task for the batch) or tasks= (one per sample), not both")
        names = _sample_tasks(self, x, tasks)
        unique = list(dict.fromkeys(names))
        if len(unique) == 1:
            with self._bound(unique[0]):
                out = self.model(x)
        else:
            inv = torch.tensor([unique.index(n) for n in names], device=x.device)
            with mixed_batch(self._binding, [self.adapters[u] for u in unique], inv):
                out = self.model(x)
        sizes = {u: self.adapters[u].num_classes for u in unique}
        return [out[i, : sizes[n]] if sizes[n] else out[i] for i, n in enumerate(names)]

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, oracle: str | TaskOracle = "entropy") -> list[str]:
        """Name a task for each sample with a task-agnostic oracle (``"entropy"``: :class:`EntropyOracle`)."""
        if isinstance(oracle, str):
            if oracle not in _ORACLES:
                raise CLRError(f"unknown oracle {oracle!r}; known: {sorted(_ORACLES)}, or pass a TaskOracle")
            oracle = _ORACLES[oracle]()
        return list(oracle(self, x))

    # -------------------------------------------------------------------------------- files and the Hub
    # Reading and writing are clr_timm.multitask_io's: these methods bind tasks and register what was read.

    @_locked
    def save_task(
        self, name: str, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, overwrite: bool = False
    ) -> Path:
        """Write one task's adapter file (recording ``name`` and its label names), as :func:`~clr_timm.save_adapter`."""
        labels = self._adapter(name).label_names
        with self._bound(name):
            return multitask_io.save_task(
                self.model, path, task=name, label_names=labels, dtype=dtype, overwrite=overwrite
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
        """Save tasks (default: all) as ``<folder>/<task>/clr_adapter.safetensors`` and more, with a card.

        It loads back with :meth:`from_pretrained` (one task: ``clr_timm.load_adapter(model, folder, task=name)``).
        """
        labels = {name: self._adapter(name).label_names for name in (tasks if tasks is not None else self.tasks)}
        return multitask_io.save_tasks(self.model, folder, labels, self._bound, dtype=dtype, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, tasks: Sequence[str] | None = None, *, dtype: Any = None, **kwargs: Any) -> Any:
        """Upload tasks (default: all) to a Hub repo in one commit; ``kwargs`` as in :func:`~clr_timm.push_folder`."""
        save = functools.partial(self.save_pretrained, tasks=tasks, dtype=dtype)
        return multitask_io.push_saved(save, repo_id, **kwargs)

    def load_task(
        self,
        name: str | None,
        source: str | os.PathLike,
        *,
        task: str | None = None,
        check_backbone: bool = True,
        **hub_kwargs: Any,
    ) -> str:
        """Add an adapter as a new task, and return its name; on any error no task is added.

        Args:
            name: The new task's name (default: ``task``, else the task the file records, else the file's name).
            source: An adapter file, a ``save_pretrained`` folder, or ``"hf-hub:org/name"``.
            task: The task's name in ``source``, as in :func:`~clr_timm.load_adapter`.
            check_backbone: Refuse an adapter recorded for other backbone weights.
            **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.
        """
        name, adapter = multitask_io.read_task(source, name=name, task=task, **hub_kwargs)  # I/O outside the lock
        with self._lock:  # checked against the model as no mixed batch is changing it
            validate_adapter(self.model, adapter, check_backbone=check_backbone)
            return self._load(name, adapter)

    @_locked
    def _load(self, name: str, adapter: AdapterFile) -> str:
        num_classes = adapter.num_classes if self.config.train_head else None
        created = self._add_task(name, num_classes, adapter.label_names, init=False)  # every tensor is loaded next
        try:
            multitask_io.copy_into(created, adapter, name)
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
        """A model serving many adapters: ``{"pets": "pets.safetensors", "birds": "hf-hub:org/birds"}``, or a list.

        Every adapter is read and checked against ``model`` before anything changes; the first is the current task.
        A list names each task after what its file records (else its file). ``model``'s own adapter, if any, is not
        kept (to keep it: ``MultiTaskModel(model, task=...)``, then :meth:`load_task`).
        """
        kwargs = dict(check_backbone=check_backbone, **hub_kwargs)
        return cls._serving(model, multitask_io.read_adapters(model, sources, **kwargs))

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
        """Tasks (default: all) of a ``save_pretrained`` folder or ``"hf-hub:org/name"``, as :meth:`from_adapters`.

        A folder with only a root adapter gives one task, named after the task it records.
        """
        kwargs = dict(check_backbone=check_backbone, **hub_kwargs)
        return cls._serving(model, multitask_io.read_pretrained(model, source, tasks, **kwargs))

    @classmethod
    def _serving(cls, model: nn.Module, loaded: list[tuple[str, AdapterFile]]) -> MultiTaskModel:
        was_attached = is_attached(model)
        mt = cls(model, loaded[0][1].config)
        try:
            for name, adapter in loaded:
                mt._load(name, adapter)
        except BaseException:
            if not was_attached:
                detach(model)
            raise
        return mt

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, current_task={self._current!r}"
