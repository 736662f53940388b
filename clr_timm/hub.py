"""Per-task adapters on the Hugging Face Hub: push, pull, list, describe, and what the Hub's errors mean.

A repo holds the layout of :mod:`clr_timm.card` (one repo per backbone, one folder per task, ``task=None`` the root).
:func:`push_folder` uploads a ``save_pretrained`` folder in one commit (adapters, configs and card together, so a
failed push leaves the repo as it was); :func:`download_adapter` pulls a task into the Hub cache, where it stays
available offline. ``clr_timm.push_to_hub(model, ...)`` and ``clr_timm.load_adapter(model, "hf-hub:org/name", ...)``
(in :mod:`clr_timm.save_load`) are built on them. Every huggingface_hub exception becomes a :class:`HubError`
subclass that says what to do.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import ADAPTER_FILE, _check_task_name
from .card import (
    CARD_FILE,
    CONFIG_FILE,
    LIBRARY_NAME,
    MAX_CARD_BYTES,
    MAX_CONFIG_BYTES,
    TaskFiles,
    check_one_backbone,
    describe_collection,
    describe_file,
    describe_local,
    dump_summary,
    local_tasks,
    read_card,
    read_summary,
    render_card,
    task_label,
)
from .errors import (
    AdapterError,
    CLRError,
    HubAuthError,
    HubError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    TaskNotFoundError,
    printable,
    shown,
)
from .source import parse_repo_id, parse_source
from .version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

__all__ = [
    "HubError",
    "HubRepoNotFoundError",
    "HubAuthError",
    "HubRevisionNotFoundError",
    "TaskNotFoundError",
    "HubOfflineError",
    "push_folder",
    "push_tasks",
    "list_tasks",
    "download_adapter",
    "describe",
]

_COMMIT_OID = re.compile(r"[0-9a-f]{40}")
_LIST = 1000  # characters of a list of names (tasks, branches) that a message quotes


# ------------------------------------------------------------------------------------------- the Hub's errors


def _api(token: str | bool | None = None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _has_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str):
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the HTTP library under huggingface_hub (it changed across versions) for an unreachable Hub."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        with suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _refs_hint(api: HfApi, repo_id: str) -> str:
    """``" (branches: [...], tags: [...])"``, or nothing when the refs cannot be listed."""
    try:
        refs = api.list_repo_refs(repo_id)
    except Exception:  # only a hint for an error message that is already on its way
        return ""
    branches, tags = sorted(b.name for b in refs.branches), sorted(t.name for t in refs.tags)
    return f" (branches: {shown(branches, _LIST)}, tags: {shown(tags, _LIST)})"


@contextmanager
def _hub_errors(
    api: HfApi, repo_id: str, *, revision: str | None, token: str | bool | None, write: bool = False
) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into :class:`HubError` subclasses that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except CLRError:
        raise
    except GatedRepoError as e:
        raise HubAuthError(
            f"{repo_id} is gated: accept its conditions on {_endpoint()}/{repo_id}, then pass a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        if not _has_token(token):
            raise HubAuthError(_needs_token(repo_id, write)) from e
        raise HubRepoNotFoundError(
            f"repo {repo_id} not found on {_endpoint()} (or it is private and your token cannot read it): check the "
            "name and the token's account"
        ) from e
    except RevisionNotFoundError as e:
        raise HubRevisionNotFoundError(
            f"revision {revision!r} not found in {repo_id}{_refs_hint(api, repo_id)}: give a branch, tag or commit "
            "that exists"
        ) from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise HubOfflineError(f"cannot reach the Hub for {repo_id}{_at(revision)}: {_offline_reason(error=e)}") from e
    except HfHubHTTPError as e:
        raise _http_error(e, repo_id, revision, token, write) from e
    except HFValidationError as e:  # an argument the client refuses that the checks here let through
        raise HubError(f"huggingface_hub refused a request for {repo_id}{_at(revision)}: {_first_line(e)}") from e
    except Exception as e:
        if isinstance(e, _network_errors()):
            hint = _TIMEOUT_HINT if "Timeout" in type(e).__name__ else ""
            raise HubError(f"cannot reach the Hub at {_endpoint()} for {repo_id}: {_first_line(e)}{hint}") from e
        if isinstance(e, OSError):  # a download cut short or longer than announced, a cache that cannot be written
            raise HubError(
                f"a file of {repo_id}{_at(revision)} could not be downloaded: {_first_line(e)}. Try again (with "
                "force_download=True if it persists), or check that the Hub cache can be written"
            ) from e
        raise


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (the client adds advice below it), for a message of our own."""
    return printable((str(e).strip().splitlines() or [type(e).__name__])[0])


