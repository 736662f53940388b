"""The adapter file format: a task's delta as one small safetensors file, written atomically and checked on reading.

The file holds only the task's delta (reprogramming tensors, per-task norm tensors, head) under the model's own
state_dict keys, and string metadata that says what it is and which base model it belongs to. Nothing is ever
unpickled. Applying a file to a model validates everything against the model before touching a tensor, so a bad file
leaves the model as it was: the same module and parameter objects, flags, hooks and training modes, not only values.

Files come from strangers, so reading one costs time and memory bounded by the tensors it holds (with a model: the
tensors the model expects) plus a small constant, whatever its header claims. The header is checked before any tensor
is read: its length against the file and :data:`MAX_HEADER_BYTES`, its JSON structure before it is parsed, at most
:data:`MAX_TENSORS` tensors of known dtypes, shapes of rank at most :data:`MAX_RANK` and offsets that tile the data
exactly, and metadata of at most :data:`MAX_METADATA_CHARS` characters (:data:`MAX_METADATA_VALUE_CHARS` in one
value, :data:`MAX_METADATA_KEYS` keys). Given a model, a file is checked against it from the header alone, so a
tensor the model has no place for is refused by name without being read. Every failure is an :class:`AdapterError`
whose message quotes at most a few hundred characters of the file.

This module knows files and models only: where a source lives (a folder, the Hub) is decided by
:mod:`clr_timm.source`, and the verbs ``save_adapter`` / ``load_adapter`` are in :mod:`clr_timm.save_load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from .attach import (
    CLR_ATTR,
    CLRPlan,
    _adapter_tensors,
    _named_tensors,
    attach,
    current_plan,
    get_config,
    is_attached,
    plan_targets,
    reprogramming_shapes,
    resize_head,
)
from .config import CLRConfig, json_structure
from .errors import AdapterError, AdapterMismatchError, BackboneMismatchError, CLRError, ConfigError, shown
from .state import find_state, get_state, refuse_fused
from .version import __version__

__all__ = [
    "ADAPTER_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterFile",
    "extract_adapter",
    "write_adapter",
    "read_adapter",
    "validate_adapter",
    "apply_adapter",
    "backbone_fingerprint",
    "base_model_info",
]

ADAPTER_FILE = "clr_adapter.safetensors"
FORMAT_NAME = "clr_timm.adapter"
FORMAT_VERSION = 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_STORAGE_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FINGERPRINT_SAMPLES = 64

MAX_HEADER_BYTES = 8 * 2**20
"""The largest safetensors header read (the largest timm CNN's adapter has a header of about 200 kB)."""
MAX_TENSORS = 16_384
"""The most tensors an adapter file may hold (the largest timm CNN's adapter has about 1,500)."""
MAX_RANK = 8
"""The highest rank of a tensor in an adapter file (the built-in layers and timm's heads use at most 4)."""
MAX_METADATA_CHARS = 4 * 2**20
"""The most characters of metadata, keys and values together."""
MAX_METADATA_VALUE_CHARS = 2 * 2**20
"""The most characters of one metadata value (the label names of 21k classes take about 1 MB)."""
MAX_METADATA_KEYS = 256
"""The most metadata keys (clr_timm writes 12)."""
_MAX_DIM = 2**31 - 1
# safetensors dtype name -> (torch dtype, bytes per value), for every dtype a model's adapter tensors can have.
_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_DTYPE_NAMES = {dtype: name for name, (dtype, _) in _DTYPES.items()}


@dataclass
class AdapterFile:
    """An adapter: its tensors and what its metadata says, as read from a file or extracted from a model.

    ``path`` is the file it was read from or written to (``""`` for one extracted and not written yet), and
    ``metadata`` the safetensors metadata exactly as it is (or will be) in the file. ``base_weights_sha256`` is the
    SHA-256 of the local weights file the backbone was loaded from, for an adapter trained on weights that no
    pretrained tag names (``clr-timm extract --base-weights``); None otherwise, and then not written to the file.
    """

    path: str
    tensors: dict[str, torch.Tensor]
    config: CLRConfig
    num_classes: int | None
    architecture: str | None = None
    pretrained_tag: str | None = None
    hf_hub_id: str | None = None
    backbone_fingerprint: str | None = None
    task: str | None = None
    label_names: list[str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base_weights_sha256: str | None = None

    @property
    def base_model(self) -> str | None:
        """``architecture.tag`` (the timm model name) when known."""
        if self.architecture and self.pretrained_tag:
            return f"{self.architecture}.{self.pretrained_tag}"
        return self.architecture

    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def base_model_info(model: nn.Module) -> dict[str, str | None]:
    """timm architecture, pretrained tag and hub id of a model, where timm recorded them."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if not isinstance(cfg, dict):
        cfg = dict(cfg)
    return {
        "architecture": cfg.get("architecture"),
        "pretrained_tag": cfg.get("tag"),
        "hf_hub_id": cfg.get("hf_hub_id"),
    }


def _frozen_tensors(model: nn.Module, plan=None, tensors=None) -> list[tuple[str, torch.Tensor]]:
    """The tensors no adapter owns under any config (norm layers, the head and CLR kernels excluded), by key."""
    plan = plan or (current_plan(model) if is_attached(model) else plan_targets(model))
    tensors = _named_tensors(model) if tensors is None else tensors
    owned = tuple(f"{n}." for n in (*plan.norms, *plan.head))
    return sorted((k, t) for k, t in tensors.items() if not k.startswith(owned) and f".{CLR_ATTR}." not in f".{k}")


def backbone_fingerprint(model: nn.Module, *, _plan=None, _tensors=None) -> str | None:
    """A short hash of the frozen backbone weights, recorded in each adapter to catch a wrong base model.

    It hashes the name and shape of every tensor that no adapter owns (norm layers and the head excluded, so it does
    not depend on the CLRConfig or the number of classes) and 64 evenly strided values of each (as float32). It takes
    milliseconds on any model and tells apart any two different sets of weights in practice (two trainings differ in
    every value); it is a check against mistakes, not a cryptographic seal. Returns None on a model with no data
    (the ``meta`` device).
    """
    h = hashlib.sha256()
    samples = []
    for k, t in _frozen_tensors(model, _plan, _tensors):
        if t.is_meta:
            return None
        h.update(f"{k}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            samples.append(flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES].float().cpu())
    if samples:
        h.update(torch.cat(samples).numpy().tobytes())
    return h.hexdigest()[:32]


def _versions() -> dict[str, str]:
    import safetensors
    import timm

    return {
        "clr_timm": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
    }


def _check_task_name(task: str | None) -> None:
    """A task name is a folder name on every system and on the Hub: no separators, no characters Windows refuses."""
    if task is not None and (
        not isinstance(task, str)
        or task in ("", ".", "..")
        or any(c in '/\\<>:"|?*' or not c.isprintable() for c in task)
        or len(task.encode("utf-8")) > 255
    ):
        raise CLRError(
            "a task name must be a non-empty folder name of at most 255 bytes, without control characters or any "
            f'of / \\ < > : " | ? *, got {shown(task)}'
        )


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, str) and dtype not in _STORAGE_DTYPES:
        raise AdapterError(f"dtype must be one of {list(_STORAGE_DTYPES)} or a torch float dtype, got {dtype!r}")
    storage = _STORAGE_DTYPES[dtype] if isinstance(dtype, str) or dtype is None else dtype
    if storage is not None and storage not in _FLOAT_DTYPES:
        raise AdapterError(f"dtype must be a floating dtype, got {storage}")
    return storage


# ------------------------------------------------------------------------------------------------------- writing


def extract_adapter(
    model: nn.Module,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    _fingerprint: str | None = None,
) -> AdapterFile:
    """The task's adapter of an attached model, in memory (copied to the CPU), with the metadata a file records.

    Nothing is taken from what was loaded before: ``task`` and ``label_names`` are recorded as given, and the model is
    not changed.

    Args:
        model: An attached model.
        task: Task name to record.
        dtype: Storage dtype of the floating tensors: None keeps the model's, ``"fp16"`` / ``"bf16"`` halve the file.
        label_names: Class names to record.
        _fingerprint: The model's :func:`backbone_fingerprint` when the caller has it (saving many tasks of one
            backbone computes it once); None computes it.
    """
    state = get_state(model)
    _check_task_name(task)
    storage = _storage_dtype(dtype)
    tensors = {k: t for k, t, _ in _adapter_tensors(model, current_plan(model))}
    num_classes = getattr(model, "num_classes", None)
    label_names = list(label_names) if label_names is not None else None
    if label_names is not None and num_classes is not None and len(label_names) != num_classes:
        raise AdapterError(f"{len(label_names)} label names given for a head of {num_classes} classes")
    copies = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        if storage is not None and t.is_floating_point():
            t = t.to(storage)
        copies[k] = t.contiguous().clone()
    adapter = AdapterFile(
        path="",
        tensors=copies,
        config=state.config,
        num_classes=num_classes,
        **{k: v or None for k, v in base_model_info(model).items()},
        backbone_fingerprint=_fingerprint or backbone_fingerprint(model),
        task=task,
        label_names=label_names,
        versions=_versions(),
    )
    adapter.metadata = _metadata(adapter)
    return adapter


def _metadata(adapter: AdapterFile) -> dict[str, str]:
    """The safetensors metadata that records an adapter's fields (all strings, JSON where not plain text).

    ``base_weights_sha256`` is written only when set, so every other adapter's file stays as it always was.
    """
    local_base = {"base_weights_sha256": adapter.base_weights_sha256} if adapter.base_weights_sha256 else {}
    return {
        "format": "pt",
        "clr_format": FORMAT_NAME,
        "clr_format_version": str(FORMAT_VERSION),
        "config": adapter.config.to_json(),
        "num_classes": json.dumps(adapter.num_classes),
        "label_names": json.dumps(adapter.label_names),
        "task": json.dumps(adapter.task),
        "backbone_fingerprint": adapter.backbone_fingerprint or "",
        "versions": json.dumps(adapter.versions, sort_keys=True),
        "architecture": adapter.architecture or "",
        "pretrained_tag": adapter.pretrained_tag or "",
        "hf_hub_id": adapter.hf_hub_id or "",
        **local_base,
    }


def _metadata_problem(meta: Mapping[str, str]) -> str | None:
    """Why ``meta`` is more metadata than :func:`read_adapter` reads, or None."""
    if len(meta) > MAX_METADATA_KEYS:
        return f"its metadata has {len(meta)} keys; clr_timm reads at most {MAX_METADATA_KEYS}"
    key = max(meta, key=lambda k: len(meta[k]), default=None)
    if key is not None and len(meta[key]) > MAX_METADATA_VALUE_CHARS:
        return (
            f"its metadata {shown(key, 60)} has {len(meta[key])} characters; clr_timm reads at most "
            f"{MAX_METADATA_VALUE_CHARS} in one value"
        )
    total = sum(len(k) + len(v) for k, v in meta.items())
    if total > MAX_METADATA_CHARS:
        return f"its metadata has {total} characters; clr_timm reads at most {MAX_METADATA_CHARS}"
    return None


def _check_writable(adapter: AdapterFile, path: Path) -> None:
    """Refuse to write what :func:`read_adapter` would refuse to read back (label names too long, ...)."""
    problem = _metadata_problem(adapter.metadata)
    if problem is None and len(adapter.tensors) > MAX_TENSORS:
        problem = f"it has {len(adapter.tensors)} tensors; clr_timm reads at most {MAX_TENSORS}"
    for key, t in adapter.tensors.items():
        if problem is None and (t.dim() > MAX_RANK or t.dtype not in _DTYPE_NAMES):
            problem = f"tensor {shown(key)} has rank {t.dim()} and dtype {t.dtype}, which clr_timm does not read"
    if problem is not None:
        raise AdapterError(f"cannot write the adapter to {path}: {problem}")


# ------------------------------------------------------------------------------------------------------- writing files

# A save writes into a temporary folder beside its target, named after it and the writing process: whatever the writer
# leaves there (safetensors writes through a temporary file of its own) goes with the folder, and the next save beside
# it can tell a folder left by a killed process from one still being written.
_TEMPORARY_NAME_CHARS = 100


def _temporary_prefix(path: Path) -> str:
    return f".{path.name[:_TEMPORARY_NAME_CHARS]}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what earlier saves to ``path`` left behind when their process was killed before it could."""
    if os.name != "posix":  # os.kill(pid, 0) tells a live process from a dead one only on POSIX
        return
    prefix = _temporary_prefix(path)
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        found = re.fullmatch(r"([1-9][0-9]*)-[0-9a-f]{16}\.tmp", entry.name[len(prefix) :])
        if found is None or int(found.group(1)) == os.getpid() or _process_alive(int(found.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(entry.path)


def _create_temporary(path: Path) -> Path:
    """A new empty folder beside ``path``, created as any folder of the user's is (mode 0o777 less the umask)."""
    while True:
        folder = path.parent / f"{_temporary_prefix(path)}{os.getpid()}-{secrets.token_hex(8)}.tmp"
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            continue
        return folder


def _create_exclusively(tmp: Path, path: Path) -> None:
    """Give the finished file ``tmp`` the name ``path`` only if nothing has it: FileExistsError otherwise."""
    try:
        os.link(tmp, path)  # atomic, and fails on any existing name (a file, a folder, a dangling link)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name exclusively, then move the file onto it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
        os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path, *, exclusive: bool = False) -> Iterator[str]:
    """A temporary path beside ``path``: written by the caller, then fsynced and renamed over ``path``.

    The file gets the permissions of any new file of the user's (0o666 less the umask), however the caller wrote it
    (safetensors writes 0o600). A crash or Ctrl-C before the rename leaves the previous file intact and removes the
    partial one; what a save killed outright leaves is removed by the next save to ``path`` (once the killed process
    is gone).

    Args:
        path: The file to write.
        exclusive: Create ``path`` only if nothing is there, atomically: of two writers racing to one new path,
            exactly one succeeds and the other gets FileExistsError (what it wrote removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    folder = _create_temporary(path)
    tmp = folder / path.name
    try:
        yield str(tmp)
        os.chmod(tmp, stat.S_IMODE(os.stat(folder).st_mode) & 0o666)  # the folder's mode is the umask's
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if exclusive:
            _create_exclusively(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _replaceable(path: Path, task: str | None) -> bool:
    """Whether ``path`` holds an adapter of ``task`` that a save may replace; False when nothing is there.

    Raises :class:`AdapterError` for anything else there: another task's adapter, or a file that is not one.
    """
    if not os.path.lexists(path):
        return False
    try:
        with _open_file(path) as (f, size):
            meta = _read_header(f, size, path).metadata
        _check_format(meta, path)
        existing = _json_meta(meta, "task", path, "a task name", most=4096)
    except (AdapterError, OSError) as e:
        raise AdapterError(f"{path} exists and is not a clr_timm adapter; pass overwrite=True to replace it") from e
    if existing != task:
        raise AdapterError(
            f"{path} holds the adapter of task {shown(existing)}, not {shown(task)}; pass overwrite=True to replace it"
        )
    return True


def write_adapter(adapter: AdapterFile, path: str | os.PathLike, *, overwrite: bool = False) -> AdapterFile:
    """Write an adapter to a safetensors file, atomically; returns it with ``path`` set (the file is not re-read).

    Args:
        adapter: What to write (from :func:`extract_adapter` or :func:`read_adapter`).
        path: Destination file (conventionally ``*.safetensors``).
        overwrite: Replace an existing file that holds another task's adapter, or that is not an adapter at all.
            An existing adapter of the same task is always replaced (saving checkpoints during training). Without
            it, a new file is created exclusively: of two saves racing to one new path, one writes it and the other
            finds it there (and replaces it only if it holds the same task).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if os.path.isdir(path):
        raise AdapterError(f"{path} is a directory; give a file path, or use clr_timm.save_pretrained for folders")
    _check_writable(adapter, path)
    try:
        exclusive = not overwrite and not _replaceable(path, adapter.task)
        try:
            with atomic_path(path, exclusive=exclusive) as tmp:
                save_file(adapter.tensors, tmp, metadata=adapter.metadata)
        except FileExistsError:  # another save created the file since: the rules for a file that was there apply
            _replaceable(path, adapter.task)
            with atomic_path(path) as tmp:
                save_file(adapter.tensors, tmp, metadata=adapter.metadata)
    except (OSError, SafetensorError) as e:  # the folder cannot be made, the disk is full, the name is too long, ...
        reason = getattr(e, "strerror", None) or shown(str(e))
        raise AdapterError(f"cannot write {shown(str(path))}: {reason}") from e
    return dataclasses.replace(adapter, path=str(path))


# ------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies in the data section of a file, checked against the file."""

    dtype: torch.dtype
    itemsize: int
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    """A safetensors header, checked: the metadata, each tensor's entry, and where the data section starts."""

    metadata: dict[str, str]
    entries: dict[str, _Entry]
    data_start: int
    data_size: int
    runs: tuple[tuple[tuple[str, _Entry], ...], ...] | None = None  # _runs(entries), where known


def _unreadable(path: Path, why: str) -> AdapterError:
    return AdapterError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")


@contextmanager
def _open_file(path: Path) -> Iterator[tuple[Any, int]]:
    """``path`` opened once for every read that follows, and its size; anything but a regular file is refused.

    Opened without blocking, so that a path swapped for a FIFO after the caller looked at it cannot hang the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(f"{path} is not a regular file; it is not an adapter file")
        yield f, info.st_size


def _is_pickle(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise AdapterError("a key appears twice in one object")
    return found


def _header_text(f, size: int, path: Path) -> str:
    """The header's text: the 8-byte length, checked against the file and :data:`MAX_HEADER_BYTES` before the header
    is read, then the header itself, nothing more."""
    head = f.read(8)
    if not head:
        raise AdapterError(f"{path} is empty; it is not an adapter file")
    n = int.from_bytes(head, "little")
    if len(head) < 8 or n > size - 8:
        if _is_pickle(head):  # only now: the length of a valid header can begin with the same bytes
            raise AdapterError(
                f"{path} is a PyTorch pickle checkpoint (torch.save), not a safetensors adapter; clr_timm never "
                "unpickles files. Save adapters with clr_timm.save_adapter"
            )
        if len(head) < 8:
            raise _unreadable(path, f"its {size} bytes are too few for the header's length")
        raise _unreadable(path, f"it announces a header of {n} bytes, but only {size - 8} bytes follow")
    if n > MAX_HEADER_BYTES:
        raise AdapterError(
            f"{path} has a header of {n} bytes, more than the {MAX_HEADER_BYTES} clr_timm reads; it is not an adapter"
        )
    raw = f.read(n)
    if len(raw) != n:
        raise _unreadable(path, "it got shorter while it was read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _unreadable(path, "its header is not UTF-8 text") from None
    del raw  # at most two copies of the header at a time: its text and its structure
    if not text.lstrip().startswith("{"):
        raise _unreadable(path, "its header is not a JSON object")
    return text


def _parse_header(text: str, path: Path) -> tuple[Any, dict[str, Any]]:
    """(metadata, tensor table) of a header's JSON text, its size checked before it is parsed, keys unique."""
    # A tensor's entry is 5 strings, an object with two arrays and a dozen separators at most; the metadata is one
    # object of strings. Counted before parsing: json.loads would build up to 20 times the text's size in objects.
    containers, separators = json_structure(text, 5 * MAX_TENSORS + 2 * MAX_METADATA_KEYS + 8)
    if containers > 3 * MAX_TENSORS + 2 or separators > (MAX_RANK + 8) * MAX_TENSORS + 2 * MAX_METADATA_KEYS + 8:
        raise AdapterError(
            f"{path} has a header of {containers} JSON objects and arrays and {separators} separators, more than "
            f"{MAX_TENSORS} tensors (the most clr_timm reads) and their metadata need; it is not an adapter"
        )
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, AdapterError) as e:
        raise _unreadable(path, f"its header is not valid JSON ({shown(str(e), 120)})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "its header is not a JSON object")
    return header.pop("__metadata__", None), header


def _read_header(f, size: int, path: Path) -> _Header:
    """The header of the safetensors file open as ``f`` (``size`` bytes), checked before any tensor is read.

    Reads the 8-byte length and then the header itself, nothing more; refuses a length that does not fit the file or
    exceeds :data:`MAX_HEADER_BYTES` before reading the header, and a header whose JSON holds more than
    :data:`MAX_TENSORS` entries need before parsing it. A header whose tensor table was checked before (the files of
    the tasks of one model) has only its metadata parsed and checked (:func:`_known_table`).
    """
    text = _header_text(f, size, path)
    data_size = size - 8 - len(text.encode("utf-8"))
    known = _known_table(text, data_size)
    meta, table = known if known is not None else _parse_header(text, path)
    meta = meta or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{path}: safetensors metadata must map strings to strings")
    problem = _metadata_problem(meta)
    if problem is not None:
        raise AdapterError(f"{path}: {problem}; it is not an adapter")
    if known is not None:
        return _Header(meta, table, size - data_size, data_size, _runs(table))
    if len(table) > MAX_TENSORS:
        raise AdapterError(f"{path} has {len(table)} tensors; clr_timm reads at most {MAX_TENSORS}")
    entries = {key: _entry(key, value, data_size, path) for key, value in table.items()}
    _check_layout(entries, data_size, path)
    _remember_table(text, data_size, entries)
    return _Header(meta, entries, size - data_size, data_size)


# Tensor tables checked before: the files of many tasks of one model and config differ in their metadata only, and
# safetensors writes the metadata first. A header that is ``{"__metadata__":`` + a JSON object + ``,`` + the rest of a
# header checked before (the same text, the same data size) has that header's tensor table, already checked (valid
# JSON, unique keys, entries, layout), so only its metadata is parsed, after its size is checked. Entries are immutable.
_METADATA_START = '{"__metadata__":'
_CHECKED_TABLES: OrderedDict[tuple[str, int], dict[str, _Entry]] = OrderedDict()
_RUNS: dict[int, tuple[dict[str, _Entry], tuple]] = {}  # id(entries) of a kept table -> (entries, _runs(entries))
_CHECKED_TABLES_KEPT = 8
_CHECKED_TABLE_MAX_CHARS = 2**20
_CHECKED_TABLES_LOCK = threading.Lock()


def _known_table(text: str, data_size: int) -> tuple[Any, dict[str, _Entry]] | None:
    """(metadata, entries) of a header whose table was checked before (see above), or None."""
    if not text.startswith(_METADATA_START):
        return None
    with _CHECKED_TABLES_LOCK:
        tables = list(_CHECKED_TABLES.items())
    for (rest, size), entries in reversed(tables):
        cut = len(text) - len(rest) - 1  # where the comma after the metadata must be
        if size != data_size or cut <= len(_METADATA_START) or text[cut] != "," or not text.endswith(rest):
            continue
        meta_text = text[len(_METADATA_START) : cut]
        containers, separators = json_structure(meta_text, 2 * MAX_METADATA_KEYS + 1)
        if containers != 1 or separators > 2 * MAX_METADATA_KEYS:
            return None  # not an object of strings: the whole header is parsed, to say what is wrong
        try:
            meta = json.loads(meta_text, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError, AdapterError):
            return None
        return (meta, entries) if isinstance(meta, dict) else None
    return None


def _remember_table(text: str, data_size: int, entries: dict[str, _Entry]) -> None:
    """Keep a checked header's table under the text that follows its metadata, where the header starts with it."""
    if not text.startswith(_METADATA_START):
        return
    try:
        _, end = json.JSONDecoder().raw_decode(text, len(_METADATA_START))
    except (ValueError, RecursionError):
        return
    if text[end : end + 1] != "," or len(text) - end > _CHECKED_TABLE_MAX_CHARS:
        return
    key = (text[end + 1 :], data_size)
    with _CHECKED_TABLES_LOCK:
        if key in _CHECKED_TABLES:
            _RUNS.pop(id(_CHECKED_TABLES[key]), None)
        _CHECKED_TABLES[key] = entries
        _CHECKED_TABLES.move_to_end(key)
        _RUNS[id(entries)] = (entries, _runs(entries))
        while len(_CHECKED_TABLES) > _CHECKED_TABLES_KEPT:
            _RUNS.pop(id(_CHECKED_TABLES.popitem(last=False)[1]), None)


def _check_layout(entries: dict[str, Any], data_size: int, path: Path) -> None:
    """safetensors lays the tensors end to end: in order of offsets, each starts where the one before ends, and the
    last ends the file. Checked, overlaps and gaps can no longer make a read touch bytes twice or run past the data."""
    position = 0
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            raise _unreadable(
                path,
                f"tensor {shown(key, 80)} starts at byte {e.begin} of the data, not at {position} where the one "
                "before it ends",
            )
        position = e.end
    if position != data_size:
        raise _unreadable(path, f"its tensors end at byte {position} of its data, which has {data_size} bytes")


def _is_int(value: Any) -> bool:
    return type(value) is int  # not a bool, nor a float that happens to be whole


def _entry(key: str, value: Any, data_size: int, path: Path) -> _Entry:
    """One tensor's header entry, checked: a dtype clr_timm reads, a shape, and offsets in the data that fit both."""
    if type(value) is not dict:
        raise _unreadable(path, f"the entry of tensor {shown(key, 80)} is not a JSON object")
    name, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if type(name) is not str or name not in _DTYPES:
        raise AdapterError(
            f"{path}: tensor {shown(key, 80)} has dtype {shown(name, 40)}; clr_timm reads {', '.join(_DTYPES)}"
        )
    dtype, itemsize = _DTYPES[name]
    if type(shape) is not list or len(shape) > MAX_RANK or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise _unreadable(
            path, f"tensor {shown(key, 80)} has shape {shown(shape, 80)}, not a list of at most {MAX_RANK} sizes"
        )
    if type(offsets) is not list or len(offsets) != 2 or not (_is_int(offsets[0]) and _is_int(offsets[1])):
        raise _unreadable(path, f"tensor {shown(key, 80)} has data offsets {shown(offsets, 80)}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _unreadable(
            path, f"tensor {shown(key, 80)} lies at bytes {begin} to {end} of a data section of {data_size} bytes"
        )
    if end - begin != math.prod(shape) * itemsize:
        raise _unreadable(
            path,
            f"tensor {shown(key, 80)} of shape {tuple(shape)} and dtype {name} takes {end - begin} bytes, not "
            f"{math.prod(shape) * itemsize}",
        )
    return _Entry(dtype, itemsize, tuple(shape), begin, end)


def _runs(entries: dict[str, _Entry]) -> tuple[tuple[tuple[str, _Entry], ...], ...]:
    """The entries in the order of their data, in runs of one dtype: each run is one stretch of the data section.

    Those of a kept table (:func:`_remember_table`) are worked out once."""
    kept = _RUNS.get(id(entries))
    if kept is not None and kept[0] is entries:
        return kept[1]
    runs: list[list[tuple[str, _Entry]]] = []
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if runs and runs[-1][0][1].dtype == e.dtype:
            runs[-1].append((key, e))
        else:
            runs.append([(key, e)])
    return tuple(tuple(run) for run in runs)


def _read_run(data: bytearray, run: list[tuple[str, _Entry]]) -> torch.Tensor:
    """One run's values as a 1-D tensor: a view of ``data`` where aligned, else a buffer of its own."""
    dtype, itemsize = run[0][1].dtype, run[0][1].itemsize
    begin, end = run[0][1].begin, run[-1][1].end
    if begin == end:
        return torch.empty(0, dtype=dtype)
    if begin % itemsize:  # a misaligned run gets a buffer of its own
        flat = torch.frombuffer(data[begin:end], dtype=dtype)
    else:
        flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // itemsize, offset=begin)
    if sys.byteorder == "big" and itemsize > 1:  # safetensors stores little-endian
        flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return flat


# numpy checks a CPU tensor's values many times faster than torch's parallel kernels do for a small tensor.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _bad_bools(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool and t.numel() > 0 and bool(t.view(torch.uint8).max() > 1)


def _not_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or not t.numel():
        return False
    if t.dtype in _NUMPY_FLOATS:
        return not np.isfinite(t.numpy()).all()
    return not bool(torch.isfinite(t).all())


def _check_values(tensors: dict[str, torch.Tensor], flats: list[torch.Tensor], path: Path) -> None:
    """Booleans hold 0 or 1 and floats are finite: checked once per run (``flats``), the culprit named in file order."""
    if any(_bad_bools(t) for t in flats):
        bad = next(k for k, t in tensors.items() if _bad_bools(t))
        raise AdapterError(f"{path}: tensor {shown(bad, 80)} is boolean but holds bytes other than 0 and 1")
    if any(_not_finite(t) for t in flats):
        bad = next(k for k, t in tensors.items() if _not_finite(t))
        raise AdapterError(f"{path}: tensor {shown(bad)} contains NaN or Inf values; the adapter is corrupt")


def _read_tensors(f, header: _Header, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the header's entries, checked (:func:`_check_values`): the data section, which they tile
    exactly, read at once; each run of one dtype is viewed once and cut into its tensors."""
    data = bytearray(header.data_size)
    f.seek(header.data_start)
    if f.readinto(data) != len(data):
        raise _unreadable(path, "it got shorter while it was read")
    tensors, flats = {}, []
    for run in header.runs or _runs(header.entries):
        flats.append(_read_run(data, run))
        pieces = flats[-1].split([(e.end - e.begin) // e.itemsize for _, e in run])
        tensors.update(
            (key, piece if len(e.shape) == 1 else piece.view(e.shape)) for (key, e), piece in zip(run, pieces)
        )
    tensors = {key: tensors[key] for key in header.entries}
    _check_values(tensors, flats, path)
    return tensors


def _json_meta(meta: dict[str, str], key: str, path: Path, what: str, default: Any = None, most: int = 0) -> Any:
    """The JSON value of metadata ``key``; longer than ``most`` characters (when given), refused unparsed."""
    if key not in meta:
        return default
    if most and len(meta[key]) > most:
        raise AdapterError(f"{path}: metadata {key!r} must be {what}, not {len(meta[key])} characters of JSON")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{path}: metadata field {key!r} is not valid JSON ({shown(str(e), 120)})") from e


def _check_format(meta: dict[str, str], path: Path) -> None:
    """Refuse metadata that is not a clr_timm adapter's, or that a newer clr_timm wrote."""
    if meta.get("clr_format") != FORMAT_NAME:
        raise AdapterError(
            f"{path} is a safetensors file but not a clr_timm adapter (metadata 'clr_format' is "
            f"{shown(meta.get('clr_format'), 80)}, expected {FORMAT_NAME!r})"
        )
    try:
        version = int(meta.get("clr_format_version", ""))
    except ValueError as e:
        raise AdapterError(f"{path}: metadata 'clr_format_version' is missing or not an integer") from e
    if version < 1:
        raise AdapterError(f"{path}: metadata 'clr_format_version' is {version}; format versions start at 1")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{path} was written in adapter format version {version} by a newer clr_timm; this clr_timm "
            f"({__version__}) reads up to version {FORMAT_VERSION}: upgrade clr_timm"
        )


def _task_fields(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """config, num_classes, label_names and task from the metadata, each checked."""
    if "config" not in meta:
        raise AdapterError(f"{path}: metadata has no 'config'")
    try:
        config = CLRConfig.from_json(meta["config"])
    except ConfigError as e:
        raise AdapterError(f"{path}: invalid CLRConfig in metadata: {e}") from e
    num_classes = _json_meta(meta, "num_classes", path, "a non-negative integer", most=64)
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 0):
        raise AdapterError(f"{path}: metadata 'num_classes' must be a non-negative integer, got {shown(num_classes)}")
    label_names = _json_meta(meta, "label_names", path, "a list of strings")
    if label_names is not None and not (isinstance(label_names, list) and all(isinstance(n, str) for n in label_names)):
        raise AdapterError(f"{path}: metadata 'label_names' must be a list of strings")
    if label_names is not None and num_classes is not None and len(label_names) != num_classes:
        raise AdapterError(f"{path}: metadata has {len(label_names)} label names for a head of {num_classes} classes")
    task = _json_meta(meta, "task", path, "a task name", most=4096)
    if task is not None and not isinstance(task, str):
        raise AdapterError(f"{path}: metadata 'task' must be a string")
    try:
        _check_task_name(task)
    except CLRError as e:
        raise AdapterError(f"{path}: metadata 'task' is not a valid task name: {e}") from e
    return {"config": config, "num_classes": num_classes, "label_names": label_names, "task": task}


def _adapter_of(meta: dict[str, str], path: Path) -> AdapterFile:
    """The adapter the metadata describes, every field checked; its tensors are read after."""
    _check_format(meta, path)
    fields = _task_fields(meta, path)
    versions = _json_meta(meta, "versions", path, "an object of strings", {}, most=65536)
    sha256 = meta.get("base_weights_sha256") or None
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise AdapterError(f"{path}: metadata 'base_weights_sha256' is not 64 lowercase hex digits: {shown(sha256)}")
    return AdapterFile(
        path=str(path),
        tensors={},
        **fields,
        architecture=meta.get("architecture") or None,
        pretrained_tag=meta.get("pretrained_tag") or None,
        hf_hub_id=meta.get("hf_hub_id") or None,
        backbone_fingerprint=meta.get("backbone_fingerprint") or None,
        versions={k: v for k, v in versions.items() if isinstance(v, str)} if isinstance(versions, dict) else {},
        metadata=dict(meta),
        base_weights_sha256=sha256,
    )


def read_adapter(path: str | os.PathLike, *, model: nn.Module | None = None) -> AdapterFile:
    """Read and check an adapter file. Raises :class:`AdapterError` on any problem.

    A folder stands for the ``clr_adapter.safetensors`` in it. The header is checked whole before any tensor is read
    (see the bounds at the top of :mod:`clr_timm.adapter`), so reading costs time and memory bounded by the tensors in
    the file plus a small constant, whatever the file claims.

    Args:
        path: The adapter file, or a folder holding one.
        model: The model the adapter is for, attached or not: the file is checked against it from its header alone
            (config, architecture, head, and every tensor's name, shape and kind, as :func:`validate_adapter` checks
            them; the backbone fingerprint is left to :func:`apply_adapter`), so a file with a tensor the model has
            no place for is refused before any tensor is read, and only tensors the model expects are ever read.
    """
    path = Path(path)
    if os.path.isdir(path):  # os.path: False, not OSError, for a name the system cannot take (too long, NUL)
        path = path / ADAPTER_FILE
    if not os.path.isfile(path):
        raise AdapterError(f"no adapter file at {shown(str(path))}")
    try:
        with _open_file(path) as (f, size):
            header = _read_header(f, size, path)
            adapter = _adapter_of(header.metadata, path)
            if model is not None:
                specs = {k: (e.shape, e.dtype) for k, e in header.entries.items()}
                _check_against(model, adapter, specs, check_backbone=False)
            adapter.tensors = _read_tensors(f, header, path)
    except OSError as e:
        raise AdapterError(f"{path} cannot be read: {shown(str(e))}") from e
    return adapter


# ------------------------------------------------------------------------------------------------------ applying


def _expected_shapes(model: nn.Module, adapter: AdapterFile, plan) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """key -> (shape, kind, is_float) the adapter must have to fit ``model`` (head resized to the adapter's classes)."""
    expected = {key: (shape, "clr", True) for key, shape in reprogramming_shapes(plan).items()}
    current = getattr(model, "num_classes", None)
    resized = adapter.config.train_head and adapter.num_classes is not None and current != adapter.num_classes
    sized = False  # a head tensor with one row per class, that the head's new size is read from
    for key, t, kind in _adapter_tensors(model, plan):
        if kind == "clr":
            continue
        shape = tuple(t.shape)
        if kind == "head" and resized and shape and shape[0] == current:
            shape, sized = (adapter.num_classes, *shape[1:]), True
        expected[key] = (shape, kind, t.is_floating_point())
    if resized and not sized:
        raise AdapterMismatchError(
            f"{adapter.path} has a head for {adapter.num_classes} classes, but the model's head has no tensor of its "
            f"{current} classes to size a new one from (a model made with num_classes=0?); make the model with "
            f"num_classes={adapter.num_classes}"
        )
    return expected


def _check_fits(model: nn.Module, adapter: AdapterFile) -> None:
    """Config, architecture and head size: what must match before the tensors are worth comparing."""
    path = adapter.path
    if is_attached(model) and get_config(model) != adapter.config:
        raise AdapterMismatchError(
            f"{path} was made with {shown(adapter.config, 400)}, but the model is attached with {get_config(model)}; "
            "call clr_timm.detach(model) first, or load it into a fresh model"
        )
    arch = base_model_info(model)["architecture"]
    if adapter.architecture and arch and adapter.architecture != arch:
        raise AdapterMismatchError(f"{path} is an adapter for {shown(adapter.architecture)}, not for {arch!r}")
    if adapter.config.train_head and adapter.num_classes != getattr(model, "num_classes", None):
        if not hasattr(model, "reset_classifier"):
            raise AdapterMismatchError(
                f"{path} has a head for {adapter.num_classes} classes and {type(model).__name__} cannot be resized"
            )
        if adapter.num_classes is None:
            raise AdapterError(f"{path}: metadata has no 'num_classes' to size the head with")
        if adapter.num_classes < 1:
            raise AdapterMismatchError(
                f"{path} records a head of {adapter.num_classes} classes; a per-task head has at least one class "
                "(the file is damaged, or was not written by clr_timm)"
            )


def _check_against(
    model: nn.Module,
    adapter: AdapterFile,
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    check_backbone: bool,
    tensors: dict[str, torch.Tensor] | None = None,
) -> CLRPlan:
    """:func:`validate_adapter` on the adapter's tensors as ``specs`` (key -> shape and dtype) describe them."""
    path = adapter.path
    _check_fits(model, adapter)
    plan = plan_targets(model, adapter.config)
    expected = _expected_shapes(model, adapter, plan)
    for key, (shape, kind, is_float) in expected.items():
        if key not in specs:
            raise AdapterMismatchError(f"{path} has no tensor {key!r} ({kind}) that the model needs: wrong base model?")
        got_shape, got_dtype = specs[key]
        if tuple(got_shape) != shape:
            raise AdapterMismatchError(f"{path}: tensor {key!r} has shape {tuple(got_shape)}, the model needs {shape}")
        if got_dtype.is_floating_point != is_float:
            raise AdapterMismatchError(
                f"{path}: tensor {key!r} has dtype {got_dtype}, the model needs a "
                f"{'floating' if is_float else 'integer'} tensor"
            )
    extra = sorted(set(specs) - set(expected))
    if extra:
        raise AdapterMismatchError(
            f"{path} has tensor {shown(extra[0])} that the model has no place for"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: wrong base model?"
        )
    if check_backbone and adapter.backbone_fingerprint:
        mine = backbone_fingerprint(model, _plan=plan, _tensors=tensors)
        if mine is not None and mine != adapter.backbone_fingerprint:
            raise BackboneMismatchError(
                f"{path} was trained on other backbone weights than this model's (fingerprint "
                f"{shown(adapter.backbone_fingerprint, 40)} != {mine!r}; made for "
                f"{shown(adapter.base_model) if adapter.base_model else 'an unknown base model'}). "
                "Load the right pretrained weights, or pass check_backbone=False to load it anyway"
            )
    return plan


def validate_adapter(
    model: nn.Module,
    adapter: AdapterFile,
    *,
    check_backbone: bool = True,
    tensors: dict[str, torch.Tensor] | None = None,
) -> CLRPlan:
    """Check that ``adapter`` fits ``model``, raising before anything changes; returns the plan it was checked with.

    Args:
        model: The model it is meant for, attached or not.
        adapter: The adapter.
        check_backbone: Refuse an adapter recorded for other backbone weights (fingerprint mismatch).
        tensors: ``model``'s ``state_dict(keep_vars=True)`` when the caller already has it (saves a model walk).
    """
    specs = {k: (tuple(t.shape), t.dtype) for k, t in adapter.tensors.items()}
    return _check_against(model, adapter, specs, check_backbone=check_backbone, tensors=tensors)


class _Undo:
    """What loading an adapter may change in a model, kept so that a failed load puts back the very same objects.

    ``attach`` adds children, hooks and attributes; ``resize_head`` (timm's ``reset_classifier``) replaces the head's
    modules and attributes; the copy overwrites values. Restoring every module's own attributes in place (the same
    dicts, so hook handles held elsewhere still remove their hooks), each parameter's ``requires_grad`` and every
    overwritten value gives back the model as it was: an optimizer holding its head's parameters still holds the
    model's, and its hooks and training modes are the ones it had.
    """

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], keys, structure: bool = True) -> None:
        """``structure``: whether the load may attach or resize the head (else only values and the task change)."""
        self.modules = []
        for m in model.modules() if structure else ():
            attrs = dict(vars(m))
            containers = {k: v.copy() for k, v in attrs.items() if isinstance(v, (dict, set, list))}
            self.modules.append((m, attrs, containers))
        self.flags = [(p, p.requires_grad) for p in model.parameters()] if structure else []
        self.values = [(tensors[k], tensors[k].detach().clone()) for k in keys if k in tensors]
        state = find_state(model)
        self.record = (state, state.task, state.label_names) if state is not None else None

    def restore(self) -> None:
        for module, attrs, containers in self.modules:
            for name, saved in containers.items():
                live = attrs[name]
                if isinstance(live, list):
                    live[:] = saved
                else:
                    live.clear()
                    live.update(saved)
            module.__dict__.clear()
            module.__dict__.update(attrs)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for t, v in self.values:
                t.copy_(v)
        if self.record is not None:
            state, task, label_names = self.record
            state.task, state.label_names = task, label_names


