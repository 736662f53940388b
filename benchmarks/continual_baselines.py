"""CLR against the usual baselines on the same task sequence, data, budget and seeds: the README's comparison table.

Every method learns the tasks of ``examples/continual.py`` one after another with the same :class:`Recipe` (epochs,
batch size, resolution, AdamW with a cosine schedule, augmentation, label smoothing, seed). The learning rates of
CLR and its variants, the probe, norm + head, full fine-tuning and LoRA were each tuned on held-out validation images
(``--validation``); the continual-learning baselines train the shared backbone at full fine-tuning's rate, and their
own settings (EWC's lambda, SI's c, SupSup's density, how BatchNorm statistics are handled) come from a small
held-out two-task search (README: recipe notes). After each task every task seen so far is evaluated again, so
forgetting is measured from the accuracy matrix.

Methods:

- ``linear probe``: frozen backbone (BatchNorm in eval mode), a head per task.
- ``norm + head``: per-task norm affines and head (CLR with no reprogramming kernels).
- ``CLR``: the example's recipe (reprogramming kernels after every conv larger than 1x1, norms, head), and the same
  with each depthwise policy (``clr``, ``scale``, ``skip``).
- ``full fine-tuning``: a whole copy of the network per task: the accuracy upper bound at 100% of the backbone per task.
- ``sequential fine-tuning``: one shared backbone trained on each task in turn, a head per task: shows forgetting.
- The paper's continual-learning baselines on that shared backbone (``benchmarks/cl_methods.py``, each written from
  its paper): EWC, online EWC, SI, LwF (regularisation), ER, DER++ (replay), SupSup (parameter isolation).
- ``LoRA (PEFT)``: LoRA on every conv that is not depthwise, through PEFT, when it is installed (``pip install
  peft``; optional, not a dependency of clr_timm). PEFT's LoRA cannot target depthwise convs at a rank smaller than
  their channel count.

``--methods`` takes method keys and the groups ``cl`` (the default: CLR, the continual-learning baselines, the
linear probe and full fine-tuning), ``ablations`` (CLR's variants, norm + head, LoRA) and ``all``. ``--seeds 0 1 2``
repeats everything per seed and reports mean and spread.

Regenerate the README's continual-learning table, ``benchmarks/results/continual_baselines.{md,json}`` and the
task-1 plot ``continual_baselines_task1.png`` (under an hour on 2 cores)::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.continual_baselines

and the ablation table ``continual_ablations.{md,json}`` (500 training images per task as in
``examples/continual.py``; about 40 minutes)::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.continual_baselines --methods ablations --max-train 500 \\
        --name continual_ablations

The placement study on depthwise-separable nets (``--methods placement``: every preset of ``clr_timm.PRESETS``, the
depthwise policies, norm + head, SupSup, LoRA, full fine-tuning; ``benchmarks/results/continual_placement_*``, what
``CLRConfig.recommended`` rests on; ``benchmarks/placement_summary.py`` makes the choice and checks the goal)::

    python -m benchmarks.continual_baselines --methods placement --tasks animal_mnist elpv uci_digits \\
        --image-size 32 --max-train 160 --max-test 200 --epochs 4 --seeds 0 1 2 --threads 1 \\
        --model tf_efficientnet_lite0 --name continual_placement_lite0

and its validation run (``--max-train 240 --validation 0.3333``: 160 training images as above, 80 held out)::

    python -m benchmarks.continual_baselines --methods placement --tasks animal_mnist elpv uci_digits \\
        --image-size 32 --max-train 240 --validation 0.3333 --max-test 200 --epochs 4 --threads 1 \\
        --name continual_placement_val_lite0

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clr_timm
from benchmarks import cl_methods as cl
from examples.continual import (
    PreparedTask,
    Recipe,
    average_accuracy,
    build_model,
    default_tasks,
    evaluate,
    forgetting,
    format_matrix,
    make_optimizer,
    prepare_tasks,
    random_affine,
    recalibrate_batchnorm,
    train_task,
)

__all__ = [
    "GROUPS",
    "METHODS",
    "Method",
    "MethodResult",
    "backward_transfer",
    "format_table",
    "main",
    "run_method",
    "split_validation",
]


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        key: Short name used on the command line (``--methods``, ``--lr key=value``).
        label: Name in the table.
        kind: ``"clr"`` (any :class:`~clr_timm.CLRConfig` on a :class:`~clr_timm.MultiTaskModel`: CLR, norm + head,
            linear probe), ``"full"``, ``"cl"`` (a :mod:`benchmarks.cl_methods` strategy on one shared backbone) or
            ``"lora"``.
        lr: Peak learning rate (everything but CLR kernels).
        clr_lr: Peak learning rate of CLR kernels.
        config: The CLR config of a ``"clr"`` method.
        train_mode: Train in train mode (False: eval mode, frozen BatchNorm statistics).
        recalibrate_bn: Re-estimate BatchNorm statistics on the task's training images after training.
        lora_rank: LoRA rank (``"lora"``).
        strategy: Builds a ``"cl"`` method's strategy from the recipe and the seed.
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
    strategy: Callable[[Recipe, int], cl.Strategy] | None = field(default=None, compare=False, repr=False)


def _with(cls: Callable[..., cl.Strategy], *args, replay: bool = False, **kw) -> Callable[[Recipe, int], cl.Strategy]:
    """A strategy factory: ``cls(*args, **kw)`` plus the recipe's label smoothing (and batch, augmentation, seed)."""

    def build(recipe: Recipe, seed: int) -> cl.Strategy:
        extra = {"label_smoothing": recipe.label_smoothing}
        if replay:
            extra.update(batch_size=recipe.batch_size, augment=random_affine if recipe.augment else None, seed=seed)
        return cls(*args, **kw, **extra)

    return build


