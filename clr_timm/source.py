"""What a source of adapters is: an adapter file, a ``save_pretrained`` folder, or a Hub repo.

Every function that takes a source (``load_adapter``, ``describe``, ``MultiTaskModel.from_pretrained``, ``clr-timm
info``) and every Hub function that takes a repo id asks this module, so ``hf-hub:org/name@rev`` means the same
everywhere. It looks at nothing but whether a local path exists: fetching is the caller's business (the Hub's in
:mod:`clr_timm.hub`, the dispatch in :mod:`clr_timm.save_load`).

In a folder or a repo, a task lives in the subfolder named after it (``<task>/clr_adapter.safetensors``); ``task=None``
is the adapter at the root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import ADAPTER_FILE, AdapterFile, _check_task_name
from .errors import AdapterError, AdapterMismatchError, CLRError

__all__ = ["HUB_PREFIX", "Source", "parse_source", "parse_repo_id", "task_file", "folder_tasks", "check_recorded_task"]

HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class Source:
    """A parsed source.

    Attributes:
        kind: ``"file"`` (an adapter file, or a path that does not exist), ``"folder"`` or ``"hub"``.
        path: The local path (file and folder).
        repo_id: ``org/name`` (hub).
        revision: Branch, tag or commit (hub; None: ``main``).
    """

    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None


def parse_repo_id(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """``[hf-hub:]org/name[@rev]`` and a ``revision`` argument -> (repo id, revision)."""
    if not isinstance(repo_id, str) or not repo_id:
        raise CLRError(f"a Hub repo id must be a non-empty string like 'org/name', got {repo_id!r}")
    repo_id, at, rev = repo_id.removeprefix(HUB_PREFIX).partition("@")
    if at:
        if not rev:
            raise CLRError(f"'{repo_id}@' names no revision; write 'org/name@branch-tag-or-commit'")
        if revision is not None and revision != rev:
            raise CLRError(f"two revisions given for {repo_id}: {rev!r} after '@' and revision={revision!r}")
        revision = rev
    return repo_id, revision


def _is_bare_repo(source: str) -> bool:
    """``org/name`` that names no local path: a Hub repo where a bare repo id is accepted."""
    return source.count("/") == 1 and not source.startswith((".", "/")) and not Path(source).exists()


def parse_source(
    source: str | os.PathLike,
    hub_kwargs: Mapping[str, Any] | None = None,
    *,
    bare_repo: bool = False,
) -> Source:
    """Decide what ``source`` is.

    Args:
        source: An adapter file, a ``save_pretrained`` folder, or ``"hf-hub:org/name[@rev]"``.
        hub_kwargs: The Hub arguments the caller was given (``revision``, ``token``, ...): merged with an ``@rev``
            of a Hub source, an error for a local one.
        bare_repo: Also take ``"org/name"`` as a Hub repo when no such local path exists (``describe``, ``clr-timm
            info``); a path starting with ``.`` or ``/`` is always local.
    """
    hub_kwargs = hub_kwargs or {}
    if isinstance(source, str) and (source.startswith(HUB_PREFIX) or (bare_repo and _is_bare_repo(source))):
        repo_id, revision = parse_repo_id(source, hub_kwargs.get("revision"))
        return Source("hub", repo_id=repo_id, revision=revision)
    if hub_kwargs:
        raise CLRError(
            f"{sorted(hub_kwargs)} only apply to Hub repos ('{HUB_PREFIX}org/name'), not to the local path {source}"
        )
    path = Path(source)
    return Source("folder" if path.is_dir() else "file", path=path)


def folder_tasks(folder: Path) -> list[str]:
    """The tasks of a ``save_pretrained`` folder: its subfolders that hold an adapter, sorted."""
    return sorted(p.parent.name for p in folder.glob(f"*/{ADAPTER_FILE}"))


def task_file(folder: Path, task: str | None) -> Path:
    """The adapter file of ``task`` in a ``save_pretrained`` folder (None: the one at its root)."""
    _check_task_name(task)
    if task is None:
        return folder / ADAPTER_FILE
    if not (folder / task).is_dir():
        raise AdapterError(f"no task {task!r} in {folder}; tasks there: {folder_tasks(folder)}")
    return folder / task / ADAPTER_FILE


def check_recorded_task(adapter: AdapterFile, task: str | None) -> None:
    """Refuse an adapter file that records another task than ``task`` (None accepts any, and a file naming none).

    A single file has no subfolder to pick, so ``task=`` names the task the caller expects it to hold; a file that
    records no task is refused too, since nothing says it is that task's.
    """
    if task is not None and adapter.task != task:
        recorded = f"task {adapter.task!r}" if adapter.task is not None else "no task name"
        raise AdapterMismatchError(
            f"{adapter.path} records {recorded}, not task {task!r}: leave task= out to load it anyway, or give the "
            f"file of task {task!r}"
        )
