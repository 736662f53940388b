"""Build the model a server runs: the backbone the adapters record, checked, with their tasks.

The backbone comes from the base model the first adapter records (``timm.create_model(name, pretrained=True)``,
through timm's Hub cache), or, offline, from a weights file: a timm state_dict as safetensors, or a timm checkpoint
(``.pth`` / ``.pth.tar``, read by :func:`clr_timm.checkpoint.read_weights`: no pickled code is run). Either way
its fingerprint must equal the one the adapters record (:func:`~clr_timm.adapter.backbone_fingerprint`) before the
server accepts a request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..adapter import AdapterFile, backbone_fingerprint
from ..checkpoint import read_weights
from ..errors import BackboneMismatchError, CLRError, printable, shown
from ..hub import list_tasks
from ..multitask import MultiTaskModel
from ..save_load import read_source
from ..source import folder_tasks, parse_source

__all__ = ["load_base_weights", "load_model"]


def _first_adapter(source: str | os.PathLike, tasks: Sequence[str] | None, hub_kwargs: dict[str, Any]) -> AdapterFile:
    """The adapter that names the base model: the first task asked for, else the source's first task."""
    src = parse_source(source, hub_kwargs)
    if tasks:
        first: str | None = tasks[0]
    elif src.kind == "hub":
        found = list_tasks(src.repo_id, revision=src.revision, token=hub_kwargs.get("token"))
        first = found[0] if found else None
    elif src.kind == "folder":
        found = folder_tasks(src.path)
        first = found[0] if found else None
    else:
        first = None
    return read_source(source, task=first, **hub_kwargs)


def load_base_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a timm state_dict (safetensors) or checkpoint (``.pth``, ``.pth.tar``) into ``model``.

    The file is read by :func:`clr_timm.checkpoint.read_weights`: bounded, no pickled code run, the EMA weights of a
    checkpoint that has them.
    """
    state = read_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CLRError(
            f"base weights {printable(str(path))} do not fit {type(model).__name__}: {shown(str(e), 400)}"
        ) from None
    return model


def _backbone(adapter: AdapterFile, base_weights: str | os.PathLike | None) -> nn.Module:
    import timm

    name = adapter.base_model
    if not name:
        raise CLRError(f"{adapter.path} records no base model; build the model yourself and use create_app(mt)")
    if base_weights is not None:
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as e:
            raise CLRError(f"cannot build the base model {shown(name)}: {shown(str(e))}") from None
        return load_base_weights(model, base_weights)
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:
        raise CLRError(
            f"cannot load the pretrained base model {shown(name)} ({shown(str(e))}); on a machine without the Hub, "
            "pass its weights with --base-weights FILE (base_weights=)"
        ) from None


def _check_backbone(model: nn.Module, adapter: AdapterFile, base_weights: str | os.PathLike | None) -> None:
    mine = backbone_fingerprint(model)
    if adapter.backbone_fingerprint and mine != adapter.backbone_fingerprint:
        where = f"the base weights {printable(str(base_weights))}" if base_weights else "the pretrained weights"
        raise BackboneMismatchError(
            f"{where} are not the backbone the adapters were trained on: fingerprint {mine} != "
            f"{shown(adapter.backbone_fingerprint, 40)} recorded in {adapter.path} (base model "
            f"{shown(adapter.base_model)}); pass the weights the adapters were made with"
        )


def load_model(
    source: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    *,
    base_weights: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> MultiTaskModel:
    """A :class:`~clr_timm.MultiTaskModel` in eval mode serving ``source``'s tasks, on its recorded backbone.

    Args:
        source: A ``save_pretrained`` folder, ``"hf-hub:org/name"`` or one adapter file.
        tasks: The tasks to serve (default: all of them).
        base_weights: The backbone's weights file, instead of timm's pretrained download.
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.

    Raises:
        BackboneMismatchError: The backbone's fingerprint differs from the adapters'; nothing is served.
    """
    first = _first_adapter(source, tasks, hub_kwargs)
    model = _backbone(first, base_weights).eval()
    _check_backbone(model, first, base_weights)
    if parse_source(source, hub_kwargs).kind == "file":
        mt = MultiTaskModel.from_adapters(model, [source], **hub_kwargs)
    else:
        mt = MultiTaskModel.from_pretrained(model, source, tasks, **hub_kwargs)
    return mt.eval()
