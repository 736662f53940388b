"""A MultiTaskModel's tasks to and from adapter files, ``save_pretrained`` folders and the Hub.

Every task is saved as the single-task adapter file that :func:`~clr_timm.load_adapter` reads, so any task of a
:class:`~clr_timm.MultiTaskModel` loads into a plain model and back. The methods ``save_task``, ``save_pretrained``,
``push_to_hub``, ``load_task``, ``from_adapters`` and ``from_pretrained`` of the class are thin over these functions,
which see the wrapped model and what binds a task into it, never the class itself (it sits above this module).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ADAPTER_FILE, AdapterFile, backbone_fingerprint, extract_adapter, validate_adapter, write_adapter
from .attach import plan_targets
from .binding import TaskAdapter, _view
from .card import CARD_FILE, model_license, write_local_card, write_task_folder
from .count import ParameterCount, count_parameters
from .errors import AdapterMismatchError, CLRError
from .hub import list_tasks, push_folder
from .save_load import read_source
from .source import folder_tasks, parse_source

__all__ = [
    "Binder",
    "save_task",
    "save_tasks",
    "push_saved",
    "read_task",
    "read_adapters",
    "read_pretrained",
    "copy_into",
]

Binder = Callable[[str], AbstractContextManager]
"""Binds a task's tensors into the wrapped model for the duration of a ``with`` block (``MultiTaskModel._bound``)."""


# ------------------------------------------------------------------------------------------------------- saving


