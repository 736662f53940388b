"""The ``clr-timm`` command: ``count`` what CLR costs on timm models, ``info`` on an adapter, ``push`` / ``pull``.

Every command has ``--help``. Errors print ``error: <message>`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ._cli_hub import add_hub_commands
from .adapter import ADAPTER_FILE, read_adapter
from .attach import CLR_ATTR, plan_targets
from .config import DEPTHWISE_POLICIES, CLRConfig
from .count import CURATED_MODELS, ModelCount, count_model, format_table, resolve_model_names
from .errors import CLRError

__all__ = [
    "add_count_arguments",
    "build_parser",
    "config_from_args",
    "count_rows",
    "format_adapter",
    "main",
    "model_names_from_args",
    "run_count",
    "run_info",
    "write_csv",
    "write_json",
]

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


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
    parser.add_argument("--kernel-size", type=int, default=3, help="size k of the k x k CLR kernels (%(default)s)")
    parser.add_argument(
        "--depthwise",
        choices=DEPTHWISE_POLICIES,
        default="clr",
        help="after a depthwise conv: a full CLR kernel (the paper), nothing, or one scale per channel (%(default)s)",
    )
    parser.add_argument(
        "--frozen-norms",
        action="store_true",
        help="keep normalisation layers frozen and shared (no per-task affines or BatchNorm statistics)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    parser.add_argument("--csv", metavar="PATH", help="also write the counts as CSV")


def config_from_args(args: argparse.Namespace) -> CLRConfig:
    """The CLR config that ``count``'s arguments describe."""
    return CLRConfig(kernel_size=args.kernel_size, depthwise=args.depthwise, train_norms=not args.frozen_norms)


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
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def write_csv(path: str | Path, rows: list[ModelCount]) -> None:
    """The counts as CSV, one row per model."""
    dicts = [r.to_dict() for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]) if dicts else ["model"])
        writer.writeheader()
        writer.writerows(dicts)


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


def _kind(key: str, head: tuple[str, ...] | None) -> str:
    """The kind of an adapter tensor from its key; ``head`` is None when the head's modules are unknown."""
    if key.endswith(f".{CLR_ATTR}.weight"):
        return "clr"
    if head and key.startswith(head):
        return "head"
    if key.rsplit(".", 1)[-1] in _STAT_BUFFERS:
        return "norm_stats"
    return "norm_affine" if head is not None else "norm_affine / head"


def _head_prefixes(architecture: str | None, num_classes: int | None, config: CLRConfig) -> tuple[str, ...] | None:
    """Module prefixes of the head of ``architecture``, from a weightless (meta) build of it; None when unknown."""
    import timm
    import torch

    if not architecture or not timm.is_model(architecture):
        return None
    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=num_classes or 1)
    except Exception:  # a model that needs real tensors to build: tell norms and head apart no further
        return None
    return tuple(f"{h}." for h in plan_targets(model, config).head)


def format_adapter(path: str | Path) -> str:
    """What an adapter file holds: its metadata, and its tensors grouped by kind with their sizes."""
    adapter = read_adapter(path)
    head = _head_prefixes(adapter.architecture, adapter.num_classes, adapter.config)
    groups: dict[str, list[torch.Tensor]] = {}
    for key, t in adapter.tensors.items():
        groups.setdefault(_kind(key, head), []).append(t)
    labels = adapter.label_names or []
    more = f", ... ({len(labels)} in all)" if len(labels) > 10 else ""
    rows = [
        ("adapter", adapter.path),
        ("base model", adapter.base_model or "unknown"),
        ("timm hub id", adapter.hf_hub_id),
        ("backbone fingerprint", adapter.backbone_fingerprint),
        ("task", adapter.task),
        ("classes", adapter.num_classes),
        ("label names", ", ".join(labels[:10]) + more),
        ("config", adapter.config.to_json()),
        ("format version", adapter.metadata.get("clr_format_version")),
        ("written by", ", ".join(f"{k} {v}" for k, v in sorted(adapter.versions.items()))),
        ("file size", f"{Path(adapter.path).stat().st_size:,} bytes"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows if v not in (None, "")]
    lines += ["", f"{'tensors':<18}{'count':>7}{'values':>14}{'bytes':>14}  dtype"]
    totals = [0, 0, 0]
    for kind in ("clr", "norm_affine", "norm_stats", "head", "norm_affine / head"):
        ts = groups.get(kind, [])
        if not ts:
            continue
        row = [len(ts), sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)]
        dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in ts}))
        lines.append(f"{kind:<18}{row[0]:>7}{row[1]:>14,}{row[2]:>14,}  {dtypes}")
        totals = [a + b for a, b in zip(totals, row)]
    lines.append(f"{'total':<18}{totals[0]:>7}{totals[1]:>14,}{totals[2]:>14,}")
    return "\n".join(lines)


def _is_hub_source(source: str) -> bool:
    return source.startswith("hf-hub:") or (
        not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/"))
    )


def run_info(args: argparse.Namespace) -> int:
    """``clr-timm info``: what an adapter file, a save_pretrained folder or a Hub repo holds."""
    from ._cli_hub import format_description
    from .hub import describe

    source = args.source
    hub = _is_hub_source(source)
    if not hub and not args.json:
        path = Path(source) / (args.task or "") if Path(source).is_dir() else Path(source)
        if path.is_file() or (path / ADAPTER_FILE).is_file():
            print(format_adapter(path))
            return 0
    hub_kwargs = {k: getattr(args, k) for k in ("revision", "token") if hub and getattr(args, k) is not None}
    info = describe(source, task=args.task, **hub_kwargs)
    print(json.dumps(info, indent=1, default=str) if args.json else format_description(info))
    return 0


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
        description="Print an adapter's metadata (task, classes, config, base model, fingerprint, versions) and its "
        "tensors grouped by kind with their sizes. SOURCE is an adapter file, a folder, 'hf-hub:org/name' or "
        "'org/name' (a Hub repo when no such local path exists).",
    )
    info.add_argument("source", metavar="PATH_OR_REPO", help="adapter file, folder or Hub repo")
    info.add_argument("--task", help="one task of a folder or Hub repo")
    info.add_argument("--revision", help="branch, tag or commit of a Hub repo")
    info.add_argument("--token", help="Hub token, for private repos")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=run_info)

    add_hub_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clr-timm`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clr-timm count --all | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