_FROZEN_STATS = {"update_norm_stats": False}
_SHARED_LR = 3e-3  # full fine-tuning's tuned rate: every method that trains the shared backbone uses it
_EWC_LAMBDA, _SI_C, _REPLAY_PER_TASK, _SUPSUP_DENSITY = 1e5, 1e7, 50, 0.5  # held-out search: README
# The authors' other placements (clr_timm.config.PRESETS, ours names), each with pretrained BatchNorm statistics like
# the recipe: after 1x1 convs too, a per-channel scale after 1x1 convs, the gated block, the parallel dense 1x1 block.
_PLACEMENT_PRESETS = {
    "clr_full": ("clr-full", "CLR after 1x1 convs too (clr-full, Ghost)"),
    "clr_pointwise_scale": (
        "clr-pointwise-scale",
        "CLR + scale after 1x1 convs (clr-pointwise-scale, Ghost_reduced_v2)",
    ),
    "clr_gated": ("clr-gated", "CLR gated (clr-gated, Ghost_a)"),
    "parallel_1x1": ("parallel-1x1", "parallel dense 1x1 beside every conv (parallel-1x1, li18 / li50)"),
}
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
        *(
            Method(key, label, "clr", 2e-3, config=clr_timm.CLRConfig.preset(preset, **_FROZEN_STATS))
            for key, (preset, label) in _PLACEMENT_PRESETS.items()
        ),
        Method("full", "full fine-tuning per task", "full", _SHARED_LR),
        Method("sequential", "sequential fine-tuning, shared backbone", "cl", _SHARED_LR, strategy=_with(cl.Strategy)),
        Method("ewc", f"EWC (lambda {_EWC_LAMBDA:g})", "cl", _SHARED_LR, strategy=_with(cl.EWC, _EWC_LAMBDA)),
        Method(
            "oewc",
            f"online EWC (lambda {_EWC_LAMBDA:g}, gamma 1)",
            "cl",
            _SHARED_LR,
            strategy=_with(cl.EWC, _EWC_LAMBDA, online=True),
        ),
        Method("si", f"SI (c {_SI_C:g})", "cl", _SHARED_LR, strategy=_with(cl.SI, _SI_C)),
        Method("lwf", "LwF (lambda 1, T 2)", "cl", _SHARED_LR, strategy=_with(cl.LwF)),
        Method(
            "er",
            f"ER ({_REPLAY_PER_TASK} images / task)",
            "cl",
            _SHARED_LR,
            strategy=_with(cl.ER, _REPLAY_PER_TASK, replay=True),
        ),
        Method(
            "derpp",
            f"DER++ ({_REPLAY_PER_TASK} images / task)",
            "cl",
            _SHARED_LR,
            strategy=_with(cl.DERpp, _REPLAY_PER_TASK, replay=True),
        ),
        Method(
            "supsup",
            f"SupSup (task id given, density {_SUPSUP_DENSITY:g})",
            "cl",
            _SHARED_LR,
            strategy=_with(cl.SupSup, _SUPSUP_DENSITY),
        ),
        Method(
            "supsup_frozen_bn",
            "SupSup (density 0.9, pretrained BatchNorm statistics)",
            "cl",
            _SHARED_LR,
            strategy=_with(cl.SupSup, 0.9, task_norm_stats=False),
        ),
        Method("lora", "LoRA r=8 on non-depthwise convs (PEFT)", "lora", 3e-3, train_mode=False),
    )
}
"""The compared methods with their learning rates and method settings (README: recipe notes)."""

