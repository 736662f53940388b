"""A long task sequence from the offline data: CLR's recommended config against norm + head, SupSup, ER and DER++.

The paper (Analysis 1) follows task 1's accuracy through 53 tasks. The data that installs offline has six sources, so
the sequence is built from class-subset splits and other views of them, 16 tasks in all (17 when Fashion-MNIST's
Debian package is installed):

- ``elpv``: solar-cell defect probability, 4 classes (task 1: the hardest, so forgetting shows);
- ``animal_a_b``: Animal-MNIST, two classes each (5 tasks over the 10 classes);
- ``mnist_a_b``: MNIST digit pairs (5 tasks);
- ``uci_0-4`` / ``uci_5-9``: the 8x8 UCI digits, halves of the classes;
- ``lfw_faces``: faces vs non-faces;
- ``mnist_rot90``: all ten digits rotated by 90 degrees (a new input distribution, rotated-MNIST style);
- ``animal_8px``: all ten animals, downsampled to 8x8 first (another resolution);
- ``fashion_0-4``: five Fashion-MNIST classes, where installed.

Every method learns the tasks in that order (task-incremental: a head per task, the task id given at test time)
with the shared recipe of :mod:`benchmarks.continual_baselines`, and after each task every task seen so far is
evaluated again. Reported: average accuracy and forgetting after the last task, task 1's accuracy after every task
(``<name>_task1.png``), bytes stored per task, and compute per task normalised to per-task full fine-tuning, measured
as training seconds per task (wall clock, one thread, the same batches) divided by full fine-tuning's. The replay
methods keep ``--replay`` images per task (the tasks are small).

The default (64 training images per task, 3 epochs, 32 px, six methods) took 27 minutes on one thread of a heavily
shared 2-core machine (``benchmarks/results/continual_long_sequence.md``)::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.long_sequence

``--max-train 300 --epochs 8 --image-size 64`` is the budget of the five-task comparison (a few hours on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clr_timm
from benchmarks import cl_methods as cl
from benchmarks.continual_baselines import METHODS, Method, MethodResult, _with, plot_first_task, run_method
from examples import offline_assets as assets
from examples.continual import PreparedTask, Recipe, build_model, format_matrix

__all__ = ["RECOMMENDED_LR", "SPEC", "build_sequence", "compute_ratio", "format_table", "main", "sequence_spec"]

View = Callable[[np.ndarray], np.ndarray]


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, 1, axes=(-2, -1)))


def _lowres(side: int) -> View:
    def view(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).float().unsqueeze(1)
        small = torch.nn.functional.interpolate(t, size=(side, side), mode="area")
        return small.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()

    return view


SPEC: list[tuple[str, str, tuple[int, ...] | None, View | None]] = [
    ("elpv", "elpv", None, None),
    ("animal_0_1", "animal_mnist", (0, 1), None),
    ("mnist_0_1", "mnist", (0, 1), None),
    ("uci_0-4", "uci_digits", (0, 1, 2, 3, 4), None),
    ("animal_2_3", "animal_mnist", (2, 3), None),
    ("mnist_2_3", "mnist", (2, 3), None),
    ("lfw_faces", "lfw_faces", None, None),
    ("animal_4_5", "animal_mnist", (4, 5), None),
    ("mnist_4_5", "mnist", (4, 5), None),
    ("mnist_rot90", "mnist", None, _rot90),
    ("animal_6_7", "animal_mnist", (6, 7), None),
    ("mnist_6_7", "mnist", (6, 7), None),
    ("uci_5-9", "uci_digits", (5, 6, 7, 8, 9), None),
    ("animal_8_9", "animal_mnist", (8, 9), None),
    ("mnist_8_9", "mnist", (8, 9), None),
    ("animal_8px", "animal_mnist", None, _lowres(8)),
    ("fashion_0-4", "fashion_mnist", (0, 1, 2, 3, 4), None),
]
"""(task name, source task of ``examples/offline_assets.py``, classes kept or None for all, image view or None)."""


def sequence_spec(available: Iterable[str] | None = None) -> list[tuple[str, str, tuple[int, ...] | None, View | None]]:
    """The tasks of :data:`SPEC` whose source data is installed (all but Fashion-MNIST with the pip extras)."""
    have = set(assets.available_tasks() if available is None else available)
    return [s for s in SPEC if s[1] in have]


def _subset(x: torch.Tensor, y: torch.Tensor, keep: Sequence[int] | None, n: int | None, seed: int):
    """The images of classes ``keep`` (relabelled 0..k-1), then a stratified sample of ``n`` of them."""
    if keep is not None:
        mask = torch.isin(y, torch.tensor(keep))
        x, y = x[mask], torch.searchsorted(torch.tensor(sorted(keep)), y[mask])
    idx = np.arange(len(y))
    if n is not None and n < len(y):
        idx = assets._stratified_take(y.numpy(), idx, n, np.random.default_rng(seed))
    return x[idx], y[idx]


def build_sequence(
    image_size: int, mean, std, *, max_train: int, max_test: int, seed: int = 0, available: Iterable[str] | None = None
) -> list[PreparedTask]:
    """The long sequence as prepared tasks (float ``N x 3 x S x S``), each source loaded once."""
    sources: dict[str, assets.TaskData] = {}
    tasks = []
    for name, source, keep, view in sequence_spec(available):
        if source not in sources:
            sources[source] = assets.load_task(source, seed=seed)
        data = sources[source]
        xs, raw = [], (0, 0)
        for x, y, n, k in ((data.x_train, data.y_train, max_train, 1), (data.x_test, data.y_test, max_test, 2)):
            x, y = _subset(x, y, keep, n, seed * 10 + k)
            if view is not None:
                x = torch.from_numpy(view(x.numpy()))
            raw = tuple(x.shape[-2:])
            xs.append(assets.tensor_dataset(x, y, image_size, mean, std).tensors)
        classes = [data.classes[c] for c in (keep or range(data.num_classes))]
        tasks.append(PreparedTask(name, classes, *xs[0], *xs[1], source_size=raw))
    return tasks


RECOMMENDED_LR = {"tf_efficientnet_lite0": 1e-2, "tf_efficientnet_lite1": 1e-2, "mobilenetv2_100": 1e-3}
"""Learning rate of the recommended config per model (chosen on validation images, like the config itself)."""


def _methods(model: torch.nn.Module, name: str, replay: int) -> dict[str, Method]:
    """The compared methods: the recommended CLR config of ``model``'s family and the baselines."""
    config = clr_timm.CLRConfig.recommended(model)
    lr = RECOMMENDED_LR.get(name, 2e-3)
    fields = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if getattr(clr_timm.CLRConfig(), k) != v)
    recommended = Method("recommended", f"CLR, CLRConfig.recommended ({fields or 'the paper'})", "clr", lr,
                         config=config)  # fmt: skip
    er, derpp = METHODS["er"], METHODS["derpp"]
    return {
        "recommended": recommended,
        "norm_head": METHODS["norm_head"],
        "supsup_frozen_bn": METHODS["supsup_frozen_bn"],
        "er": replace(er, label=f"ER ({replay} images / task)", strategy=_with(cl.ER, replay, replay=True)),
        "derpp": replace(derpp, label=f"DER++ ({replay} images / task)", strategy=_with(cl.DERpp, replay, replay=True)),
        "full": METHODS["full"],
    }


