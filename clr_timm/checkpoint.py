"""timm's training checkpoints: read them without running any of their code, and extract the adapter a run trained.

timm's ``train.py`` (its ``CheckpointSaver``) writes ``last.pth.tar``, ``checkpoint-<epoch>.pth.tar`` and
``model_best.pth.tar``: a pickled dict of ``state_dict``, ``state_dict_ema`` (with ``--model-ema``), ``args`` (the
run's ``argparse.Namespace``), ``epoch``, ``metric``, ``optimizer`` and the saver's bookkeeping. With one line inserted
after ``create_model`` (``clr_timm.attach(model)``) the ``state_dict`` is the attached model's: the frozen backbone,
the adapter's tensors and the ``<conv>.clr.weight`` kernels. :func:`extract_adapter` turns such a file into an adapter
file that records its base model truthfully.

Files are read with ``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers, with exactly
the one type timm adds allowed (:data:`TIMM_GLOBALS`: ``argparse.Namespace``); a file naming any other class or
function is refused before it is unpickled, naming it, and nothing in it runs. Tensors are memory-mapped, so reading a
checkpoint costs memory for the weights used, not the optimizer state; files over ``max_bytes`` are refused unread.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import _frozen_tensors, _metadata, backbone_fingerprint, write_adapter
from .adapter import extract_adapter as _adapter_of_model
from .attach import CLR_ATTR, attach, current_plan, plan_targets, reprogramming_shapes, resize_head
from .config import PRESETS, CLRConfig
from .errors import CLRError, shown

__all__ = [
    "TIMM_GLOBALS",
    "MAX_CHECKPOINT_BYTES",
    "MAX_PICKLE_BYTES",
    "TimmCheckpoint",
    "read_checkpoint",
    "read_weights",
    "extract_adapter",
]

TIMM_GLOBALS = (argparse.Namespace,)
"""The types a timm checkpoint holds beyond what ``torch.load(weights_only=True)`` rebuilds (its ``args``)."""
MAX_CHECKPOINT_BYTES = 64 * 2**30
"""The largest checkpoint read (a timm CNN's checkpoint with EMA weights and optimizer state is far below)."""
MAX_PICKLE_BYTES = 256 * 2**20
"""The largest pickle record inside a checkpoint (its non-tensor part: a timm checkpoint's is a few hundred kB)."""
_ALLOWED = {f"{t.__module__}.{t.__qualname__}" for t in TIMM_GLOBALS}
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
_WRAPPED = ("model", "model_ema")  # where checkpoints not written by timm keep their weights and their EMA


@dataclass
class TimmCheckpoint:
    """What a timm checkpoint holds that matters for its adapter.

    Attributes:
        path: The file.
        state_dict: The trained weights (``state_dict``, or the whole file when it is a plain state_dict).
        state_dict_ema: Their exponential moving average (``--model-ema``), if saved.
        args: The training run's arguments (timm's ``train.py`` saves them), if saved.
        epoch: The epoch it was saved after.
        metric: The score that ranked it (``model_best`` is the file with the best one).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    state_dict_ema: dict[str, torch.Tensor] | None = None
    args: argparse.Namespace | None = None
    epoch: int | None = None
    metric: float | None = None


def _check_pickle(path: Path) -> None:
    """Refuse a zip checkpoint whose pickle is too large or names a global outside torch's and timm's safe set."""
    try:
        with zipfile.ZipFile(path) as z:
            records = [i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
    except (zipfile.BadZipFile, OSError) as e:
        raise CLRError(f"{path} is not a readable PyTorch checkpoint (damaged or truncated zip archive: {e})") from e
    if len(records) != 1:
        raise CLRError(f"{path} is a zip archive but not a PyTorch checkpoint (it has {len(records)} data.pkl records)")
    if records[0].file_size > MAX_PICKLE_BYTES:
        raise CLRError(
            f"{path} has a pickle record of {records[0].file_size:,} bytes; a timm checkpoint's is a few hundred kB "
            f"and clr_timm reads at most {MAX_PICKLE_BYTES:,}"
        )
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # a record torch cannot scan: refused, never unpickled
        raise CLRError(f"{path} cannot be read as a PyTorch checkpoint: {shown(str(e))}") from e
    refused = sorted(set(found) - _ALLOWED)
    if refused:
        raise CLRError(
            f"{path} was refused: its pickle names {', '.join(shown(g, 80) for g in refused[:5])}, which a timm "
            f"checkpoint never holds (only tensors, plain containers and {sorted(_ALLOWED)}). Nothing in it was run; "
            "if you made this file yourself, save a state_dict instead"
        )


def _torch_load(path: Path, max_bytes: int) -> Any:
    """``torch.load`` with ``weights_only=True`` and :data:`TIMM_GLOBALS` allowed, every failure a CLRError."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise CLRError(
            f"reading a timm checkpoint without running its code needs torch >= 2.5 (torch.serialization's "
            f"safe_globals and get_unsafe_globals_in_checkpoint); this is torch {torch.__version__}"
        )
    if not path.is_file():
        raise CLRError(f"no checkpoint file at {shown(str(path))}")
    size = path.stat().st_size
    if size > max_bytes:
        raise CLRError(f"{path} has {size:,} bytes, more than max_bytes={max_bytes:,}; raise it to read this file")
    with open(path, "rb") as f:
        magic = f.read(4)
    zipped = magic == _ZIP_MAGIC
    if zipped:
        _check_pickle(path)
    elif not magic.startswith(_PICKLE_MAGIC):
        raise CLRError(f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, neither a zip nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(TIMM_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # UnpicklingError (a refused global), a truncated record, ...: nothing was run
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        said = next((line for line in lines if "Unsupported global" in line), lines[0])  # torch names the global
        raise CLRError(
            f"{path} cannot be read safely ({type(e).__name__}: {shown(said, 300)}); it is damaged, truncated, "
            "or holds more than tensors, plain containers and argparse.Namespace. Nothing in it was run"
        ) from e


def _tensors(value: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    """A state_dict's tensors by key, without the ``module.`` prefix of a DDP model (as timm's clean_state_dict)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        raise CLRError(f"{path}: {what} is not a state_dict (a dict of names to tensors)")
    return {k.removeprefix("module."): v for k, v in value.items()}


def read_checkpoint(path: str | os.PathLike, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> TimmCheckpoint:
    """Read a timm training checkpoint, or a plain state_dict saved with ``torch.save``, safely (see the module).

    Raises :class:`~clr_timm.CLRError` naming the file and what is wrong: too large, damaged or truncated, a class
    or function outside the safe set (named; nothing is run), or no state_dict in it.
    """
    path = Path(path)
    data = _torch_load(path, max_bytes)
    if isinstance(data, dict) and "state_dict" in data:
        args = data.get("args")
        if isinstance(args, dict):
            args = argparse.Namespace(**{k: v for k, v in args.items() if isinstance(k, str)})
        metric, epoch = data.get("metric"), data.get("epoch")
        return TimmCheckpoint(
            path=path,
            state_dict=_tensors(data["state_dict"], "'state_dict'", path),
            state_dict_ema=_tensors(data["state_dict_ema"], "'state_dict_ema'", path)
            if data.get("state_dict_ema") is not None
            else None,
            args=args if isinstance(args, argparse.Namespace) else None,
            epoch=epoch if isinstance(epoch, int) else None,
            metric=float(metric) if isinstance(metric, (int, float)) else None,
        )
    if isinstance(data, dict) and any(isinstance(data.get(k), dict) for k in _WRAPPED):
        # Other training scripts (DeiT's, for one) keep the weights under "model" and their EMA under "model_ema".
        trained, ema = (data.get(k) for k in _WRAPPED)
        return TimmCheckpoint(
            path=path,
            state_dict=_tensors(trained if isinstance(trained, dict) else ema, "'model'", path),
            state_dict_ema=_tensors(ema, "'model_ema'", path) if isinstance(ema, dict) else None,
        )
    return TimmCheckpoint(path=path, state_dict=_tensors(data, "the file", path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_weights(path: str | os.PathLike, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> dict[str, torch.Tensor]:
    """A model's weights from a safetensors file, a timm checkpoint or a plain state_dict, read safely.

    Of a timm checkpoint with EMA weights, the EMA's are taken, as timm itself does when it loads a checkpoint as
    pretrained weights (``--pretrained-path``, ``load_checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise CLRError(f"no weights file at {shown(str(path))}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _ZIP_MAGIC or magic.startswith(_PICKLE_MAGIC):
        ck = read_checkpoint(path, max_bytes=max_bytes)
        return ck.state_dict_ema if ck.state_dict_ema is not None else ck.state_dict
    if path.stat().st_size > max_bytes:
        raise CLRError(f"{path} has {path.stat().st_size:,} bytes, more than max_bytes={max_bytes:,}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k.removeprefix("module."): v for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CLRError(f"{path} is neither a safetensors file nor a PyTorch checkpoint ({shown(str(e))})") from e


# ------------------------------------------------------------------------------------------------------- extracting


def _choose_weights(ck: TimmCheckpoint, ema: bool | None) -> dict[str, torch.Tensor]:
    """The state_dict ``ema`` asks for; refuses to guess when the file holds both."""
    if ck.state_dict_ema is None:
        if ema:
            raise CLRError(
                f"{ck.path} holds no EMA weights ('state_dict_ema'; trained without --model-ema): drop --ema"
            )
        return ck.state_dict
    if ema is None:
        raise CLRError(_ema_question(ck))
    return ck.state_dict_ema if ema else ck.state_dict


def _ema_question(ck: TimmCheckpoint) -> str:
    """Why the choice between a checkpoint's trained and EMA weights matters, and which score picked the file."""
    args = ck.args
    metric_name = getattr(args, "eval_metric", "top1") if args is not None else "metric"
    score = f"{metric_name} {ck.metric:g}" if ck.metric is not None else "no recorded score"
    epoch = f" after epoch {ck.epoch}" if ck.epoch is not None else ""
    if args is None or not getattr(args, "model_ema", True):
        who = f"Its training arguments do not say --model-ema, so which weights scored it ({score}{epoch}) is unknown."
    elif getattr(args, "model_ema_force_cpu", False):
        who = (
            f"The run kept its EMA on the CPU (--model-ema-force-cpu), which timm does not validate: this file's "
            f"score ({score}{epoch}) and the choice of model_best are the trained weights'; --no-ema extracts them."
        )
    else:
        decay = getattr(args, "model_ema_decay", None)
        who = (
            f"With --model-ema{f' (decay {decay:g})' if isinstance(decay, (int, float)) else ''} timm's train.py "
            f"scores every epoch with the EMA weights: this file's score ({score}{epoch}), and which epoch became "
            "model_best.pth.tar, are the EMA's; --ema extracts the weights that earned it."
        )
    return (
        f"{ck.path} holds two sets of weights: the trained ones ('state_dict', what validate.py and --resume load) "
        f"and their exponential moving average ('state_dict_ema', what timm.models.load_checkpoint loads by default). "
        f"{who} Choose one: --ema or --no-ema (Python: ema=True / ema=False)."
    )


def _model_name(ck: TimmCheckpoint, model: str | None) -> str:
    name = model or getattr(ck.args, "model", None)
    if not isinstance(name, str) or not name:
        raise CLRError(f"{ck.path} records no model name (no timm training 'args'): give it (--model NAME / model=)")
    return name


def _build(name: str, ck: TimmCheckpoint, num_classes: int | None) -> nn.Module:
    """The architecture as the run built it (``train.py``'s arguments that change the weights' shapes or outputs)."""
    import timm

    args = ck.args if ck.args is not None else argparse.Namespace()
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    for key, arg in (("num_classes", "num_classes"), ("global_pool", "gp"), ("bn_eps", "bn_eps")):
        if getattr(args, arg, None) is not None:
            kwargs[key] = getattr(args, arg)
    input_size = getattr(args, "input_size", None)
    in_chans = getattr(args, "in_chans", None) or (input_size[0] if input_size else None)
    if in_chans:
        kwargs["in_chans"] = in_chans
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not timm.is_model(name):
        raise CLRError(
            f"{ck.path} is a checkpoint of {shown(name)}, which this timm ({timm.__version__}) does not have"
        )
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise CLRError(f"cannot build {shown(name)} with {shown(kwargs)} for {ck.path}: {shown(str(e))}") from e
    return model.eval()


def _fit_head(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Size the head from a plain state_dict, whose number of classes no 'args' records."""
    for head in plan_targets(model).head:
        weight = sd.get(f"{head}.weight")
        if weight is not None and weight.dim() >= 1 and weight.shape[0] != getattr(model, "num_classes", None):
            resize_head(model, int(weight.shape[0]))
            return


def _check_backbone_keys(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """The state_dict's tensors other than the reprogramming layers' must be exactly the architecture's."""
    _check_keys(model.state_dict(), {k: v for k, v in sd.items() if f".{CLR_ATTR}." not in f".{k}"}, path, name)


def _check_keys(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        problems = [
            f"{len(keys)} {what} (first: {shown(keys[0])})"
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of another shape"))
            if keys
        ]
        raise CLRError(
            f"{path} does not fit {shown(name)}: tensors {', '.join(problems)}. Is it a checkpoint of another "
            "architecture, or of other model arguments (--num-classes, --model-kwargs)?"
        )


def _detect_config(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, config: CLRConfig | None) -> CLRConfig:
    """The config whose reprogramming tensors the state_dict holds: ``config`` checked, or the first that fits.

    The kernels' names and shapes tell the layer kinds and kernel size apart; the per-task norm and head choices leave
    no trace in a state_dict, so a config that differs only there must be given (``--config``).
    """
    kernels = {k: tuple(v.shape) for k, v in sd.items() if f".{CLR_ATTR}." in f".{k}"}
    if not kernels:
        raise CLRError(
            f"{path} has no CLR tensors (no '.{CLR_ATTR}.' keys): it is not the checkpoint of a model with "
            "clr_timm.attach(model) inserted after timm.create_model"
        )
    candidates = [config] if config is not None else [CLRConfig(), *(CLRConfig.preset(n) for n in PRESETS)]
    for candidate in candidates:
        if reprogramming_shapes(plan_targets(model, candidate)) == kernels:
            return candidate
    which = f"the config given ({config})" if config is not None else "the default config or any preset"
    raise CLRError(
        f"{path}'s {len(kernels)} CLR tensors (first: {shown(min(kernels))}) are not those of {which} on this "
        "architecture: give the config the run attached with (--config '{...}' / config=CLRConfig(...))"
    )


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str) -> None:
    _check_keys(model.state_dict(), sd, path, name)  # the kernels too: attach's hook forgives their absence
    model.load_state_dict(sd, strict=True)


def _check_base(model: nn.Module, base: dict[str, torch.Tensor], base_path: Path, path: Path) -> None:
    """Refuse a checkpoint whose frozen backbone is not exactly the base weights' (norms and head excluded)."""
    frozen = _frozen_tensors(model, current_plan(model))
    absent = [k for k, _ in frozen if k not in base]
    if absent:
        raise CLRError(
            f"{base_path} has no tensor {shown(absent[0])} (and {len(absent) - 1} more of the backbone's): it is not a "
            "state_dict of this architecture, or is in another format (load it with timm and save its state_dict)"
        )
    for key, t in frozen:
        b = base[key]
        if tuple(b.shape) != tuple(t.shape) or not torch.equal(t.detach().cpu(), b.to(t.dtype)):
            theirs = backbone_fingerprint(model, _plan=current_plan(model), _tensors=base)
            raise CLRError(
                f"{path} was not trained on {base_path}: its frozen tensor {shown(key)} differs (backbone fingerprint "
                f"{backbone_fingerprint(model)} != {theirs}). Give the weights the run started from"
            )


def _local_base(ck: TimmCheckpoint, base_weights: str | os.PathLike | None) -> Path | None:
    """The local weights file the run's backbone came from: the one given, else the run's own, when it names one."""
    if base_weights is not None:
        return Path(base_weights)
    named = getattr(ck.args, "pretrained_path", None) or getattr(ck.args, "initial_checkpoint", None)
    if not named:
        return None
    if not Path(named).is_file():
        raise CLRError(
            f"{ck.path} was trained from the local weights file {shown(named)} (--pretrained-path / "
            "--initial-checkpoint), which is not here: give it (--base-weights FILE) so the adapter can record which "
            "weights it needs"
        )
    return Path(named)


def _recorded_base(ck: TimmCheckpoint, name: str, base_file: Path | None) -> dict[str, str | None]:
    """What the adapter records as its base: a pretrained tag only when the run really loaded it, and the file's hash.

    The tag (and its Hub id) comes from timm's pretrained config of the name the run was given, which names timm's
    default tag when the name has none, exactly the weights ``--pretrained`` loads.
    """
    args = ck.args
    from_file = bool(getattr(args, "pretrained_path", None) or getattr(args, "initial_checkpoint", None))
    tagged = bool(getattr(args, "pretrained", False)) if args is not None else "." in name
    record: dict[str, str | None] = {"base_weights_sha256": _sha256(base_file) if base_file is not None else None}
    if from_file or not tagged:
        record.update(pretrained_tag=None, hf_hub_id=None)
    return record


def extract_adapter(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    ema: bool | None = None,
    task: str | None = None,
    base_weights: str | os.PathLike | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    config: CLRConfig | None = None,
    label_names: list[str] | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
) -> Path:
    """Write the adapter a timm training run saved in ``checkpoint`` to ``output`` (``clr-timm extract``).

    The model is rebuilt from the run's arguments (``args.model``, ``num_classes``, ...) without downloading weights,
    attached, loaded strictly with the chosen weights, and its adapter saved as :func:`~clr_timm.save_adapter` does.

    Args:
        checkpoint: ``model_best.pth.tar``, ``last.pth.tar``, ``checkpoint-N.pth.tar``, or a plain state_dict.
        output: The adapter file to write.
        ema: True for the EMA weights (``state_dict_ema``), False for the trained ones; required when the file
            holds both (the error explains which weights scored it).
        task: Task name to record.
        base_weights: The weights file the run started from (safetensors, timm checkpoint or state_dict): the
            checkpoint's frozen backbone must equal it, and the adapter records its SHA-256. Default: the run's
            ``--pretrained-path`` / ``--initial-checkpoint`` when it has one.
        model: timm model name, for a file without training arguments.
        num_classes: Classes of the head (default: the run's, or the state_dict's head).
        config: The :class:`CLRConfig` the run attached with (default: the one whose kernels the file holds; the
            per-task norm and head choices leave no trace in a checkpoint, so give it when they are not the
            default).
        label_names: Class names to record.
        dtype: Storage dtype of the floating tensors (``"fp16"`` / ``"bf16"`` halve the file).
        overwrite: Replace an existing file that holds another task's adapter.
        max_bytes: Refuse checkpoints larger than this.

    Returns:
        The path written. Every check runs before it is written; on any error nothing is.
    """
    ck = read_checkpoint(checkpoint, max_bytes=max_bytes)
    sd = _choose_weights(ck, ema)
    name = _model_name(ck, model)
    net = _build(name, ck, num_classes)
    if num_classes is None and getattr(ck.args, "num_classes", None) is None:
        _fit_head(net, sd)
    _check_backbone_keys(net, sd, ck.path, name)
    attach(net, _detect_config(net, sd, ck.path, config))
    _load_strict(net, sd, ck.path, name)
    base_file = _local_base(ck, base_weights)
    if base_file is not None:
        _check_base(net, read_weights(base_file, max_bytes=max_bytes), base_file, ck.path)
    adapter = _adapter_of_model(net, task=task, dtype=dtype, label_names=label_names)
    adapter = dataclasses.replace(adapter, **_recorded_base(ck, name, base_file))
    adapter.metadata = _metadata(adapter)
    return Path(write_adapter(adapter, output, overwrite=overwrite).path)
