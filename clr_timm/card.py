"""The files around an adapter: ``clr_config.json``, the model card, and folders of tasks on disk.

One folder (or Hub repo) per backbone holds many tasks, one subfolder per task (``task=None`` uses the root)::

    README.md                        model card: Hub metadata, a table of the tasks, a usage snippet
    pets/clr_adapter.safetensors     the task's adapter (see :mod:`clr_timm.adapter`)
    pets/clr_config.json             what it holds, for people: config, classes, label names, base model, sizes
    flowers/...

This module writes and reads that layout on disk, renders the card, and says what an adapter or a folder holds
(:func:`describe_file`, :func:`describe_local`); :mod:`clr_timm.hub` moves the same files to and from the Hub.

Everything in these files may come from a stranger. A folder is read without following links, each file once and
bounded in size; what is uploaded is those bytes, as they were checked. ``clr_config.json`` is checked for the shape
this module reads, and text from it or from a task's name reaches the card only escaped, so it cannot break the
card's generated section.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
import shlex
import tempfile
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import (
    ADAPTER_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    AdapterFile,
    _check_task_name,
    atomic_path,
    read_adapter,
    write_adapter,
)
from .attach import CLR_ATTR, plan_targets
from .config import CLRConfig, json_structure
from .count import ParameterCount, count_parameters
from .errors import AdapterError, CLRError, HubError, printable, shown
from .source import check_no_link, check_recorded_task, folder_tasks, read_in_folder, task_file

__all__ = [
    "CONFIG_FILE",
    "CARD_FILE",
    "LIBRARY_NAME",
    "TaskFiles",
    "summarize",
    "dump_summary",
    "parse_summary",
    "read_summary",
    "local_tasks",
    "write_task_folder",
    "model_license",
    "check_one_backbone",
    "render_card",
    "write_local_card",
    "read_card",
    "checked_adapter",
    "describe_file",
    "describe_collection",
    "describe_local",
    "task_label",
]

CONFIG_FILE = "clr_config.json"
CARD_FILE = "README.md"
LIBRARY_NAME = "clr-timm"
_CARD_START = "<!-- clr-timm:tasks:start -->"
_CARD_END = "<!-- clr-timm:tasks:end -->"
_CARD_BLOCK = re.compile(re.escape(_CARD_START) + r".*?" + re.escape(_CARD_END), re.DOTALL)
_CARD_TAGS = ("clr", "continual-learning", "timm", "image-classification")
_DEFAULT_LICENSE = "apache-2.0"  # timm's default for cards it writes
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_KINDS = ("clr", "norm_affine", "norm_stats", "head", "norm_affine / head")
MAX_CONFIG_BYTES = 16 << 20
"""The largest ``clr_config.json`` read (label names of 20,000 classes take about 1 MB)."""
MAX_CARD_BYTES = 16 << 20
"""The largest ``README.md`` read."""
MAX_UPLOAD_BYTES = 4 << 30
"""The largest adapter file read from a folder to upload."""
_MAX_DEPTH = 32  # JSON nesting in clr_config.json: a CLRConfig is two levels deep
_MAX_CONTAINERS = 10_000  # objects and lists in clr_config.json (it writes about ten)
_MAX_SEPARATORS = 1_000_000  # commas and colons (one per label name, a few dozen more)
_TIMM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # what a timm model name (``arch.tag``) looks like
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}")
_DTYPE = re.compile(r"[a-z0-9_]{1,20}")


def task_label(task: str | None) -> str:
    """How messages name a task: ``task 'pets'``, or the adapter at the root."""
    return f"task {task!r}" if task is not None else "the adapter at the repo root (task=None)"


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


def summarize(
    adapter: AdapterFile, count: ParameterCount | None, license: str | None = None, file_size: int | None = None
) -> dict[str, Any]:
    """The content of ``clr_config.json``: everything a person (or the model card) wants to know about an adapter.

    ``file_size`` is the adapter file's size (default: that of ``adapter.path``).
    """
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
            **({"weights_sha256": adapter.base_weights_sha256} if adapter.base_weights_sha256 else {}),
        },
        "parameters": parameters,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "num_tensors": len(adapter.tensors),
        "num_values": adapter.num_values(),
        "file_size": file_size if file_size is not None else path.stat().st_size,
        "versions": adapter.versions,
    }


def dump_summary(summary: dict[str, Any]) -> str:
    """The text of ``clr_config.json``."""
    return json.dumps(summary, indent=2) + "\n"


_STRINGS = ("task", "dtype", "format", "adapter_file")
_INTEGERS = ("num_classes", "num_tensors", "num_values", "file_size", "format_version")
_OBJECTS = ("base_model", "parameters", "versions")


def _depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value``, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= _MAX_DEPTH:
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _wrong_field(data: dict[str, Any]) -> str | None:
    """The first field whose type is not what this module reads (None: every field is usable)."""
    for key in _STRINGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key!r} must be a string"
    for key in _INTEGERS:
        if data.get(key) is not None and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            return f"{key!r} must be an integer"
    for key in _OBJECTS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key!r} must be an object"
    labels = data.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(n, str) for n in labels)):
        return "'label_names' must be a list of strings"
    for key, value in (data.get("base_model") or {}).items():
        if value is not None and not isinstance(value, str):
            return f"'base_model.{printable(str(key), 40)}' must be a string"
    return None


def parse_summary(data: bytes, where: str | os.PathLike) -> dict[str, Any]:
    """The content of a ``clr_config.json``, checked to have the shape :func:`summarize` writes (other keys pass)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{where} has {len(data):,} bytes, more than the {MAX_CONFIG_BYTES:,} of a {CONFIG_FILE}")
    try:
        text = data.decode("utf-8")
        containers, separators = json_structure(text)
        if containers > _MAX_CONTAINERS or separators > _MAX_SEPARATORS:  # refused before json.loads builds them
            raise AdapterError(
                f"{where} holds {containers:,} objects and lists and {separators:,} separators, more than a "
                f"{CONFIG_FILE} has; delete it and save the adapter again"
            )
        summary = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the JSON parser goes
        reason = printable(str(e) or type(e).__name__)
        raise AdapterError(f"{where} is not a readable JSON file ({reason}); delete it, save the adapter again") from e
    if not isinstance(summary, dict):
        raise AdapterError(f"{where} must hold a JSON object, got {type(summary).__name__}")
    if _depth(summary) > _MAX_DEPTH:
        raise AdapterError(f"{where} nests deeper than {_MAX_DEPTH} levels; delete it and save the adapter again")
    wrong = _wrong_field(summary)
    if wrong is not None:
        raise AdapterError(f"{where}: {wrong}; delete it and save the adapter again")
    return summary


