"""Registry-wide coverage: does CLR attach correctly to every timm architecture?

For each architecture (each ``timm.list_models()`` name; ``--all`` adds every pretrained tag) it builds the model at
random init, runs a small input, attaches CLR and checks that:

* the attached model computes what the original computed (eval, fp32, max abs difference <= 1e-6; the table says
  how many were bit-identical),
* a backward pass of a train-mode output reaches every reprogramming kernel (non-None, finite gradient),
* detach gives back the original outputs,
* for models with re-parameterisable blocks (``fuse`` / ``reparameterize`` / ``switch_to_deploy``): attaching after
  ``timm.utils.reparameterize_model`` computes what the fused model computed, and re-parameterising an attached model
  raises :class:`clr_timm.CLRError` instead of silently dropping the adapter.

Train mode is used for the gradient check because that is how adapters are trained (drop path and dropout are off at
timm's defaults, and batch 2 keeps BatchNorm defined on 1x1 feature maps).

Usage::

    python benchmarks/registry_coverage.py                  # every architecture (about 1,400: hours on 2 cores)
    python benchmarks/registry_coverage.py --shard 3/16 --jsonl /tmp/cov3.jsonl   # one of 16 parallel runs
    python benchmarks/registry_coverage.py --sample         # the smallest architecture of each timm model file
    python benchmarks/registry_coverage.py resnet50 fastvit_t8 --jsonl /tmp/coverage.jsonl
    python benchmarks/registry_coverage.py --print-sample   # smallest architecture of each timm model file
    python benchmarks/registry_coverage.py --print-sample /tmp/coverage.jsonl   # fastest to check in that walk
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from torch import nn

import clr_timm
from clr_timm.attach import CLR_ATTR
from clr_timm.count import count_model

__all__ = [
    "Result",
    "architectures",
    "check_model",
    "fastest_per_module",
    "has_reparameterisable_blocks",
    "smallest_per_module",
    "main",
]

NUM_CLASSES = 10
INPUT_SIZE = 64
TOLERANCE = 1e-6
_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


@dataclass
class Result:
    """What happened to one model.

    status is ``"passed"``, ``"failed"`` (CLR broke something: the reason says what), ``"not_applicable"`` (no conv
    larger than 1x1: nothing to reprogram) or ``"model_error"`` (the plain model itself does not build or run here).
    """

    name: str
    module: str
    status: str
    reason: str = ""
    input_size: int | None = None
    targets: int = 0
    max_abs_diff: float | None = None
    bit_identical: bool | None = None
    reparam: str = ""  # "", "checked"
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)


def architectures(include_tags: bool = False) -> dict[str, list[str]]:
    """timm model names grouped by the model file (``timm.list_modules()``) that defines them."""
    groups = {}
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if include_tags:
            names = sorted(set(names) | set(timm.list_models(module=module, pretrained=True)))
        if names:
            groups[module] = names
    return groups


def _module_of(name: str) -> str:
    base = name.split(".")[0]
    for module, names in architectures().items():
        if base in names:
            return module
    return "?"


def smallest_per_module() -> dict[str, str]:
    """The architecture with the smallest backbone (meta-device count) in each timm model file: the test sample."""
    sample = {}
    for module, names in architectures().items():
        sizes = []
        for name in names:
            try:
                sizes.append((count_model(name, num_classes=NUM_CLASSES).count.backbone, name))
            except clr_timm.CLRError:  # does not build at all: not a candidate
                continue
        if sizes:
            sample[module] = min(sizes)[1]
    return sample


def fastest_per_module(jsonl: str) -> dict[str, str]:
    """The architecture of each model file that was fastest to check in a walk recorded with ``--jsonl``."""
    best: dict[str, Result] = {}
    with open(jsonl) as f:
        for line in f:
            r = Result(**json.loads(line))
            if r.module not in best or r.seconds < best[r.module].seconds:
                best[r.module] = r
    return {m: best[m].name for m in sorted(best)}


def has_reparameterisable_blocks(model: nn.Module) -> bool:
    return any(callable(getattr(type(m), k, None)) for m in model.modules() for k in _REPARAM_METHODS)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, bool]:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), False
    diff = max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), default=0.0)
    return diff, all(torch.equal(x, y) for x, y in zip(a, b))


def _build(name: str, img_size: int | None, kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"pretrained": False, "num_classes": NUM_CLASSES, **kwargs}
    if img_size is not None:
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs).eval()


def _input(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _cfg_sizes(model: nn.Module) -> list[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes = [cfg.get(k) for k in ("min_input_size", "input_size", "test_input_size")]
    return sorted({int(s[-1]) for s in sizes if s})


def _runnable(
    name: str, size: int, kwargs: dict[str, Any]
) -> tuple[nn.Module, int | None, torch.Tensor, list[torch.Tensor]]:
    """Build and run the plain model on a small input: ``img_size=size`` first, then timm's default config at
    ``size``, ``2 * size`` and its pretrained config's input sizes. Returns the model, the ``img_size`` it was built
    with, the input and the outputs."""
    errors = []
    attempts: list[tuple[int | None, int]] = [(size, size), (None, size), (None, 2 * size)]
    for img_size, input_size in attempts:
        try:
            model = _build(name, img_size, kwargs)
            if img_size is None and len(attempts) == 3:
                attempts += [(None, s) for s in _cfg_sizes(model) if s not in (size, 2 * size)]
            x = _input(input_size)
            with torch.no_grad():
                out = _tensors(model(x))
            if not out:
                raise RuntimeError("forward returned no tensor")
            return model, img_size, x, out
        except Exception as e:  # any failure of the plain model: try the next configuration
            first = (str(e).splitlines() or [""])[0][:200]
            errors.append(f"img_size={img_size} input={input_size}: {type(e).__name__}: {first}")
    raise RuntimeError("; ".join(errors))


def _check_reparameterisation(name: str, img_size: int | None, kwargs: dict[str, Any], x: torch.Tensor) -> list[str]:
    """Attach after fusing gives the fused model's outputs; fusing an attached model raises CLRError."""
    from timm.utils.model import reparameterize_model

    problems = []
    fused = reparameterize_model(_build(name, img_size, kwargs), inplace=True)
    with torch.no_grad():
        expected = _tensors(fused(x))
        clr_timm.attach(fused)
        got = _tensors(fused(x))
    diff, _ = _max_diff(expected, got)
    if not diff <= TOLERANCE:
        problems.append(f"attach after reparameterize_model: outputs differ by {diff:.3g}")
    attached = clr_timm.attach(_build(name, img_size, kwargs))
    try:
        reparameterize_model(attached, inplace=True)
        problems.append("reparameterize_model on an attached model did not raise CLRError")
    except clr_timm.CLRError:
        pass
    return problems


