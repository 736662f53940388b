"""The ``clr-timm`` command: ``count`` what CLR costs on timm models, ``info`` on adapters, ``push`` / ``pull``.

Every command has ``--help``. Errors print ``error: <message>`` on stderr and exit with status 2, without a traceback.
Text that comes from files or repos (names, labels, versions, error messages quoting them) is printed with control
characters escaped and long values cut, so an adapter cannot rewrite or flood the terminal.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import DEPTHWISE_POLICIES, PRESETS, CLRConfig
from .count import CURATED_MODELS, ModelCount, count_model, format_table, resolve_model_names
from .errors import CLRError, printable
from .hub import describe, download_adapter, push_folder
from .source import parse_source

__all__ = [
    "add_count_arguments",
    "build_parser",
    "config_from_args",
    "count_rows",
    "format_description",
    "main",
    "model_names_from_args",
    "run_count",
    "run_info",
    "run_pull",
    "run_push",
    "write_csv",
    "write_json",
]


def add_count_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``clr-timm count``, shared with ``benchmarks/param_count.py``."""
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="timm model names or wildcards ('resnet*'); default: a curated set of well-known CNNs",
    )
    parser.add_argument("--all", action="store_true", help="every architecture in timm's registry")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the per-task head (%(default)s)")
    parser.add_argument(
        "--variant",
        choices=sorted(PRESETS),
        default="clr",
        help="a named CLR variant: the authors' --method names or ours (%(default)s: the paper's); the options "
        "below override its fields",
    )
    parser.add_argument("--kernel-size", type=int, help="size k of the k x k CLR kernels (default: the variant's)")
    parser.add_argument(
        "--depthwise",
        choices=DEPTHWISE_POLICIES,
        help="after a depthwise conv: a full CLR kernel (the paper), nothing, or one scale per channel "
        "(default: the variant's)",
    )
    parser.add_argument(
        "--frozen-norms",
        action="store_true",
        help="keep normalisation layers frozen and shared (no per-task affines or BatchNorm statistics)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    parser.add_argument("--csv", metavar="PATH", help="also write the counts as CSV")


def config_from_args(args: argparse.Namespace) -> CLRConfig:
    """The CLR config that ``count``'s arguments describe: the variant, with the fields the options set."""
    overrides = {"kernel_size": args.kernel_size, "depthwise": args.depthwise}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.frozen_norms:
        overrides["train_norms"] = False
    return CLRConfig.preset(getattr(args, "variant", "clr"), **overrides)


def model_names_from_args(args: argparse.Namespace) -> list[str]:
    """The models ``count``'s arguments name: given ones (wildcards expanded), ``--all``, or the curated set."""
    import timm

    if args.all:
        if args.models:
            raise CLRError("give model names or --all, not both")
        return timm.list_models()
    return resolve_model_names(args.models) if args.models else list(CURATED_MODELS)


def count_rows(
    names: Sequence[str], config: CLRConfig, num_classes: int, progress: bool = False
) -> tuple[list[ModelCount], dict[str, str]]:
    """Count every model; returns the counts and, by model name, why the others could not be counted."""
    rows, failed = [], {}
    for i, name in enumerate(names, 1):
        try:
            rows.append(count_model(name, config, num_classes))
        except CLRError as e:
            failed[name] = str(e)
        if progress:
            print(f"\r[{i}/{len(names)}] {name:<60}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return rows, failed


def write_json(path: str | Path, rows: list[ModelCount], failed: dict[str, str] | None = None) -> None:
    """The counts as JSON: ``{"models": [...], "failed": {name: reason}}``."""
    data = {"models": [r.to_dict() for r in rows], "failed": failed or {}}
    _write(path, json.dumps(data, indent=1) + "\n")


def write_csv(path: str | Path, rows: list[ModelCount]) -> None:
    """The counts as CSV, one row per model."""
    dicts = [r.to_dict() for r in rows]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dicts[0]) if dicts else ["model"])
    writer.writeheader()
    writer.writerows(dicts)
    _write(path, text.getvalue())