def _http_error(e: Exception, repo_id: str, revision: str | None, token: str | bool | None, write: bool) -> HubError:
    """The :class:`HubError` for an HTTP error answer of the Hub (an ``HfHubHTTPError``)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    server = printable(getattr(e, "server_message", None) or _first_line(e))
    if status == 401 and not _has_token(token):
        return HubAuthError(_needs_token(repo_id, write))
    if status == 401:
        return HubAuthError(f"the Hub rejected the token for {repo_id} ({server}): check or renew it")
    if status == 403 and write:
        return HubAuthError(
            f"your token may not write to {repo_id} ({server}): push to a namespace you own, or open a pull "
            "request with create_pr=True (CLI: --create-pr)"
        )
    if status == 403:
        return HubAuthError(f"your token may not read {repo_id} ({server}): ask its owner for access")
    if status == 412:
        return HubError(f"{repo_id}{_at(revision)} changed while pushing; nothing was committed: push again")
    return HubError(
        f"the Hub answered HTTP {status} to a request for {repo_id}{_at(revision)}: {server}{_status_hint(status)}"
    )


def _needs_token(repo_id: str, write: bool) -> str:
    if write:
        return (
            f"pushing to {repo_id} needs a token with write access: pass token=... (CLI: --token) or log in with "
            "`hf auth login`"
        )
    return (
        f"repo {repo_id} was not found on {_endpoint()} without a token: it does not exist, or it is private. Check "
        "the name, or pass token=... (CLI: --token), or log in with `hf auth login`"
    )


_TIMEOUT_HINT = " (HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, 10 s by default: raise them on a slow connection)"


def _status_hint(status: int | None) -> str:
    if status == 429:
        return " (too many requests; wait a while and try again)"
    if status is not None and status >= 500:
        return " (a problem on the Hub's side; try again later)"
    return ""


def _offline_reason(local_files_only: bool = False, error: BaseException | None = None) -> str:
    """Why the Hub gave nothing: offline mode, or what the client's last attempt met (an HTTP status, a timeout)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    if local_files_only:
        return "local_files_only=True"
    seen: set[int] = set()
    cause = error
    while cause is not None and id(cause) not in seen:  # the client wraps the real cause in LocalEntryNotFoundError
        seen.add(id(cause))
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, HfHubHTTPError) and status is not None:
            return f"the Hub at {_endpoint()} answered HTTP {status}{_status_hint(status)}"
        if "Timeout" in type(cause).__name__:
            return f"the Hub at {_endpoint()} did not answer within the client's timeout{_TIMEOUT_HINT}"
        cause = cause.__cause__ or cause.__context__
    return f"the Hub at {_endpoint()} cannot be reached"


def _tasks_in(paths: list[str]) -> tuple[list[str], bool]:
    """Named tasks, and whether there is an adapter at the root, among repo-relative file paths."""
    tasks = sorted({p.split("/")[0] for p in paths if p.count("/") == 1 and p.endswith(f"/{ADAPTER_FILE}")})
    return [t for t in tasks if _is_task_name(t)], ADAPTER_FILE in paths


def _is_task_name(name: str) -> bool:
    """Whether a repo's folder name is a task name (a folder named otherwise is no task: it cannot be loaded)."""
    try:
        _check_task_name(name)
    except CLRError:
        return False
    return True