GROUPS: dict[str, list[str]] = {
    "cl": [
        *("clr", "probe", "full", "sequential", "ewc", "oewc", "si", "lwf", "er", "derpp", "supsup", "supsup_frozen_bn")
    ],
    "ablations": ["probe", "norm_head", "clr", "clr_paper_bn", "clr_scale", "clr_skip", "full", "sequential", "lora"],
    "placement": [
        *("norm_head", "clr", "clr_scale", "clr_skip", *_PLACEMENT_PRESETS, "supsup_frozen_bn", "lora", "full")
    ],
    "all": list(METHODS),
}
"""Named sets of methods for ``--methods``; ``cl`` is the default."""


@dataclass
class MethodResult:
    """What one method did on the task sequence with one seed."""

    key: str
    label: str
    lr: float
    clr_lr: float | None
    seed: int
    matrix: list[list[float | None]]
    average_accuracy: float
    forgetting: float
    forgetting_per_task: list[float]
    backward_transfer: float
    per_task_trained: int
    per_task_stored: int
    per_task_stored_bytes: int
    extra_state_bytes: int
    replay_bytes: int
    head_params: int
    backbone: int
    seconds_per_epoch: float
    seconds_per_task: float
    epoch_seconds: list[float] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def percent_trained(self) -> float:
        return 100.0 * self.per_task_trained / self.backbone

    @property
    def percent_stored(self) -> float:
        return 100.0 * self.per_task_stored / self.backbone


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): mean over all but the last task of final accuracy minus accuracy just learnt.

    Negative: forgetting; positive: later tasks helped earlier ones. 0.0 for a single task.
    """
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[j][j] for j in range(last)]
    return sum(diffs) / len(diffs) if diffs else 0.0


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
        seed: Seed of heads, batch order, augmentation and replay draws (the same for every method).
        progress: Show tqdm bars.
    """
    recipe = replace(recipe, lr=method.lr, clr_lr=method.clr_lr)
    names = [t.name for t in tasks]
    backbone = clr_timm.count_parameters(base).backbone
    matrix: list[list[float | None]] = []
    epoch_seconds: list[float] = []
    task_seconds: list[float] = []
    models: list[nn.Module] = []
    cost: dict = {}

    mt: clr_timm.MultiTaskModel | None = None
    net: cl.MultiHeadNet | None = None
    strategy: cl.Strategy | None = None
    if method.kind == "clr":
        mt = clr_timm.MultiTaskModel(copy.deepcopy(base), method.config)
    elif method.kind == "cl":
        net = cl.MultiHeadNet(base)
        strategy = method.strategy(recipe, seed)
        strategy.setup(net)
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
        elif net is not None:
            net.add_head(task.name, task.num_classes)
            strategy.before_task(task.name, i, task.x_train, task.y_train)
            trainee = net
        elif method.kind == "lora":
            trainee = _lora_model(base, task.num_classes, method.lora_rank)
            models.append(trainee)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
        started = time.perf_counter()
        optimizer = make_optimizer(trainee, recipe)
        epoch_seconds += train_task(
            trainee,
            task,
            recipe,
            optimizer=optimizer,
            seed=seed + i,
            train_mode=method.train_mode if strategy is None else strategy.train_mode,
            desc=desc,
            progress=progress,
            loss_fn=strategy.loss if strategy else None,
            around_step=strategy.around_step if strategy else None,
        )
        if strategy is not None:
            strategy.after_task(task.name, i, task.x_train, task.y_train)
        if method.recalibrate_bn:
            recalibrate_batchnorm(trainee, task.x_train)
        task_seconds.append(time.perf_counter() - started)
        if i == 0:
            cost = _cost(method, trainee, backbone, strategy)
        row: list[float | None] = [None] * len(tasks)
        for j in range(i + 1):
            if mt is not None:
                mt.set_task(names[j])
                row[j] = evaluate(mt, tasks[j].x_test, tasks[j].y_test)
            elif net is not None:
                strategy.set_eval_task(names[j])
                net.eval()
                row[j] = evaluate(net, tasks[j].x_test, tasks[j].y_test)
            else:
                models[j].eval()
                row[j] = evaluate(models[j], tasks[j].x_test, tasks[j].y_test)
        if strategy is not None:
            strategy.set_eval_task(task.name)
        matrix.append(row)
    if strategy is not None:  # what the method keeps after the whole sequence
        cost.update(extra_state_bytes=strategy.extra_state_bytes(), replay_bytes=strategy.replay_bytes())
    per_task, mean_forgetting = forgetting(matrix)
    return MethodResult(
        key=method.key,
        label=method.label,
        lr=method.lr,
        clr_lr=method.clr_lr,
        seed=seed,
        matrix=matrix,
        average_accuracy=average_accuracy(matrix),
        forgetting=mean_forgetting,
        forgetting_per_task=per_task,
        backward_transfer=backward_transfer(matrix),
        backbone=backbone,
        seconds_per_epoch=statistics.median(epoch_seconds),
        seconds_per_task=statistics.mean(task_seconds),
        epoch_seconds=epoch_seconds,
        task_seconds=task_seconds,
        **cost,
    )


