"""What a source of adapters is: an adapter file, a ``save_pretrained`` folder, or a Hub repo.

Every function that takes a source (``load_adapter``, ``describe``, ``MultiTaskModel.from_pretrained``, ``clr-timm
info``) and every Hub function that takes a repo id asks this module, so ``hf-hub:org/name@rev`` means the same
everywhere. It looks at nothing but whether a local path exists: fetching is the caller's business (the Hub's in
:mod:`clr_timm.hub`, the dispatch in :mod:`clr_timm.save_load`).

In a folder or a repo, a task lives in the subfolder named after it (``<task>/clr_adapter.safetensors``); ``task=None``
is the adapter at the root. Nothing reads or writes a folder through a link: a folder handed over by someone else could
link its ``README.md`` or a task to any file of the user's (:func:`read_in_folder`, :func:`check_no_link`). Repo ids and
revisions are checked here, before any of them reaches huggingface_hub (which builds cache paths from them).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import ADAPTER_FILE, AdapterFile, _check_task_name
from .errors import AdapterError, AdapterMismatchError, CLRError, shown

__all__ = [
    "HUB_PREFIX",
    "Source",
    "parse_source",
    "parse_repo_id",
    "task_file",
    "folder_tasks",
    "check_recorded_task",
    "check_no_link",
    "read_in_folder",
]

HUB_PREFIX = "hf-hub:"
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")  # the Hub's rule for a namespace or a name
_MAX_REPO_ID = 96
_MAX_REVISION = 255
# What git refuses in a ref name (git check-ref-format): control characters, space, ~ ^ : ? * [ \, "..", "@{", "//",
# a component that starts with "." or ends with ".lock".
_BAD_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(^|/)\.|\.lock(/|$)")


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
    """``[hf-hub:]org/name[@rev]`` and a ``revision`` argument -> (repo id, revision), both checked.

    A revision is a branch, tag or commit named as git allows (``v2``, ``refs/pr/1``, a commit id); anything else
    (``..``, an absolute path, a backslash, a control character) is refused before it reaches huggingface_hub.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise CLRError(f"a Hub repo id must be a non-empty string like 'org/name', got {shown(repo_id)}")
    repo_id, at, rev = repo_id.removeprefix(HUB_PREFIX).partition("@")
    if at:
        if not rev:
            raise CLRError(f"{shown(repo_id + '@')} names no revision; write 'org/name@branch-tag-or-commit'")
        if revision is not None and revision != rev:
            raise CLRError(
                f"two revisions given for {shown(repo_id)}: {shown(rev)} after '@' and revision={shown(revision)}"
            )
        revision = rev
    _check_repo_id(repo_id)
    _check_revision(revision)
    return repo_id, revision


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if (
        len(parts) > 2
        or not all(_REPO_PART.fullmatch(p) for p in parts)
        or "--" in repo_id
        or ".." in repo_id
        or len(repo_id) > _MAX_REPO_ID
        or repo_id.endswith(".git")
    ):
        raise CLRError(
            f"{shown(repo_id)} is not a Hub repo id: write 'org/name', each part letters, digits, '-', '_' and '.' "
            f"(not first or last, no '--' or '..'), at most {_MAX_REPO_ID} characters in all"
        )


def _check_revision(revision: str | None) -> None:
    if revision is None:
        return
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > _MAX_REVISION
        or revision == "@"
        or revision.startswith("/")
        or revision.endswith(("/", "."))
        or _BAD_REVISION.search(revision)
        or not revision.isprintable()
    ):
        raise CLRError(
            f"{shown(revision)} is not a branch, tag or commit name: give one as git writes it (like 'main', 'v2', "
            "'refs/pr/1' or a commit id), without '..', spaces, control characters or any of ~ ^ : ? * [ \\"
        )