def _write(path: str | Path, text: str) -> None:
    try:
        with open(path, "w", newline="") as f:
            f.write(text)
    except OSError as e:
        raise CLRError(f"cannot write {printable(str(path))}: {e.strerror or e}") from e


def run_count(args: argparse.Namespace) -> int:
    """``clr-timm count``: print the markdown table (and write JSON / CSV)."""
    names = model_names_from_args(args)
    config = config_from_args(args)
    start = time.perf_counter()
    rows, failed = count_rows(names, config, args.num_classes, progress=args.all and sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows, failed)
    if args.csv:
        write_csv(args.csv, rows)
    on_cpu = [r.model for r in rows if r.built_on != "meta"]
    if args.all or on_cpu or failed:
        print(f"\ncounted {len(rows)} of {len(names)} models in {seconds:.0f} s", file=sys.stderr)
    if on_cpu:
        print(f"built on the CPU (not on the meta device): {', '.join(on_cpu)}", file=sys.stderr)
    for reason in failed.values():
        print(f"error: {reason}", file=sys.stderr)
    return 2 if failed and not rows else 0


# ------------------------------------------------------------------------------------------------------------ info


_MAX_ERROR = 2000  # characters of an error message printed


def _text(value: Any) -> str | None:
    """A value from a file, for the terminal: escaped and cut (:func:`~clr_timm.errors.printable`); None stays None."""
    return None if value is None else printable(str(value))


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _pct(value: Any) -> str:
    return f"{value:.3f}%" if isinstance(value, (int, float)) else "?"


def _tensor_table(kinds: dict[str, dict[str, Any]]) -> list[str]:
    """The adapter's tensors grouped by kind (reprogramming, norms, head), with their sizes and a total."""
    lines = [f"{'tensors':<18}{'count':>7}{'values':>14}{'bytes':>14}  dtype"]
    totals = [0, 0, 0]
    for kind, g in kinds.items():
        row = [g["count"], g["values"], g["bytes"]]
        lines.append(f"{kind:<18}{row[0]:>7}{row[1]:>14,}{row[2]:>14,}  {', '.join(g['dtypes'])}")
        totals = [a + b for a, b in zip(totals, row)]
    lines.append(f"{'total':<18}{totals[0]:>7}{totals[1]:>14,}{totals[2]:>14,}")
    return lines


