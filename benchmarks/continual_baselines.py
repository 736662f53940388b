"""CLR against the usual baselines on the same task sequence, data, budget and seeds: the README's comparison table.

Every method learns the tasks of ``examples/continual.py`` one after another with the same :class:`Recipe` (epochs,
batch size, resolution, AdamW with a cosine schedule, augmentation, label smoothing, seed); only the learning rate
is the method's own (each tuned on held-out validation images, see ``--validation``). After each task every task seen
so far is evaluated again, so forgetting is measured from the accuracy matrix.

Methods:

- ``linear probe``: frozen backbone (BatchNorm in eval mode), a head per task.
- ``norm + head``: per-task norm affines and head (CLR with no reprogramming kernels).
- ``CLR``: the example's recipe (reprogramming kernels after every conv larger than 1x1, norms, head), and the same
  with each depthwise policy (``clr``, ``scale``, ``skip``).
- ``full fine-tuning``: a whole copy of the network per task: the accuracy upper bound at 100% of the backbone per task.
- ``sequential fine-tuning``: one shared backbone trained on each task in turn, a head per task: shows forgetting.
- ``LoRA (PEFT)``: LoRA on every conv that is not depthwise, through PEFT, when it is installed (``pip install
  peft``; optional, not a dependency of clr_timm). PEFT's LoRA cannot target depthwise convs at a rank smaller than
  their channel count.

Regenerate the README table and ``benchmarks/results/continual_baselines.{md,json}`` (about 40 minutes on 2 cores)::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.continual_baselines

Tune on held-out training images instead of the test set (what the learning rates came from)::

    python -m benchmarks.continual_baselines --validation 0.33 --tasks animal_mnist elpv --max-train 600 \\
        --methods full --lr full=1e-4 --out /tmp/tuning
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clr_timm
from examples.continual import (
    DEFAULT_TASKS,
    PreparedTask,
    Recipe,
    average_accuracy,
    build_model,
    evaluate,
    forgetting,
    format_matrix,
    make_optimizer,
    prepare_tasks,
    recalibrate_batchnorm,
    train_task,
)

__all__ = ["METHODS", "Method", "MethodResult", "format_table", "main", "run_method", "split_validation"]


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        key: Short name used on the command line (``--methods``, ``--lr key=value``).
        label: Name in the table.
        kind: ``"clr"`` (any :class:`~clr_timm.CLRConfig` on a :class:`~clr_timm.MultiTaskModel`: CLR, norm + head,
            linear probe), ``"full"``, ``"sequential"`` or ``"lora"``.
        lr: Peak learning rate (everything but CLR kernels).
        clr_lr: Peak learning rate of CLR kernels.
        config: The CLR config of a ``"clr"`` method.
        train_mode: Train in train mode (False: eval mode, frozen BatchNorm statistics).
        recalibrate_bn: Re-estimate BatchNorm statistics on the task's training images after training.
        lora_rank: LoRA rank (``"lora"``).
    """

    key: str
    label: str
    kind: str
    lr: float
    clr_lr: float | None = None
    config: clr_timm.CLRConfig | None = None
    train_mode: bool = True
    recalibrate_bn: bool = False
    lora_rank: int = 8


_FROZEN_STATS = {"update_norm_stats": False}
METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("probe", "linear probe", "clr", 1e-2, config=clr_timm.CLRConfig(include=[], train_norms=False)),
        Method("norm_head", "norm + head", "clr", 1e-2, config=clr_timm.CLRConfig(include=[], **_FROZEN_STATS)),
        Method("clr", "CLR (depthwise=clr, the recipe)", "clr", 2e-3, config=clr_timm.CLRConfig(**_FROZEN_STATS)),
        Method("clr_paper_bn", "CLR, BatchNorm statistics updating (paper)", "clr", 2e-3, config=clr_timm.CLRConfig()),
        Method(
            "clr_scale",
            "CLR, depthwise=scale",
            "clr",
            2e-3,
            config=clr_timm.CLRConfig(depthwise="scale", **_FROZEN_STATS),
        ),
        Method(
            "clr_skip", "CLR, depthwise=skip", "clr", 5e-3, config=clr_timm.CLRConfig(depthwise="skip", **_FROZEN_STATS)
        ),
        Method("full", "full fine-tuning per task", "full", 3e-3),
        Method("sequential", "sequential fine-tuning, shared backbone", "sequential", 3e-3),
        Method("lora", "LoRA r=8 on non-depthwise convs (PEFT)", "lora", 3e-3, train_mode=False),
    )
}
"""The compared methods with their tuned learning rates (README: recipe notes)."""