def read_summary(path: Path) -> dict[str, Any]:
    """A ``clr_config.json`` at ``path`` (a file the Hub client downloaded, or one written here), read and checked."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{path} has more than the {MAX_CONFIG_BYTES:,} bytes a {CONFIG_FILE} may have")
        data = path.read_bytes()
    except OSError as e:
        raise AdapterError(f"cannot read {path}: {e.strerror or e}") from e
    return parse_summary(data, path)


@dataclass
class TaskFiles:
    """One task's files, on disk or in a repo: its name, what its clr_config.json says, its adapter's size.

    ``adapter`` and ``config`` are the bytes to upload, read once and checked (:func:`local_tasks`); ``config`` None
    uploads ``dump_summary(summary)``.
    """

    task: str | None
    summary: dict[str, Any]
    file_size: int | None
    adapter: bytes | None = None
    config: bytes | None = None


def checked_adapter(data: bytes, path: Path) -> AdapterFile:
    """``data``, the content of the adapter file ``path``, checked as :func:`~clr_timm.read_adapter` checks a file.

    The bytes are what is checked, not ``path`` (which may have changed since): they go through a private copy.
    """
    with tempfile.TemporaryDirectory(prefix="clr_timm-check-") as tmp:
        copy = Path(tmp) / ADAPTER_FILE
        copy.write_bytes(data)
        try:
            adapter = read_adapter(copy)
        except AdapterError as e:
            raise type(e)(str(e).replace(str(copy), str(path))) from e
    return dataclasses.replace(adapter, path=str(path))


def local_tasks(folder: Path, validate: bool = True, names: list[str | None] | None = None) -> list[TaskFiles]:
    """The adapters of a ``save_pretrained`` folder: the root one (task None) first, then the task folders.

    Nothing is read through a link. With ``validate``, each adapter file is read once, checked, and kept as the bytes
    to upload; without, only its size is taken (unless it has no ``clr_config.json`` to summarise it). ``names``
    reads only those tasks (None: the root adapter), which must be in the folder.
    """
    if names is None:
        names = [*([None] if os.path.lexists(folder / ADAPTER_FILE) else []), *folder_tasks(folder)]
    tasks = []
    for name in names:
        where = f"{name}/" if name is not None else ""
        adapter_path = folder / where / ADAPTER_FILE
        config = read_in_folder(folder, where + CONFIG_FILE, MAX_CONFIG_BYTES)
        data, size = None, None
        if validate or config is None:
            data = read_in_folder(folder, where + ADAPTER_FILE, MAX_UPLOAD_BYTES)
            if data is None:
                raise AdapterError(f"{adapter_path} disappeared while {folder} was read")
            adapter, size = checked_adapter(data, adapter_path), len(data)
        else:
            check_no_link(folder, where + ADAPTER_FILE)
            size = adapter_path.stat().st_size
        if config is not None:
            summary = parse_summary(config, folder / where / CONFIG_FILE)
        else:
            summary = summarize(adapter, _count_from_metadata(adapter), file_size=size)
        tasks.append(TaskFiles(name, summary, size, data if validate else None, config))
    return tasks


# ---------------------------------------------------------------------------------------------------- model card


def _timm_name(value: Any) -> str | None:
    """``value`` if it looks like a timm model name (the only base model text a card shows), else None."""
    return value if isinstance(value, str) and _TIMM_NAME.fullmatch(value) else None


def _base_model_id(summary: dict[str, Any]) -> str | None:
    base = summary.get("base_model") or {}
    hub_id = base.get("hf_hub_id")
    if isinstance(hub_id, str) and _HUB_ID.fullmatch(hub_id):
        return hub_id
    architecture, tag = _timm_name(base.get("architecture")), _timm_name(base.get("pretrained_tag"))
    return f"timm/{architecture}.{tag}" if architecture and tag else None


def _base_name(t: TaskFiles) -> str | None:
    base = t.summary.get("base_model") or {}
    return base.get("name") or base.get("architecture")


def _code(text: str) -> str:
    """``text`` as inline code that nothing in it can end early (its backticks, non-printable characters)."""
    text = printable(text)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def check_one_backbone(where: str, tasks: list[TaskFiles]) -> None:
    """Refuse to mix adapters of different base models in one repo (one repo per backbone, one card per base)."""
    named = [t for t in tasks if _base_name(t)]
    for t in named[1:]:
        if _base_name(t) != _base_name(named[0]):
            raise HubError(
                f"{where} holds adapters for {shown(_base_name(named[0]))} ({task_label(named[0].task)}), and "
                f"{task_label(t.task)} is for {shown(_base_name(t))}: keep one base model per repo, push to another "
                "repo"
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
                f"{where}: {task_label(t.task)} was trained on other backbone weights than {task_label(first_task)} "
                f"(fingerprint {shown(fingerprint)} != {shown(first)}): keep one backbone per repo, push to another "
                "repo"
            )


def _usage(repo_id: str | None, summary: dict[str, Any], task: str | None) -> str:
    base = summary.get("base_model") or {}
    name = _timm_name(base.get("name")) or _timm_name(base.get("architecture")) or "<timm model name>"
    source = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    task_arg = f", task={json.dumps(task)}" if task is not None else ""  # a task name has no '<', '|' or newline
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
        f"{_code(f'clr-timm pull {cli_repo}{cli_task}')} downloads a task into the Hub cache, where it stays available "
        "offline.",
    ]
    if repo_id is None:
        lines += ["", "(Replace ORG/NAME by the repo this folder is uploaded to, or load from the folder's path.)"]
    return "\n".join(lines)


def _variant(config: Any) -> str:
    """The preset a recorded config is (``CLRConfig.preset``), ``custom``, or ``?`` when it cannot be read."""
    try:
        name = CLRConfig.from_dict(config).preset_name()
    except CLRError:
        return "?"
    return f"`{name}`" if name else "custom"


def _row(t: TaskFiles) -> str:
    """One line of the card's table of tasks."""
    s, p = t.summary, t.summary.get("parameters") or {}
    per_task, percent, head, classes = (
        p.get("per_task"),
        p.get("percent_of_backbone"),
        p.get("head"),
        s.get("num_classes"),
    )
    dtype = s.get("dtype")
    cells = [
        _code(t.task) if t.task is not None else "(repo root)",
        _variant(s.get("config")),
        f"{classes}" if isinstance(classes, int) else "?",
        f"{per_task:,}" if isinstance(per_task, int) else "?",
        f"{percent:.3f}%" if isinstance(percent, (int, float)) else "?",
        f"{head:,}" if isinstance(head, int) else "?",
        _human_bytes(t.file_size) + (f" ({dtype})" if isinstance(dtype, str) and _DTYPE.fullmatch(dtype) else ""),
    ]
    return f"| {' | '.join(cells)} |"