def save_task(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task: str,
    label_names: list[str] | None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the task bound in ``model`` to an adapter file, recording ``task`` and exactly ``label_names``."""
    adapter = extract_adapter(model, task=task, dtype=dtype, label_names=label_names)
    return Path(write_adapter(adapter, path, overwrite=overwrite).path)


def save_tasks(
    model: nn.Module,
    folder: str | os.PathLike,
    tasks: Mapping[str, list[str] | None],
    bind: Binder,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write each task (name -> label names) into ``folder/<task>/``, bound in turn, then the folder's card once.

    The card is updated from what was just written (other tasks keep their rows), so the time is linear in the number
    of tasks saved, not in the number of tasks in the folder.
    """
    folder = Path(folder)
    license = model_license(model)
    counts: dict[int | None, ParameterCount] = {}  # tasks differ in their head's size only
    written = []
    fingerprint = None  # computed once: the tasks differ only in what the fingerprint leaves out
    for name, labels in tasks.items():
        with bind(name):
            fingerprint = fingerprint or backbone_fingerprint(model)
            adapter = extract_adapter(model, task=name, dtype=dtype, label_names=labels, _fingerprint=fingerprint)
            size = getattr(model, "num_classes", None)
            count = counts[size] if size in counts else counts.setdefault(size, count_parameters(model))
            written.append(write_task_folder(adapter, folder, name, count=count, license=license, overwrite=overwrite))
    write_local_card(folder, written)
    return folder


def push_saved(save: Callable[[Path], Any], repo_id: str, **push_kwargs: Any) -> Any:
    """Upload what ``save(folder)`` writes to a Hub repo in one commit (the repo's own card is updated, not replaced).

    ``push_kwargs`` go to :func:`~clr_timm.push_folder`.
    """
    with tempfile.TemporaryDirectory(prefix="clr_timm-push-") as tmp:
        save(Path(tmp))
        (Path(tmp) / CARD_FILE).unlink(missing_ok=True)  # the card is rebuilt from the repo's own
        return push_folder(tmp, repo_id, **push_kwargs)


# ------------------------------------------------------------------------------------------------------ reading


def _name_of(adapter: AdapterFile, task: str | None) -> str:
    """A task's default name: the subfolder it was read from, else the task it records, else its file's name."""
    if task:
        return task
    if adapter.task:
        return adapter.task
    path = Path(adapter.path)
    return path.parent.name if path.name == ADAPTER_FILE else path.stem


def read_task(
    source: str | os.PathLike, *, name: str | None = None, task: str | None = None, **hub_kwargs: Any
) -> tuple[str, AdapterFile]:
    """Read one adapter (as :func:`~clr_timm.save_load.read_source` does); the caller checks it against the model.

    Returns:
        The task's name (``name``, else :func:`_name_of`) and the adapter.
    """
    adapter = read_source(source, task=task, **hub_kwargs)
    return name or _name_of(adapter, task), adapter


def _same_backbone(model: nn.Module, adapter: AdapterFile, fingerprints: dict[str, str | None]) -> bool:
    """Whether ``adapter`` records ``model``'s backbone fingerprint, the model's computed once per config (it covers
    the tensors the config leaves frozen) and then compared as a string: loading N adapters hashes the backbone once."""
    if not adapter.backbone_fingerprint:
        return True
    key = repr(adapter.config)
    if key not in fingerprints:
        fingerprints[key] = backbone_fingerprint(model, _plan=plan_targets(model, adapter.config))
    mine = fingerprints[key]
    return mine is None or mine == adapter.backbone_fingerprint


def _fit_key(adapter: AdapterFile, packed: PackedTensors) -> tuple:
    """Everything :func:`~clr_timm.validate_adapter` can look at but the values: two adapters with the same key pass
    or fail the same checks against one model (the task, its label names and the file's path aside; the raw metadata
    is what the other fields were parsed from)."""
    meta = tuple(
        (f.name, repr(getattr(adapter, f.name)))
        for f in dataclasses.fields(adapter)
        if f.name not in ("tensors", "path", "task", "label_names", "metadata")  # metadata: the others, as text
    )
    return (*meta, packed._layout)  # one object per distinct table: every tensor's name, shape, dtype and place


class PackedTensors(Mapping[str, torch.Tensor]):
    """An adapter's tensors packed into one flat tensor per dtype, in file order: a read-only mapping whose tensors
    are views made on demand.

    Loading many tasks reads and checks every file before any is used, so all their tensors are alive at once;
    packed, a task is a couple of tensors instead of hundreds (the cyclic garbage collector walks every live tensor
    at each full collection: ~285,000 for 1,000 ResNet-50 tasks). :func:`copy_into` copies a packed adapter into a
    task with one ``index_select`` per flat tensor.
    """

    def __init__(self, layout: _Layout, flats: tuple[torch.Tensor, ...]) -> None:
        self._layout = layout
        self._flats = flats

    @classmethod
    def pack(cls, tensors: Mapping[str, torch.Tensor], layouts: dict[tuple, _Layout]) -> PackedTensors:
        """``tensors`` as one flat tensor per dtype; ``layouts`` shares one :class:`_Layout` per table (the keys of the
        tasks of one model). When each dtype's tensors are contiguous views of one 1-D tensor, as the reader cuts them
        from a file's data, that tensor is the flat one (no copy); else they are concatenated in file order."""
        flats: dict[torch.dtype, torch.Tensor] = {}
        specs = []
        for key, t in tensors.items():
            mine = t._base if t._base is not None else t
            base = flats.setdefault(t.dtype, mine)
            start = t.storage_offset() - base.storage_offset()
            if mine is not base or not t.is_contiguous() or start < 0 or start + t.numel() > base.numel():
                return cls._concatenated(tensors, layouts)
            specs.append((key, tuple(t.shape), t.dtype, start))
        if any(b.dim() != 1 or not b.is_contiguous() or b.dtype != d for d, b in flats.items()):
            return cls._concatenated(tensors, layouts)
        return cls(_Layout.shared(tuple(specs), layouts), tuple(flats.values()))

    @classmethod
    def _concatenated(cls, tensors: Mapping[str, torch.Tensor], layouts: dict[tuple, _Layout]) -> PackedTensors:
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        sizes: dict[torch.dtype, int] = {}
        specs = []
        for key, t in tensors.items():
            specs.append((key, tuple(t.shape), t.dtype, sizes.get(t.dtype, 0)))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
            groups.setdefault(t.dtype, []).append(t.reshape(-1))
        return cls(_Layout.shared(tuple(specs), layouts), tuple(torch.cat(g) for g in groups.values()))

    def __getitem__(self, key: str) -> torch.Tensor:
        g, start, shape = self._layout.places[key]
        return self._flats[g][start : start + math.prod(shape)].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.places)

    def __len__(self) -> int:
        return len(self._layout.places)


