"""ONNX export of one task (or of several, picked per sample), checked with onnxruntime before the file appears.

:func:`export_onnx` exports a deep copy of the model with one task's adapter bound (a plain attached model, or one task
of a :class:`~clr_timm.MultiTaskModel`), in eval mode and fused where the layer kind folds exactly
(:func:`clr_timm.fuse`), so the user's model is never touched. The graph takes ``input`` (N, C, H, W) with a dynamic
batch dimension and returns ``logits``; the task's name, classes, label names and timm's preprocessing (input size,
mean, std) go into the file's ``metadata_props`` under ``clr_timm.*``.

With ``tasks=[...]`` the graph serves several tasks of a MultiTaskModel at once: a second input ``task_index`` (N,)
picks each sample's task. :mod:`clr_timm.mixed` cannot be traced for this (its per-task sample groups come from
``nonzero`` and its grouped convolution has ``groups = N * C``, both frozen into the graph by a trace), so the graph
runs every module that holds adapter tensors once per task and gathers each sample's output: fixed shapes, exact for
any batch and any mix, at the adapter modules' cost times the number of tasks.

The file is written the way adapters are (:func:`clr_timm.adapter.atomic_path`): into a temporary file beside the
target, checked with onnxruntime against the PyTorch outputs at another batch size than the traced one, and only then
renamed; an existing file is refused unless ``overwrite=True``.

Exporter: PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) by default. It needs only
``onnx``, traces the eval-mode forward exactly as it runs (forward hooks and the per-instance forwards of ``fuse``
included), and was 2-12x faster than the torch.export-based exporter on ResNet-18 and tf_efficientnet_lite0 (most
of the latter's time goes to ``ExportedProgram.run_decompositions``). PyTorch has deprecated the TorchScript exporter,
so ``dynamo=True`` (which also needs ``onnxscript``) is offered, and the same onnxruntime check guards either one.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._override import override_forward, restore_forward
from .adapter import atomic_path, base_model_info
from .attach import current_plan, is_attached
from .errors import CLRError, shown
from .fuse import fuse as fuse_model
from .fuse import is_fused
from .multitask import MultiTaskModel
from .state import FUSED, MEMORY_EFFICIENT, MULTITASK, get_state
from .version import __version__

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
"""The ONNX opset written by default (both PyTorch exporters and onnxruntime >= 1.14 support it)."""

_OWNER = "clr_timm.onnx_export"
_INSTALL = 'pip install "clr-timm[onnx]"'
_CHECK_BATCH = 3  # the onnxruntime check runs another batch size than the traced one (2): the batch is really dynamic


def _require(name: str, why: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise CLRError(f"{why} needs the {name!r} package, which is not installed: {_INSTALL}") from e


def _available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W): given, or timm's data config of the model (what the task was trained with)."""
    if input_size is None:
        from timm.data import resolve_model_data_config

        return tuple(int(v) for v in resolve_model_data_config(model)["input_size"])
    if isinstance(input_size, int):
        channels = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0])
        input_size = (channels, input_size, input_size)
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise CLRError(f"input_size must be an int or (channels, height, width) of positive ints, got {shown(size)}")
    return size


