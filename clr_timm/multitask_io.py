"""A MultiTaskModel's tasks to and from adapter files, ``save_pretrained`` folders and the Hub.

Every task is saved as the single-task adapter file that :func:`~clr_timm.load_adapter` reads, so any task of a
:class:`~clr_timm.MultiTaskModel` loads into a plain model and back. The methods ``save_task``, ``save_pretrained``,
``push_to_hub``, ``load_task``, ``from_adapters`` and ``from_pretrained`` of the class are thin over these functions,
which see the wrapped model and what binds a task into it, never the class itself (it sits above this module).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import ADAPTER_FILE, AdapterFile, backbone_fingerprint, extract_adapter, validate_adapter, write_adapter
from .attach import plan_targets
from .binding import TaskAdapter
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


def _fit_key(adapter: AdapterFile) -> tuple:
    """Everything :func:`~clr_timm.validate_adapter` can look at but the values: two adapters with the same key pass
    or fail the same checks against one model (the task, its label names and the file's path aside; the raw metadata
    is what the other fields were parsed from)."""
    meta = tuple(
        (f.name, repr(getattr(adapter, f.name)))
        for f in dataclasses.fields(adapter)
        if f.name not in ("tensors", "path", "task", "label_names", "metadata")  # metadata: the others, as text
    )
    specs = tuple((k, t.shape, t.is_floating_point()) for k, t in adapter.tensors.items())  # in file order
    return meta + specs


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
        key = _fit_key(adapter)
        if not same or key not in checked:
            validate_adapter(model, adapter, check_backbone=check_backbone and not same)  # a mismatch raises there
            checked.add(key)
        loaded.append((name, adapter))
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


def copy_into(task_adapter: TaskAdapter, adapter: AdapterFile, name: str) -> None:
    """Copy an adapter's tensors into a new task (whose state_dict has the file's keys)."""
    shapes = {s.key: s.shape for s in task_adapter._slots}
    shapes.update({k: tuple(t.shape) for k, t in task_adapter.head_tensors().items()})
    differ = sorted(set(shapes) ^ set(adapter.tensors))
    differ += sorted(k for k, t in adapter.tensors.items() if k in shapes and tuple(t.shape) != shapes[k])
    if differ:
        raise AdapterMismatchError(f"{adapter.path}: tensor {differ[0]!r} does not fit task {name!r}")
    task_adapter.copy_from(adapter.tensors)
