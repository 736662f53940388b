"""Per-task adapters on the Hugging Face Hub, and the same layout on disk.

One repo per backbone holds many tasks, one folder per task (``task=None`` uses the repo root)::

    README.md                        model card: Hub metadata, a table of the tasks, a usage snippet
    pets/clr_adapter.safetensors     the task's adapter (see :mod:`clr_timm.adapter`)
    pets/clr_config.json             what it holds, for people: config, classes, label names, base model, sizes
    flowers/...

:func:`save_pretrained` writes that layout into a folder (which the ordinary Hub CLI can upload as it is),
:func:`push_to_hub` and :func:`push_folder` upload it, one commit per push (adapters, configs and card together, so a
failed push leaves the repo as it was), and ``clr_timm.load_adapter(model, "hf-hub:org/name", task=...)`` pulls a task
through :func:`download_adapter` into the Hub cache, where it stays available offline.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapter import (
    ADAPTER_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    AdapterFile,
    _check_task_name,
    atomic_path,
    read_adapter,
    save_adapter,
)
from .attach import CLR_ATTR
from .count import ParameterCount, count_parameters
from .errors import AdapterError, CLRError
from .version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

__all__ = [
    "CONFIG_FILE",
    "LIBRARY_NAME",
    "HubError",
    "HubRepoNotFoundError",
    "HubAuthError",
    "HubRevisionNotFoundError",
    "TaskNotFoundError",
    "HubOfflineError",
    "save_pretrained",
    "push_to_hub",
    "push_folder",
    "list_tasks",
    "download_adapter",
    "describe",
]

CONFIG_FILE = "clr_config.json"
LIBRARY_NAME = "clr-timm"
_CARD_FILE = "README.md"
_CARD_START = "<!-- clr-timm:tasks:start -->"
_CARD_END = "<!-- clr-timm:tasks:end -->"
_CARD_BLOCK = re.compile(re.escape(_CARD_START) + r".*?" + re.escape(_CARD_END), re.DOTALL)
_CARD_TAGS = ("clr", "continual-learning", "timm", "image-classification")
_DEFAULT_LICENSE = "apache-2.0"  # timm's default for cards it writes
_COMMIT_OID = re.compile(r"[0-9a-f]{40}")


class HubError(AdapterError):
    """An adapter cannot be pushed to or pulled from the Hugging Face Hub."""


class HubRepoNotFoundError(HubError):
    """The repo does not exist, or it is private and the token given cannot read it."""


class HubAuthError(HubError):
    """The Hub needs a (valid) token, or the token may not write where the push goes.

    Also raised for a repo that cannot be read without a token: the Hub answers the same for a private repo as for a
    missing one, so the message names both.
    """


class HubRevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repo."""


class TaskNotFoundError(HubError):
    """The repo has no adapter for the task at that revision; the message lists the tasks it has."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (or offline mode is on) and what was asked for is not in the local cache."""


# ------------------------------------------------------------------------------------------------------------ helpers