def _single_task_copy(model: nn.Module, task: str | None) -> tuple[nn.Module, str | None, list[str] | None]:
    """A deep copy of the model with one task's tensors, in eval mode and in no mode but fused: (copy, task, labels)."""
    if isinstance(model, MultiTaskModel):
        name = task if task is not None else model.current_task
        if name is None:
            raise CLRError(f"the MultiTaskModel has no current task; pass task= (tasks: {shown(model.tasks)})")
        adapter = model._adapter(name)
        with model._lock, model._bound(name):
            copied = copy.deepcopy(model.model)
        get_state(copied).leave(copied, MULTITASK)  # the copy serves this task alone
        return copied.eval(), name, adapter.label_names
    if not is_attached(model):
        raise CLRError(
            f"{type(model).__name__} has no CLR adapter attached: export_onnx exports a task "
            "(clr_timm.load_adapter or attach first)"
        )
    state = get_state(model)
    if MULTITASK in state.modes:
        raise CLRError("this model is served by a MultiTaskModel: export through it, export_onnx(mt, path, task=...)")
    if task is not None and task != state.task:
        raise CLRError(f"task={shown(task)} names no task of this model (it holds {shown(state.task)}); omit task=")
    copied = copy.deepcopy(model)
    get_state(copied).leave(copied, MEMORY_EFFICIENT)  # a training mode; its autograd functions do not export
    return copied.eval(), state.task, state.label_names


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _select(stacked: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
    """``stacked[task_index[b], b]`` for each sample b of a (tasks, batch, ...) stack: one GatherElements in ONNX."""
    index = task_index.view(1, -1, *([1] * (stacked.dim() - 2))).expand(1, *stacked.shape[1:])
    return stacked.gather(0, index)[0]


class _AllHeads(nn.Module):
    """Every task's head on every sample, zero-padded to the widest, then each sample's own task's logits."""

    def __init__(self, heads: list[nn.Module], task_index: torch.Tensor) -> None:
        super().__init__()
        self.heads, self.task_index = heads, task_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [head(x) for head in self.heads]
        width = max(o.shape[-1] for o in outs)
        return _select(torch.stack([F.pad(o, (0, width - o.shape[-1])) for o in outs]), self.task_index)


def _all_tasks_forward(per_task: list[dict[str, torch.Tensor]], task_index: torch.Tensor, m: nn.Module, inner, *args):
    """The module once per task, with that task's tensors in its slots; each sample takes its own task's output."""
    live = {a: m._parameters[a] if a in m._parameters else m._buffers[a] for a in per_task[0]}
    outs = []
    try:
        for tensors in per_task:
            for attr, t in tensors.items():
                (m._parameters if attr in m._parameters else m._buffers)[attr] = t
            outs.append(inner(*args))
    finally:
        for attr, t in live.items():
            (m._parameters if attr in m._parameters else m._buffers)[attr] = t
    return _select(torch.stack(outs), task_index)


class _TaskIndexed(nn.Module):
    """``forward(input, task_index)``: each sample through its own task's adapter, in one graph of fixed shapes.

    Every module holding adapter tensors (reprogramming layers, norms) runs once per task and each sample takes its
    task's output; the frozen convs run once. No shape depends on which tasks are present (unlike
    :mod:`clr_timm.mixed`, whose per-task sample groups and batch-sized grouped convolutions a trace would freeze), so
    the graph is exact for any batch size and any mix of tasks, at the cost of the adapter modules' work times the
    number of tasks.
    """

    def __init__(self, model: nn.Module, adapters: list[dict[str, torch.Tensor]], head_paths: list[str]) -> None:
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        self._heads: dict[str, list[nn.Module]] = {}
        for path in head_paths:
            heads = [copy.deepcopy(modules[path]) for _ in adapters]
            for head, tensors in zip(heads, adapters):
                for key, t in tensors.items():
                    if key.startswith(f"{path}."):
                        owner, attr = _split(key[len(path) + 1 :])
                        sub = head.get_submodule(owner)
                        (sub._parameters if attr in sub._parameters else sub._buffers)[attr] = t
            self._heads[path] = heads
        heads = tuple(f"{h}." for h in head_paths)
        self._slots: dict[str, list[dict[str, torch.Tensor]]] = {}
        for i, tensors in enumerate(adapters):
            for key, t in tensors.items():
                if not key.startswith(heads):
                    owner, attr = _split(key)
                    self._slots.setdefault(owner, [{} for _ in adapters])[i][attr] = t

    def forward(self, x: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        modules = dict(self.model.named_modules())
        swapped = []
        try:
            for path, per_task in self._slots.items():
                override_forward(modules[path], _OWNER, functools.partial(_all_tasks_forward, per_task, task_index))
            for path, heads in self._heads.items():
                parent, child = _split(path)
                swapped.append((modules[parent], child, modules[path]))
                modules[parent]._modules[child] = _AllHeads(heads, task_index)
            return self.model(x)
        finally:
            for path in self._slots:
                restore_forward(modules[path], _OWNER)
            for parent, child, head in swapped:
                parent._modules[child] = head


def _example(model: nn.Module, size: tuple[int, int, int], batch: int, seed: int) -> torch.Tensor:
    p = next(model.parameters())
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))
    return x.to(p.device, p.dtype)