def _first_cell(task: str | None) -> str:
    return _code(task) if task is not None else "(repo root)"


def _card_rows(card: str | None) -> dict[str, str]:
    """The rows of the table of tasks in a card's generated block, by their first cell (:func:`_first_cell`)."""
    block = _CARD_BLOCK.search(card or "")
    lines = block.group(0).splitlines() if block else []
    return {line[2:].split(" | ", 1)[0]: line for line in lines if line.startswith("| ") and " | " in line}


def _tasks_block(repo_id: str | None, tasks: list[TaskFiles], kept: dict[str | None, str] | None = None) -> str:
    """The generated part of the card, between the markers: the table of tasks and how to use them.

    ``kept``: rows of other tasks (task -> row, as an earlier card has them) to list beside ``tasks``.
    """
    tasks = sorted(tasks, key=lambda t: (t.task is not None, t.task or ""))
    rows = [((t.task is not None, t.task or ""), _row(t)) for t in tasks]
    rows += [((name is not None, name or ""), row) for name, row in (kept or {}).items()]
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
            "| Task | Variant | Classes | Parameters per task | % of backbone | Head | File |",
            "|---|---|---:|---:|---:|---:|---:|",
            *(row for _, row in sorted(rows)),
            "",
            "Parameters per task: the reprogramming layers and the task's normalisation layers, without its "
            f"head. The backbone{shared} is frozen and shared by every task, so adding a task never changes another.",
            "",
            _usage(repo_id, example.summary, example.task),
            _CARD_END,
        ]
    )


