"""Saving a model's adapter and loading one back, wherever it lives: the verbs, in mirror pairs.

================================================  ================================================================
``save_adapter(model, path, *, task, ...)``       one file
``save_pretrained(model, folder, *, task, ...)``  ``folder/<task>/`` with its ``clr_config.json`` and the card
``push_to_hub(model, repo_id, *, task, ...)``     ``<task>/`` in a Hub repo, one commit
``load_adapter(model, source, *, task, ...)``     any of the three back (:mod:`clr_timm.source` says which it is)
================================================  ================================================================

``task`` is the task's name on both sides: in a folder or repo it is also the subfolder, and a single file loaded with
``task=`` must record that name. Saving never changes the model; loading records the adapter's task and label names on
it, and they are what a later save records when none are given.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapter import AdapterFile, _check_task_name, apply_adapter, extract_adapter, read_adapter, write_adapter
from .card import TaskFiles, local_tasks, model_license, write_local_card, write_task_folder
from .count import count_parameters
from .hub import download_adapter, push_tasks
from .source import check_recorded_task, parse_source, task_file
from .state import get_state, refuse_fused

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = ["save_adapter", "save_pretrained", "push_to_hub", "load_adapter", "read_source"]


def _extract(
    model: nn.Module, task: str | None, dtype: str | torch.dtype | None, label_names: list[str] | None
) -> AdapterFile:
    """The model's adapter in memory, recording the task and labels it was loaded with unless others are given."""
    state = get_state(model)
    task = task if task is not None else state.task
    label_names = label_names if label_names is not None else state.label_names
    return extract_adapter(model, task=task, dtype=dtype, label_names=label_names)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the task's adapter of an attached model to a safetensors file, atomically.

    Args:
        model: An attached model.
        path: Destination file (conventionally ``*.safetensors``).
        task: The task's name, recorded in the file (default: the one the adapter was loaded with, if any).
        dtype: Storage dtype of the floating tensors: None keeps the model's, ``"fp16"`` / ``"bf16"`` halve the file.
        label_names: Class names recorded in the file (default: the loaded ones, if any).
        overwrite: Replace an existing file that holds another task's adapter, or that is not an adapter at all.
            An existing adapter of the same task is always replaced (saving checkpoints during training).

    Returns:
        The path written. A crash mid-write leaves any previous file intact. The model is not changed.
    """
    return Path(write_adapter(_extract(model, task, dtype, label_names), path, overwrite=overwrite).path)


def _save_task(
    model: nn.Module,
    folder: Path,
    task: str | None,
    dtype: str | torch.dtype | None,
    label_names: list[str] | None,
    overwrite: bool = False,
) -> TaskFiles:
    """Write a task's adapter and its clr_config.json into ``folder/<task>`` (no card)."""
    _check_task_name(task)
    adapter = _extract(model, task, dtype, label_names)
    count = count_parameters(model)
    return write_task_folder(adapter, folder, task, count=count, license=model_license(model), overwrite=overwrite)


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a task's adapter in the Hub layout: ``<folder>/<task>/clr_adapter.safetensors`` and ``clr_config.json``.

    The folder also gets a ``README.md`` model card listing every task in it (text a person wrote outside the
    generated section is kept), so it can be uploaded with :func:`~clr_timm.push_folder`, ``clr-timm push`` or the
    ordinary Hub CLI, and loaded back with ``clr_timm.load_adapter(model, folder, task=task)``. Each file is written
    atomically.

    Args:
        model: An attached model.
        folder: The folder of the whole collection (one subfolder per task).
        task: The task's name and subfolder; None writes the adapter at the folder's root (recording the task it
            was loaded with, if any).
        dtype: Storage dtype of the floating tensors (``"fp16"`` / ``"bf16"`` halve the file).
        label_names: Class names recorded with the adapter (default: the loaded ones, if any).
        overwrite: Replace an existing adapter of another task at the same place.

    Returns:
        The task's folder.
    """
    written = _save_task(model, Path(folder), task, dtype, label_names, overwrite)
    write_local_card(Path(folder), [written])
    return Path(folder) / task if task is not None else Path(folder)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    label_names: list[str] | None = None,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
) -> CommitInfo:
    """Upload a task's adapter to a Hub repo (created if needed) in one commit with its config and the model card.

    Other tasks already in the repo stay as they are; the card's table of tasks is regenerated and everything else
    in the card is kept.

    Args:
        model: An attached model.
        repo_id: ``"org/name"`` (``"hf-hub:org/name"`` and ``"org/name@branch"`` are accepted too).
        task: The task's name and folder in the repo; None uses the repo root.
        dtype: Storage dtype of the floating tensors (``"fp16"`` / ``"bf16"`` halve the file).
        label_names: Class names recorded with the adapter (default: the loaded ones, if any).
        revision: Branch to commit to, created from ``main`` when missing (a version of a task); tags and commits
            cannot be pushed to.
        private: Create the repo private (ignored when it exists).
        token: Hub token with write access (default: the logged-in one).
        commit_message: Summary of the commit (default: ``"Add CLR adapter for task 'pets'"``).
        commit_description: Longer description of the commit or pull request.
        create_pr: Open a pull request instead of committing to the branch (works on repos you cannot write to).
        license: License in the card's metadata (default: the card's, else the base model's, else apache-2.0).

    Returns:
        huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``pr_url`` for a pull request).
    """
    _check_task_name(task)
    with tempfile.TemporaryDirectory(prefix="clr_timm-push-") as tmp:
        _save_task(model, Path(tmp), task, dtype, label_names)  # no card here: the repo's own is updated
        return push_tasks(
            local_tasks(Path(tmp)),  # the files as written, read back once: what is uploaded is what was checked
            repo_id,
            revision=revision,
            private=private,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            license=license,
        )


def read_source(
    source: str | os.PathLike,
    *,
    task: str | None = None,
    model: nn.Module | None = None,
    **hub_kwargs: Any,
) -> AdapterFile:
    """Read (downloading if needed) and check the adapter file of ``task`` in ``source``.

    Args:
        source: An adapter file, a ``save_pretrained`` folder, or ``"hf-hub:org/name[@rev]"``.
        task: The task's name: its subfolder in a folder or repo (None: the root); for a file, the task it must
            record (None: any).
        model: The model the adapter is for: the file is checked against it before any tensor is read (see
            :func:`~clr_timm.read_adapter`); None reads the file on its own.
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.
    """
    _check_task_name(task)
    src = parse_source(source, hub_kwargs)
    if src.kind == "hub":
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if k != "revision"}
        return read_adapter(download_adapter(src.repo_id, task, revision=src.revision, **hub_kwargs), model=model)
    if src.kind == "folder":
        return read_adapter(task_file(src.path, task), model=model)
    adapter = read_adapter(src.path, model=model)
    check_recorded_task(adapter, task)
    return adapter


def load_adapter(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    task: str | None = None,
    check_backbone: bool = True,
    **hub_kwargs: Any,
) -> nn.Module:
    """Load a task's adapter into ``model``: attach CLR if needed, resize the head, copy the tensors.

    Args:
        model: A timm model, attached or not, built with the same architecture and backbone weights.
        source: An adapter file, a folder saved by :func:`save_pretrained`, or ``"hf-hub:org/name[@rev]"``.
        task: The task's name: its subfolder in a folder or Hub repo (None: the root). For a single file, the task
            the file must record (:class:`~clr_timm.AdapterMismatchError` otherwise, also for a file that records
            none); None loads a file whatever it records.
        check_backbone: Refuse an adapter recorded for other backbone weights (fingerprint mismatch).
        **hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.

    Returns:
        The model, which records the adapter's task and label names. On any error it is left exactly as it was.
    """
    refuse_fused(model, "loading an adapter into it")
    adapter = read_source(source, task=task, model=model, **hub_kwargs)  # checked against the model before reading
    return apply_adapter(model, adapter, check_backbone=check_backbone)