def _run_exporter(
    model: nn.Module, inputs: dict[str, torch.Tensor], path: str, *, opset: int, dynamic_batch: bool, dynamo: bool
) -> None:
    args = tuple(inputs.values())
    names = {"input_names": list(inputs), "output_names": ["logits"], "opset_version": opset}
    if dynamo:
        _require("onnxscript", "export_onnx(dynamo=True)")
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in args) if dynamic_batch else None
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=shapes, external_data=False, **names)
        return
    axes = {name: {0: "batch"} for name in [*inputs, "logits"]} if dynamic_batch else None
    with warnings.catch_warnings():
        # Chosen here, not by the caller (see the module's docstring); shape values traced as constants are what a
        # fixed input size means, and the onnxruntime check runs another batch size than the traced one.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        torch.onnx.export(model, args, path, dynamo=False, dynamic_axes=axes, **names)


def _export(model: nn.Module, inputs: dict[str, torch.Tensor], path: str, **options: Any) -> None:
    try:
        with torch.no_grad():
            _run_exporter(model, inputs, path, **options)
    except CLRError:
        raise
    except Exception as e:  # the exporters raise many types (TorchExportError, RuntimeError, UnsupportedOperatorError)
        raise CLRError(f"torch.onnx.export could not export {type(model).__name__}: {shown(str(e), 1000)}") from e


def _check(path: str, inputs: dict[str, torch.Tensor], reference: torch.Tensor, atol: float) -> float:
    """Run the file with onnxruntime on CPU; the largest absolute difference from ``reference``, checked."""
    ort = _require("onnxruntime", "checking the exported file (verify=True)")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    out = session.run(["logits"], feed)[0]
    expected = reference.detach().float().cpu().numpy()
    if out.shape != expected.shape:
        raise CLRError(f"the exported graph returns shape {out.shape} where PyTorch returns {expected.shape}")
    diff = float(np.abs(out - expected).max())
    limit = atol * max(1.0, float(np.abs(expected).max()))
    if not diff <= limit:
        raise CLRError(
            f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} (> {limit:.3g}: atol {atol} times the logits' "
            "scale); nothing was written. Try fuse=False, or report the model"
        )
    return diff


def _annotate(path: str, props: dict[str, Any]) -> None:
    """Record what the file is (task, classes, preprocessing) in its ``metadata_props``, as strings."""
    onnx = _require("onnx", "export_onnx")
    proto = onnx.load(path)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"clr_timm.{key}", value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, path)


