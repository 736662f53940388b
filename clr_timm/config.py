"""CLRConfig: what a CLR adapter reprograms, as a dataclass that round-trips through JSON.

Configs come from files written by others (an adapter's metadata, a repo's ``clr_config.json``), so reading one has
bounded cost: at most :data:`MAX_PATTERNS` ``include`` / ``exclude`` patterns of at most :data:`MAX_PATTERN_LENGTH`
characters each, JSON whose nesting and size are refused before it is parsed, and every failure a
:class:`~clr_timm.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, shown
from .layers import layer_kinds

__all__ = ["CLRConfig", "DEPTHWISE_POLICIES", "PRESETS", "MAX_PATTERNS", "MAX_PATTERN_LENGTH", "MAX_KERNEL_SIZE"]

# Matching compiles each list into one regex, once; its cost grows with the wildcards in it (about 17 us per "*"), so
# these bound the worst list, 256 patterns of 63 "*" each, to about half a second, and any plan after it to a regex
# match per conv.
MAX_PATTERNS = 256
"""The most patterns ``CLRConfig.include`` or ``CLRConfig.exclude`` may hold (each list on its own)."""
MAX_PATTERN_LENGTH = 128
"""The most characters one ``include`` / ``exclude`` pattern may have (timm's module names are under 100)."""
MAX_KERNEL_SIZE = 63
"""The largest ``CLRConfig.kernel_size`` (the paper uses 3)."""
_MAX_CONTAINERS = 16  # objects and arrays in a config's JSON: it has 3 (its object, include and exclude)

DEPTHWISE_POLICIES = ("clr", "skip", "scale")
"""The built-in choices for ``CLRConfig.depthwise``; any registered layer kind is accepted too."""

# A JSON string token, closed or running to the end of the text: always matches at a quote, so substituting it scans
# the text once (an unclosed string cannot make it retry at every later quote).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)


def json_structure(text: str, max_strings: int = 65_536) -> tuple[int, int]:
    """(containers, separators) of a JSON text: its ``{`` and ``[``, and its ``,`` and ``:``, outside strings.

    Counted in linear time at the cost of two or three copies of the text, building nothing else, so that a caller
    can refuse a text before ``json.loads`` spends memory on it (``[],`` repeated costs 60 bytes of Python objects
    per 3 bytes of text). Strings are told apart when there are at most ``max_strings`` of them (past that it would
    cost an object per string); otherwise what they hold is counted too, an upper bound. Either way a text of n
    strings has at least n - 1 separators, so a bound on separators bounds the strings as well.
    """
    text = text.replace("\\\\", "")  # without escaped backslashes, a quote after a backslash is an escaped one
    if (text.count('"') - text.count('\\"')) // 2 <= max_strings:
        text = _JSON_STRING.sub("", text)
    return text.count("{") + text.count("["), text.count(",") + text.count(":")


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

# Measured per family (CLRConfig.recommended's docstring has the numbers); any other family gets the paper's default.
_RECOMMENDED: dict[str, dict[str, Any]] = {
    "efficientnet_lite": {"include": [], "update_norm_stats": False},  # norm + head: no kernel earned its storage
    "mobilenetv2": {**_CLR_GATED, "update_norm_stats": False},  # the authors' Ghost_a, pretrained BN statistics
}
_FAMILIES = (
    (re.compile(r"(tf_)?efficientnet_lite\d"), "efficientnet_lite"),
    (re.compile(r"mobilenetv2_"), "mobilenetv2"),
)


def _model_family(model: Any) -> str | None:
    """The family (a key of ``_RECOMMENDED``) of a timm model or model name, or None for an unmeasured one."""
    if isinstance(model, str):
        name = model.split("/")[-1]  # "hf-hub:timm/name.tag", "timm/name.tag"
    elif hasattr(model, "named_modules"):
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        name = name if isinstance(name, str) else type(model).__name__
    else:
        raise ConfigError(f"CLRConfig.recommended takes a timm model or a model name, got {shown(model)}")
    name = name.split(".")[0]
    return next((family for pattern, family in _FAMILIES if pattern.match(name)), None)


@dataclass
class CLRConfig:
    """Which parts of a frozen timm model a task's adapter owns.

    Attributes:
        kernel_size: Size k of the depthwise k x k reprogramming kernel inserted after each targeted conv (odd, at
            most :data:`MAX_KERNEL_SIZE`).
        include: fnmatch patterns on module names (``"layer3.*"``); when given, only convs matching one are
            reprogrammed. ``None`` targets every conv whose kernel is larger than 1x1. At most :data:`MAX_PATTERNS`
            patterns of at most :data:`MAX_PATTERN_LENGTH` characters.
        exclude: fnmatch patterns on module names of convs never to reprogram (applied after ``include``); the same
            limits.
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
        if self.include is not None:
            self.include = _pattern_list(self.include, "include")
        self.exclude = _pattern_list(self.exclude, "exclude")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~clr_timm.ConfigError` naming the first invalid field."""
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_KERNEL_SIZE or k % 2 == 0:
            raise ConfigError(
                f"CLRConfig.kernel_size must be an odd positive int of at most {MAX_KERNEL_SIZE} (e.g. 3), got "
                f"{shown(k, 60)}"
            )
        kinds = layer_kinds()
        for name in ("depthwise", "layer", "pointwise"):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in (kinds if name == "layer" else ("skip", *kinds)):
                allowed = "a registered layer kind" if name == "layer" else "'skip' or a layer kind"
                raise ConfigError(f"CLRConfig.{name} must be {allowed} {kinds}, got {shown(value)}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"CLRConfig.{name} must be a list of fnmatch pattern strings, got {shown(patterns)}")
            if len(patterns) > MAX_PATTERNS:
                raise ConfigError(f"CLRConfig.{name} has {len(patterns)} patterns; at most {MAX_PATTERNS} are allowed")
            longest = max(patterns, key=len, default="")
            if len(longest) > MAX_PATTERN_LENGTH:
                raise ConfigError(
                    f"CLRConfig.{name} has a pattern of {len(longest)} characters ({shown(longest, 60)}); at most "
                    f"{MAX_PATTERN_LENGTH} are allowed"
                )
        for name in ("train_norms", "update_norm_stats", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CLRConfig.{name} must be a bool, got {shown(getattr(self, name))}")

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
            raise ConfigError(f"unknown CLR preset {shown(name)}; presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def recommended(cls, model: Any) -> CLRConfig:
        """The config measured for a model's family (the cheapest within noise of the best), else the paper's default.

        Args:
            model: A timm model (its family is read from ``pretrained_cfg["architecture"]``, else ``default_cfg``,
                else its class name) or a timm model name (``"tf_efficientnet_lite0"``,
                ``"timm/mobilenetv2_100.ra_in1k"``).

        Returns:
            A fresh config; the same for every model of a family. Evidence (``benchmarks/results/
            continual_placement_*.md``; tasks animal_mnist, elpv, uci_digits, 160 training images each, 32 px,
            4 epochs: ``python -m benchmarks.continual_baselines --methods placement --tasks animal_mnist elpv
            uci_digits --image-size 32 --max-train 160 --max-test 200 --epochs 4 --seeds 0 1 2``; every choice made
            on ``--max-train 240 --validation 0.3333``, a third of the training images held out, never the test set):

            - EfficientNet-Lite (``tf_efficientnet_lite0`` measured, lite1 checked): norm + head,
              ``CLRConfig(include=[], update_norm_stats=False)``, AdamW lr 1e-2; 2.49% of the backbone per task. No
              kernel placement earned its storage: on validation ``depthwise="skip"`` (a kernel after the stem only)
              led by 0.8 points, within noise, so the cheaper config is returned; on the test images, three seeds:
              norm + head 69.8 +- 0.9%, ``depthwise="skip"`` 69.3 +- 1.9, SupSup 69.6 +- 4.1, the paper's placement
              59.4 +- 1.5; the gated, after-1x1 and parallel presets 58.7, 62.3, 26.0 (one seed, 7-316% stored).
            - MobileNetV2 (``mobilenetv2_100``): the authors' gated block everywhere (``Ghost_a``) with pretrained
              BatchNorm statistics, ``CLRConfig.preset("clr-gated", update_norm_stats=False)``, AdamW lr 1e-3;
              10.74% of the backbone stored per task, over the 5% budget: no config within it learns here. Norm +
              head, ``depthwise="skip"`` / ``"scale"`` and the 1x1 presets collapse to a constant class (validation
              25-33% at lr 1e-3 and 1e-2); the paper's placement reaches 42.9%, the gated block 56.2%. Test, three
              seeds: gated 56.9 +- 1.7%; the paper's placement 58.3 +- 5.8%, norm + head 25.8 +- 0.0, SupSup
              44.5 +- 3.3, per-task full fine-tuning 61.6 +- 2.1 (``--model mobilenetv2_100 --methods clr_gated clr
              norm_head supsup_frozen_bn full --lr clr_gated=1e-3 clr=1e-3``).
            - Any other family: ``CLRConfig()``, the paper's default (nothing measured).

        Raises:
            ConfigError: If ``model`` is neither a model nor a model name.
        """
        return cls.from_dict(dict(_RECOMMENDED.get(_model_family(model), {})))

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
        if not isinstance(data, Mapping):
            raise ConfigError(f"a CLRConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(shown(k, 60) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown CLRConfig field(s) {', '.join(unknown[:5])}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:  # a field missing from the dataclass's signature, or a key that is not a string
            raise ConfigError(f"invalid CLRConfig {shown(data)}: {shown(str(e))}") from e

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> CLRConfig:
        """The config a JSON object describes; anything else, however nested or large, raises ConfigError."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"CLRConfig JSON is not UTF-8 text: {e}") from e
        if not isinstance(text, str):
            raise ConfigError(f"CLRConfig JSON must be a string, got {type(text).__name__}")
        # Refuse what no config can be before parsing it: one object holding two lists of patterns, and a few scalars.
        most = 2 * MAX_PATTERNS + 4 * _MAX_CONTAINERS
        containers, separators = json_structure(text, most)
        if containers > _MAX_CONTAINERS or separators > most:
            raise ConfigError(
                f"CLRConfig JSON has {containers} objects or arrays and {separators} separators, more than any "
                f"CLRConfig has (at most {MAX_PATTERNS} patterns in each of include and exclude)"
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"CLRConfig JSON does not parse: {shown(str(e))}") from e
        return cls.from_dict(data)


def _pattern_list(patterns: Any, name: str) -> list:
    """``include`` / ``exclude`` as a list: one pattern stands for a list of it; a mapping or a scalar is refused."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (list, tuple)):
        return list(patterns)
    if isinstance(patterns, (Mapping, bytes, bytearray)) or not hasattr(patterns, "__iter__"):
        raise ConfigError(f"CLRConfig.{name} must be a list of fnmatch pattern strings, got {shown(patterns)}")
    # Any other iterable (a set, a generator) is taken one past the limit at most: an endless one is refused too.
    listed = [p for _, p in zip(range(MAX_PATTERNS + 1), patterns)]
    if len(listed) > MAX_PATTERNS:
        raise ConfigError(f"CLRConfig.{name} has more than {MAX_PATTERNS} patterns; at most {MAX_PATTERNS} are allowed")
    return listed
