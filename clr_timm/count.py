"""Parameter accounting: what one task costs on top of the frozen backbone.

Shared by :func:`print_trainable_parameters`, the ``clr-timm count`` command and ``benchmarks/param_count.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .attach import CLR_ATTR, _adapter_tensors, _under, get_config, is_attached, plan_targets
from .config import CLRConfig
from .layers import CLR_LAYERS

__all__ = ["ParameterCount", "count_parameters", "print_trainable_parameters", "format_count"]


@dataclass(frozen=True)
class ParameterCount:
    """Per-task cost of a CLR adapter, in numbers of values.

    Attributes:
        clr: Reprogramming kernel values (``CLRConv2d`` / ``CLRScale``).
        norm_affine: Affine parameters of the per-task normalisation layers.
        norm_stats: BatchNorm running means and variances (per task too; the integer batch counters are not counted).
        head: Classifier parameters.
        backbone: Parameters of the original model without its classifier (norm affines included): the paper's
            denominator.
        frozen: Parameters that no task changes.
        per_task: clr + norm_affine + norm_stats: what a task adds, without its head.
        per_task_with_head: per_task + head.
        percent_of_backbone: 100 * per_task / backbone.
        bytes_fp32: Size of the adapter's tensors (head included) stored in fp32.
        bytes_fp16: The same in fp16 / bf16.
        num_reprogrammed: Number of convs followed by a reprogramming layer.
    """

    clr: int
    norm_affine: int
    norm_stats: int
    head: int
    backbone: int
    frozen: int
    per_task: int
    per_task_with_head: int
    percent_of_backbone: float
    bytes_fp32: int
    bytes_fp16: int
    num_reprogrammed: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: nn.Module, config: CLRConfig | None = None) -> ParameterCount:
    """Break down what one task's adapter costs on ``model``.

    Works on an attached model, and on a plain one (including one built on the ``meta`` device) with the cost that
    :func:`~clr_timm.attach` under ``config`` would give, without changing it.
    """
    if is_attached(model):
        if config is not None and config != get_config(model):
            raise ValueError("config differs from the one the model is attached with; leave it out")
        config = get_config(model)
    config = config or CLRConfig()
    plan = plan_targets(model, config)
    k2 = config.kernel_size**2
    clr = sum(t.channels * (k2 if t.layer == "clr" else 1) for t in plan.targets)
    kinds = {"norm_affine": 0, "norm_stats": 0, "head": 0}
    for _, t, kind in _adapter_tensors(model, plan):
        if kind == "clr":
            continue
        if t.is_floating_point():
            kinds[kind] += t.numel()
    backbone = 0
    for name, m in model.named_modules():
        if isinstance(m, CLR_LAYERS) or _under(name, plan.head) or name.split(".")[-1:] == [CLR_ATTR]:
            continue
        backbone += sum(p.numel() for p in m.parameters(recurse=False))
    head_params = sum(p.numel() for n in plan.head for p in model.get_submodule(n).parameters())
    head = kinds["head"]
    per_task = clr + kinds["norm_affine"] + kinds["norm_stats"]
    values = per_task + head
    return ParameterCount(
        clr=clr,
        norm_affine=kinds["norm_affine"],
        norm_stats=kinds["norm_stats"],
        head=head,
        backbone=backbone,
        frozen=backbone - kinds["norm_affine"] + (0 if config.train_head else head_params),
        per_task=per_task,
        per_task_with_head=values,
        percent_of_backbone=100.0 * per_task / backbone if backbone else float("nan"),
        bytes_fp32=4 * values,
        bytes_fp16=2 * values,
        num_reprogrammed=len(plan.targets),
    )


def format_count(c: ParameterCount) -> str:
    """A small human-readable table of a :class:`ParameterCount`."""
    rows = [
        ("CLR kernels", c.clr, f"{c.num_reprogrammed} convs reprogrammed"),
        ("norm affine", c.norm_affine, "per task"),
        ("norm statistics", c.norm_stats, "per task (BatchNorm running mean/var)"),
        ("per task, without head", c.per_task, f"{c.percent_of_backbone:.3f}% of the backbone"),
        ("head", c.head, "per task"),
        (
            "per task, with head",
            c.per_task_with_head,
            f"{c.bytes_fp32 / 1e6:.2f} MB fp32, {c.bytes_fp16 / 1e6:.2f} MB fp16",
        ),
        ("backbone (no head)", c.backbone, f"{c.frozen:,} frozen, shared by all tasks"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>13,}  {note}" for name, value, note in rows)


def print_trainable_parameters(model: nn.Module, config: CLRConfig | None = None) -> ParameterCount:
    """Print (and return) the per-task parameter breakdown of ``model``."""
    c = count_parameters(model, config)
    print(format_count(c))
    return c