def _cost(method: Method, trainee: nn.Module, backbone: int, strategy: cl.Strategy | None) -> dict:
    """Per-task cost after the first task: trained and stored parameters (heads apart), bytes, note."""
    cost = {"extra_state_bytes": 0, "replay_bytes": 0, "note": ""}
    if method.kind == "clr":
        c = clr_timm.count_parameters(trainee.model)
        trained = c.clr + c.norm_affine
        note = "" if method.config.update_norm_stats or not c.norm_stats else "stored incl. unchanged BN statistics"
        return {**cost, "per_task_trained": trained, "per_task_stored": c.per_task, "head_params": c.head,
                "per_task_stored_bytes": 4 * c.per_task, "note": note}  # fmt: skip
    if method.kind == "lora":
        trained = [(n, p.numel()) for n, p in trainee.named_parameters() if p.requires_grad]
        lora = sum(k for n, k in trained if "lora_" in n)
        head = sum(k for n, k in trained if "lora_" not in n)
        return {**cost, "per_task_trained": lora, "per_task_stored": lora, "head_params": head,
                "per_task_stored_bytes": 4 * lora, "note": "BatchNorm frozen (eval mode)"}  # fmt: skip
    if method.kind == "full":
        head = sum(p.numel() for p in trainee.get_classifier().parameters())
        return {**cost, "per_task_trained": backbone, "per_task_stored": backbone, "head_params": head,
                "per_task_stored_bytes": 4 * backbone, "note": "a whole network per task"}  # fmt: skip
    head = sum(p.numel() for p in trainee.heads[trainee.task].parameters())
    if isinstance(strategy, cl.SupSup):
        bits = strategy.mask_bits()
        return {**cost, "per_task_trained": bits, "per_task_stored": strategy.per_task_stored_values(),
                "head_params": head,
                "per_task_stored_bytes": strategy.per_task_stored_bytes(),
                "note": f"a {bits:,}-bit mask per task over the frozen weights"
                + ("" if strategy.train_mode else "; BatchNorm frozen")}  # fmt: skip
    return {**cost, "per_task_trained": backbone, "per_task_stored": 0, "head_params": head,
            "per_task_stored_bytes": 0, "note": "one backbone, trained by every task in turn"}  # fmt: skip


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