@contextlib.contextmanager
def _time_limit(seconds: int | None) -> Iterator[None]:
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_model(
    name: str,
    size: int = INPUT_SIZE,
    module: str | None = None,
    reparam: bool = True,
    detach: bool = True,
    **kwargs: Any,
) -> Result:
    """Run every coverage check on one model; never raises.

    Args:
        name: timm model name.
        size: Input size tried first (the model is built with ``img_size=size`` where it takes one).
        module: The timm model file, for the report (looked up when not given).
        reparam: Also check re-parameterisation on models that have ``fuse`` / ``reparameterize`` methods.
        detach: Also check that detach gives back the original outputs.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``depth=2`` to check a giant architecture quickly).
    """
    start = time.perf_counter()
    result = Result(name, module or _module_of(name), "passed")
    try:
        model, img_size, x, before = _runnable(name, size, kwargs)
    except Exception as e:
        result.status, result.reason = "model_error", f"plain model does not run: {e}"
        result.seconds = time.perf_counter() - start
        return result
    result.input_size = x.shape[-1]
    problems = []
    try:
        plan = clr_timm.plan_targets(model)
        result.targets = len(plan.targets)
        if not plan.targets:
            result.status, result.reason = "not_applicable", "no conv with a kernel larger than 1x1"
            return result
        clr_timm.attach(model)
        with torch.no_grad():
            after = _tensors(model(x))
        result.max_abs_diff, result.bit_identical = _max_diff(before, after)
        if not result.max_abs_diff <= TOLERANCE:
            problems.append(f"attached outputs differ from the original by {result.max_abs_diff:.3g}")

        model.train()
        loss = sum(t.float().sum() for t in _tensors(model(x)) if t.requires_grad)
        if not isinstance(loss, torch.Tensor):
            problems.append("train-mode output does not require grad")
        else:
            loss.backward()
            modules = dict(model.named_modules())
            missing = [t.name for t in plan.targets if getattr(modules[t.name], CLR_ATTR).weight.grad is None]
            bad = [
                t.name
                for t in plan.targets
                if t.name not in missing and not torch.isfinite(getattr(modules[t.name], CLR_ATTR).weight.grad).all()
            ]
            if missing:
                n = len(plan.targets)
                problems.append(f"no gradient reached {len(missing)}/{n} CLR kernels, e.g. {missing[:3]}")
            if bad:
                problems.append(f"non-finite gradient on {len(bad)} CLR kernels, e.g. {bad[:3]}")
        model.zero_grad(set_to_none=True)
        model.eval()
        if detach:
            clr_timm.detach(model)
            with torch.no_grad():
                restored = _tensors(model(x))
            diff, _ = _max_diff(before, restored)
            if not diff <= TOLERANCE:
                problems.append(f"detached outputs differ from the original by {diff:.3g}")
        if reparam and detach and has_reparameterisable_blocks(model):
            result.reparam = "checked"
            problems += _check_reparameterisation(name, img_size, kwargs, x)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:300]} (at {tb.filename}:{tb.lineno})")
    finally:
        result.seconds = time.perf_counter() - start
    if problems:
        result.status, result.reason, result.details = "failed", problems[0], problems
    return result