@dataclass
class MethodResult:
    """What one method did on the task sequence."""

    key: str
    label: str
    lr: float
    clr_lr: float | None
    matrix: list[list[float | None]]
    average_accuracy: float
    forgetting: float
    forgetting_per_task: list[float]
    per_task_trained: int
    per_task_stored: int
    head_params: int
    backbone: int
    seconds_per_epoch: float
    epoch_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def percent_trained(self) -> float:
        return 100.0 * self.per_task_trained / self.backbone

    @property
    def percent_stored(self) -> float:
        return 100.0 * self.per_task_stored / self.backbone


def split_validation(tasks: Sequence[PreparedTask], fraction: float, seed: int) -> list[PreparedTask]:
    """Replace each task's test set by a held-out share of its training images (stratified), for tuning."""
    out = []
    for t in tasks:
        g = torch.Generator().manual_seed(seed)
        val_idx, train_idx = [], []
        for c in range(t.num_classes):
            members = torch.nonzero(t.y_train == c).flatten()
            members = members[torch.randperm(len(members), generator=g)]
            k = round(fraction * len(members))
            val_idx.append(members[:k])
            train_idx.append(members[k:])
        tr = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=g)]
        va = torch.cat(val_idx)
        out.append(replace(t, x_train=t.x_train[tr], y_train=t.y_train[tr], x_test=t.x_train[va], y_test=t.y_train[va]))
    return out


def _set_head(model: nn.Module, head: nn.Module, num_classes: int) -> None:
    """Swap the classifier module of a timm model (found through timm's pretrained_cfg)."""
    path = model.pretrained_cfg.get("classifier", "classifier")
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, head)
    model.num_classes = num_classes


def _fresh_head(model: nn.Module, num_classes: int) -> nn.Module:
    model.reset_classifier(num_classes)
    return model.get_classifier()


def run_method(
    method: Method,
    base: nn.Module,
    tasks: Sequence[PreparedTask],
    recipe: Recipe,
    *,
    seed: int = 0,
    progress: bool = True,
) -> MethodResult:
    """Learn ``tasks`` in sequence with one method, starting from a copy of the pretrained ``base`` each time.

    Args:
        method: What to train and how.
        base: The pretrained model (left unchanged).
        tasks: The task sequence.
        recipe: The shared training budget; the method's own learning rates replace ``recipe.lr`` / ``clr_lr``.
        seed: Seed of heads, batch order and augmentation (the same for every method).
        progress: Show tqdm bars.
    """
    recipe = replace(recipe, lr=method.lr, clr_lr=method.clr_lr)
    names = [t.name for t in tasks]
    backbone = clr_timm.count_parameters(base).backbone
    matrix: list[list[float | None]] = []
    epoch_seconds: list[float] = []
    heads: dict[str, nn.Module] = {}
    models: list[nn.Module] = []
    per_task_trained = per_task_stored = 0
    head_params = 0
    note = ""

    model = copy.deepcopy(base)
    mt: clr_timm.MultiTaskModel | None = None
    if method.kind == "clr":
        mt = clr_timm.MultiTaskModel(model, method.config)
    for i, task in enumerate(tasks):
        torch.manual_seed(seed + i)
        desc = f"{method.key} [{i + 1}/{len(tasks)}] {task.name}"
        if mt is not None:
            mt.add_task(task.name, task.num_classes)
            mt.set_task(task.name)
            trainee: nn.Module = mt
        elif method.kind == "full":
            trainee = copy.deepcopy(base)
            trainee.reset_classifier(task.num_classes)
            models.append(trainee)
        elif method.kind == "sequential":
            heads[task.name] = _fresh_head(model, task.num_classes)
            trainee = model
        elif method.kind == "lora":
            trainee = _lora_model(base, task.num_classes, method.lora_rank)
            models.append(trainee)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
        optimizer = make_optimizer(trainee, recipe)
        epoch_seconds += train_task(
            trainee,
            task,
            recipe,
            optimizer=optimizer,
            seed=seed + i,
            train_mode=method.train_mode,
            desc=desc,
            progress=progress,
        )
        if method.recalibrate_bn:
            recalibrate_batchnorm(trainee, task.x_train)
        if i == 0:
            per_task_trained, per_task_stored, head_params, note = _cost(method, trainee, backbone)
        row: list[float | None] = [None] * len(tasks)
        for j in range(i + 1):
            if mt is not None:
                mt.set_task(names[j])
                row[j] = evaluate(mt, tasks[j].x_test, tasks[j].y_test)
            elif method.kind == "sequential":
                _set_head(model, heads[names[j]], tasks[j].num_classes)
                model.eval()
                row[j] = evaluate(model, tasks[j].x_test, tasks[j].y_test)
                _set_head(model, heads[names[i]], task.num_classes)
            else:
                models[j].eval()
                row[j] = evaluate(models[j], tasks[j].x_test, tasks[j].y_test)
        matrix.append(row)
    per_task, mean_forgetting = forgetting(matrix)
    return MethodResult(
        key=method.key,
        label=method.label,
        lr=method.lr,
        clr_lr=method.clr_lr,
        matrix=matrix,
        average_accuracy=average_accuracy(matrix),
        forgetting=mean_forgetting,
        forgetting_per_task=per_task,
        per_task_trained=per_task_trained,
        per_task_stored=per_task_stored,
        head_params=head_params,
        backbone=backbone,
        seconds_per_epoch=statistics.median(epoch_seconds),
        epoch_seconds=epoch_seconds,
        note=note,
    )


