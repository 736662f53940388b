"""CLRConfig: what a CLR adapter reprograms, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .layers import layer_kinds

__all__ = ["CLRConfig", "DEPTHWISE_POLICIES", "PRESETS"]

DEPTHWISE_POLICIES = ("clr", "skip", "scale")
"""The built-in choices for ``CLRConfig.depthwise``; any registered layer kind is accepted too."""

# Fields added after adapter format version 1 are written only when they differ from their default, so that the
# files (and clr_config.json) of every config that format 1 could express stay exactly as they were.
_WRITTEN_IF_SET = {"layer": "clr", "pointwise": "skip"}

# The authors' variants (their main.py --method names) and our readable names for them. Only the fields that differ
# from CLRConfig's defaults; see the README's table for what each is and which start as the identity.
_CLR = {}
_CLR_FULL = {"pointwise": "clr"}
_CLR_POINTWISE_SCALE = {"pointwise": "scale"}
_CLR_GATED = {"layer": "gated", "depthwise": "gated", "pointwise": "gated"}
_PARALLEL_1X1 = {"layer": "parallel", "depthwise": "parallel", "pointwise": "parallel", "train_norms": False}
PRESETS: dict[str, dict[str, Any]] = {
    "Ghost_reduced_v1": _CLR,
    "clr": _CLR,
    "Ghost": _CLR_FULL,
    "clr-full": _CLR_FULL,
    "Ghost_reduced_v2": _CLR_POINTWISE_SCALE,
    "clr-pointwise-scale": _CLR_POINTWISE_SCALE,
    "Ghost_a": _CLR_GATED,
    "clr-gated": _CLR_GATED,
    "li18": _PARALLEL_1X1,
    "li50": _PARALLEL_1X1,
    "parallel-1x1": _PARALLEL_1X1,
}
"""Preset name -> the fields it sets (see :meth:`CLRConfig.preset`)."""


@dataclass
class CLRConfig:
    """Which parts of a frozen timm model a task's adapter owns.

    Attributes:
        kernel_size: Size k of the depthwise k x k reprogramming kernel inserted after each targeted conv (odd).
        include: fnmatch patterns on module names (``"layer3.*"``); when given, only convs matching one are
            reprogrammed. ``None`` targets every conv whose kernel is larger than 1x1.
        exclude: fnmatch patterns on module names of convs never to reprogram (applied after ``include``).
        layer: The kind of reprogramming layer after every other conv with a kernel larger than 1x1: ``"clr"`` (the
            paper's depthwise k x k kernel), ``"gated"``, ``"parallel"``, ``"scale"``, or any kind registered with
            :func:`clr_timm.register_layer`.
        pointwise: What to put after a 1x1 conv: ``"skip"`` nothing (the paper's default), or a layer kind
            (``"clr"`` in the authors' ``Ghost``, ``"scale"`` in ``Ghost_reduced_v2``).
        depthwise: What to put after a depthwise conv (``groups == in_channels > 1``): ``"clr"`` a full
            reprogramming kernel (the paper), ``"skip"`` nothing, ``"scale"`` one learned scale per channel, or any
            registered layer kind.
        train_norms: Normalisation layers are per task: their affine parameters train and, for BatchNorm, their
            running statistics update and are saved with the adapter. When False they stay frozen (BatchNorm is
            kept in eval mode even when the model trains).
        update_norm_stats: With ``train_norms``, BatchNorm running statistics update while the model trains (the
            paper). When False they keep their pretrained values and BatchNorm normalises with them in train mode
            too, while the affine parameters still train: on small batches and little data this transfers much
            better (see the README's recipe notes). The statistics are part of the adapter either way.
        train_head: The classifier (found through timm's ``get_classifier``) is per task and saved with the adapter.
    """

    kernel_size: int = 3
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    depthwise: str = "clr"
    train_norms: bool = True
    update_norm_stats: bool = True
    train_head: bool = True
    layer: str = "clr"
    pointwise: str = "skip"

    def __post_init__(self) -> None:
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if self.include is not None:
            self.include = list(self.include)
        self.exclude = list(self.exclude)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~clr_timm.ConfigError` naming the first invalid field."""
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ConfigError(f"CLRConfig.kernel_size must be an odd positive int (e.g. 3), got {k!r}")
        kinds = layer_kinds()
        if not isinstance(self.depthwise, str) or (self.depthwise != "skip" and self.depthwise not in kinds):
            raise ConfigError(f"CLRConfig.depthwise must be 'skip' or a layer kind {kinds}, got {self.depthwise!r}")
        if not isinstance(self.layer, str) or self.layer not in kinds:
            raise ConfigError(f"CLRConfig.layer must be a registered layer kind {kinds}, got {self.layer!r}")
        if not isinstance(self.pointwise, str) or (self.pointwise != "skip" and self.pointwise not in kinds):
            raise ConfigError(f"CLRConfig.pointwise must be 'skip' or a layer kind {kinds}, got {self.pointwise!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is not None and not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"CLRConfig.{name} must be a list of fnmatch pattern strings, got {patterns!r}")
        for name in ("train_norms", "update_norm_stats", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CLRConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CLRConfig:
        """The config of a named variant: the authors' ``--method`` names (``"Ghost_reduced_v1"``, ``"Ghost"``,
        ``"Ghost_reduced_v2"``, ``"Ghost_a"``, ``"li18"`` / ``"li50"``) or ours (``"clr"``, ``"clr-full"``,
        ``"clr-pointwise-scale"``, ``"clr-gated"``, ``"parallel-1x1"``).

        It is an ordinary config: ``overrides`` (or a later ``dataclasses.replace``) set any field. Every preset but
        ``li18`` / ``li50`` (``"parallel-1x1"``, a dense 1x1 conv at PyTorch's default init beside each conv) leaves
        the model computing exactly what it did at attach; the README's variants table says what each one is.
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown CLR preset {name!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def preset_name(self) -> str | None:
        """Our name of the preset this config is (``"clr"``, ``"clr-gated"``, ...), or None for any other config."""
        ours = [n for n in PRESETS if not n[0].isupper() and not n.startswith("li")]
        return next((n for n in ours if self == CLRConfig.preset(n)), None)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name, default in _WRITTEN_IF_SET.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLRConfig:
        """Build a config from a dict, refusing unknown fields (a typo must not silently change the method)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a CLRConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CLRConfig field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"invalid CLRConfig {data!r}: {e}") from e

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> CLRConfig:
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:
            raise ConfigError(f"CLRConfig JSON does not parse: {e}") from e
        return cls.from_dict(data)