def _summary(results: list[Result], seconds: float) -> str:
    counts = Counter(r.status for r in results)
    lines = [
        f"tried {len(results)}: passed {counts['passed']}, failed {counts['failed']}, "
        f"not applicable (no conv > 1x1) {counts['not_applicable']}, plain model does not run {counts['model_error']} "
        f"[{seconds / 60:.1f} min]",
    ]
    passed = [r for r in results if r.status == "passed"]
    if passed:
        exact = sum(bool(r.bit_identical) for r in passed)
        lines.append(
            f"outputs bit-identical in {exact}/{len(passed)} passed models (all within {TOLERANCE:g}); "
            f"re-parameterisation checked on {sum(r.reparam == 'checked' for r in passed)}"
        )
    for status in ("failed", "model_error", "not_applicable"):
        group = [r for r in results if r.status == status]
        if group:
            lines.append(f"\n{status} ({len(group)}):")
            lines += [f"  {r.module}/{r.name}: {r.reason}" for r in group]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: one per architecture)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="every model name, pretrained tags included")
    group.add_argument("--sample", action="store_true", help="the smallest architecture of each timm model file")
    group.add_argument(
        "--print-sample",
        nargs="?",
        const="",
        metavar="JSONL",
        help="print the sample as JSON and exit: the smallest architecture of each model file, or with a --jsonl file "
        "of an earlier walk, the one that was fastest to check",
    )
    parser.add_argument("--size", type=int, default=INPUT_SIZE, help="input size tried first (default %(default)s)")
    parser.add_argument("--module", action="append", help="only models of this timm model file (repeatable)")
    parser.add_argument("--no-reparam", action="store_true", help="skip the re-parameterisation checks")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model (default %(default)s)")
    parser.add_argument("--jsonl", help="append one JSON line per model to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th model starting at I (parallel runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.print_sample is not None:
        sample = fastest_per_module(args.print_sample) if args.print_sample else smallest_per_module()
        print(json.dumps(sample, indent=4))
        return 0
    if args.models:
        todo = [(_module_of(n), n) for n in args.models]
    elif args.sample:
        todo = list(smallest_per_module().items())
    else:
        todo = [(m, n) for m, names in architectures(args.all).items() for n in names]
    if args.module:
        todo = [(m, n) for m, n in todo if m in args.module]
    shard, shards = (int(v) for v in args.shard.split("/"))
    todo = todo[shard::shards]

    start = time.perf_counter()
    results = []
    for i, (module, name) in enumerate(todo, 1):
        with _time_limit(args.timeout):
            try:
                r = check_model(name, args.size, module, reparam=not args.no_reparam)
            except TimeoutError as e:
                r = Result(name, module, "failed", f"TimeoutError: {e}", seconds=float(args.timeout))
        results.append(r)
        print(f"[{i}/{len(todo)}] {module}/{name}: {r.status} {r.reason} ({r.seconds:.1f} s)", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(asdict(r)) + "\n")
    print()
    print(_summary(results, time.perf_counter() - start))
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