def compute_ratio(results: Sequence[MethodResult]) -> dict[str, float | None]:
    """Mean training seconds per task of each method over per-task full fine-tuning's (None without a full row)."""
    full = next((r for r in results if r.key == "full"), None)
    if full is None:
        return {r.key: None for r in results}
    return {r.key: statistics.mean(r.task_seconds) / statistics.mean(full.task_seconds) for r in results}


def format_table(results: Sequence[MethodResult]) -> str:
    """One row per method: accuracy, forgetting, task 1 first and last, bytes per task, compute vs full FT."""
    ratio = compute_ratio(results)
    lines = [
        "| method | lr | avg acc (%) | forgetting (pts) | task 1 just learnt / final (%) | stored per task "
        "(% of backbone bytes) | head | replay memory | params trained (% of backbone) | s / task "
        "| compute vs full FT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = f"{100 * r.matrix[0][0]:.1f} / {100 * r.matrix[-1][0]:.1f}"
        stored = f"{r.per_task_stored_bytes:,} B ({100 * r.per_task_stored_bytes / (4 * r.backbone):.2f}%)"
        share = "—" if ratio[r.key] is None else f"{ratio[r.key]:.2f}"
        lines.append(
            f"| {r.label} | {r.lr:g} | {100 * r.average_accuracy:.1f} | {100 * r.forgetting:.1f} | {first} | "
            f"{stored} | {r.head_params:,} | {r.replay_bytes:,} B | {r.percent_trained:.1f} | "
            f"{r.seconds_per_task:.1f} | {share} |"
        )
    return "\n".join(lines)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--methods", nargs="+", default=["recommended", "norm_head", "supsup_frozen_bn", "er", "derpp",
                                                    "full"])  # fmt: skip
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-train", type=int, default=64, help="training images per task (%(default)s)")
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--replay", type=int, default=10, help="images per task in ER's and DER++'s memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="continual_long_sequence")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, help="train nothing: rewrite <name>.md and the plot from a run's JSON")
    return p.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> list[MethodResult]:
    """Run every method over the sequence; write ``<out>/<name>.{md,json}`` and ``<out>/<name>_task1.png``."""
    args = parse_args(argv)
    if args.from_json:
        return _rerender(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, mean, std = build_model(args.model, 10)
    base.eval()
    methods = _methods(base, args.model, args.replay)
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(methods)}")
    tasks = build_sequence(args.image_size, mean, std, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    recipe = Recipe(epochs=args.epochs)
    names = [t.name for t in tasks]
    results: list[MethodResult] = []
    for key in args.methods:
        result = run_method(methods[key], base, tasks, recipe, seed=args.seed, progress=not args.no_progress)
        results.append(result)
        print(
            f"{result.label}: {100 * result.average_accuracy:.1f}%\n{format_matrix(names, result.matrix)}", flush=True
        )
        _write(args, argv, tasks, recipe, results, time.perf_counter() - started)
    print(format_table(results))
    return results


def _rerender(args: argparse.Namespace) -> list[MethodResult]:
    """The table and plot of an earlier run, from its JSON (the header keeps that run's command and settings)."""
    saved = json.loads(args.from_json.read_text())
    fields = set(MethodResult.__dataclass_fields__)
    results = [MethodResult(**{k: v for k, v in r.items() if k in fields}) for r in saved["results"]]
    out = Path(args.out)
    md = out / f"{args.name}.md"
    header = md.read_text().split("\n| method |")[0] if md.is_file() else ""
    md.write_text(header + "\n" + format_table(results) + "\n")
    plot_first_task(
        results, [t["name"] for t in saved["tasks"]], out / f"{args.name}_task1.png", highlight="recommended"
    )
    return results


def _write(args, argv, tasks: Sequence[PreparedTask], recipe: Recipe, results, seconds: float) -> None:
    command = " ".join(["python -m benchmarks.long_sequence", *(list(argv) if argv is not None else sys.argv[1:])])
    header = (
        f"# Continual learning over a {len(tasks)}-task sequence\n\nGenerated by `{command}` in {seconds / 60:.0f} min "
        f"on {torch.get_num_threads()} CPU thread(s) (torch {torch.__version__}).\n\n{args.model}, offline ImageNet "
        f"weights, {args.image_size} px, {recipe.epochs} epochs per task, batch {recipe.batch_size}, seed {args.seed}; "
        "tasks in order: "
        + ", ".join(f"{t.name} ({len(t.x_train)} train / {len(t.x_test)} test)" for t in tasks)
        + ". *compute vs full FT*: measured training seconds per task over per-task full fine-tuning's (same batches, "
        "one thread, a shared machine: about +-20%). *stored per task*: float32 bytes each task adds beside its head "
        "(SupSup: its bit mask).\n\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(header + format_table(results) + "\n")
    plot_first_task(results, [t.name for t in tasks], out / f"{args.name}_task1.png", highlight="recommended")
    payload = {
        "settings": {k: v for k, v in vars(args).items()},
        "tasks": [
            {"name": t.name, "classes": t.classes, "train": len(t.x_train), "test": len(t.x_test)} for t in tasks
        ],
        "results": [asdict(r) for r in results],
        "compute_vs_full": compute_ratio(results),
        "wall_seconds": seconds,
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