def render_card(
    existing: str | None,
    repo_id: str | None,
    title: str,
    tasks: list[TaskFiles],
    license: str | None = None,
    kept: dict[str | None, str] | None = None,
) -> str:
    """The model card: Hub metadata updated, the generated block replaced, everything a person wrote kept.

    ``kept``: table rows of other tasks, taken from ``existing`` (see :func:`write_local_card`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = next((b for b in (_base_model_id(t.summary) for t in tasks) if b), None)
    block = _tasks_block(repo_id, tasks, kept)
    if existing is None:
        name = next((n for n in (_timm_name(_base_name(t)) for t in tasks) if n), None)
        title = html.escape(printable(title), quote=False)  # a folder's name: no markup, no comment marker
        intro = (
            "Channel-wise Lightweight Reprogramming (CLR, Ge et al., ICCV 2023) adapters"
            + (f" for the timm model `{name}`" if name else "")
            + ": the backbone stays frozen and is shared by every task, and each task adds a small adapter of its own "
            "(reprogramming layers after the convolutions, normalisation layers and head), made with "
            "`clr-timm`."
        )
        card = ModelCard(f"---\nlibrary_name: {LIBRARY_NAME}\n---\n\n# {title}\n\n{intro}\n\n{block}\n")
    else:
        try:
            card = ModelCard(existing)
        except Exception as e:  # yaml errors, a metadata block that is not a mapping
            raise HubError(
                f"the existing {CARD_FILE} of {repo_id or printable(title)} has metadata that does not parse "
                f"({printable(str(e))}): fix its YAML header, then push again"
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


def write_local_card(folder: Path, written: list[TaskFiles] | None = None) -> None:
    """Write (or update) the ``README.md`` card of a ``save_pretrained`` folder from the tasks in it.

    With ``written`` (the tasks just saved, as :func:`write_task_folder` returns them), the other tasks keep the rows
    the existing card gives them, and only a task without one has its ``clr_config.json`` read: saving k tasks into a
    folder of N reads k files, not N, so that saving tasks one at a time stays linear in the number of tasks.
    """
    existing = read_card(folder)
    if written is None:
        tasks, kept = local_tasks(folder, validate=False), {}
    else:
        rows = _card_rows(existing)
        saved = {t.task for t in written}
        on_disk = [*([None] if os.path.lexists(folder / ADAPTER_FILE) else []), *folder_tasks(folder)]
        others = [name for name in on_disk if name not in saved]
        kept = {name: rows[_first_cell(name)] for name in others if _first_cell(name) in rows}
        tasks = [*written, *local_tasks(folder, validate=False, names=[n for n in others if n not in kept])]
    if not tasks:
        return
    card = render_card(existing, None, folder.resolve().name, tasks, kept=kept)
    _atomic_write_text(folder / CARD_FILE, card)


def read_card(folder: Path) -> str | None:
    """The ``README.md`` of a folder (None: it has none), read once and not through a link."""
    data = read_in_folder(folder, CARD_FILE, MAX_CARD_BYTES)
    try:
        return data.decode("utf-8") if data is not None else None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{folder / CARD_FILE} is not UTF-8 text ({e}); fix or delete it") from e


def model_license(model: torch.nn.Module) -> str | None:
    """The license timm records for a model's pretrained weights, if any."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("license") if isinstance(cfg, dict) else getattr(cfg, "license", None)