class _Layout:
    """Where each tensor of a packed table lies: ``places[key] = (flat index, start, shape)``, shared by every adapter
    with the same table, and, per model layout, the indices that copy it into a task (:func:`_copy_plan`)."""

    def __init__(self, specs: tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]) -> None:
        self.dtypes: list[torch.dtype] = list(dict.fromkeys(d for _, _, d, _ in specs))
        self.places = {key: (self.dtypes.index(dtype), start, shape) for key, shape, dtype, start in specs}
        self.plans: dict[int, tuple[list, Any]] = {}  # id(slots) -> (slots, plan); the slots list guards the id

    @classmethod
    def shared(cls, specs: tuple, layouts: dict[tuple, _Layout]) -> _Layout:
        """The layout of ``specs`` ((key, shape, dtype, start) in file order), one object per distinct table."""
        return layouts.get(specs) or layouts.setdefault(specs, cls(specs))


def _read_all(
    model: nn.Module,
    items: list[tuple[str | None, str | os.PathLike, str | None]],
    check_backbone: bool,
    hub_kwargs: dict[str, Any],
) -> list[tuple[str, AdapterFile]]:
    """(name, source, task) -> (name, adapter), every one read and checked before any is used."""
    if not items:
        raise CLRError("no adapters given")
    fingerprints: dict[str, str | None] = {}
    checked: set[tuple] = set()
    layouts: dict[tuple, _Layout] = {}
    loaded: list[tuple[str, AdapterFile]] = []
    names: set[str] = set()
    for name, source, task in items:
        adapter = read_source(source, task=task, **hub_kwargs)
        name = name or _name_of(adapter, task)
        if name in names:
            raise CLRError(f"two adapters for task {name!r}; name them with a dict {{name: source}}")
        if loaded and adapter.config != loaded[0][1].config:
            raise AdapterMismatchError(
                f"{adapter.path} was made with {adapter.config}, but {loaded[0][1].path} with "
                f"{loaded[0][1].config}: one MultiTaskModel serves adapters of one config"
            )
        same = _same_backbone(model, adapter, fingerprints)
        packed = PackedTensors.pack(adapter.tensors, layouts)
        key = _fit_key(adapter, packed)
        if not same or key not in checked:
            validate_adapter(model, adapter, check_backbone=check_backbone and not same)  # a mismatch raises there
            checked.add(key)
        loaded.append((name, dataclasses.replace(adapter, tensors=packed)))  # hundreds of tensor objects fewer
        names.add(name)
    return loaded


def read_adapters(
    model: nn.Module,
    sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    *,
    check_backbone: bool = True,
    **hub_kwargs: Any,
) -> list[tuple[str, AdapterFile]]:
    """``{name: source}`` or ``[source, ...]`` -> (name, adapter) pairs, all checked against ``model``."""
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    return _read_all(model, [(n, s, None) for n, s in items], check_backbone, hub_kwargs)


def _all_tasks(source: str | os.PathLike, hub_kwargs: dict[str, Any]) -> list[str | None]:
    """Every task of a folder or Hub repo; ``[None]`` for a folder with only a root adapter."""
    src = parse_source(source, hub_kwargs)
    if src.kind == "hub":
        tasks: list[str | None] = list(list_tasks(src.repo_id, revision=src.revision, token=hub_kwargs.get("token")))
    elif src.kind == "folder":
        tasks = list(folder_tasks(src.path))
        if not tasks and (src.path / ADAPTER_FILE).is_file():
            return [None]
    else:
        raise CLRError(f"{src.path} is not a folder; use from_adapters for adapter files")
    if not tasks:
        raise CLRError(f"no task folders (<task>/{ADAPTER_FILE}) in {source}")
    return tasks