def _api(token: str | bool | None = None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _parse_repo(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """``[hf-hub:]org/name[@rev]`` and a ``revision`` argument -> (repo id, revision)."""
    if not isinstance(repo_id, str) or not repo_id:
        raise CLRError(f"a Hub repo id must be a non-empty string like 'org/name', got {repo_id!r}")
    repo_id = repo_id.removeprefix("hf-hub:")
    repo_id, at, rev = repo_id.partition("@")
    if at:
        if not rev:
            raise CLRError(f"'{repo_id}@' names no revision; write 'org/name@branch-tag-or-commit'")
        if revision is not None and revision != rev:
            raise CLRError(f"two revisions given for {repo_id}: {rev!r} after '@' and revision={revision!r}")
        revision = rev
    return repo_id, revision


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
    return f" (branches: {sorted(b.name for b in refs.branches)}, tags: {sorted(t.name for t in refs.tags)})"


@contextmanager
def _hub_errors(
    api: HfApi, repo_id: str, *, revision: str | None, token: str | bool | None, write: bool = False
) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into :class:`HubError` subclasses that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
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
        status = getattr(getattr(e, "response", None), "status_code", None)
        server = getattr(e, "server_message", None) or str(e).splitlines()[0]
        if status == 401 and not _has_token(token):
            raise HubAuthError(_needs_token(repo_id, write)) from e
        if status == 401:
            raise HubAuthError(f"the Hub rejected the token for {repo_id} ({server}): check or renew it") from e
        if status == 403 and write:
            raise HubAuthError(
                f"your token may not write to {repo_id} ({server}): push to a namespace you own, or open a pull "
                "request with create_pr=True (CLI: --create-pr)"
            ) from e
        if status == 403:
            raise HubAuthError(f"your token may not read {repo_id} ({server}): ask its owner for access") from e
        if status == 412:
            raise HubError(f"{repo_id}{_at(revision)} changed while pushing; nothing was committed: push again") from e
        raise HubError(
            f"the Hub answered HTTP {status} to a request for {repo_id}{_at(revision)}: {server}{_status_hint(status)}"
        ) from e
    except Exception as e:
        if isinstance(e, _network_errors()):
            hint = _TIMEOUT_HINT if "Timeout" in type(e).__name__ else ""
            raise HubError(
                f"cannot reach the Hub at {_endpoint()} for {repo_id}: {str(e) or type(e).__name__}{hint}"
            ) from e
        raise


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
    return tasks, ADAPTER_FILE in paths


def _task_label(task: str | None) -> str:
    return f"task {task!r}" if task is not None else "the adapter at the repo root (task=None)"


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


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"


# ----------------------------------------------------------------------------------------------- clr_config.json


def _license_of(info: dict[str, Any]) -> str | None:
    """License of the timm weights an adapter was made for, from timm's registry of pretrained configs."""
    if not info.get("architecture") or not info.get("pretrained_tag"):
        return None
    with suppress(Exception):  # a model timm does not know (renamed, custom): no license to inherit
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(f"{info['architecture']}.{info['pretrained_tag']}")
        return getattr(cfg, "license", None) if cfg is not None else None
    return None


def _count_from_metadata(adapter: AdapterFile) -> ParameterCount | None:
    """The parameter count of an adapter without its model: rebuild the architecture on the meta device."""
    if not adapter.architecture:
        return None
    try:
        import timm

        name = adapter.base_model or adapter.architecture
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=adapter.num_classes or 0)
        return count_parameters(model, adapter.config)
    except Exception:  # an architecture this timm does not have: the sizes stay unknown, the upload still works
        return None


def _summary(adapter: AdapterFile, count: ParameterCount | None, license: str | None = None) -> dict[str, Any]:
    """The content of ``clr_config.json``: everything a person (or the model card) wants to know about an adapter."""
    path = Path(adapter.path)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values() if t.is_floating_point())
    parameters = None
    if count is not None:
        parameters = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in count.to_dict().items()
        }
    info = {"architecture": adapter.architecture, "pretrained_tag": adapter.pretrained_tag}
    return {
        "format": FORMAT_NAME,
        "format_version": int(adapter.metadata.get("clr_format_version", FORMAT_VERSION)),
        "adapter_file": ADAPTER_FILE,
        "task": adapter.task,
        "num_classes": adapter.num_classes,
        "label_names": adapter.label_names,
        "config": adapter.config.to_dict(),
        "base_model": {
            "name": adapter.base_model,
            "architecture": adapter.architecture,
            "pretrained_tag": adapter.pretrained_tag,
            "hf_hub_id": adapter.hf_hub_id,
            "license": license or _license_of(info),
            "backbone_fingerprint": adapter.backbone_fingerprint,
        },
        "parameters": parameters,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "num_tensors": len(adapter.tensors),
        "num_values": adapter.num_values(),
        "file_size": path.stat().st_size,
        "versions": adapter.versions,
    }


def _dump(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2) + "\n"


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a readable JSON file ({e}); delete it and save the adapter again") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass
class _Task:
    """One task's files, on disk or in a repo: where it lives, what its clr_config.json says, its adapter size."""

    task: str | None
    summary: dict[str, Any]
    file_size: int | None
    adapter: Path | None = None
    config: Path | None = None


