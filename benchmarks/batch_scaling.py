"""Does batching pay on this machine? One batch of N images against N single-image forwards, on a MultiTaskModel.

For each model and input size: the median time of one single-task batch of ``--batch`` images, of the same batch
with every image from another task (a mixed batch), and of ``--batch`` forwards of one image each. On GPUs batching
always pays; on CPUs it depends on the model: this is what ``clr-timm serve --max-batch-size`` should follow.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.batch_scaling
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch

import clr_timm


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def measure(name: str, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    mt = clr_timm.MultiTaskModel(timm.create_model(name, num_classes=10))
    tasks = [f"t{i}" for i in range(batch)]
    for task in tasks:
        mt.add_task(task, 10)
    mt.eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        mt.set_task(tasks[0])
        single = _median_seconds(lambda: mt(x, task=tasks[0]), repeats)
        mixed = _median_seconds(lambda: mt(x, tasks=tasks), repeats)
        one_by_one = _median_seconds(lambda: [mt(x[i : i + 1], task=t) for i, t in enumerate(tasks)], repeats)
    return {
        "model": name,
        "input_size": size,
        "batch": batch,
        "single_task_batch_ms": single * 1e3,
        "mixed_batch_ms": mixed * 1e3,
        "one_image_at_a_time_ms": one_by_one * 1e3,
        "batching_gain": one_by_one / single,
    }


def main(argv: Iterable[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "tf_efficientnet_lite0"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="folder for the md and json")
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    rows = [measure(m, s, args.batch, args.repeats) for m in args.models for s in args.sizes]
    lines = [
        f"| model | px | batch of {args.batch}, one task (ms) | mixed tasks (ms) | one image at a time (ms) | gain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input_size']} | {r['single_task_batch_ms']:.0f} | {r['mixed_batch_ms']:.0f} "
            f"| {r['one_image_at_a_time_ms']:.0f} | {r['batching_gain']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "batch_scaling.md").write_text(
        text + f"\n\n`python -m benchmarks.batch_scaling`, {args.threads} threads, torch {torch.__version__}\n"
    )
    (args.results / "batch_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