def _cost(method: Method, trainee: nn.Module, backbone: int) -> tuple[int, int, int, str]:
    """(trained per task, stored per task, head, note), heads excluded from the first two."""
    if method.kind == "clr":
        c = clr_timm.count_parameters(trainee.model)
        trained = c.clr + c.norm_affine
        stored = c.per_task
        note = "" if method.config.update_norm_stats or not c.norm_stats else "stored incl. unchanged BN statistics"
        return trained, stored, c.head, note
    if method.kind == "lora":
        trained = [(n, p.numel()) for n, p in trainee.named_parameters() if p.requires_grad]
        lora = sum(k for n, k in trained if "lora_" in n)
        return lora, lora, sum(k for n, k in trained if "lora_" not in n), "BatchNorm frozen (eval mode)"
    head = sum(p.numel() for p in trainee.get_classifier().parameters())
    if method.kind == "full":
        return backbone, backbone, head, "a whole network per task"
    return 0, 0, head, "one backbone, overwritten by each task"


def _lora_model(base: nn.Module, num_classes: int, rank: int) -> nn.Module:
    """A copy of ``base`` with a new head and PEFT LoRA on every non-depthwise conv; only LoRA and head train."""
    import peft

    model = copy.deepcopy(base)
    model.reset_classifier(num_classes)
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not (m.groups > 1 and m.groups == m.in_channels)
    ]
    head = model.pretrained_cfg.get("classifier", "classifier")
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, modules_to_save=[head])
    return peft.get_peft_model(model, config)