def _local_tasks(folder: Path, validate: bool = True) -> list[_Task]:
    """The adapters of a ``save_pretrained`` folder: the root one (task None) first, then the task folders."""
    candidates = [(None, folder)] if (folder / ADAPTER_FILE).is_file() else []
    candidates += [(p.name, p) for p in sorted(folder.iterdir()) if p.is_dir() and (p / ADAPTER_FILE).is_file()]
    tasks = []
    for name, where in candidates:
        adapter_path, config_path = where / ADAPTER_FILE, where / CONFIG_FILE
        if config_path.is_file():
            summary = _read_summary(config_path)
            if validate:
                read_adapter(adapter_path)
        else:
            adapter = read_adapter(adapter_path)
            summary = _summary(adapter, _count_from_metadata(adapter))
            config_path = None
        tasks.append(_Task(name, summary, adapter_path.stat().st_size, adapter_path, config_path))
    return tasks


# ---------------------------------------------------------------------------------------------------- model card


def _base_model_id(summary: dict[str, Any]) -> str | None:
    base = summary.get("base_model") or {}
    hub_id = base.get("hf_hub_id")
    if isinstance(hub_id, str) and hub_id.count("/") == 1 and not hub_id.endswith("/"):
        return hub_id
    if base.get("architecture") and base.get("pretrained_tag"):
        return f"timm/{base['architecture']}.{base['pretrained_tag']}"
    return None


def _base_name(t: _Task) -> str | None:
    base = t.summary.get("base_model") or {}
    return base.get("name") or base.get("architecture")


def _check_one_backbone(where: str, tasks: list[_Task]) -> None:
    """Refuse to mix adapters of different base models in one repo (one repo per backbone, one card per base)."""
    named = [t for t in tasks if _base_name(t)]
    for t in named[1:]:
        if _base_name(t) != _base_name(named[0]):
            raise HubError(
                f"{where} holds adapters for {_base_name(named[0])!r} ({_task_label(named[0].task)}), and "
                f"{_task_label(t.task)} is for {_base_name(t)!r}: keep one base model per repo, push to another repo"
            )
    fingerprints: dict[str, tuple[str | None, str]] = {}
    for t in tasks:
        fingerprint = (t.summary.get("base_model") or {}).get("backbone_fingerprint")
        if not fingerprint:
            continue
        # The fingerprint covers the frozen tensors, which depend on the config: compare like with like.
        key = json.dumps(t.summary.get("config"), sort_keys=True)
        first_task, first = fingerprints.setdefault(key, (t.task, fingerprint))
        if fingerprint != first:
            raise HubError(
                f"{where}: {_task_label(t.task)} was trained on other backbone weights than {_task_label(first_task)} "
                f"(fingerprint {fingerprint} != {first}): keep one backbone per repo, push to another repo"
            )


def _usage(repo_id: str | None, summary: dict[str, Any], task: str | None) -> str:
    base = summary.get("base_model") or {}
    name = base.get("name") or base.get("architecture") or "<timm model name>"
    source = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    task_arg = f", task={json.dumps(task)}" if task is not None else ""
    cli_repo = repo_id or "ORG/NAME"
    cli_task = f" --task {shlex.quote(task)}" if task is not None else ""
    lines = [
        "## Usage",
        "",
        "```python",
        "import timm",
        "import clr_timm",
        "",
        f'model = timm.create_model("{name}", pretrained=True)',
        f'clr_timm.load_adapter(model, "{source}"{task_arg})  # attaches CLR, sizes the head, checks the base model',
        "model.eval()",
        "```",
        "",
        f'The tasks of this repo: `clr_timm.list_tasks("{cli_repo}")`. From the shell: '
        f"`clr-timm pull {cli_repo}{cli_task}` downloads a task into the Hub cache, where it stays available offline.",
    ]
    if repo_id is None:
        lines += ["", "(Replace ORG/NAME by the repo this folder is uploaded to, or load from the folder's path.)"]
    return "\n".join(lines)


def _row(t: _Task) -> str:
    """One line of the card's table of tasks."""
    s, p = t.summary, t.summary.get("parameters") or {}
    per_task, percent, head, classes = (
        p.get("per_task"),
        p.get("percent_of_backbone"),
        p.get("head"),
        s.get("num_classes"),
    )
    cells = [
        f"`{t.task}`" if t.task is not None else "(repo root)",
        str(classes) if classes is not None else "?",
        f"{per_task:,}" if isinstance(per_task, int) else "?",
        f"{percent:.3f}%" if isinstance(percent, (int, float)) else "?",
        f"{head:,}" if isinstance(head, int) else "?",
        _human_bytes(t.file_size) + (f" ({s['dtype']})" if s.get("dtype") else ""),
    ]
    return f"| {' | '.join(cells)} |"