def _cached_tasks(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> list[str | None] | None:
    """Tasks of ``repo_id`` at ``revision`` already in the Hub cache (None: the root), or None when it cannot say."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(cache_dir)
    except Exception:  # no cache at all, or an unreadable one: only a hint for an error message
        return None
    revision = revision or "main"
    for repo in cache.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if revision in rev.refs or rev.commit_hash == revision:
                paths = [f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files]
                tasks, root = _tasks_in(paths)
                return [*([None] if root else []), *tasks]
    return []


# ---------------------------------------------------------------------------------------------------------- push


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
) -> CommitInfo:
    """Upload every adapter of a ``save_pretrained`` folder to a Hub repo (created if needed), all in one commit.

    Each adapter is checked before anything is sent, adapters of another base model than the repo's are refused, and
    the repo's card is regenerated (its own text kept; the folder's ``README.md`` is used only for a repo that has no
    card yet). Other tasks already in the repo stay as they are.

    Args:
        folder: A folder written by :func:`~clr_timm.save_pretrained` (the root adapter and one per task subfolder).
        repo_id: ``"org/name"`` (``"hf-hub:org/name"`` and ``"org/name@branch"`` are accepted too).
        revision, private, token, commit_message, commit_description, create_pr, license: As in
            :func:`~clr_timm.push_to_hub`.

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url`` for a pull request).
    """
    folder = Path(folder)
    if not os.path.isdir(folder):
        raise AdapterError(f"{folder} is not a folder; give the folder written by clr_timm.save_pretrained")
    local = local_tasks(folder)
    if not local:
        raise AdapterError(
            f"no adapter in {folder}: expected {ADAPTER_FILE} at its root or in task subfolders "
            "(write them with clr_timm.save_pretrained)"
        )
    check_one_backbone(str(folder), local)
    return push_tasks(
        local,
        repo_id,
        card=read_card(folder),
        revision=revision,
        private=private,
        token=token,
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
        license=license,
    )


def push_tasks(
    local: list[TaskFiles],
    repo_id: str,
    *,
    card: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
) -> CommitInfo:
    """Upload checked task files (:func:`~clr_timm.card.local_tasks`, :func:`~clr_timm.card.write_task_folder`).

    What :func:`push_folder` does once it has read the folder; ``card`` is the card to start from when the repo has
    none yet. The other arguments are :func:`push_folder`'s.
    """
    repo_id, revision = parse_repo_id(repo_id, revision)
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token, write=True):
        if not create_pr:
            repo_id = _ensure_repo(api, repo_id, revision, private)
        info = api.repo_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        remote = _remote_tasks(api, repo_id, info.sha, sizes, skip={t.task for t in local})
        check_one_backbone(f"{repo_id}{_at(revision)}", remote + local)
        if CARD_FILE in sizes:
            card = _remote_card(api, repo_id, info.sha, sizes[CARD_FILE])
        card = render_card(card, repo_id, repo_id.split("/")[-1], remote + local, license)
        return api.create_commit(
            repo_id,
            _operations(card, local),
            commit_message=commit_message or _commit_message(local, sizes),
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=info.sha,
        )


def _remote_card(api: HfApi, repo_id: str, commit: str, size: int | None) -> str:
    """The repo's README.md at ``commit``, as text."""
    if size is not None and size > MAX_CARD_BYTES:
        raise HubError(f"the {CARD_FILE} of {repo_id} has {size:,} bytes, more than the {MAX_CARD_BYTES:,} read here")
    data = Path(api.hf_hub_download(repo_id, CARD_FILE, revision=commit)).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HubError(f"the {CARD_FILE} of {repo_id} is not UTF-8 text ({e}): fix it on the Hub, push again") from e


def _operations(card: str, local: list[TaskFiles]) -> list[Any]:
    """The commit: the card, and each local task's adapter and clr_config.json, as the bytes that were checked."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(CARD_FILE, card.encode("utf-8"))]
    for t in local:
        if t.adapter is None:
            raise CLRError(f"{task_label(t.task)} was not read to be uploaded: use local_tasks(folder)")
        prefix = f"{t.task}/" if t.task is not None else ""
        config = t.config if t.config is not None else dump_summary(t.summary).encode("utf-8")
        operations.append(CommitOperationAdd(prefix + ADAPTER_FILE, t.adapter))
        operations.append(CommitOperationAdd(prefix + CONFIG_FILE, config))
    return operations


def _remote_tasks(
    api: HfApi,
    repo_id: str,
    commit: str,
    sizes: dict[str, int | None],
    skip: set[str | None] = frozenset(),
    cache_dir: str | os.PathLike | None = None,
) -> list[TaskFiles]:
    """The tasks of the repo at ``commit`` (the root one first), less those in ``skip``."""
    names, root = _tasks_in(list(sizes))
    names = [n for n in ([None] if root else []) + names if n not in skip]
    return [_remote_task(api, repo_id, commit, n, sizes, cache_dir) for n in names]


def _ensure_repo(api: HfApi, repo_id: str, revision: str | None, private: bool | None) -> str:
    """Create the repo and the branch pushed to where missing; returns the repo's id as the Hub spells it."""
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        _ensure_branch(api, repo_id, revision)
    return repo_id