def read_pretrained(
    model: nn.Module,
    source: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    *,
    check_backbone: bool = True,
    **hub_kwargs: Any,
) -> list[tuple[str, AdapterFile]]:
    """The tasks (default: all) of a folder or Hub repo -> (name, adapter) pairs, all checked against ``model``."""
    names = list(tasks) if tasks is not None else _all_tasks(source, hub_kwargs)
    return _read_all(model, [(t, source, t) for t in names], check_backbone, hub_kwargs)


def _copy_plan(task_adapter: TaskAdapter, layout: _Layout) -> Any:
    """How a packed table goes into a task of this model: per flat tensor of the task, the indices of its values in
    the packed flat tensor of its dtype; and the heads' (key, flat, start, shape). None when the table does not fit
    exactly (then :func:`copy_into` goes the general way, which names the misfit) or a dtype differs."""
    slots = task_adapter._slots
    kept = layout.plans.get(id(slots))
    if kept is not None and kept[0] is slots:
        return kept[1]
    places, flats = layout.places, task_adapter._flats
    heads = task_adapter.head_tensors()
    fits = len(places) == len(slots) + len(heads) and all(  # then a group's slots all lie in one packed tensor
        k in places and places[k][2] == tuple(t.shape) and layout.dtypes[places[k][0]] == t.dtype
        for k, t in [*((s.key, _view(flats, s)) for s in slots), *heads.items()]
    )
    plan = None
    if fits:
        index: list[tuple[int, torch.Tensor]] = []
        for g in range(len(flats)):
            mine = [places[s.key] for s in slots if s.group == g]
            ends = [start + math.prod(shape) for _, start, shape in mine]
            kind = torch.int32 if max(ends, default=0) < 2**31 else torch.long  # int32 indices are faster
            ranges = [torch.arange(p[1], end, dtype=kind) for p, end in zip(mine, ends)]
            index.append((mine[0][0] if mine else 0, torch.cat(ranges) if ranges else torch.empty(0, dtype=kind)))
        plan = (index, [(k, *places[k]) for k in heads])
    layout.plans[id(slots)] = (slots, plan)
    return plan


def copy_into(task_adapter: TaskAdapter, adapter: AdapterFile, name: str) -> None:
    """Copy an adapter's tensors into a new task (whose state_dict has the file's keys): a packed adapter
    (:class:`PackedTensors`, as :func:`read_adapters` and :func:`read_pretrained` give) with one ``index_select`` per
    flat tensor."""
    packed = adapter.tensors
    plan = _copy_plan(task_adapter, packed._layout) if isinstance(packed, PackedTensors) else None
    if plan is not None and all(  # the task's storage now (a model moved to a GPU: the general way)
        f.dtype == packed._flats[g].dtype and f.device == packed._flats[g].device
        for f, (g, _) in zip(task_adapter._flats, plan[0])
    ):
        index, heads = plan
        with torch.no_grad():
            for flat, (g, idx) in zip(task_adapter._flats, index):
                torch.index_select(packed._flats[g], 0, idx, out=flat)
            tensors = task_adapter.head_tensors()
            for key, g, start, shape in heads:
                tensors[key].copy_(packed._flats[g][start : start + math.prod(shape)].view(shape))
        return
    shapes = {s.key: s.shape for s in task_adapter._slots}
    shapes.update({k: tuple(t.shape) for k, t in task_adapter.head_tensors().items()})
    differ = sorted(set(shapes) ^ set(adapter.tensors))
    differ += sorted(k for k, t in adapter.tensors.items() if k in shapes and tuple(t.shape) != shapes[k])
    if differ:
        raise AdapterMismatchError(f"{adapter.path}: tensor {differ[0]!r} does not fit task {name!r}")
    task_adapter.copy_from(dict(adapter.tensors))