def _tasks_block(repo_id: str | None, tasks: list[_Task]) -> str:
    """The generated part of the card, between the markers: the table of tasks and how to use them."""
    tasks = sorted(tasks, key=lambda t: (t.task is not None, t.task or ""))
    backbone = next(
        (b for t in tasks if isinstance(b := (t.summary.get("parameters") or {}).get("backbone"), int)), None
    )
    shared = f" (its {backbone:,} parameters)" if backbone is not None else ""
    example = next((t for t in tasks if t.task is not None), tasks[0])
    return "\n".join(
        [
            _CARD_START,
            "<!-- clr-timm rewrites this section on every push: write your own text outside these markers. -->",
            "## Tasks",
            "",
            "| Task | Classes | Parameters per task | % of backbone | Head | File |",
            "|---|---:|---:|---:|---:|---:|",
            *(_row(t) for t in tasks),
            "",
            "Parameters per task: the depthwise reprogramming kernels and the task's normalisation layers, without its "
            f"head. The backbone{shared} is frozen and shared by every task, so adding a task never changes another.",
            "",
            _usage(repo_id, example.summary, example.task),
            _CARD_END,
        ]
    )


def _render_card(
    existing: str | None, repo_id: str | None, title: str, tasks: list[_Task], license: str | None = None
) -> str:
    """The model card: Hub metadata updated, the generated block replaced, everything a person wrote kept."""
    from huggingface_hub import ModelCard, ModelCardData

    base = next((b for b in (_base_model_id(t.summary) for t in tasks) if b), None)
    block = _tasks_block(repo_id, tasks)
    if existing is None:
        name = next((n for n in map(_base_name, tasks) if n), None)
        intro = (
            "Channel-wise Lightweight Reprogramming (CLR, Ge et al., ICCV 2023) adapters"
            + (f" for the timm model `{name}`" if name else "")
            + ": the backbone stays frozen and is shared by every task, and each task adds a small adapter of its own "
            "(depthwise reprogramming kernels after the convolutions, normalisation layers and head), made with "
            "`clr-timm`."
        )
        card = ModelCard(f"---\nlibrary_name: {LIBRARY_NAME}\n---\n\n# {title}\n\n{intro}\n\n{block}\n")
    else:
        try:
            card = ModelCard(existing)
        except Exception as e:  # yaml errors, a metadata block that is not a mapping
            raise HubError(
                f"the existing {_CARD_FILE} of {repo_id or title} has metadata that does not parse ({e}): fix its "
                "YAML header, then push again"
            ) from e
        text = card.text
        if _CARD_BLOCK.search(text):
            text = _CARD_BLOCK.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + f"\n\n{block}\n"
        card.text = text
    data: ModelCardData = card.data
    data.library_name = LIBRARY_NAME
    if base:
        data.base_model = base
    data.pipeline_tag = "image-classification"
    licenses = [(t.summary.get("base_model") or {}).get("license") for t in tasks]
    data.license = license or data.license or next((x for x in licenses if x), None) or _DEFAULT_LICENSE
    tags = [t for t in (data.tags or []) if not t.startswith("base_model:adapter:")]
    ours = [*_CARD_TAGS, *([f"base_model:adapter:{base}"] if base else [])]
    data.tags = tags + [t for t in ours if t not in tags]
    return str(card)


def _write_local_card(folder: Path) -> None:
    tasks = _local_tasks(folder, validate=False)
    if not tasks:
        return
    path = folder / _CARD_FILE
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    _atomic_write_text(path, _render_card(existing, None, folder.resolve().name, tasks))


