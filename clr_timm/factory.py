"""One call from a published adapter to a model ready for inference: :func:`create_model`, timm's verb for CLR.

The adapter records the base model it was trained on (timm name, pretrained tag, or the SHA-256 of a local weights
file, and a fingerprint of the frozen backbone); this module builds that base with timm and loads the adapter into it.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .adapter import AdapterFile, _frozen_tensors, apply_adapter
from .attach import plan_targets
from .checkpoint import read_weights
from .errors import CLRError, shown
from .save_load import read_source

__all__ = ["create_model"]


def _base_name(adapter: AdapterFile, source: str | os.PathLike) -> str:
    import timm

    if not adapter.architecture:
        raise CLRError(f"{source}: the adapter records no base architecture; build the model and use load_adapter")
    if not timm.is_model(adapter.architecture):
        raise CLRError(
            f"{source} is an adapter for {shown(adapter.architecture)}, which this timm ({timm.__version__}) does "
            "not have; upgrade timm"
        )
    return adapter.base_model or adapter.architecture


def _load_base_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the backbone tensors of a local weights file into ``model`` (the head and norms are the adapter's)."""
    weights = read_weights(path)
    own = model.state_dict()
    frozen = [k for k, _ in _frozen_tensors(model, plan_targets(model))]
    absent = [k for k in frozen if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape)]
    if absent:
        raise CLRError(
            f"{path} has no tensor {shown(absent[0])} of this model's shape (and {len(absent) - 1} more of the "
            "backbone's): it holds the weights of another architecture"
        )
    head = tuple(f"{h}." for h in plan_targets(model).head)
    model.load_state_dict({k: v for k, v in weights.items() if k in own and not k.startswith(head)}, strict=False)


def create_model(
    source: str | os.PathLike,
    task: str | None = None,
    *,
    pretrained: bool = True,
    base_weights: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build the base model an adapter records, load the adapter, and return it in eval mode.

    The model is a plain timm model with the adapter attached: ``timm.data.resolve_data_config({}, model=model)``
    gives its preprocessing, and timm's ``validate.py``-style evaluation runs on it unchanged.

    Args:
        source: ``"hf-hub:org/name[@rev]"``, a :func:`~clr_timm.save_pretrained` folder or an adapter file.
        task: The task: its subfolder in a folder or repo (None: the root); for a file, the task it must record.
        pretrained: Load the recorded pretrained weights through timm (it may download them). False builds the
            backbone at random init and skips the backbone check: for tests, or to load the backbone yourself after
            (nothing checks it then); on a machine without timm's download, pass ``base_weights`` instead.
        base_weights: A local weights file (safetensors, timm checkpoint or state_dict) to build the backbone from,
            instead of timm's download: required for an adapter trained from a local file (it records its SHA-256).
        **timm_kwargs: Passed to ``timm.create_model`` (``in_chans``, ``drop_rate``, ...).

    Raises:
        CLRError: The adapter records no architecture this timm has, or a local base without ``base_weights``;
            :class:`~clr_timm.BackboneMismatchError` when the weights built are not those the adapter was trained on.
    """
    import timm

    adapter = read_source(source, task=task)
    name = _base_name(adapter, source)
    if adapter.base_weights_sha256 and base_weights is None and pretrained:
        raise CLRError(
            f"{source} was trained on a local weights file (sha256 {adapter.base_weights_sha256}), not on timm's "
            "pretrained weights: pass base_weights=FILE (that file), or pretrained=False to build it at random init"
        )
    kwargs = {"num_classes": adapter.num_classes} if adapter.num_classes is not None else {}
    model = timm.create_model(name, pretrained=pretrained and base_weights is None, **{**kwargs, **timm_kwargs})
    if base_weights is not None:
        _load_base_weights(model, base_weights)
    apply_adapter(model, adapter, check_backbone=pretrained or base_weights is not None)
    return model.eval()