def _format_adapter(info: dict[str, Any]) -> str:
    """One adapter: its metadata, what it costs, then its tensors by kind."""
    base, p = info.get("base_model") or {}, info.get("parameters") or {}
    labels = info.get("label_names") or []
    more = f", ... ({len(labels)} in all)" if len(labels) > 10 else ""
    per_task = p and f"{_int(p.get('per_task'))} values ({_pct(p.get('percent_of_backbone'))} of the backbone)"
    versions = sorted((info.get("versions") or {}).items())
    rows = [
        ("adapter", _text(info.get("path"))),
        ("repo", info.get("repo_id") and f"{info['repo_id']} @ {_text(info.get('revision'))}"),
        ("base model", _text(base.get("name")) or "unknown"),
        ("timm hub id", _text(base.get("hf_hub_id"))),
        ("backbone fingerprint", _text(base.get("backbone_fingerprint"))),
        ("task", _text(info.get("task"))),
        ("classes", info.get("num_classes")),
        ("label names", ", ".join(printable(str(n), 80) for n in labels[:10]) + more),
        ("config", info.get("config") and _text(json.dumps(info["config"], sort_keys=True))),
        ("reprogrammed convs", info.get("num_reprogrammed")),
        ("per task", per_task),
        ("format version", info.get("format_version")),
        ("written by", ", ".join(f"{printable(str(k), 40)} {printable(str(v), 40)}" for k, v in versions)),
        ("file size", f"{_int(info.get('file_size'))} bytes"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows if v not in (None, "", {})]
    return "\n".join([*lines, "", *_tensor_table(info.get("tensors_by_kind") or {})])


def format_description(info: dict[str, Any]) -> str:
    """:func:`clr_timm.describe`'s dict as text, for ``clr-timm info``: one adapter, or a folder's or repo's tasks."""
    if info.get("kind") == "adapter":
        return _format_adapter(info)
    lines = [f"{info.get('kind')}: {_text(info.get('repo_id') or info.get('path'))}"]
    if info.get("kind") == "repo":
        lines.append(
            f"revision: {_text(info.get('revision'))} (commit {_text(info.get('commit'))}), "
            f"private: {info.get('private')}"
        )
    tasks = [printable(t) for t in info.get("tasks") or []]
    root = "; plus a root adapter" if info.get("root_adapter") else ""
    lines.append(f"tasks: {', '.join(tasks) if tasks else '(none)'}{root}")
    for a in info.get("adapters") or []:
        p, base = a.get("parameters") or {}, (a.get("base_model") or {}).get("name")
        lines.append(
            f"  {_text(a.get('task')) or '(root)'}: {_int(a.get('num_classes'))} classes, "
            f"{_int(p.get('per_task'))} parameters per task ({_pct(p.get('percent_of_backbone'))} of the backbone), "
            f"{_int(a.get('file_size'))} bytes, base model {_text(base) or 'unknown'}"
        )
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    """``clr-timm info``: what an adapter file, a save_pretrained folder or a Hub repo holds."""
    hub = parse_source(args.source, bare_repo=True).kind == "hub"
    hub_kwargs = {k: getattr(args, k) for k in ("revision", "token") if hub and getattr(args, k) is not None}
    info = describe(args.source, task=args.task, **hub_kwargs)
    print(json.dumps(info, indent=1, default=str) if args.json else format_description(info))
    return 0


# ------------------------------------------------------------------------------------------------------ push, pull


def run_push(args: argparse.Namespace) -> int:
    """``clr-timm push``: upload a save_pretrained folder; prints the commit's (or pull request's) URL."""
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


def run_pull(args: argparse.Namespace) -> int:
    """``clr-timm pull``: download a task's adapter and its clr_config.json; prints the adapter's path."""
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


def _add_hub_commands(subparsers: argparse._SubParsersAction) -> None:
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
    push.set_defaults(func=run_push)

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
    pull.set_defaults(func=run_pull)


def build_parser() -> argparse.ArgumentParser:
    """The ``clr-timm`` argument parser, with one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="clr-timm",
        description="Channel-wise Lightweight Reprogramming (CLR) for timm models: per-task adapter tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    count = subparsers.add_parser(
        "count",
        help="what one task's adapter costs on timm models (no weights are downloaded or built)",
        description="Build timm architectures without weights (on the meta device), attach CLR and print what one "
        "task costs as a markdown table: backbone, CLR kernels, norm affines and statistics, head, per task (without "
        "head) and its share of the backbone, and the adapter's size.",
    )
    add_count_arguments(count)
    count.set_defaults(func=run_count)

    info = subparsers.add_parser(
        "info",
        help="what an adapter file, save_pretrained folder or Hub repo holds",
        description="Print an adapter's metadata (task, classes, config, base model, fingerprint, versions, cost) "
        "and its tensors grouped by kind with their sizes, or the tasks of a folder or Hub repo. SOURCE is an adapter "
        "file, a folder, 'hf-hub:org/name' or 'org/name' (a Hub repo when no such local path exists).",
    )
    info.add_argument("source", metavar="PATH_OR_REPO", help="adapter file, folder or Hub repo")
    info.add_argument("--task", help="one task of a folder or Hub repo")
    info.add_argument("--revision", help="branch, tag or commit of a Hub repo")
    info.add_argument("--token", help="Hub token, for private repos")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=run_info)

    _add_hub_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clr-timm`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLRError as e:
        print(f"error: {printable(str(e), _MAX_ERROR)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clr-timm count --all | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