def write_task_folder(
    adapter: AdapterFile,
    folder: Path,
    task: str | None,
    *,
    count: ParameterCount | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> TaskFiles:
    """Write an adapter and its ``clr_config.json`` into ``folder/<task>`` (None: ``folder``), without a card.

    Args:
        adapter: What to write (:func:`~clr_timm.adapter.extract_adapter`).
        folder: The folder of the whole collection.
        task: The task's subfolder.
        count: The adapter's parameter count, for ``clr_config.json`` (None: rebuilt from the metadata).
        license: The base model's license, for ``clr_config.json``.
        overwrite: As in :func:`~clr_timm.adapter.write_adapter`.

    Returns:
        The task's name, summary and file size (no bytes: read them back with :func:`local_tasks` to upload).
    """
    _check_task_name(task)
    if folder.is_file():
        raise AdapterError(
            f"{folder} is a file; save_pretrained writes a folder (use clr_timm.save_adapter for a file)"
        )
    target = folder / task if task is not None else folder
    where = f"{task}/" if task is not None else ""
    for name in (ADAPTER_FILE, CONFIG_FILE):  # write into the folder, never through a link out of it
        check_no_link(folder, where + name)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise AdapterError(f"{target} is a file, not a task's folder: move it away, or save the task by another name")
    written = write_adapter(adapter, target / ADAPTER_FILE, overwrite=overwrite)
    summary = summarize(written, count if count is not None else _count_from_metadata(written), license)
    _atomic_write_text(target / CONFIG_FILE, dump_summary(summary))
    return TaskFiles(task, summary, summary["file_size"])


# ------------------------------------------------------------------------------------------------------ describe


def _kind(key: str, head: tuple[str, ...] | None) -> str:
    """The kind of an adapter tensor from its key; ``head`` is None when the head's modules are unknown."""
    if f".{CLR_ATTR}." in f".{key}":
        return "clr"
    if head and key.startswith(head):
        return "head"
    if key.rsplit(".", 1)[-1] in _STAT_BUFFERS:
        return "norm_stats"
    return "norm_affine" if head is not None else "norm_affine / head"


def _head_prefixes(architecture: str | None, num_classes: int | None, config: CLRConfig) -> tuple[str, ...] | None:
    """Module prefixes of the head of ``architecture``, from a weightless (meta) build of it; None when unknown."""
    import timm

    if not architecture or not timm.is_model(architecture):
        return None
    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=num_classes or 1)
    except Exception:  # a model that needs real tensors to build: tell norms and head apart no further
        return None
    return tuple(f"{h}." for h in plan_targets(model, config).head)


