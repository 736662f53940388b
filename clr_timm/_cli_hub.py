"""The Hub commands of ``clr-timm``: ``push`` and ``pull`` (``info`` lives in :mod:`clr_timm.cli` and calls describe).

``clr_timm.cli`` registers them with ``add_hub_commands(subparsers)``; each command sets ``func(args) -> int``, the
exit code. Errors of the library print ``error: <message>`` on stderr and exit with 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from .errors import CLRError

__all__ = ["add_hub_commands", "format_description"]


def _reports_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CLRError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_hub_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``push`` and ``pull`` to the ``clr-timm`` parser's subcommands."""
    push = subparsers.add_parser(
        "push",
        help="upload a save_pretrained folder (one or many tasks) to a Hub repo, in one commit",
        description="Upload every adapter of a folder written by clr_timm.save_pretrained (the root one and one per "
        "task subfolder) to a Hub repo, created if needed, in one commit that also updates the model card.",
    )
    push.add_argument("folder", help="folder written by clr_timm.save_pretrained")
    push.add_argument("repo_id", metavar="repo", help="Hub repo, 'org/name'")
    push.add_argument("--revision", help="branch to push to (created from main when missing)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--token", help="Hub token with write access (default: the logged-in one)")
    push.add_argument("-m", "--commit-message", help="commit summary")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--license", help="license in the card metadata (default: the base model's)")
    push.set_defaults(func=_reports_errors(_push))

    pull = subparsers.add_parser(
        "pull",
        help="download a task's adapter from a Hub repo and print where it is",
        description="Download a task's adapter (and its clr_config.json) into the Hub cache, or into --out in the "
        "repo's layout, and print the adapter file's path. A task pulled once loads with no server.",
    )
    pull.add_argument("repo_id", metavar="repo", help="Hub repo, 'org/name' or 'org/name@revision'")
    pull.add_argument("--task", help="the task's folder in the repo (default: the adapter at the repo root)")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument("--out", help="download into this folder instead of the Hub cache")
    pull.add_argument("--token", help="Hub token, for private repos")
    pull.add_argument("--cache-dir", help="Hub cache to use (default: HF_HUB_CACHE)")
    pull.add_argument("--local-files-only", action="store_true", help="use the cache only, never the network")
    pull.set_defaults(func=_reports_errors(_pull))


def _push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    info = push_folder(
        args.folder,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        license=args.license,
    )
    print(info.pr_url if getattr(info, "pr_url", None) else info.commit_url)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .hub import download_adapter

    path = download_adapter(
        args.repo_id,
        args.task,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_dir=args.out,
        local_files_only=args.local_files_only,
        with_config=True,
    )
    print(path)
    return 0


def format_description(info: dict[str, Any]) -> str:
    """A human-readable text of :func:`clr_timm.hub.describe`'s dict, for ``clr-timm info``."""
    if info.get("kind") == "adapter":
        return _format_adapter(info)
    where = info.get("repo_id") or info.get("path")
    lines = [f"{info.get('kind')}: {where}"]
    if info.get("kind") == "repo":
        lines.append(f"revision: {info.get('revision')} (commit {info.get('commit')}), private: {info.get('private')}")
    tasks = info.get("tasks") or []
    lines.append(
        f"tasks: {', '.join(tasks) if tasks else '(none)'}"
        + ("; plus a root adapter" if info.get("root_adapter") else "")
    )
    for a in info.get("adapters") or []:
        p = a.get("parameters") or {}
        base = (a.get("base_model") or {}).get("name")
        lines.append(
            f"  {a.get('task') if a.get('task') is not None else '(root)'}: {a.get('num_classes', '?')} classes, "
            f"{_int(p.get('per_task'))} parameters per task ({_pct(p.get('percent_of_backbone'))} of the backbone), "
            f"{_int(a.get('file_size'))} bytes, base model {base or 'unknown'}"
        )
    return "\n".join(lines)


def _format_adapter(info: dict[str, Any]) -> str:
    base = info.get("base_model") or {}
    p = info.get("parameters") or {}
    rows = [
        ("adapter", info.get("path")),
        ("repo", info.get("repo_id") and f"{info['repo_id']} @ {info.get('revision')}"),
        ("task", info.get("task")),
        ("classes", info.get("num_classes")),
        ("label names", ", ".join(info["label_names"]) if info.get("label_names") else None),
        ("base model", base.get("name")),
        ("timm hub id", base.get("hf_hub_id")),
        ("backbone fingerprint", base.get("backbone_fingerprint")),
        ("config", info.get("config")),
        ("format version", info.get("format_version")),
        ("tensors", f"{info.get('num_tensors')} ({_int(info.get('num_values'))} values, {info.get('dtypes')})"),
        ("reprogrammed convs", info.get("num_reprogrammed")),
        ("per task", p and f"{_int(p.get('per_task'))} ({_pct(p.get('percent_of_backbone'))} of the backbone)"),
        ("head", p and _int(p.get("head"))),
        ("file size", f"{_int(info.get('file_size'))} bytes"),
        ("written by", ", ".join(f"{k} {v}" for k, v in sorted((info.get("versions") or {}).items()))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows if v not in (None, "", {}))


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _pct(value: Any) -> str:
    return f"{value:.3f}%" if isinstance(value, (int, float)) else "?"