def _copy_in(model: nn.Module, adapter: AdapterFile, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the adapter's tensors in (``tensors``: the attached model's current ``state_dict(keep_vars=True)``)."""
    if adapter.config.train_head and adapter.num_classes != getattr(model, "num_classes", None):
        resize_head(model, adapter.num_classes)
        # The new head must be the one validation expected: every tensor the adapter owns now, with the file's shapes.
        owned = {k: tuple(t.shape) for k, t, _ in _adapter_tensors(model, current_plan(model))}
        wanted = {k: tuple(t.shape) for k, t in adapter.tensors.items()}
        if owned != wanted:
            key = min(k for k in owned.keys() | wanted.keys() if owned.get(k) != wanted.get(k))
            raise AdapterMismatchError(
                f"{adapter.path}: with a head of {adapter.num_classes} classes the model's tensor {shown(key)} has "
                f"shape {owned.get(key)}, the file's {wanted.get(key)}"
            )
        tensors = None  # the head is new
    tensors = _named_tensors(model) if tensors is None else tensors
    with torch.no_grad():
        for k, v in adapter.tensors.items():
            tensors[k].copy_(v)
    state = get_state(model)
    state.task, state.label_names = adapter.task, adapter.label_names


def apply_adapter(model: nn.Module, adapter: AdapterFile, *, check_backbone: bool = True) -> nn.Module:
    """Put an adapter into ``model``: attach CLR if needed, resize the head, copy the tensors.

    The model records the adapter's task and label names (the defaults of its next save). Everything is validated
    first; on any error, then or while copying, the model is left exactly as it was: the same module and parameter
    objects (an optimizer over them keeps training them), ``requires_grad`` flags, hooks, training modes and values.
    """
    refuse_fused(model, "loading an adapter into it")
    was_attached = is_attached(model)
    tensors = _named_tensors(model)  # one walk, shared by the fingerprint, the backup and the copy
    validate_adapter(model, adapter, check_backbone=check_backbone, tensors=tensors)
    resizes = adapter.config.train_head and adapter.num_classes != getattr(model, "num_classes", None)
    undo = _Undo(model, tensors, adapter.tensors, structure=resizes or not was_attached)
    try:
        if not was_attached:
            attach(model, adapter.config)
        _copy_in(model, adapter, tensors if was_attached else None)
    except BaseException as e:
        undo.restore()
        if isinstance(e, CLRError) or not isinstance(e, Exception):
            raise
        raise AdapterError(
            f"{adapter.path} could not be loaded ({type(e).__name__}: {shown(str(e))}); the model was left as it was"
        ) from e
    return model