def _peft_status() -> str | None:
    """None when PEFT is importable, else why LoRA is skipped."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        return f"PEFT is not installed ({e}); pip install peft to add the LoRA row"
    return None


def _fmt_params(n: int, pct: float) -> str:
    return f"{n:,} ({pct:.2f}%)"


def format_table(results: Sequence[MethodResult]) -> str:
    """The comparison as a markdown table."""
    lines = [
        "| method | lr | avg acc (%) | forgetting (pts) | per-task params trained (% of backbone) | "
        "stored per task | head | s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lr = f"{r.lr:g}" + (f" / kernels {r.clr_lr:g}" if r.clr_lr else "")
        lines.append(
            f"| {r.label} | {lr} | {100 * r.average_accuracy:.1f} | {100 * r.forgetting:.1f} | "
            f"{_fmt_params(r.per_task_trained, r.percent_trained)} | "
            f"{_fmt_params(r.per_task_stored, r.percent_stored)} | {r.head_params:,} | {r.seconds_per_epoch:.1f} |"
        )
    return "\n".join(lines)


def _parse_lrs(items: Sequence[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in METHODS or not value:
            raise SystemExit(f"--lr takes METHOD=LR with METHOD in {sorted(METHODS)}, got {item!r}")
        lrs[key] = float(value)
    return lrs


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-test", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--label-smoothing", type=float, default=Recipe.label_smoothing)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate")
    p.add_argument("--clr-lr", type=float, default=None, help="override the CLR kernels' learning rate")
    p.add_argument(
        "--validation",
        type=float,
        default=0.0,
        help="evaluate on this held-out share of the training images instead of the test set (tuning)",
    )
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for continual_baselines.{md,json}")
    p.add_argument("--name", default="continual_baselines", help="output file stem")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> list[MethodResult]:
    """Run the comparison and write ``<out>/<name>.md`` and ``<out>/<name>.json``."""
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
    )
    lrs = _parse_lrs(args.lr)
    base, mean, std = build_model(args.model, 10, pretrained=args.pretrained)
    base.eval()
    tasks = prepare_tasks(
        args.tasks, args.image_size, mean, std, max_train=args.max_train, max_test=args.max_test, seed=args.seed
    )
    if args.validation:
        tasks = split_validation(tasks, args.validation, args.seed)
    skipped: dict[str, str] = {}
    results: list[MethodResult] = []
    for key in args.methods:
        method = METHODS[key]
        if key in lrs:
            method = replace(method, lr=lrs[key])
        if args.clr_lr is not None and method.clr_lr is not None:
            method = replace(method, clr_lr=args.clr_lr)
        if method.kind == "lora" and (why := _peft_status()):
            skipped[key] = why
            print(f"skipping {method.label}: {why}")
            continue
        result = run_method(method, base, tasks, recipe, seed=args.seed, progress=not args.no_progress)
        results.append(result)
        print(
            f"{method.label}: average {100 * result.average_accuracy:.1f}%, forgetting "
            f"{100 * result.forgetting:.1f} points\n{format_matrix([t.name for t in tasks], result.matrix)}"
        )
    table = format_table(results)
    seconds = time.perf_counter() - started
    split = f"validation ({args.validation:.0%} of the training images)" if args.validation else "test"
    header = (
        f"# Continual learning: CLR against baselines\n\n"
        f"Generated by `python -m benchmarks.continual_baselines {' '.join(argv_to_list(argv))}`".rstrip()
        + f" in {seconds / 60:.0f} min on {torch.get_num_threads()} CPU threads (torch {torch.__version__}).\n\n"
        f"{args.model}, offline ImageNet weights, {args.image_size} px; tasks in order: "
        + ", ".join(f"{t.name} ({len(t.x_train)} train / {len(t.x_test)} {split})" for t in tasks)
        + f". Same budget for every method: {recipe.epochs} epochs, batch {recipe.batch_size}, AdamW (no weight "
        f"decay) with cosine schedule and {recipe.warmup_epochs:g}-epoch warm-up, label smoothing "
        f"{recipe.label_smoothing:g}, {'random-affine augmentation' if recipe.augment else 'no augmentation'}, "
        f"seed {args.seed}; learning rates per method as shown. *avg acc*: mean accuracy over all tasks after the "
        "last one; *forgetting*: best earlier accuracy minus final, averaged over all but the last task. "
        "Per-task parameters exclude the head (listed apart).\n\n"
    )
    if skipped:
        header += "".join(f"Skipped {METHODS[k].label}: {why}.\n\n" for k, why in skipped.items())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(header + table + "\n")
    payload = {
        "settings": {**vars(args), "recipe": asdict(recipe), "evaluated_on": split},
        "tasks": [{"name": t.name, "train": len(t.x_train), "eval": len(t.x_test)} for t in tasks],
        "results": [
            {**asdict(r), "percent_trained": r.percent_trained, "percent_stored": r.percent_stored} for r in results
        ],
        "skipped": skipped,
        "wall_seconds": seconds,
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n" + table)
    return results


def argv_to_list(argv: Iterable[str] | None) -> list[str]:
    return list(argv) if argv is not None else sys.argv[1:]


if __name__ == "__main__":
    main()