# ---------------------------------------------------------------------------------------------------- public API


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a task's adapter in the Hub layout: ``<folder>/<task>/clr_adapter.safetensors`` and ``clr_config.json``.

    The folder also gets a ``README.md`` model card listing every task in it (text a person wrote outside the
    generated section is kept), so it can be uploaded with :func:`push_folder`, ``clr-timm push`` or the ordinary Hub
    CLI, and loaded back with ``clr_timm.load_adapter(model, folder, task=task)``. Each file is written atomically.

    Args:
        model: An attached model.
        folder: The folder of the whole collection (one subfolder per task).
        task: The task's subfolder; None writes the adapter at the folder's root.
        dtype: Storage dtype of the floating tensors (``"fp16"`` / ``"bf16"`` halve the file), as in
            :func:`~clr_timm.save_adapter`.
        label_names: Class names recorded with the adapter.
        overwrite: Replace an existing adapter of another task at the same place.

    Returns:
        The task's folder.
    """
    target = _save_task(model, Path(folder), task, dtype, label_names, overwrite)
    _write_local_card(Path(folder))
    return target


def _save_task(
    model: nn.Module,
    folder: Path,
    task: str | None,
    dtype: str | torch.dtype | None,
    label_names: list[str] | None,
    overwrite: bool = False,
) -> Path:
    """Write a task's adapter and its clr_config.json (no card); returns the task's folder."""
    _check_task_name(task)
    if folder.is_file():
        raise AdapterError(
            f"{folder} is a file; save_pretrained writes a folder (use clr_timm.save_adapter for a file)"
        )
    target = folder / task if task is not None else folder
    path = save_adapter(model, target / ADAPTER_FILE, dtype, task=task, label_names=label_names, overwrite=overwrite)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    license = cfg.get("license") if isinstance(cfg, dict) else getattr(cfg, "license", None)
    _atomic_write_text(target / CONFIG_FILE, _dump(_summary(read_adapter(path), count_parameters(model), license)))
    return target


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    task: str | None = None,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    license: str | None = None,
) -> CommitInfo:
    """Upload a task's adapter to a Hub repo (created if needed) in one commit with its config and the model card.

    Other tasks already in the repo stay as they are; the card's table of tasks is regenerated and everything else
    in the card is kept.

    Args:
        model: An attached model.
        repo_id: ``"org/name"`` (``"hf-hub:org/name"`` and ``"org/name@branch"`` are accepted too).
        task: The task's folder in the repo; None uses the repo root.
        revision: Branch to commit to, created from ``main`` when missing (a version of a task); tags and commits
            cannot be pushed to.
        private: Create the repo private (ignored when it exists).
        token: Hub token with write access (default: the logged-in one).
        commit_message: Summary of the commit (default: ``"Add CLR adapter for task 'pets'"``).
        commit_description: Longer description of the commit or pull request.
        create_pr: Open a pull request instead of committing to the branch (works on repos you cannot write to).
        dtype: Storage dtype of the floating tensors (``"fp16"`` / ``"bf16"`` halve the file).
        label_names: Class names recorded with the adapter.
        license: License in the card's metadata (default: the card's, else the base model's, else apache-2.0).

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url`` for a pull request).
    """
    _check_task_name(task)
    with tempfile.TemporaryDirectory(prefix="clr_timm-push-") as tmp:
        _save_task(model, Path(tmp), task, dtype, label_names)  # no card here: the repo's own is updated
        return push_folder(
            tmp,
            repo_id,
            revision=revision,
            private=private,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            license=license,
        )


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
    """Upload every adapter of a :func:`save_pretrained` folder to a Hub repo, all in one commit.

    Each adapter is checked before anything is sent, adapters of another base model than the repo's are refused, and
    the repo's card is regenerated (its own text kept; the folder's ``README.md`` is used only for a repo that has no
    card yet). Arguments as in :func:`push_to_hub`.

    Returns:
        huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    repo_id, revision = _parse_repo(repo_id, revision)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder; give the folder written by clr_timm.save_pretrained")
    local = _local_tasks(folder)
    if not local:
        raise AdapterError(
            f"no adapter in {folder}: expected {ADAPTER_FILE} at its root or in task subfolders "
            "(write them with clr_timm.save_pretrained)"
        )
    _check_one_backbone(str(folder), local)
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token, write=True):
        if not create_pr:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                _ensure_branch(api, repo_id, revision)
        info = api.repo_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        remote_names, remote_root = _tasks_in(list(sizes))
        pushed = {t.task for t in local}
        remote = [
            _remote_task(api, repo_id, info.sha, name, sizes)
            for name in ([None] if remote_root else []) + remote_names
            if name not in pushed
        ]
        _check_one_backbone(f"{repo_id}{_at(revision)}", remote + local)
        if _CARD_FILE in sizes:
            existing = Path(api.hf_hub_download(repo_id, _CARD_FILE, revision=info.sha)).read_text(encoding="utf-8")
        elif (folder / _CARD_FILE).is_file():
            existing = (folder / _CARD_FILE).read_text(encoding="utf-8")
        else:
            existing = None
        card = _render_card(existing, repo_id, repo_id.split("/")[-1], remote + local, license)
        operations = [CommitOperationAdd(_CARD_FILE, card.encode("utf-8"))]
        for t in local:
            prefix = f"{t.task}/" if t.task is not None else ""
            config = t.config.read_bytes() if t.config is not None else _dump(t.summary).encode("utf-8")
            operations.append(CommitOperationAdd(prefix + ADAPTER_FILE, str(t.adapter)))
            operations.append(CommitOperationAdd(prefix + CONFIG_FILE, config))
        message = commit_message or _commit_message(local, sizes)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=info.sha,
        )


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
) -> _Task:
    from huggingface_hub.errors import EntryNotFoundError

    prefix = f"{task}/" if task is not None else ""
    summary: dict[str, Any] = {}
    if prefix + CONFIG_FILE in sizes:
        with suppress(EntryNotFoundError, AdapterError):  # a config someone broke by hand: its row shows '?'
            path = api.hf_hub_download(repo_id, prefix + CONFIG_FILE, revision=commit, cache_dir=cache_dir)
            summary = _read_summary(Path(path))
    return _Task(task, summary, sizes.get(prefix + ADAPTER_FILE))


