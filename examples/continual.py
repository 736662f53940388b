"""Continual learning with CLR: learn tasks one after another on one frozen backbone, and forget nothing.

Each task gets its own CLR adapter (reprogramming kernels, norm layers and head) on a shared frozen ImageNet backbone,
held side by side in a :class:`clr_timm.MultiTaskModel`. After each task every task seen so far is evaluated again,
which fills the accuracy matrix ``acc[i][j]`` (accuracy on task ``j`` after learning task ``i``); forgetting is
measured from it, not assumed. At the end the saved adapter files are loaded into a freshly built backbone and
evaluated once more, and the task-agnostic entropy oracle routes the pooled test images without being told their task.

Offline by default: real ImageNet weights and real datasets that ship inside registry packages
(``examples/offline_assets.py``). Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE python examples/continual.py                   # about 5 minutes on 2 CPU cores
    python examples/continual.py --quick                                   # seconds: the test's tiny settings
    python examples/continual.py --epochs 12 --image-size 96 --max-train 2000
    python examples/continual.py --model resnet50 --pretrained --image-size 160   # any timm model, hub weights

Outputs in ``--out`` (default ``runs/continual``): ``results.json``, ``continual.png`` (accuracy matrix and per-task
accuracy), and ``adapters/<task>/clr_adapter.safetensors``, one per task, which ``clr_timm.load_adapter`` and
``clr_timm.MultiTaskModel.from_pretrained`` load.

The training recipe (pretrained BatchNorm statistics kept while the norm affines train, AdamW at 2e-3 for kernels,
norms and head alike, cosine schedule, light random-affine augmentation, label smoothing 0.1) came out of a small
search on held-out validation images; the README's recipe notes give the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clr_timm
from examples import offline_assets as assets

__all__ = [
    "DEFAULT_TASKS",
    "default_tasks",
    "QUICK_TASKS",
    "PreparedTask",
    "Recipe",
    "average_accuracy",
    "build_model",
    "evaluate",
    "forgetting",
    "main",
    "make_optimizer",
    "parse_args",
    "plot_results",
    "prepare_tasks",
    "random_affine",
    "recalibrate_batchnorm",
    "run",
    "train_task",
]

DEFAULT_TASKS = ("animal_mnist", "mnist", "elpv", "uci_digits", "lfw_faces")
"""The default task sequence: silhouettes, digits, solar-cell defects, 8x8 digits, faces vs non-faces (all real data,
all installed by pip: ``.[examples]`` and ``examples/requirements-offline-nodeps.txt``). Fashion-MNIST, which needs a
Debian package, stays available as an optional task: ``--tasks animal_mnist mnist fashion_mnist elpv uci_digits``."""
QUICK_TASKS = ("uci_digits", "lfw_faces")
"""Two tiny tasks for ``--quick`` (the test)."""
CLR_KERNEL_SUFFIX = ".clr.weight"
"""State-dict suffix of the reprogramming kernels: they get their own learning rate."""


def default_tasks() -> list[str]:
    """The default sequence, less the tasks whose data is not installed (none, after the README's install)."""
    installed = set(assets.available_tasks())
    missing = [t for t in DEFAULT_TASKS if t not in installed]
    if missing:
        print(f"note: skipping {', '.join(missing)} (data not installed; see examples/offline_assets.py)")
    return [t for t in DEFAULT_TASKS if t in installed]


@dataclass(frozen=True)
class Recipe:
    """How one task is trained; every method of ``benchmarks/continual_baselines.py`` shares it (except ``lr``).

    Attributes:
        epochs: Passes over the task's training images.
        batch_size: Images per step.
        lr: Peak learning rate of AdamW (weight decay 0) for every trainable tensor but the CLR kernels.
        clr_lr: Peak learning rate of the CLR reprogramming kernels (``None``: ``lr``; 10x ``lr`` was worse).
        label_smoothing: Cross-entropy label smoothing.
        augment: Small random affine transforms (rotation up to 8 degrees, scale 0.9-1.1, shift up to 8%); no flips
            or crops, which would change a digit's meaning.
        warmup_epochs: Linear warm-up before the cosine decay to zero.
    """

    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    clr_lr: float | None = None
    label_smoothing: float = 0.1
    augment: bool = True
    warmup_epochs: float = 0.5


@dataclass
class PreparedTask:
    """A task's images preprocessed once for the model: float ``N x 3 x S x S`` tensors and int64 labels."""

    name: str
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source_size: tuple[int, int] = (0, 0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def prepare_tasks(
    names: Sequence[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    max_train: int | None,
    max_test: int | None,
    seed: int = 0,
) -> list[PreparedTask]:
    """Load real tasks (stratified subsamples) and preprocess them at ``image_size``.

    Raises:
        examples.offline_assets.AssetNotInstalledError: If a task's data is not installed (the message says how).
    """
    tasks = []
    for name in names:
        data = assets.load_task(name, max_train=max_train, max_test=max_test, seed=seed)
        ds_train = assets.tensor_dataset(data.x_train, data.y_train, image_size, mean, std)
        ds_test = assets.tensor_dataset(data.x_test, data.y_test, image_size, mean, std)
        tasks.append(
            PreparedTask(
                name=name,
                classes=list(data.classes),
                x_train=ds_train.tensors[0],
                y_train=ds_train.tensors[1],
                x_test=ds_test.tensors[0],
                y_test=ds_test.tensors[1],
                source_size=data.image_size,
            )
        )
    return tasks


def build_model(name: str, num_classes: int, *, pretrained: bool = False) -> tuple[nn.Module, tuple, tuple]:
    """A timm model with real ImageNet weights, and the input mean and std those weights expect.

    Args:
        name: timm model name.
        num_classes: Size of the (freshly initialised) classifier.
        pretrained: Use timm's hub weights (``timm.create_model(name, pretrained=True)``, needs internet). Without it
            the offline weights of ``examples/offline_assets.py`` are used, which exist for a few models only.

    Returns:
        ``(model, mean, std)``.
    """
    import timm

    if pretrained:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes)
        mean, std = assets.input_mean_std(model)
        return model, mean, std
    if name not in assets.OFFLINE_WEIGHTS:
        raise SystemExit(
            f"no offline weights for {name!r} (offline: {sorted(assets.OFFLINE_WEIGHTS)}); pass --pretrained to use "
            "timm's hub weights (needs internet)"
        )
    return assets.load_pretrained(name, num_classes=num_classes), *assets.input_mean_std(name)


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts, one per image (border pixels repeated into the gaps)."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-8.0, 8.0) * (math.pi / 180.0)
    scale = uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, uniform(-0.16, 0.16)], 1), torch.stack([sin, cos, uniform(-0.16, 0.16)], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_optimizer(
    model: nn.Module, recipe: Recipe, lr: float | None = None, clr_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (no weight decay) over the trainable parameters; CLR kernels in their own group at ``recipe.clr_lr``."""
    lr = recipe.lr if lr is None else lr
    clr_lr = clr_lr if clr_lr is not None else (recipe.clr_lr if recipe.clr_lr is not None else lr)
    kernels, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (kernels if name.endswith(CLR_KERNEL_SUFFIX) else others).append(p)
    groups = [{"params": g, "lr": r} for g, r in ((others, lr), (kernels, clr_lr)) if g]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, weight_decay=0.0)


def make_timm_optimizer(
    model: nn.Module, recipe: Recipe, weight_decay: float, decay_kernels: bool = False
) -> torch.optim.Optimizer:
    """AdamW from timm's ``create_optimizer_v2`` at ``recipe.lr`` and ``weight_decay``, as timm's train.py builds it.

    timm never decays 1-D tensors (norm affines) nor what ``model.no_weight_decay()`` names, which on an attached model
    includes the CLR kernels. ``decay_kernels`` groups the parameters as timm did before that (every tensor of more
    than one dimension decays, kernels included): the "before" of the README's weight-decay measurement.
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    group_fn = (lambda m: param_groups_weight_decay(m, weight_decay)) if decay_kernels else None
    return create_optimizer_v2(model, "adamw", lr=recipe.lr, weight_decay=weight_decay, param_group_fn=group_fn)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_task(
    model: nn.Module,
    task: PreparedTask,
    recipe: Recipe,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    train_mode: bool = True,
    desc: str | None = None,
    progress: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    around_step: Callable[[Callable[[], None]], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters on one task with the recipe; returns the seconds of each epoch.

    Args:
        model: The model; only parameters with ``requires_grad`` change (and BatchNorm statistics in train mode).
        task: The task.
        recipe: Epochs, batch size, schedule, augmentation, label smoothing.
        optimizer: Default: :func:`make_optimizer` with the recipe's learning rates.
        seed: Seed of the batch order and the augmentation.
        train_mode: Put the model in train mode (False: eval mode, e.g. a linear probe's frozen BatchNorm).
        desc: Progress bar label.
        progress: Show a tqdm progress bar.
        loss_fn: ``loss_fn(x_augmented, y, x)`` returns the loss of one batch (default: label-smoothed cross-entropy
            of ``model(x_augmented)``); continual-learning baselines add their regularisers or replay here.
        around_step: ``around_step(step)`` must call ``step()`` (the optimizer step) once; it sees the gradients
            before and the parameters after (Synaptic Intelligence's path integral).
    """
    from tqdm.auto import tqdm

    optimizer = optimizer or make_optimizer(model, recipe)
    steps = math.ceil(len(task.x_train) / recipe.batch_size)
    scheduler = _schedule(optimizer, recipe.epochs * steps, round(recipe.warmup_epochs * steps))
    generator = torch.Generator().manual_seed(seed)
    model.train(train_mode)
    seconds = []
    with tqdm(total=recipe.epochs * steps, desc=desc, unit="batch", disable=not progress, leave=True) as bar:
        for epoch in range(recipe.epochs):
            start = time.perf_counter()
            batches = assets.iterate_batches(
                task.x_train, task.y_train, recipe.batch_size, shuffle=True, seed=seed * 1000 + epoch
            )
            for xb, yb in batches:
                xa = random_affine(xb, generator) if recipe.augment else xb
                if loss_fn is None:
                    loss = F.cross_entropy(model(xa), yb, label_smoothing=recipe.label_smoothing)
                else:
                    loss = loss_fn(xa, yb, xb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if around_step is None:
                    optimizer.step()
                else:
                    around_step(optimizer.step)
                scheduler.step()
                bar.update()
                bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{loss.item():.3f}", refresh=False)
            seconds.append(time.perf_counter() - start)
    model.eval()
    return seconds


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate the running statistics of every BatchNorm that updates them, as exact averages over ``x``.

    After training with batch statistics, the exponential running averages lag behind the final weights; one
    cumulative pass over the training images fixes that (as in SWA's ``update_bn``). BatchNorms held in eval mode
    by CLR (frozen statistics) are left alone.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m, (momentum, mean, var, count) in zip(bns, saved, strict=True):
            m.momentum = momentum
            if int(m.num_batches_tracked) == 0:  # held in eval mode (frozen statistics): put its values back
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.eval()


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 128
) -> float:
    """Top-1 accuracy of ``model`` (already in eval mode) on ``x``, ``y``, in fixed batches (deterministic)."""
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def average_accuracy(matrix: Sequence[Sequence[float | None]]) -> float:
    """Mean of the last row of the accuracy matrix: accuracy on every task after learning all of them."""
    final = [a for a in matrix[-1] if a is not None]
    return sum(final) / len(final)


def forgetting(matrix: Sequence[Sequence[float | None]]) -> tuple[list[float], float]:
    """Forgetting of each task but the last (best accuracy before the end minus final accuracy), and its mean.

    Args:
        matrix: ``matrix[i][j]``: accuracy on task ``j`` after learning task ``i`` (``None`` for ``j > i``).

    Returns:
        ``(per_task, mean)``; the mean is 0.0 for a single task.
    """
    last = len(matrix) - 1
    per_task = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return per_task, (sum(per_task) / len(per_task) if per_task else 0.0)


def format_matrix(names: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> str:
    """The accuracy matrix as a markdown table (percent), rows: after learning task i, columns: task j."""
    lines = ["| after learning | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, row in enumerate(matrix):
        cells = ["" if a is None else f"{100 * a:.1f}" for a in row]
        lines.append(f"| {i + 1}. {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def oracle_routing(
    mt: clr_timm.MultiTaskModel, tasks: Sequence[PreparedTask], batch: int = 128, progress: bool = True
) -> dict[str, Any]:
    """Route every test image of every task with the entropy oracle, without telling it the task.

    Each batch is routed by :class:`clr_timm.multitask.EntropyOracle` (the task whose head is least uncertain) and then
    classified in one mixed-task pass, ``mt(x, tasks=routes)``.

    Returns:
        Routing accuracy (overall and per true task), the routing confusion counts, and task-agnostic accuracy
        (routed to the right task and classified correctly).
    """
    from tqdm.auto import tqdm

    names = [t.name for t in tasks]
    confusion = [[0] * len(names) for _ in names]
    right_class = [0] * len(names)
    mt.eval()
    total = sum(math.ceil(len(t.x_test) / batch) for t in tasks)
    with tqdm(total=total, desc="entropy oracle", unit="batch", disable=not progress, leave=True) as bar:
        for j, t in enumerate(tasks):
            for i in range(0, len(t.x_test), batch):
                xb, yb = t.x_test[i : i + batch], t.y_test[i : i + batch]
                routes = mt.predict_task(xb)
                logits = mt(xb, tasks=routes)
                for route, out, label in zip(routes, logits, yb.tolist(), strict=True):
                    confusion[j][names.index(route)] += 1
                    right_class[j] += int(route == t.name and int(out.argmax()) == label)
                bar.update()
    sizes = [len(t.x_test) for t in tasks]
    routed = [confusion[j][j] for j in range(len(names))]
    return {
        "routing_accuracy": sum(routed) / sum(sizes),
        "routing_accuracy_per_task": {n: r / s for n, r, s in zip(names, routed, sizes, strict=True)},
        "task_agnostic_accuracy": sum(right_class) / sum(sizes),
        "routing_confusion": {"rows_true_task_columns_routed_to": names, "counts": confusion},
    }


def _per_task_cost(mt: clr_timm.MultiTaskModel, task: str, adapter_file: Path) -> dict[str, Any]:
    mt.set_task(task)
    c = clr_timm.count_parameters(mt.model)
    trained = c.clr + c.norm_affine
    return {
        "per_task": c.per_task,
        "per_task_trained": trained,
        "head": c.head,
        "per_task_with_head": c.per_task_with_head,
        "backbone": c.backbone,
        "percent_of_backbone": c.percent_of_backbone,
        "percent_of_backbone_trained": 100.0 * trained / c.backbone,
        "breakdown": {"clr": c.clr, "norm_affine": c.norm_affine, "norm_stats": c.norm_stats},
        "adapter_file_bytes": adapter_file.stat().st_size,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Learn ``args.tasks`` in sequence with one CLR adapter each; evaluate, save, plot. Returns the results."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters_dir = out / "adapters"
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clr_lr=args.clr_lr,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
    )
    config = clr_timm.CLRConfig(depthwise=args.depthwise, update_norm_stats=args.update_norm_stats)
    progress = not args.no_progress

    model, mean, std = build_model(args.model, 10, pretrained=args.pretrained)
    tasks = prepare_tasks(
        args.tasks, args.image_size, mean, std, max_train=args.max_train, max_test=args.max_test, seed=args.seed
    )
    names = [t.name for t in tasks]
    print(
        f"{args.model} ({'timm hub' if args.pretrained else 'offline'} ImageNet weights), {args.image_size} px, "
        f"{len(tasks)} tasks: " + ", ".join(f"{t.name} ({len(t.x_train)}/{len(t.x_test)})" for t in tasks)
    )
    mt = clr_timm.MultiTaskModel(model, config)

    matrix: list[list[float | None]] = []
    epoch_seconds: dict[str, list[float]] = {}
    for i, task in enumerate(tasks):
        torch.manual_seed(args.seed + i)  # the head's initialisation: as in benchmarks/continual_baselines.py
        mt.add_task(task.name, task.num_classes, label_names=task.classes)
        mt.set_task(task.name)
        optimizer = None  # make_optimizer's: no weight decay
        if args.weight_decay:  # the current task's tensors are bound into mt.model under the model's own names
            optimizer = make_timm_optimizer(mt.model, recipe, args.weight_decay, args.decay_clr_kernels)
        epoch_seconds[task.name] = train_task(
            mt,
            task,
            recipe,
            optimizer=optimizer,
            seed=args.seed + i,
            desc=f"[{i + 1}/{len(tasks)}] {task.name}",
            progress=progress,
        )
        if config.update_norm_stats and args.recalibrate_bn:
            recalibrate_batchnorm(mt, task.x_train)
        mt.save_pretrained(adapters_dir, tasks=[task.name], overwrite=True)
        row: list[float | None] = [None] * len(tasks)
        for j in range(i + 1):
            mt.set_task(names[j])
            row[j] = evaluate(mt, tasks[j].x_test, tasks[j].y_test)
        matrix.append(row)
        print("  accuracy after this task: " + ", ".join(f"{names[j]} {100 * row[j]:.1f}%" for j in range(i + 1)))

    # Measured, not assumed: a freshly built backbone with the adapters loaded from their files.
    fresh, _, _ = build_model(args.model, 10, pretrained=args.pretrained)
    reloaded = clr_timm.MultiTaskModel.from_pretrained(fresh, adapters_dir, tasks=names).eval()
    reloaded_accuracy = {}
    for t in tasks:
        reloaded.set_task(t.name)
        reloaded_accuracy[t.name] = evaluate(reloaded, t.x_test, t.y_test)
    oracle = oracle_routing(reloaded, tasks, progress=progress)

    per_task_forgetting, mean_forgetting = forgetting(matrix)
    costs = {t.name: _per_task_cost(mt, t.name, adapters_dir / t.name / clr_timm.adapter.ADAPTER_FILE) for t in tasks}
    first = costs[names[0]]
    results: dict[str, Any] = {
        "model": args.model,
        "weights": "timm hub" if args.pretrained else "offline (examples/offline_assets.py)",
        "config": config.to_dict(),
        "recipe": asdict(recipe),
        "settings": {
            k: getattr(args, k)
            for k in (
                "image_size",
                "max_train",
                "max_test",
                "seed",
                "recalibrate_bn",
                "threads",
                "quick",
                "weight_decay",
                "decay_clr_kernels",
            )
        },
        "tasks": [
            {
                "name": t.name,
                "num_classes": t.num_classes,
                "train_images": len(t.x_train),
                "test_images": len(t.x_test),
                "source_image_size": list(t.source_size),
            }
            for t in tasks
        ],
        "accuracy_matrix": matrix,
        "final_accuracy": {n: matrix[-1][j] for j, n in enumerate(names)},
        "accuracy_just_after_learning": {n: matrix[j][j] for j, n in enumerate(names)},
        "average_accuracy": average_accuracy(matrix),
        "forgetting": mean_forgetting,
        "forgetting_per_task": dict(zip(names, per_task_forgetting, strict=False)),
        "reloaded_accuracy": reloaded_accuracy,
        "reloaded_matches_final": all(reloaded_accuracy[n] == matrix[-1][j] for j, n in enumerate(names)),
        "oracle": oracle,
        "parameters_per_task": costs,
        "per_task_parameters": first["per_task"],
        "per_task_percent_of_backbone": first["percent_of_backbone"],
        "backbone_parameters": first["backbone"],
        "train_seconds_per_epoch": {n: sum(s) / len(s) for n, s in epoch_seconds.items()},
        "train_seconds": sum(sum(s) for s in epoch_seconds.values()),
        "adapters": {n: str(adapters_dir / n / clr_timm.adapter.ADAPTER_FILE) for n in names},
        "environment": {
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "clr_timm": clr_timm.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    }
    results["wall_seconds"] = time.perf_counter() - started
    figure = plot_results(results, out / "continual.png")
    results["figure"] = str(figure)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_summary(results)
    return results


def _print_summary(results: dict[str, Any]) -> None:
    names = [t["name"] for t in results["tasks"]]
    cost = results["parameters_per_task"][names[0]]
    oracle = results["oracle"]
    print("\nAccuracy (%) on each task (columns) after learning each task (rows):\n")
    print(format_matrix(names, results["accuracy_matrix"]))
    print(
        f"\naverage accuracy {100 * results['average_accuracy']:.1f}% | forgetting {100 * results['forgetting']:.1f} "
        f"points | reloaded from files: {'identical' if results['reloaded_matches_final'] else 'DIFFERENT'}"
    )
    print(
        f"per task: {cost['per_task']:,} values without head ({cost['percent_of_backbone']:.2f}% of the "
        f"{cost['backbone']:,}-parameter backbone; {cost['per_task_trained']:,} trained = "
        f"{cost['percent_of_backbone_trained']:.2f}%), head {cost['head']:,}, adapter file "
        f"{cost['adapter_file_bytes'] / 1e6:.2f} MB"
    )
    print(
        f"task-agnostic (entropy oracle): routing {100 * oracle['routing_accuracy']:.1f}%, "
        f"task and class right {100 * oracle['task_agnostic_accuracy']:.1f}%"
    )
    print(f"train {results['train_seconds']:.0f} s, wall {results['wall_seconds']:.0f} s; files in {results['figure']}")


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Save the accuracy matrix as a heatmap and each task's accuracy as bars, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [t["name"] for t in results["tasks"]]
    matrix = np.array([[np.nan if a is None else 100 * a for a in row] for row in results["accuracy_matrix"]])
    n = len(names)
    fig, (ax_m, ax_b) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1, 1.25]})
    image = ax_m.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            color = "black" if matrix[i, j] > 60 else "white"
            ax_m.text(j, i, f"{matrix[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
    ax_m.set_xticks(range(n), names, rotation=30, ha="right", fontsize=8)
    ax_m.set_yticks(range(n), [f"after {k}" for k in names], fontsize=8)
    ax_m.set_xlabel("evaluated task")
    ax_m.set_title("accuracy matrix (%)", fontsize=10)
    fig.colorbar(image, ax=ax_m, fraction=0.046, pad=0.04)

    x = np.arange(n)
    just = [100 * results["accuracy_just_after_learning"][k] for k in names]
    final = [100 * results["final_accuracy"][k] for k in names]
    routed = [100 * results["oracle"]["routing_accuracy_per_task"][k] for k in names]
    width = 0.27
    ax_b.bar(x - width, just, width, label="just after learning it")
    ax_b.bar(x, final, width, label="after learning all tasks")
    ax_b.bar(x + width, routed, width, label="entropy-oracle routing")
    for xi, v in zip(x, final, strict=True):
        ax_b.text(xi, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax_b.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax_b.set_ylim(0, 122)
    ax_b.set_yticks(range(0, 101, 20))
    ax_b.set_ylabel("test accuracy / routing accuracy (%)", fontsize=8)
    ax_b.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    cost = results["parameters_per_task"][names[0]]
    ax_b.set_title(
        f"avg {100 * results['average_accuracy']:.1f}%, forgetting {100 * results['forgetting']:.1f} points, "
        f"{cost['percent_of_backbone_trained']:.2f}% of backbone trained per task",
        fontsize=10,
    )
    fig.suptitle(f"CLR on {results['model']}: {n} tasks in sequence", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` replaces the sizes with tiny ones (those explicitly given still win)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=None, help=f"task sequence (default: {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default 8)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution in pixels (default 64)")
    p.add_argument("--max-train", type=int, default=None, help="training images per task (default 500)")
    p.add_argument("--max-test", type=int, default=None, help="test images per task (default 250)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument(
        "--lr", type=float, default=Recipe.lr, help="peak lr of kernels, norms and heads (default %(default)g)"
    )
    p.add_argument("--clr-lr", type=float, default=None, help="peak lr of CLR kernels (default: --lr)")
    p.add_argument("--label-smoothing", type=float, default=Recipe.label_smoothing)
    p.add_argument("--no-augment", action="store_true", help="no random affine augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/continual", help="output folder (default %(default)s)")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (default %(default)s)")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="use timm's hub weights for --model (needs internet); default: offline weights from registry packages",
    )
    p.add_argument("--depthwise", choices=["clr", "skip", "scale"], default="clr", help="CLRConfig.depthwise")
    p.add_argument(
        "--update-norm-stats",
        action="store_true",
        help="BatchNorm statistics update in train mode (the paper); default: pretrained statistics kept",
    )
    p.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="with --update-norm-stats: re-estimate each task's statistics after training",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="train with timm's create_optimizer_v2('adamw', weight_decay=...) at --lr (default 0: the recipe's AdamW "
        "without weight decay); CLR kernels are never decayed",
    )
    p.add_argument(
        "--decay-clr-kernels",
        action="store_true",
        help="with --weight-decay: decay the CLR kernels too, as timm did before clr_timm excluded them (to measure)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quick", action="store_true", help="tiny settings (2 small tasks, 32 px, 1 epoch): a smoke test")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.decay_clr_kernels and not args.weight_decay:
        p.error("--decay-clr-kernels needs --weight-decay")
    if args.recalibrate_bn and not args.update_norm_stats:
        p.error("--recalibrate-bn needs --update-norm-stats (frozen statistics are never re-estimated)")
    quick = {"tasks": list(QUICK_TASKS), "epochs": 1, "image_size": 32, "max_train": 64, "max_test": 32}
    full = {"tasks": default_tasks, "epochs": Recipe.epochs, "image_size": 64, "max_train": 500, "max_test": 250}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value() if callable(value) else value)
    if args.batch_size is None:
        args.batch_size = 16 if args.quick else Recipe.batch_size
    return args


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """Run the example from command-line arguments; returns the results written to ``<out>/results.json``."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
