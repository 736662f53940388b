"""The ``clr-timm`` command: ``count`` what CLR costs on timm models, ``info`` on adapters, ``push`` / ``pull``,
``extract`` the adapter of a timm training checkpoint.

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
    "run_extract",
    "run_info",
    "run_pull",
    "run_push",
    "run_serve",
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
        ("base weights sha256", _text(base.get("weights_sha256"))),
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


# ------------------------------------------------------------------------------------------------------------ serve


def run_serve(args: argparse.Namespace) -> int:
    """``clr-timm serve``: load the backbone and tasks (checked) and serve them over HTTP until interrupted."""
    import os

    try:
        import uvicorn

        from .serve import create_app, load_model
    except ImportError as e:
        missing = f"clr-timm serve needs the 'serve' extra ({e.name} is missing): pip install 'clr-timm[serve]'"
        raise CLRError(missing) from None
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    hub_kwargs = {"revision": args.revision} if args.revision else {}
    mt = load_model(args.source, tasks, base_weights=args.base_weights, **hub_kwargs)  # checked before serving
    size = (3, args.input_size, args.input_size) if args.input_size else None
    app = create_app(
        mt,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        mode=args.batching,
        admin_token=args.admin_token or os.environ.get("CLR_TIMM_ADMIN_TOKEN") or None,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        data_config={"input_size": size} if size else None,
    )
    print(f"serving {len(mt.tasks)} tasks on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a folder's or Hub repo's tasks over HTTP, batching requests across tasks",
        description="Load the backbone the adapters record (or --base-weights), check it against their fingerprint, "
        "and serve every task over HTTP: POST /v1/tasks/TASK/predict (multipart field 'image'), GET /v1/tasks, "
        "/healthz, /metrics (Prometheus), and token-protected /v1/admin/tasks. Needs clr-timm[serve].",
    )
    serve.add_argument("source", metavar="SOURCE", help="save_pretrained folder, 'hf-hub:org/name' or adapter file")
    serve.add_argument("--tasks", help="comma-separated tasks to serve (default: all)")
    serve.add_argument("--revision", help="branch, tag or commit of a Hub repo")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (%(default)s)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="most requests per forward (%(default)s)")
    serve.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for a batch (%(default)s)"
    )
    serve.add_argument(
        "--batching",
        choices=["cross-task", "same-task", "none"],
        default="cross-task",
        help="group any tasks, one task per batch, or no batching (%(default)s)",
    )
    serve.add_argument(
        "--base-weights",
        metavar="FILE",
        help="backbone weights (timm state_dict .safetensors, or checkpoint .pth/.pth.tar) instead of downloading",
    )
    serve.add_argument(
        "--admin-token",
        help="bearer token of the admin routes (default: $CLR_TIMM_ADMIN_TOKEN, which other users cannot see in ps; "
        "none: admin routes disabled)",
    )
    serve.add_argument("--max-upload-mb", type=int, default=10, help="largest request body in MiB (%(default)s)")
    serve.add_argument("--input-size", type=int, help="square input size instead of the base model's")
    serve.set_defaults(func=run_serve)


# ---------------------------------------------------------------------------------------------------------- extract


def run_extract(args: argparse.Namespace) -> int:
    """``clr-timm extract``: a timm training checkpoint's adapter, as an adapter file; prints its path."""
    from .checkpoint import extract_adapter

    config = CLRConfig.from_json(args.config) if args.config else None
    path = extract_adapter(
        args.checkpoint,
        args.output,
        ema=args.ema,
        task=args.task,
        base_weights=args.base_weights,
        model=args.model,
        num_classes=args.num_classes,
        config=config,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(path)
    return 0


def _add_extract_command(subparsers: argparse._SubParsersAction) -> None:
    extract = subparsers.add_parser(
        "extract",
        help="the adapter a timm train.py run saved in its checkpoint, as an adapter file",
        description="Read a checkpoint written by timm's train.py with clr_timm.attach(model) inserted after "
        "create_model (model_best.pth.tar, last.pth.tar, checkpoint-N.pth.tar, or a plain state_dict) without running "
        "any code in it, rebuild the model from the run's arguments, check its frozen backbone against --base-weights, "
        "and write the adapter, recording the base model it was trained on.",
    )
    extract.add_argument("checkpoint", help="timm checkpoint (.pth.tar) or state_dict")
    extract.add_argument("-o", "--output", required=True, help="adapter file to write (.safetensors)")
    ema = extract.add_mutually_exclusive_group()
    ema.add_argument("--ema", action="store_true", default=None, help="the EMA weights (state_dict_ema)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="the trained weights (state_dict)")
    extract.add_argument("--task", help="task name to record")
    extract.add_argument(
        "--base-weights",
        metavar="FILE",
        help="weights the run started from (safetensors, timm checkpoint): checked against the checkpoint's backbone "
        "and recorded by SHA-256 (default: the run's --pretrained-path / --initial-checkpoint, if any)",
    )
    extract.add_argument("--model", help="timm model name, for a checkpoint without timm's training arguments")
    extract.add_argument("--num-classes", type=int, help="classes of the head (default: the run's)")
    extract.add_argument("--config", help="the CLRConfig the run attached with, as JSON (default: detected)")
    extract.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="storage dtype (default: the model's)")
    extract.add_argument("--overwrite", action="store_true", help="replace a file holding another task's adapter")
    extract.set_defaults(func=run_extract)


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
    _add_extract_command(subparsers)
    _add_serve_command(subparsers)
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