def _fmt_bytes(n: float) -> str:
    if n == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _spread(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean`` for one value, ``mean ± sample std`` for several."""
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def group_by_method(results: Sequence[MethodResult]) -> dict[str, list[MethodResult]]:
    """Results per method key (one per seed), in first-seen order."""
    groups: dict[str, list[MethodResult]] = {}
    for r in results:
        groups.setdefault(r.key, []).append(r)
    return groups


def format_table(results: Sequence[MethodResult]) -> str:
    """The comparison as a markdown table; several seeds of a method are one row, mean ± sample std."""
    lines = [
        "| method | lr | seeds | avg acc (%) | forgetting (pts) | BWT (pts) | params trained per task (% of backbone) "
        "| stored per task | training state | replay memory | head | s / task |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for runs in group_by_method(results).values():
        r = runs[0]
        lr = f"{r.lr:g}" + (f" / kernels {r.clr_lr:g}" if r.clr_lr else "")
        lines.append(
            f"| {r.label} | {lr} | {len(runs)} | {_spread([x.average_accuracy for x in runs])} | "
            f"{_spread([x.forgetting for x in runs])} | {_spread([x.backward_transfer for x in runs])} | "
            f"{_fmt_params(r.per_task_trained, r.percent_trained)} | {_fmt_bytes(r.per_task_stored_bytes)} | "
            f"{_fmt_bytes(r.extra_state_bytes)} | {_fmt_bytes(r.replay_bytes)} | {r.head_params:,} | "
            f"{_spread([x.seconds_per_task for x in runs], scale=1.0, digits=0)} |"
        )
    return "\n".join(lines)


def plot_first_task(
    results: Sequence[MethodResult], task_names: Sequence[str], path: Path, *, highlight: str = "clr"
) -> Path:
    """Accuracy on the first task after learning each task, one line per method (mean over seeds, band: min-max).

    The method keyed ``highlight`` is drawn bold in black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    steps = list(range(1, len(task_names) + 1))
    colors = plt.get_cmap("tab20").colors
    markers = "os^vD<>pPX*h"
    for k, runs in enumerate(group_by_method(results).values()):
        curves = [[row[0] for row in r.matrix] for r in runs]
        mean = [statistics.mean(c[i] for c in curves) * 100 for i in range(len(steps))]
        style = "-" if runs[0].forgetting_per_task and max(r.forgetting for r in runs) > 0.005 else "--"
        clr = runs[0].key == highlight
        (line,) = ax.plot(
            steps,
            mean,
            style,
            marker=markers[k % len(markers)],
            color="black" if clr else colors[(2 * k) % 20 + (k // 10) % 2],
            linewidth=2.5 if clr else 1.5,
            zorder=3 if clr else 2,
            label=runs[0].label,
        )
        if len(curves) > 1:
            low = [min(c[i] for c in curves) * 100 for i in range(len(steps))]
            high = [max(c[i] for c in curves) * 100 for i in range(len(steps))]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    long = {"rotation": 60, "ha": "right", "fontsize": 7} if len(task_names) > 6 else {"rotation": 20}
    ax.set_xticks(steps, [f"{i}. {n}" for i, n in zip(steps, task_names, strict=True)], **long)
    ax.set_xlabel("after learning task")
    ax.set_ylabel(f"accuracy on task 1, {task_names[0]} (%)")
    seeds = len(next(iter(group_by_method(results).values())))
    ax.set_title(f"Task 1 accuracy as later tasks are learnt ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parse_lrs(items: Sequence[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in METHODS or not value:
            raise SystemExit(f"--lr takes METHOD=LR with METHOD in {sorted(METHODS)}, got {item!r}")
        lrs[key] = float(value)
    return lrs


def _expand_methods(items: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for item in items:
        for key in GROUPS.get(item, [item]):
            if key not in METHODS:
                raise SystemExit(f"unknown method {key!r}: choose from {sorted(METHODS)} or a group {sorted(GROUPS)}")
            if key not in keys:
                keys.append(key)
    return keys


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=None, help="default: the example's sequence, where installed")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["cl"],
        metavar="METHOD",
        help=f"method keys {sorted(METHODS)} or groups {sorted(GROUPS)} (default: cl)",
    )
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-train", type=int, default=300, help="training images per task (%(default)s)")
    p.add_argument("--max-test", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--label-smoothing", type=float, default=Recipe.label_smoothing)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of every method per seed")
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
    p.add_argument("--out", default="benchmarks/results", help="folder for <name>.{md,json} and the task-1 plot")
    p.add_argument("--name", default="continual_baselines", help="output file stem")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="train nothing: combine the results of earlier runs (e.g. one seed each, or more seeds for some methods) "
        "into <out>/<name>.*; each row says over how many seeds it averages",
    )
    args = p.parse_args(list(argv) if argv is not None else None)
    args.methods = _expand_methods(args.methods)
    if args.tasks is None:
        args.tasks = default_tasks()
    return args


def _write(
    args: argparse.Namespace,
    argv: Iterable[str] | None,
    recipe: Recipe,
    tasks: Sequence[tuple[str, int, int]],
    results: list[MethodResult],
    skipped: dict[str, str],
    seconds: float,
    *,
    final: bool,
    provenance: str | None = None,
) -> str:
    """Write ``<name>.md``, ``<name>.json`` and the task-1 plot with the results so far (after every method, so an
    interrupted run keeps what it measured); returns the table."""
    table = format_table(results)
    split = f"validation ({args.validation:.0%} of the training images)" if args.validation else "test"
    seeds = ", ".join(map(str, args.seeds))
    command = " ".join(["python -m benchmarks.continual_baselines", *argv_to_list(argv)])
    generated = provenance or (
        f"Generated by `{command}` in {seconds / 60:.0f} min on {torch.get_num_threads()} CPU threads "
        f"(torch {torch.__version__})"
        + ("" if final else f"; **unfinished: {len(results)} of {len(args.methods) * len(args.seeds)} runs so far**")
        + "."
    )
    header = (
        f"# Continual learning: CLR against baselines\n\n{generated}\n\n"
        f"{args.model}, offline ImageNet weights, {args.image_size} px; tasks in order: "
        + ", ".join(f"{name} ({train} train / {evaluated} {split})" for name, train, evaluated in tasks)
        + f". Task-incremental: a head per task, the task id given at test time. Same budget for every method: "
        f"{recipe.epochs} epochs, batch {recipe.batch_size}, AdamW (no weight decay) with cosine schedule and "
        f"{recipe.warmup_epochs:g}-epoch warm-up, label smoothing {recipe.label_smoothing:g}, "
        f"{'random-affine augmentation' if recipe.augment else 'no augmentation'}, "
        f"seed{'s' if len(args.seeds) > 1 else ''} {seeds}"
        + (" (mean ± sample standard deviation over the seeds)" if len(args.seeds) > 1 else "")
        + "; learning rates per method as shown. *avg acc*: mean accuracy over all tasks after the last one; "
        "*forgetting*: best earlier accuracy minus final, averaged over all but the last task; *BWT*: final minus "
        "just-learnt accuracy, averaged likewise. Parameters and bytes exclude the heads (listed apart); *stored per "
        "task*: what each task adds for inference (float32; SupSup: bits); *training state*: what the method "
        "holds while it trains beyond the network, its heads and the optimizer (Fisher and anchors, importances, "
        "the previous model, mask scores); *replay memory*: stored "
        f"examples ({args.image_size} px float32 images, labels, logits); *s / task*: training time of one task "
        "(and the method's own work after it, e.g. the Fisher), mean over tasks.\n\n"
    )
    if skipped:
        header += "".join(f"Skipped {METHODS[k].label}: {why}.\n\n" for k, why in skipped.items())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(header + table + "\n")
    figure = plot_first_task(results, [t[0] for t in tasks], out / f"{args.name}_task1.png") if results else None
    payload = {
        "settings": {**vars(args), "recipe": asdict(recipe), "evaluated_on": split},
        "tasks": [{"name": name, "train": train, "eval": evaluated} for name, train, evaluated in tasks],
        "results": [
            {**asdict(r), "percent_trained": r.percent_trained, "percent_stored": r.percent_stored} for r in results
        ],
        "skipped": skipped,
        "figure": str(figure) if figure else None,
        "wall_seconds": seconds,
        "finished": final,
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return table


def merge(args: argparse.Namespace, argv: Iterable[str] | None) -> list[MethodResult]:
    """Combine the results of earlier runs (same tasks and budget, other seeds) into one table, JSON and plot."""
    runs = [json.loads(path.read_text()) for path in args.merge]
    first = runs[0]["settings"]
    same = ("tasks", "epochs", "image_size", "max_train", "max_test", "batch_size", "model", "validation")
    for path, run in zip(args.merge, runs, strict=True):
        differs = [k for k in same if run["settings"].get(k) != first.get(k)]
        if differs:
            raise SystemExit(f"{path} differs from {args.merge[0]} in {', '.join(differs)}: not the same benchmark")
    fields = set(MethodResult.__dataclass_fields__)
    results = [MethodResult(**{k: v for k, v in r.items() if k in fields}) for run in runs for r in run["results"]]
    seeds = sorted({r.seed for r in results})
    pairs = [(r.key, r.seed) for r in results]
    if len(set(pairs)) != len(pairs):
        repeated = next(p for p in pairs if pairs.count(p) > 1)
        raise SystemExit(f"the merged runs repeat seed {repeated[1]} of method {repeated[0]!r}")
    # a method may have fewer seeds than another (extra seeds for a few rows): the table's seeds column says how many
    merged = argparse.Namespace(**{**first, "seeds": seeds, "out": args.out, "name": args.name})
    merged.methods = list(dict.fromkeys(r.key for r in results))
    recipe = Recipe(**first["recipe"])
    tasks = [(t["name"], t["train"], t["eval"]) for t in runs[0]["tasks"]]
    sources = "; ".join(
        f"`python -m benchmarks.continual_baselines {' '.join(_argv_of(run))}` ({run['wall_seconds'] / 60:.0f} min"
        + ("" if run.get("finished", True) else f", stopped after its first {len(run['results'])} runs, kept")
        + ")"
        for run in runs
    )
    provenance = (
        f"Merged by `python -m benchmarks.continual_baselines {' '.join(argv_to_list(argv))}` from {len(runs)} runs "
        f"on {torch.get_num_threads()} CPU threads (torch {torch.__version__}): {sources}."
    )
    skipped = {k: v for run in runs for k, v in run.get("skipped", {}).items()}
    table = _write(merged, argv, recipe, tasks, results, skipped, 0.0, final=True, provenance=provenance)
    print(table)
    return results


def _sizes(tasks: Sequence[PreparedTask]) -> list[tuple[str, int, int]]:
    """(name, training images, evaluation images) of each task: what the written results say about the data."""
    return [(t.name, len(t.x_train), len(t.x_test)) for t in tasks]


def _argv_of(run: dict) -> list[str]:
    return run["settings"].get("argv") or []


def main(argv: Iterable[str] | None = None) -> list[MethodResult]:
    """Run the comparison and write ``<out>/<name>.md``, ``<out>/<name>.json`` and ``<out>/<name>_task1.png``."""
    args = parse_args(argv)
    if args.merge:
        return merge(args, argv)
    args.argv = argv_to_list(argv)
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
    skipped: dict[str, str] = {}
    results: list[MethodResult] = []
    tasks: list[PreparedTask] = []
    for seed in args.seeds:
        tasks = prepare_tasks(
            args.tasks, args.image_size, mean, std, max_train=args.max_train, max_test=args.max_test, seed=seed
        )
        if args.validation:
            tasks = split_validation(tasks, args.validation, seed)
        for key in args.methods:
            method = METHODS[key]
            if key in lrs:
                method = replace(method, lr=lrs[key])
            if args.clr_lr is not None and method.clr_lr is not None:
                method = replace(method, clr_lr=args.clr_lr)
            if method.kind == "lora" and (why := _peft_status()):
                if key not in skipped:
                    print(f"skipping {method.label}: {why}")
                skipped[key] = why
                continue
            result = run_method(method, base, tasks, recipe, seed=seed, progress=not args.no_progress)
            results.append(result)
            _write(args, argv, recipe, _sizes(tasks), results, skipped, time.perf_counter() - started, final=False)
            print(
                f"{method.label}, seed {seed}: average {100 * result.average_accuracy:.1f}%, forgetting "
                f"{100 * result.forgetting:.1f} points, {result.seconds_per_task:.0f} s per task\n"
                f"{format_matrix([t.name for t in tasks], result.matrix)}",
                flush=True,
            )
    table = _write(args, argv, recipe, _sizes(tasks), results, skipped, time.perf_counter() - started, final=True)
    print("\n" + table)
    return results


def argv_to_list(argv: Iterable[str] | None) -> list[str]:
    return list(argv) if argv is not None else sys.argv[1:]


if __name__ == "__main__":
    main()