def _commit_message(local: list[_Task], remote_files: dict[str, Any]) -> str:
    def where(t: _Task) -> str:
        return f"task {t.task!r}" if t.task is not None else "the repo root"

    if len(local) == 1:
        prefix = f"{local[0].task}/" if local[0].task is not None else ""
        verb = "Update" if prefix + ADAPTER_FILE in remote_files else "Add"
        return f"{verb} CLR adapter for {where(local[0])}"
    return f"Add or update CLR adapters for {', '.join(where(t) for t in local)}"


def list_tasks(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> list[str]:
    """The tasks (folders holding an adapter) of a Hub repo at a revision, sorted.

    An adapter at the repo root (``task=None``) is not a named task and is not listed; :func:`describe` reports it.
    """
    repo_id, revision = _parse_repo(repo_id, revision)
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

    repo_id, revision = _parse_repo(repo_id, revision)
    _check_task_name(task)
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token):
        where = dict(subfolder=task, revision=revision, cache_dir=cache_dir, local_dir=local_dir)
        try:
            path = api.hf_hub_download(
                repo_id, ADAPTER_FILE, **where, local_files_only=local_files_only, force_download=force_download
            )
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
            hint = ""
            if cached is not None:
                names = [x if x is not None else "(root)" for x in cached]
                hint = f" Tasks of this repo{_at(revision)} in the cache: {names}."
            raise HubOfflineError(
                f"{_task_label(task)} of {repo_id}{_at(revision)} is not in the local cache and "
                f"{_offline_reason(local_files_only, e)}: download it once with the Hub reachable (e.g. `clr-timm pull "
                f"{repo_id}{f' --task {shlex.quote(task)}' if task else ''}`), or pass the cache_dir that holds it."
                f"{hint}"
            ) from e
        if with_config:
            with suppress(EntryNotFoundError):  # uploaded without one (e.g. a bare safetensors file)
                api.hf_hub_download(
                    repo_id, CONFIG_FILE, **where, local_files_only=local_files_only, force_download=force_download
                )
    return Path(path)