def _is_bare_repo(source: str) -> bool:
    """``org/name[@rev]`` that names no local path: a Hub repo where a bare repo id is accepted."""
    if source.count("/") != 1 or source.startswith((".", "/")) or os.path.lexists(source):
        return False
    try:
        _check_repo_id(source.partition("@")[0])
    except CLRError:
        return False
    return True


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
    return Source("folder" if os.path.isdir(path) else "file", path=path)


def folder_tasks(folder: Path) -> list[str]:
    """The tasks of a ``save_pretrained`` folder: its subfolders that hold an adapter, sorted.

    A link to such a subfolder, or one whose name is no task name, is an :class:`AdapterError` (not left out: the user
    would wonder where the task went).
    """
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    names = []
    for entry in entries:
        if entry.is_symlink() and os.path.exists(os.path.join(entry.path, ADAPTER_FILE)):
            raise _link_error(folder, entry.name)
        if not entry.is_dir(follow_symlinks=False) or not os.path.lexists(os.path.join(entry.path, ADAPTER_FILE)):
            continue
        try:
            _check_task_name(entry.name)
        except CLRError as e:
            raise AdapterError(f"{folder} has an adapter in a folder whose name is no task name: {e}") from None
        names.append(entry.name)
    return names


def task_file(folder: Path, task: str | None) -> Path:
    """The adapter file of ``task`` in a ``save_pretrained`` folder (None: the one at its root), reached by no link."""
    _check_task_name(task)
    if task is None:
        check_no_link(folder, ADAPTER_FILE)
        return folder / ADAPTER_FILE
    check_no_link(folder, task)
    if not (folder / task).is_dir():
        raise AdapterError(f"no task {task!r} in {folder}; tasks there: {folder_tasks(folder)}")
    check_no_link(folder, f"{task}/{ADAPTER_FILE}")
    return folder / task / ADAPTER_FILE


def _link_error(folder: Path, relative: str) -> AdapterError:
    return AdapterError(
        f"{folder / relative} is a symbolic link: clr_timm reads and writes nothing in a folder through a link, which "
        "could point at any file of yours. Put the file (or the task's folder) itself there"
    )


def check_no_link(folder: Path, relative: str) -> None:
    """Refuse a symbolic link at ``folder/relative`` or at any folder between (``folder`` itself may be one)."""
    path = folder
    for part in relative.split("/"):
        path = path / part
        if path.is_symlink():
            raise _link_error(folder, relative)


def read_in_folder(folder: Path, relative: str, limit: int) -> bytes | None:
    """The content of the regular file ``folder/relative`` (None: there is none), read once and never through a link.

    Each step below ``folder`` is opened relative to the one above it without following links where the system allows
    (so a folder swapped for a link while reading is refused too); a link, a file that is not a plain file, and a file
    over ``limit`` bytes are :class:`AdapterError`.
    """
    parts = relative.split("/")
    path = folder.joinpath(*parts)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    opened: list[int] = []
    try:
        if os.open in os.supports_dir_fd:
            where = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            opened.append(where)
            for part in parts[:-1]:
                where = os.open(part, flags | getattr(os, "O_DIRECTORY", 0), dir_fd=where)
                opened.append(where)
            fd = os.open(parts[-1], flags, dir_fd=where)
        else:
            check_no_link(folder, relative)
            fd = os.open(path, flags)
        opened.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(f"{path} is not a regular file; clr_timm reads only plain files in a folder")
        if info.st_size > limit:
            raise AdapterError(f"{path} has {info.st_size:,} bytes, more than the {limit:,} a {parts[-1]} may have")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise AdapterError(f"{path} grew past {limit:,} bytes while it was read")
        return b"".join(chunks)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # what O_NOFOLLOW answers for a link
            raise _link_error(folder, relative) from e
        check_no_link(folder, relative)  # a link that made another error (ENOTDIR) is named as one
        raise AdapterError(f"cannot read {path}: {e.strerror or e}") from e
    finally:
        for fd in reversed(opened):
            os.close(fd)


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
