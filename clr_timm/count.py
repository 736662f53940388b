"""Parameter accounting: what one task costs on top of the frozen backbone.

Shared by :func:`print_trainable_parameters`, the ``clr-timm count`` command and ``benchmarks/param_count.py``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .attach import CLR_ATTR, _adapter_tensors, _under, get_config, is_attached, plan_targets
from .config import CLRConfig
from .errors import CLRError, ConfigError
from .layers import ReprogrammingLayer, layer_class

__all__ = [
    "CURATED_MODELS",
    "ModelCount",
    "ParameterCount",
    "count_model",
    "count_parameters",
    "format_count",
    "format_table",
    "print_trainable_parameters",
    "resolve_model_names",
]

CURATED_MODELS = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "res2net50_26w_4s",
    "resnetv2_50x1_bit",
    "regnetx_032",
    "regnety_016",
    "efficientnet_b0",
    "tf_efficientnetv2_s",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "mixnet_s",
    "ghostnet_100",
    "convnext_tiny",
    "densenet121",
    "inception_v3",
    "legacy_xception",
    "vgg16",
    "repvgg_a2",
    "dm_nfnet_f0",
    "hrnet_w18",
    "cspdarknet53",
    "dla34",
)
"""Well-known CNNs across timm's families: the README's parameter-count table (``clr-timm count`` with no model)."""


@dataclass(frozen=True)
class ParameterCount:
    """Per-task cost of a CLR adapter, in numbers of values.

    Attributes:
        clr: Values of the reprogramming layers (each kind says how many it has).
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
            raise ConfigError(
                f"config {config} differs from the one the model is attached with ({get_config(model)}); leave it out"
            )
        config = get_config(model)
    config = config or CLRConfig()
    plan = plan_targets(model, config)
    clr = sum(layer_class(t.layer).num_values(t, config) for t in plan.targets)
    kinds = {"norm_affine": 0, "norm_stats": 0, "head": 0}
    for _, t, kind in _adapter_tensors(model, plan):
        if kind == "clr":
            continue
        if t.is_floating_point():
            kinds[kind] += t.numel()
    backbone = 0
    for name, m in model.named_modules():
        if isinstance(m, ReprogrammingLayer) or _under(name, plan.head) or name.split(".")[-1:] == [CLR_ATTR]:
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


@dataclass(frozen=True)
class ModelCount:
    """The per-task cost of CLR on one timm architecture (see :func:`count_model`).

    Attributes:
        model: timm model name.
        num_classes: Classes of the head the count was made with.
        config: The CLR config counted.
        built_on: ``"meta"`` (no memory, no init) or ``"cpu"`` for a model that does not build on the meta device.
        count: The breakdown.
    """

    model: str
    num_classes: int
    config: CLRConfig
    built_on: str
    count: ParameterCount

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON- and CSV-ready dict."""
        return {
            "model": self.model,
            "num_classes": self.num_classes,
            **{f"config_{k}": v for k, v in self.config.to_dict().items() if k in ("kernel_size", "depthwise")},
            "config_train_norms": self.config.train_norms,
            "built_on": self.built_on,
            **self.count.to_dict(),
        }


def resolve_model_names(names: list[str]) -> list[str]:
    """Check timm model names, expanding wildcards (``"resnet*"``) through ``timm.list_models``.

    Raises:
        CLRError: For a name timm does not know, with the closest names it does know.
    """
    import timm

    resolved = []
    for name in names:
        if any(c in name for c in "*?["):
            matches = timm.list_models(name)
            if not matches:
                raise CLRError(f"no timm model matches {name!r}")
            resolved += matches
        elif timm.is_model(name):
            resolved.append(name)
        else:
            raise CLRError(f"unknown timm model {name!r}{_suggestions(name)}")
    return resolved


def _suggestions(name: str) -> str:
    import timm

    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close:
        close = timm.list_models(f"*{name}*")[:5]
    return f"; did you mean {', '.join(close)}?" if close else "; list them with timm.list_models()"


def count_model(name: str, config: CLRConfig | None = None, num_classes: int = 1000) -> ModelCount:
    """Build a timm architecture without weights and count what a CLR adapter costs on it.

    The model is built on the ``meta`` device, which allocates nothing and skips weight init, so that counting the
    whole registry takes minutes; a model whose constructor needs real tensors is built on the CPU instead.

    Args:
        name: timm model name (``timm.list_models()``; a pretrained tag is allowed).
        config: CLR config to count; defaults to the paper's.
        num_classes: Classes of the per-task head.

    Raises:
        CLRError: For an unknown model name (with close names), or one that does not build.
    """
    import timm

    config = config or CLRConfig()
    if not timm.is_model(name):
        raise CLRError(f"unknown timm model {name!r}{_suggestions(name)}")
    errors = []
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except Exception as e:  # any constructor failure: try the next device, then report them all
            errors.append(f"on {device}: {type(e).__name__}: {e}")
            continue
        return ModelCount(name, num_classes, config, device, count_parameters(model, config))
    raise CLRError(f"timm model {name!r} does not build ({'; '.join(errors)})")


_TABLE_HEADER = (
    "model",
    "backbone params (no head)",
    "CLR kernels",
    "norm affine",
    "norm stats",
    "head ({} classes)",
    "per task",
    "% of backbone",
    "adapter bytes fp32 / fp16",
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n / 1e3:.1f} kB"


def format_table(rows: list[ModelCount]) -> str:
    """A markdown table of counts, to paste into a README.

    "per task" is what a task adds without its head (the paper's number); the adapter bytes include the head.
    """
    classes = sorted({r.num_classes for r in rows})
    header = [h.format(classes[0] if len(classes) == 1 else "N") for h in _TABLE_HEADER]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        c = r.count
        cells = [
            f"`{r.model}`",
            f"{c.backbone:,}",
            f"{c.clr:,}",
            f"{c.norm_affine:,}",
            f"{c.norm_stats:,}",
            f"{c.head:,}",
            f"{c.per_task:,}",
            f"{c.percent_of_backbone:.3f}%",
            f"{_mb(c.bytes_fp32)} / {_mb(c.bytes_fp16)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