def _cached_copy(api: HfApi, repo_id: str, where: dict[str, Any]) -> str | None:
    """The adapter file the cache holds for the revision asked for, or None."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return api.hf_hub_download(repo_id, ADAPTER_FILE, **where, local_files_only=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        return None


def _task_not_found(api: HfApi, repo_id: str, task: str | None, revision: str | None) -> TaskNotFoundError:
    try:
        names, root = _tasks_in(api.list_repo_files(repo_id, revision=revision))
        there = f"tasks there: {names}" + (" and an adapter at the repo root (task=None)" if root else "")
    except Exception:  # only a hint for an error message that is already on its way
        there = "its tasks could not be listed"
    missing = f"no task {task!r}" if task is not None else "no adapter at its root (task=None); pass task=..."
    return TaskNotFoundError(f"{repo_id}{_at(revision)} has {missing}; {there}")


def describe(source: str | os.PathLike, task: str | None = None, **hub_kwargs: Any) -> dict[str, Any]:
    """What an adapter, a folder of adapters or a Hub repo of adapters holds, as a JSON-ready dict.

    Args:
        source: An adapter file, a :func:`save_pretrained` folder, ``"hf-hub:org/name[@rev]"``, or ``"org/name"``
            when no such local path exists.
        task: One task of a folder or repo: describe its adapter file (metadata, tensors, sizes).
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.

    Returns:
        For one adapter: ``kind="adapter"`` with its metadata (task, classes, label names, config, base model,
        fingerprint, versions) and tensors (count, values, bytes, dtypes, reprogrammed convs). For a folder or repo:
        ``kind="folder"`` / ``"repo"``, its ``tasks``, whether it has a ``root_adapter``, and ``adapters``: each
        task's ``clr_config.json`` with its ``file_size``.
    """
    path = Path(source)
    is_hub = isinstance(source, str) and (
        source.startswith("hf-hub:") or (not path.exists() and source.count("/") == 1 and not source.startswith("."))
    )
    if is_hub:
        return _describe_repo(str(source), task, **hub_kwargs)
    if hub_kwargs:
        raise CLRError(f"{sorted(hub_kwargs)} only apply to Hub repos, not to the local path {source}")
    _check_task_name(task)
    if path.is_dir():
        if task is not None:
            if not (path / task / ADAPTER_FILE).is_file():
                names = [t.task for t in _local_tasks(path, validate=False) if t.task is not None]
                raise AdapterError(f"no task {task!r} in {path}; tasks there: {names}")
            return _describe_file(path / task / ADAPTER_FILE)
        tasks = _local_tasks(path, validate=False)
        return _collection("folder", {"path": str(path)}, tasks)
    if task is not None:
        raise CLRError(f"task={task!r} applies to folders and Hub repos, not to the file {path}")
    if not path.exists():
        raise AdapterError(f"no adapter file, folder or Hub repo named {source!s}")
    return _describe_file(path)


def _collection(kind: str, head: dict[str, Any], tasks: list[_Task]) -> dict[str, Any]:
    return {
        "kind": kind,
        **head,
        "tasks": sorted(t.task for t in tasks if t.task is not None),
        "root_adapter": any(t.task is None for t in tasks),
        "adapters": [{"task": t.task, **t.summary, "file_size": t.file_size} for t in tasks],
    }


def _describe_file(path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    adapter = read_adapter(path)
    parameters = None
    config = Path(adapter.path).parent / CONFIG_FILE
    if config.is_file():
        with suppress(AdapterError):
            parameters = _read_summary(config).get("parameters")
    summary = _summary(adapter, None if parameters else _count_from_metadata(adapter))
    summary["parameters"] = parameters or summary["parameters"]
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values())
    return {
        "kind": "adapter",
        "path": adapter.path,
        **(extra or {}),
        **summary,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "num_reprogrammed": sum(1 for k in adapter.tensors if f".{CLR_ATTR}." in f".{k}"),
    }


def _describe_repo(source: str, task: str | None, **hub_kwargs: Any) -> dict[str, Any]:
    repo_id, revision = _parse_repo(source, hub_kwargs.pop("revision", None))
    token = hub_kwargs.get("token")
    if task is not None:
        path = download_adapter(repo_id, task, revision=revision, **hub_kwargs)
        return _describe_file(path, {"repo_id": repo_id, "revision": revision or "main"})
    unknown = sorted(set(hub_kwargs) - {"token", "cache_dir", "local_files_only"})
    if unknown:
        raise CLRError(f"describe() got unexpected Hub argument(s) {unknown}")
    if hub_kwargs.get("local_files_only"):
        raise HubOfflineError(
            f"describing the whole repo {repo_id} needs the Hub; offline, describe one cached task with task=..."
        )
    api = _api(token)
    with _hub_errors(api, repo_id, revision=revision, token=token):
        info = api.repo_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        names, root = _tasks_in(list(sizes))
        cache_dir = hub_kwargs.get("cache_dir")
        names = ([None] if root else []) + names
        tasks = [_remote_task(api, repo_id, info.sha, name, sizes, cache_dir) for name in names]
    head = {"repo_id": repo_id, "revision": revision or "main", "commit": info.sha, "private": info.private}
    return _collection("repo", head, tasks)