def _preprocessing(model: nn.Module, size: tuple[int, int, int]) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {"input_size": list(size), "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def _target(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CLRError(f"{path} is a directory; give the path of the .onnx file to write")
    if os.path.lexists(path) and not overwrite:
        raise CLRError(f"{path} exists; pass overwrite=True to replace it")
    return path


def _write(path: Path, overwrite: bool, write) -> Any:
    """Call ``write(tmp)`` on a temporary path and give the result ``path``; a failure leaves nothing behind."""
    try:
        with atomic_path(path, exclusive=not overwrite) as tmp:
            result = write(tmp)
    except FileExistsError:
        raise CLRError(f"{path} was created while exporting; pass overwrite=True to replace it") from None
    except OSError as e:
        raise CLRError(f"cannot write {shown(str(path))}: {e.strerror or shown(str(e))}") from e
    return result


def _one_task(model: nn.Module, task: str | None, size, fuse: bool, dynamic_batch: bool):
    """(graph module, traced inputs, check inputs, reference outputs, metadata) for one task."""
    copied, name, labels = _single_task_copy(model, task)
    size = _input_size(copied, size)
    x, check = _example(copied, size, 2, 0), _example(copied, size, _CHECK_BATCH if dynamic_batch else 2, 1)
    with torch.no_grad():
        reference = copied(check)
    if fuse and not is_fused(copied):
        fuse_model(copied, example_input=x)
    props = {
        "task": name,
        "num_classes": getattr(copied, "num_classes", None),
        "label_names": labels,
        **_preprocessing(copied, size),
        "fused_convs": len(get_state(copied).modes[FUSED].convs) if is_fused(copied) else 0,
        "base_model": base_model_info(copied),
    }
    return copied, {"input": x}, {"input": check}, reference, props


def _task_indexed(mt: nn.Module, tasks: Sequence[str], size, dynamic_batch: bool):
    """The same for a graph of several tasks of a MultiTaskModel, chosen per sample by a ``task_index`` input."""
    if not isinstance(mt, MultiTaskModel):
        raise CLRError(f"tasks= exports several tasks of a MultiTaskModel, not of a {type(mt).__name__}")
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise CLRError(f"tasks= needs distinct task names, got {shown(tasks)}")
    adapters = [mt.adapter_state_dict(t) for t in tasks]  # raises for an unknown task, naming the tasks there are
    copied, _, _ = _single_task_copy(mt, tasks[0])
    graph = _TaskIndexed(copied, [{k: v.clone() for k, v in a.items()} for a in adapters], current_plan(copied).head)
    size = _input_size(copied, size)
    n = _CHECK_BATCH if dynamic_batch else 2
    x, check = _example(copied, size, 2, 0), _example(copied, size, n, 1)
    index = torch.tensor([(len(tasks) - 1 - i) % len(tasks) for i in range(n)], device=x.device)
    with torch.no_grad():  # the reference is the MultiTaskModel's own mixed batch
        outs = mt(check, tasks=[tasks[i] for i in index.tolist()])
    width = max(o.shape[-1] for o in outs)
    reference = torch.stack([F.pad(o, (0, width - o.shape[-1])) for o in outs])
    props = {
        "tasks": tasks,
        "num_classes": [mt.adapters[t].num_classes for t in tasks],
        "label_names": [mt.adapters[t].label_names for t in tasks],
        **_preprocessing(copied, size),
        "fused_convs": 0,
        "base_model": base_model_info(copied),
    }
    traced = {"input": x, "task_index": torch.tensor([i % len(tasks) for i in range(2)], device=x.device)}
    return graph.eval(), traced, {"input": check, "task_index": index}, reference, props


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task: str | None = None,
    tasks: Sequence[str] | None = None,
    input_size: int | Sequence[int] | None = None,
    fuse: bool = True,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    verify: bool | None = None,
    atol: float = 1e-4,
    dynamo: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export one task of a model (or several tasks, chosen per sample) to an ONNX file, checked with onnxruntime.

    The model itself is not changed (a deep copy is exported), whatever mode it is in. The graph takes ``input``
    (N, C, H, W) float32 and returns ``logits``; with ``tasks=`` it also takes ``task_index`` (N,) int64, each
    sample's position in ``tasks``, and returns (N, the largest head) logits, zero past each task's own classes.

    Args:
        model: An attached model (e.g. after :func:`~clr_timm.load_adapter`), or a :class:`~clr_timm.MultiTaskModel`.
        path: The ``.onnx`` file to write.
        task: For a MultiTaskModel, the task to export (default: its current task).
        tasks: For a MultiTaskModel, the tasks of a multi-task graph (not fused; each adapter module runs once per
            task in it, so keep it to the tasks one deployment serves).
        input_size: (C, H, W), or one int for square images; default: timm's data config of the model.
        fuse: Fold norms and reprogramming layers into convs where the layer kind allows it exactly
            (:func:`clr_timm.fuse`); kinds that do not fold are exported as they are.
        opset: ONNX opset version.
        dynamic_batch: Whether the batch dimension of the inputs and ``logits`` is dynamic.
        verify: Run the file with onnxruntime and compare with PyTorch before writing it. None (default): when
            onnxruntime is installed.
        atol: Largest accepted difference, times ``max(1, largest absolute logit)``.
        dynamo: Use PyTorch's torch.export-based exporter (needs ``onnxscript``) instead of the TorchScript-based one.
        overwrite: Replace an existing file.

    Returns:
        The path written. Its ``metadata_props`` record the task(s), classes, label names and preprocessing.

    Raises:
        CLRError: When onnx (or, for ``verify=True``, onnxruntime) is missing, the file exists, the export fails, or
            onnxruntime disagrees with PyTorch; nothing is written then.
    """
    _require("onnx", "export_onnx")
    verify = _available("onnxruntime") if verify is None else verify
    if verify:
        _require("onnxruntime", "export_onnx(verify=True)")
    if task is not None and tasks is not None:
        raise CLRError("pass either task= (a one-task graph) or tasks= (a graph with a task_index input), not both")
    path = _target(path, overwrite)
    if tasks is None:
        graph, traced, check, reference, props = _one_task(model, task, input_size, fuse, dynamic_batch)
    else:
        graph, traced, check, reference, props = _task_indexed(model, tasks, input_size, dynamic_batch)
    props["version"] = __version__

    def write(tmp: str) -> None:
        _export(graph, traced, tmp, opset=opset, dynamic_batch=dynamic_batch, dynamo=dynamo)
        _annotate(tmp, props)
        if verify:
            _check(tmp, check, reference, atol)

    _write(path, overwrite, write)
    return path
