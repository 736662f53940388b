"""The adapter file format: a task's delta as one small safetensors file, written atomically and checked on reading.

The file holds only the task's delta (reprogramming tensors, per-task norm tensors, head) under the model's own
state_dict keys, and string metadata that says what it is and which base model it belongs to. Nothing is ever
unpickled. Applying a file to a model validates everything against the model before touching a tensor, so a bad file
leaves the model as it was.

This module knows files and models only: where a source lives (a folder, the Hub) is decided by
:mod:`clr_timm.source`, and the verbs ``save_adapter`` / ``load_adapter`` are in :mod:`clr_timm.save_load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attach import (
    CLR_ATTR,
    CLRPlan,
    _adapter_tensors,
    _named_tensors,
    _refuse_fused,
    _state,
    attach,
    current_plan,
    detach,
    get_config,
    is_attached,
    plan_targets,
    reprogramming_shapes,
    resize_head,
)
from .config import CLRConfig
from .errors import AdapterError, AdapterMismatchError, BackboneMismatchError, CLRError, ConfigError
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


@dataclass
class AdapterFile:
    """An adapter: its tensors and what its metadata says, as read from a file or extracted from a model.

    ``path`` is the file it was read from or written to (``""`` for one extracted and not written yet), and
    ``metadata`` the safetensors metadata exactly as it is (or will be) in the file.
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
    if task is not None and (
        not isinstance(task, str) or not task or "/" in task or "\\" in task or task in (".", "..")
    ):
        raise CLRError(f"task name must be a non-empty string without slashes, got {task!r}")


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
) -> AdapterFile:
    """The task's adapter of an attached model, in memory (copied to the CPU), with the metadata a file records.

    Nothing is taken from what was loaded before: ``task`` and ``label_names`` are recorded as given, and the model is
    not changed.

    Args:
        model: An attached model.
        task: Task name to record.
        dtype: Storage dtype of the floating tensors: None keeps the model's, ``"fp16"`` / ``"bf16"`` halve the file.
        label_names: Class names to record.
    """
    state = _state(model)
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
        backbone_fingerprint=backbone_fingerprint(model),
        task=task,
        label_names=label_names,
        versions=_versions(),
    )
    adapter.metadata = _metadata(adapter)
    return adapter


def _metadata(adapter: AdapterFile) -> dict[str, str]:
    """The safetensors metadata that records an adapter's fields (all strings, JSON where not plain text)."""
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
    }


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary path beside ``path``: written by the caller, then fsynced and renamed over ``path``.

    A crash or Ctrl-C before the rename leaves the previous file intact and removes the partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter(adapter: AdapterFile, path: str | os.PathLike, *, overwrite: bool = False) -> AdapterFile:
    """Write an adapter to a safetensors file, atomically; returns it with ``path`` set (the file is not re-read).

    Args:
        adapter: What to write (from :func:`extract_adapter` or :func:`read_adapter`).
        path: Destination file (conventionally ``*.safetensors``).
        overwrite: Replace an existing file that holds another task's adapter, or that is not an adapter at all.
            An existing adapter of the same task is always replaced (saving checkpoints during training).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"{path} is a directory; give a file path, or use clr_timm.save_pretrained for folders")
    if path.exists() and not overwrite:
        try:
            existing = read_adapter(path)
        except AdapterError as e:
            raise AdapterError(f"{path} exists and is not a clr_timm adapter; pass overwrite=True to replace it") from e
        if existing.task != adapter.task:
            raise AdapterError(
                f"{path} holds the adapter of task {existing.task!r}, not {adapter.task!r}; pass overwrite=True to "
                "replace it"
            )
    with atomic_path(path) as tmp:
        save_file(adapter.tensors, tmp, metadata=adapter.metadata)
    return dataclasses.replace(adapter, path=str(path))


# ------------------------------------------------------------------------------------------------------- reading


def _sniff(path: Path) -> None:
    """Refuse files that are plainly not safetensors, with a message that says what they are."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise AdapterError(f"{path} is empty; it is not an adapter file")
    # A safetensors file starts with the little-endian length of a JSON header that follows.
    if len(head) == 9 and int.from_bytes(head[:8], "little") + 8 <= size and head[8:9] == b"{":
        return
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise AdapterError(
            f"{path} is a PyTorch pickle checkpoint (torch.save), not a safetensors adapter; clr_timm never unpickles "
            "files. Save adapters with clr_timm.save_adapter"
        )