def _ensure_branch(api: HfApi, repo_id: str, revision: str) -> None:
    refs = api.list_repo_refs(repo_id)
    kind = "commit" if _COMMIT_OID.fullmatch(revision) else "tag" if revision in {t.name for t in refs.tags} else None
    if kind is not None:
        raise HubError(
            f"cannot push to {revision!r} in {repo_id}: it is a {kind}; "
            "push to a branch (revision='v2' creates it) and tag that, e.g. with HfApi().create_tag"
        )
    if revision not in {b.name for b in refs.branches}:
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def _remote_task(
    api: HfApi,
    repo_id: str,
    commit: str,
    task: str | None,
    sizes: dict[str, int | None],
    cache_dir: str | os.PathLike | None = None,
) -> TaskFiles:
    from huggingface_hub.errors import EntryNotFoundError

    prefix = f"{task}/" if task is not None else ""
    summary: dict[str, Any] = {}
    if prefix + CONFIG_FILE in sizes and (sizes[prefix + CONFIG_FILE] or 0) <= MAX_CONFIG_BYTES:
        with suppress(EntryNotFoundError, AdapterError):  # a config someone broke by hand: its row shows '?'
            path = api.hf_hub_download(repo_id, prefix + CONFIG_FILE, revision=commit, cache_dir=cache_dir)
            summary = read_summary(Path(path))
    return TaskFiles(task, summary, sizes.get(prefix + ADAPTER_FILE))


def _commit_message(local: list[TaskFiles], remote_files: dict[str, Any]) -> str:
    def where(t: TaskFiles) -> str:
        return f"task {t.task!r}" if t.task is not None else "the repo root"

    if len(local) == 1:
        prefix = f"{local[0].task}/" if local[0].task is not None else ""
        verb = "Update" if prefix + ADAPTER_FILE in remote_files else "Add"
        return f"{verb} CLR adapter for {where(local[0])}"
    return f"Add or update CLR adapters for {', '.join(where(t) for t in local)}"


# ---------------------------------------------------------------------------------------------------- list, pull


def list_tasks(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> list[str]:
    """The tasks (folders holding an adapter) of a Hub repo at a revision, sorted.

    An adapter at the repo root (``task=None``) is not a named task and is not listed; :func:`describe` reports it.
    """
    repo_id, revision = parse_repo_id(repo_id, revision)
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token):
        return _tasks_in(api.list_repo_files(repo_id, revision=revision))[0]


def download_adapter(
    repo_id: str,
    task: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    with_config: bool = False,
) -> Path:
    """Download a task's adapter file from a Hub repo (into the Hub cache, or ``local_dir``) and return its path.

    A task downloaded once loads again with no server: with the Hub unreachable, with ``local_files_only=True`` or
    with ``HF_HUB_OFFLINE=1`` the cached file is used. This is what ``load_adapter(model, "hf-hub:org/name", ...)``
    calls.

    Args:
        repo_id: ``"org/name"``, optionally ``"hf-hub:org/name"`` and ``"org/name@revision"``.
        task: The task's folder in the repo (None: the repo root).
        revision: Branch, tag or commit (default ``main``).
        token: Hub token, for private repos (default: the logged-in one; False: none).
        cache_dir: The Hub cache to use (default: ``HF_HUB_CACHE``).
        local_dir: Download into this folder instead, in the repo's layout (``<local_dir>/<task>/...``).
        local_files_only: Never contact the Hub; use the cache only.
        force_download: Download again even when cached.
        with_config: Also fetch the task's ``clr_config.json`` next to the adapter, when the repo has one.
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
    )

    repo_id, revision = parse_repo_id(repo_id, revision)
    _check_task_name(task)
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token):
        where = dict(subfolder=task, revision=revision, cache_dir=cache_dir, local_dir=local_dir)
        fetch = dict(local_files_only=local_files_only, force_download=force_download)
        try:
            path = api.hf_hub_download(repo_id, ADAPTER_FILE, **where, **fetch)
        except RemoteEntryNotFoundError as e:
            raise _task_not_found(api, repo_id, task, revision) from e
        except _network_errors():
            # The client falls back on its cache when it cannot connect or times out, but not when a connection
            # breaks mid-answer (a dropped or garbled response): do the same then, and re-raise if nothing is cached.
            path = None if local_files_only or force_download else _cached_copy(api, repo_id, where)
            if path is None:
                raise
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            cached = _cached_tasks(repo_id, revision, cache_dir) if local_dir is None else None
            raise _not_cached(repo_id, task, revision, cached, _offline_reason(local_files_only, e)) from e
        if with_config:
            with suppress(EntryNotFoundError):  # uploaded without one (e.g. a bare safetensors file)
                api.hf_hub_download(repo_id, CONFIG_FILE, **where, **fetch)
    return Path(path)


def _cached_copy(api: HfApi, repo_id: str, where: dict[str, Any]) -> str | None:
    """The adapter file the cache holds for the revision asked for, or None."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return api.hf_hub_download(repo_id, ADAPTER_FILE, **where, local_files_only=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        return None