def _tensors_by_kind(adapter: AdapterFile) -> dict[str, dict[str, Any]]:
    """Count, values, bytes and dtypes of the adapter's tensors of each kind (reprogramming, norms, head)."""
    head = _head_prefixes(adapter.architecture, adapter.num_classes, adapter.config)
    groups: dict[str, list[torch.Tensor]] = {}
    for key, t in adapter.tensors.items():
        groups.setdefault(_kind(key, head), []).append(t)
    return {
        kind: {
            "count": len(ts),
            "values": sum(t.numel() for t in ts),
            "bytes": sum(t.numel() * t.element_size() for t in ts),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in ts}),
        }
        for kind in _KINDS
        if (ts := groups.get(kind))
    }


def _parameters_beside(path: Path, in_hub_cache: bool) -> dict[str, Any] | None:
    """The parameter counts of the ``clr_config.json`` beside an adapter file, if there is a readable one.

    In the Hub cache, files are links the client made; anywhere else a linked config is not read.
    """
    with suppress(AdapterError):  # none, or one someone broke: the counts are made again from the metadata
        if in_hub_cache:
            config = path.parent / CONFIG_FILE
            return read_summary(config).get("parameters") if config.is_file() else None
        data = read_in_folder(path.parent, CONFIG_FILE, MAX_CONFIG_BYTES)
        return parse_summary(data, path.parent / CONFIG_FILE).get("parameters") if data is not None else None
    return None


def describe_file(
    path: Path, extra: dict[str, Any] | None = None, *, task: str | None = None, in_hub_cache: bool = False
) -> dict[str, Any]:
    """What one adapter file holds, as :func:`clr_timm.describe` reports it (``kind="adapter"``).

    ``extra`` is merged in after the path (where it came from: repo and revision); ``task``, when given, must be the
    task the file records; ``in_hub_cache``: ``path`` is a file of the Hub cache (its ``clr_config.json`` beside it is
    a link there).
    """
    adapter = read_adapter(path)
    check_recorded_task(adapter, task)
    parameters = _parameters_beside(Path(adapter.path), in_hub_cache)
    summary = summarize(adapter, None if parameters else _count_from_metadata(adapter))
    summary["parameters"] = parameters or summary["parameters"]
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in adapter.tensors.values())
    owners = {f".{k}".split(f".{CLR_ATTR}.")[0] for k in adapter.tensors if f".{CLR_ATTR}." in f".{k}"}
    return {
        "kind": "adapter",
        "path": adapter.path,
        **(extra or {}),
        **summary,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "num_reprogrammed": len(owners),
        "tensors_by_kind": _tensors_by_kind(adapter),
    }


def describe_collection(kind: str, head: dict[str, Any], tasks: list[TaskFiles]) -> dict[str, Any]:
    """A folder or repo of adapters as :func:`clr_timm.describe` reports it: ``head`` and a summary of each task."""
    return {
        "kind": kind,
        **head,
        "tasks": sorted(t.task for t in tasks if t.task is not None),
        "root_adapter": any(t.task is None for t in tasks),
        "adapters": [{"task": t.task, **t.summary} | {"task": t.task, "file_size": t.file_size} for t in tasks],
    }


def describe_local(path: Path, task: str | None = None) -> dict[str, Any]:
    """What a local adapter file, or a ``save_pretrained`` folder (or one of its tasks), holds."""
    _check_task_name(task)
    if os.path.isdir(path):
        if task is not None:
            return describe_file(task_file(path, task))
        return describe_collection("folder", {"path": str(path)}, local_tasks(path, validate=False))
    if not os.path.exists(path):
        raise AdapterError(f"no adapter file, folder or Hub repo named {path}")
    return describe_file(path, task=task)