def _json_meta(meta: dict[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the JSON parser goes
        raise AdapterError(f"{path}: metadata field {key!r} is not valid JSON ({e})") from e


def _load_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, checked to be a clr_timm adapter of a version we read."""
    from safetensors.torch import load as safetensors_load

    _sniff(path)
    try:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = safetensors_load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damaged file
        raise AdapterError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{path}: safetensors metadata must map strings to strings")
    if meta.get("clr_format") != FORMAT_NAME:
        raise AdapterError(
            f"{path} is a safetensors file but not a clr_timm adapter (metadata 'clr_format' is "
            f"{meta.get('clr_format')!r}, expected {FORMAT_NAME!r})"
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
    return meta, tensors


def _task_fields(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """config, num_classes, label_names and task from the metadata, each checked."""
    if "config" not in meta:
        raise AdapterError(f"{path}: metadata has no 'config'")
    try:
        config = CLRConfig.from_json(meta["config"])
    except (ConfigError, RecursionError) as e:
        raise AdapterError(f"{path}: invalid CLRConfig in metadata: {e}") from e
    num_classes = _json_meta(meta, "num_classes", path)
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0
    ):
        raise AdapterError(f"{path}: metadata 'num_classes' must be a non-negative integer, got {num_classes!r}")
    label_names = _json_meta(meta, "label_names", path)
    if label_names is not None and not (isinstance(label_names, list) and all(isinstance(n, str) for n in label_names)):
        raise AdapterError(f"{path}: metadata 'label_names' must be a list of strings")
    if label_names is not None and num_classes is not None and len(label_names) != num_classes:
        raise AdapterError(f"{path}: metadata has {len(label_names)} label names for a head of {num_classes} classes")
    task = _json_meta(meta, "task", path)
    if task is not None and not isinstance(task, str):
        raise AdapterError(f"{path}: metadata 'task' must be a string")
    try:
        _check_task_name(task)
    except CLRError as e:
        raise AdapterError(f"{path}: metadata 'task' is not a valid task name: {e}") from e
    return {"config": config, "num_classes": num_classes, "label_names": label_names, "task": task}


def _check_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point()]
    for k, t in floats:
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
    if floats and not torch.isfinite(torch.cat([t.reshape(-1).float() for _, t in floats])).all():
        bad = next(k for k, t in floats if not torch.isfinite(t).all())
        raise AdapterError(f"{path}: tensor {bad!r} contains NaN or Inf values; the adapter is corrupt")


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file on its own (no model needed). Raises :class:`AdapterError` on any problem.

    A folder stands for the ``clr_adapter.safetensors`` in it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"no adapter file at {path}")
    meta, tensors = _load_file(path)
    fields = _task_fields(meta, path)
    _check_values(tensors, path)
    versions = _json_meta(meta, "versions", path, {}) or {}
    return AdapterFile(
        path=str(path),
        tensors=tensors,
        **fields,
        architecture=meta.get("architecture") or None,
        pretrained_tag=meta.get("pretrained_tag") or None,
        hf_hub_id=meta.get("hf_hub_id") or None,
        backbone_fingerprint=meta.get("backbone_fingerprint") or None,
        versions=versions if isinstance(versions, dict) else {},
        metadata=dict(meta),
    )


# ------------------------------------------------------------------------------------------------------ applying


def _expected_shapes(model: nn.Module, adapter: AdapterFile, plan) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """key -> (shape, kind, is_float) the adapter must have to fit ``model`` (head resized to the adapter's classes)."""
    expected = {key: (shape, "clr", True) for key, shape in reprogramming_shapes(plan).items()}
    current = getattr(model, "num_classes", None)
    for key, t, kind in _adapter_tensors(model, plan):
        if kind == "clr":
            continue
        shape = tuple(t.shape)
        if kind == "head" and adapter.num_classes is not None and current != adapter.num_classes and shape:
            shape = (adapter.num_classes, *shape[1:]) if shape[0] == current else shape
        expected[key] = (shape, kind, t.is_floating_point())
    return expected


def _check_fits(model: nn.Module, adapter: AdapterFile) -> None:
    """Config, architecture and head size: what must match before the tensors are worth comparing."""
    path = adapter.path
    if is_attached(model) and get_config(model) != adapter.config:
        raise AdapterMismatchError(
            f"{path} was made with {adapter.config}, but the model is attached with {get_config(model)}; "
            "call clr_timm.detach(model) first, or load it into a fresh model"
        )
    arch = base_model_info(model)["architecture"]
    if adapter.architecture and arch and adapter.architecture != arch:
        raise AdapterMismatchError(f"{path} is an adapter for {adapter.architecture!r}, not for {arch!r}")
    if adapter.config.train_head and adapter.num_classes != getattr(model, "num_classes", None):
        if not hasattr(model, "reset_classifier"):
            raise AdapterMismatchError(
                f"{path} has a head for {adapter.num_classes} classes and {type(model).__name__} cannot be resized"
            )
        if adapter.num_classes is None:
            raise AdapterError(f"{path}: metadata has no 'num_classes' to size the head with")


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
    path = adapter.path
    _check_fits(model, adapter)
    plan = plan_targets(model, adapter.config)
    expected = _expected_shapes(model, adapter, plan)
    for key, (shape, kind, is_float) in expected.items():
        if key not in adapter.tensors:
            raise AdapterMismatchError(f"{path} has no tensor {key!r} ({kind}) that the model needs: wrong base model?")
        got = adapter.tensors[key]
        if tuple(got.shape) != shape:
            raise AdapterMismatchError(f"{path}: tensor {key!r} has shape {tuple(got.shape)}, the model needs {shape}")
        if got.is_floating_point() != is_float:
            raise AdapterMismatchError(
                f"{path}: tensor {key!r} has dtype {got.dtype}, the model needs a "
                f"{'floating' if is_float else 'integer'} tensor"
            )
    extra = sorted(set(adapter.tensors) - set(expected))
    if extra:
        raise AdapterMismatchError(f"{path} has tensor {extra[0]!r} that the model has no place for: wrong base model?")
    if check_backbone and adapter.backbone_fingerprint:
        mine = backbone_fingerprint(model, _plan=plan, _tensors=tensors)
        if mine is not None and mine != adapter.backbone_fingerprint:
            raise BackboneMismatchError(
                f"{path} was trained on other backbone weights than this model's (fingerprint "
                f"{adapter.backbone_fingerprint} != {mine}; made for {adapter.base_model or 'an unknown base model'}). "
                "Load the right pretrained weights, or pass check_backbone=False to load it anyway"
            )
    return plan


def _copy_in(model: nn.Module, adapter: AdapterFile, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the adapter's tensors in (``tensors``: the attached model's current ``state_dict(keep_vars=True)``)."""
    if adapter.config.train_head and adapter.num_classes != getattr(model, "num_classes", None):
        resize_head(model, adapter.num_classes)
        tensors = None  # the head is new
    tensors = _named_tensors(model) if tensors is None else tensors
    with torch.no_grad():
        for k, v in adapter.tensors.items():
            tensors[k].copy_(v)
    state = _state(model)
    state.task, state.label_names = adapter.task, adapter.label_names


def apply_adapter(model: nn.Module, adapter: AdapterFile, *, check_backbone: bool = True) -> nn.Module:
    """Put an adapter into ``model``: attach CLR if needed, resize the head, copy the tensors.

    The model records the adapter's task and label names (the defaults of its next save). Everything is validated
    first; on any error, then or while copying, the model is left exactly as it was.
    """
    _refuse_fused(model, "loading an adapter into it")
    was_attached = is_attached(model)
    tensors = _named_tensors(model)  # one walk, shared by the fingerprint, the backup and the copy
    validate_adapter(model, adapter, check_backbone=check_backbone, tensors=tensors)
    backup = None
    if was_attached:
        backup = {k: tensors[k].detach().clone() for k in adapter.tensors}  # exactly what _copy_in overwrites
        old = (_state(model).task, _state(model).label_names, getattr(model, "num_classes", None))
    try:
        if not was_attached:
            attach(model, adapter.config)
        _copy_in(model, adapter, tensors if was_attached else None)
    except BaseException:
        if not was_attached and is_attached(model):
            detach(model)
        elif was_attached:
            if getattr(model, "num_classes", None) != old[2]:
                resize_head(model, old[2])
            tensors = _named_tensors(model)
            with torch.no_grad():
                for k, v in backup.items():
                    tensors[k].copy_(v)
            _state(model).task, _state(model).label_names = old[0], old[1]
        raise
    return model