def _not_cached(
    repo_id: str, task: str | None, revision: str | None, cached: list[str | None] | None, reason: str
) -> HubOfflineError:
    """The error for a task that is not in the cache when the Hub cannot be asked; ``cached``: what is there."""
    hint = ""
    if cached is not None:
        names = [x if x is not None else "(root)" for x in cached]
        hint = f" Tasks of this repo{_at(revision)} in the cache: {shown(names, _LIST)}."
    return HubOfflineError(
        f"{task_label(task)} of {repo_id}{_at(revision)} is not in the local cache and {reason}: download it once "
        f"with the Hub reachable (e.g. `clr-timm pull {repo_id}{f' --task {shlex.quote(task)}' if task else ''}`), "
        f"or pass the cache_dir that holds it.{hint}"
    )


def _task_not_found(api: HfApi, repo_id: str, task: str | None, revision: str | None) -> TaskNotFoundError:
    try:
        names, root = _tasks_in(api.list_repo_files(repo_id, revision=revision))
        there = f"tasks there: {shown(names, _LIST)}" + (" and an adapter at the repo root (task=None)" if root else "")
    except Exception:  # only a hint for an error message that is already on its way
        there = "its tasks could not be listed"
    missing = f"no task {task!r}" if task is not None else "no adapter at its root (task=None); pass task=..."
    return TaskNotFoundError(f"{repo_id}{_at(revision)} has {missing}; {there}")


# ------------------------------------------------------------------------------------------------------ describe


def describe(source: str | os.PathLike, task: str | None = None, **hub_kwargs: Any) -> dict[str, Any]:
    """What an adapter, a folder of adapters or a Hub repo of adapters holds, as a JSON-ready dict.

    Args:
        source: An adapter file, a ``save_pretrained`` folder, ``"hf-hub:org/name[@rev]"``, or ``"org/name"``
            when no such local path exists.
        task: One task of a folder or repo: describe its adapter file (metadata, tensors, sizes). For a file, the
            task it must record.
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.

    Returns:
        For one adapter: ``kind="adapter"`` with its metadata (task, classes, label names, config, base model,
        fingerprint, versions) and tensors (count, values, bytes, dtypes, reprogrammed convs, ``tensors_by_kind``).
        For a folder or repo: ``kind="folder"`` / ``"repo"``, its ``tasks``, whether it has a ``root_adapter``, and
        ``adapters``: each task's ``clr_config.json`` with its ``file_size``.
    """
    src = parse_source(source, hub_kwargs, bare_repo=True)
    if src.kind != "hub":
        return describe_local(src.path, task)
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k != "revision"}
    repo_id, revision = src.repo_id, src.revision
    if task is not None:
        path = download_adapter(repo_id, task, revision=revision, **hub_kwargs)
        return describe_file(path, {"repo_id": repo_id, "revision": revision or "main"}, in_hub_cache=True)
    unknown = sorted(set(hub_kwargs) - {"token", "cache_dir", "local_files_only"})
    if unknown:
        raise CLRError(f"describe() got unexpected Hub argument(s) {unknown}")
    if hub_kwargs.get("local_files_only"):
        raise HubOfflineError(
            f"describing the whole repo {repo_id} needs the Hub; offline, describe one cached task with task=..."
        )
    token = hub_kwargs.get("token")
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token):
        info = api.repo_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        tasks = _remote_tasks(api, repo_id, info.sha, sizes, cache_dir=hub_kwargs.get("cache_dir"))
    head = {"repo_id": repo_id, "revision": revision or "main", "commit": info.sha, "private": info.private}
    return describe_collection("repo", head, tasks)
