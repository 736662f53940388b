"""Walking a timm model: find what CLR reprograms, inject the layers, freeze the rest, and take it all back.

A reprogramming layer lives as a child named ``clr`` of the conv it follows and is applied by a forward hook on that
conv, so the model's own modules, forward code and state_dict keys stay exactly as timm made them: the only new keys
are ``<conv>.clr.<tensor>`` (``<conv>.clr.weight`` for the built-in kinds). Everything the attach changes is recorded
in the model's one state record (:class:`~clr_timm.state.CLRState`) so that :func:`detach` restores the original model
bit for bit, whatever modes it is in.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import CLRConfig
from .errors import CLRError, ConfigError
from .layers import ReprogrammingLayer, layer_class
from .state import STATE_ATTR, CLRState, find_state, get_state, refuse_fused

__all__ = [
    "attach",
    "detach",
    "is_attached",
    "get_config",
    "reset_adapter",
    "resize_head",
    "current_plan",
    "mark_only_adapter_as_trainable",
    "adapter_state_dict",
    "plan_targets",
    "reprogramming_shapes",
    "CLRPlan",
    "Target",
]

CLR_ATTR = "clr"
_TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_NORM_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_NORM_CLASS_NAME = re.compile(r"Norm(Act|Tlu)?(\d+d)?([BS]\d+a?)?(Fp32)?$")
# The method through which timm's optimizer factory asks a model which parameters not to decay.
NO_WEIGHT_DECAY = "no_weight_decay"
# Methods through which timm fuses or re-parameterises a module (see timm.models.reparameterize_model).
_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


@dataclass(frozen=True)
class Target:
    """A conv that gets a reprogramming layer."""

    name: str
    channels: int
    depthwise: bool
    layer: str  # the reprogramming layer's kind (clr_timm.layers.layer_class)
    in_channels: int = 0


@dataclass
class CLRPlan:
    """What :func:`attach` would do to a model under a config, computed without changing the model."""

    config: CLRConfig
    targets: list[Target]
    norms: list[str]
    head: list[str]
    skipped: list[str] = field(default_factory=list)  # convs with k > 1 left alone by a "skip" policy


def _clr_forward_hook(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return module.clr(output)


def _clr_input_hook(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return module.clr(output, args[0])  # a layer that also reads the conv's input (ReprogrammingLayer.reads_input)


def _load_state_dict_post_hook(module: nn.Module, incompatible_keys) -> None:
    # A plain timm checkpoint has no CLR kernels: loading one strictly into an attached model is fine, and keeps
    # the adapter's kernels as they are.
    state = find_state(module)
    if state is None:
        return
    layers = tuple(_key(t, f"{CLR_ATTR}.") for t in state.targets)
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(layers)]


def _frozen_norm_pre_hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
    # A norm that is not part of the adapter must not update its running statistics when the model trains.
    module.training = False


class _ReparamGuard:
    """Stands in for a module's fuse / reparameterize method while CLR is attached, and says what to do instead.

    Fusing replaces the convs that carry the reprogramming layers and folds away the norms that are part of the
    adapter, so re-parameterising an attached model would silently drop the adapter.
    """

    def __init__(self, module: str, method: str) -> None:
        self.module, self.method = module, method

    def __call__(self, *args, **kwargs):
        where = f"module {self.module!r}" if self.module else "the model"
        raise CLRError(
            f"cannot {self.method}() {where} while CLR is attached: re-parameterising replaces the convs that carry "
            "the reprogramming layers and fuses the per-task norms away. Re-parameterise first "
            "(timm.utils.reparameterize_model(model)) and attach after, or call clr_timm.detach(model) first"
        )


class _NoWeightDecay:
    """Stands in for the model's ``no_weight_decay()`` while CLR is attached: the model's own names plus the
    reprogramming-layer tensors, which weight decay would pull toward zero and so away from the identity they start at.

    timm's ``create_optimizer_v2`` and ``param_groups_weight_decay`` put every name it returns in the group without
    weight decay (norm affines are 1-D, which timm never decays). The names are fixed at attach, so the object pickles
    and deep-copies (``ModelEmaV3``) without a reference to the model; :func:`detach` removes it.
    """

    def __init__(self, names: frozenset[str], own: frozenset[str], replaced: object) -> None:
        self.names, self.own, self.replaced = names, own, replaced

    def __call__(self) -> set[str]:
        return set(self.own | self.names)


_NOTHING = object()  # what _NoWeightDecay.replaced holds when the model had no instance attribute no_weight_decay


def _exclude_from_weight_decay(model: nn.Module, plan: CLRPlan) -> None:
    modules = dict(model.named_modules())
    names = frozenset(
        _key(t.name, f"{CLR_ATTR}.{pn}") for t in plan.targets for pn in getattr(modules[t.name], CLR_ATTR).params()
    )
    own = getattr(model, NO_WEIGHT_DECAY, None)
    own = frozenset(own()) if callable(own) else frozenset()
    replaced = model.__dict__.get(NO_WEIGHT_DECAY, _NOTHING)
    object.__setattr__(model, NO_WEIGHT_DECAY, _NoWeightDecay(names, own, replaced))


def _restore_weight_decay(model: nn.Module) -> None:
    hook = model.__dict__.get(NO_WEIGHT_DECAY)
    if isinstance(hook, _NoWeightDecay):
        object.__delattr__(model, NO_WEIGHT_DECAY)
        if hook.replaced is not _NOTHING:
            object.__setattr__(model, NO_WEIGHT_DECAY, hook.replaced)


def _guard_reparameterisation(model: nn.Module) -> list[tuple[str, str]]:
    guarded = []
    for name, m in model.named_modules():
        for method in _REPARAM_METHODS:
            if callable(getattr(type(m), method, None)):
                object.__setattr__(m, method, _ReparamGuard(name, method))
                guarded.append((name, method))
    return guarded


def _is_conv(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return True
    # timm's CondConv2d is a plain Module whose forward takes routing weights; duck-type it so that neither its
    # import path nor timm's version matters.
    return type(m).__name__ == "CondConv2d" and hasattr(m, "out_channels") and hasattr(m, "kernel_size")


def _kernel_area(m: nn.Module) -> int:
    k = m.kernel_size
    return math.prod(k) if isinstance(k, (tuple, list)) else int(k) ** 2


def _is_depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels


def _is_norm(m: nn.Module) -> bool:
    """Normalisation layers of torch and timm (BatchNorm, BatchNormAct2d, GroupNorm(Act), LayerNorm(2d), ...)."""
    if isinstance(m, _TORCH_NORMS):
        return True
    # timm's own norms (RmsNorm, EvoNorm2dB0, FilterResponseNormAct2d, ...): a class named like a norm layer whose
    # own parameters are all per-channel vectors. Containers such as ConvNormAct own no parameters directly, and
    # blocks that merely mention norms (NormFreeBlock's scalar skipinit gain) are not named like a norm layer.
    if not _NORM_CLASS_NAME.search(type(m).__name__) or isinstance(m, ReprogrammingLayer):
        return False
    params = list(m.parameters(recurse=False))
    return bool(params) and all(p.dim() <= 1 for p in params)


def _has_running_stats(m: nn.Module) -> bool:
    return any(n in _NORM_STAT_BUFFERS for n, _ in m.named_buffers(recurse=False))


def _classifier_objects(model: nn.Module) -> list[nn.Module]:
    """The classifier module(s), found through timm's ``get_classifier``."""
    if not hasattr(model, "get_classifier"):
        return []
    try:
        got = model.get_classifier()
    except Exception:  # a model whose get_classifier is not implemented for its current state
        return []
    if isinstance(got, nn.Module):
        return [got]
    if isinstance(got, (tuple, list)):
        return [h for h in got if isinstance(h, nn.Module)]
    return []


def _classifier_names_from_cfg(model: nn.Module) -> list[str]:
    """Fallback for models without ``get_classifier``: ``pretrained_cfg["classifier"]``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(names, str):
        names = [names]
    found = []
    for n in names or []:
        try:
            model.get_submodule(n)
        except AttributeError:
            continue
        found.append(n)
    return found


def _head_modules(model: nn.Module) -> list[str]:
    """Names of the classifier modules, found through timm's own API."""
    return plan_targets(model).head


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """A test of whether a name matches any of ``patterns`` (as ``fnmatch.fnmatchcase``), compiled once per list.

    A plan then costs one regex match per conv, not one fnmatch per conv and pattern (which, past fnmatch's own
    cache of compiled patterns, recompiles every pattern for every conv).
    """
    if not patterns:
        return lambda name: False
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in dict.fromkeys(patterns))).match


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def plan_targets(model: nn.Module, config: CLRConfig | None = None) -> CLRPlan:
    """Compute which convs, norms and head modules the adapter covers, without changing the model.

    Works on models built on the ``meta`` device, which is how the parameter-count benchmark walks the registry.
    """
    config = config or CLRConfig()
    include = _matcher(tuple(config.include)) if config.include is not None else None
    exclude = _matcher(tuple(config.exclude))
    head_ids = {id(h) for h in _classifier_objects(model)}
    head = [] if head_ids else _classifier_names_from_cfg(model)
    targets, norms, skipped = [], [], []
    for name, m in model.named_modules():  # one walk: parents come before their children
        if name and id(m) in head_ids:
            head.append(name)
            continue
        if isinstance(m, ReprogrammingLayer) or _under(name, head):
            continue
        if _is_conv(m):
            pointwise, depthwise = _kernel_area(m) == 1, _is_depthwise(m)
            if pointwise and config.pointwise == "skip":
                continue
            if include is not None and not include(name):
                continue
            if exclude(name):
                continue
            kind = config.pointwise if pointwise else config.depthwise if depthwise else config.layer
            if kind == "skip":
                skipped.append(name)
                continue
            targets.append(Target(name, int(m.out_channels), depthwise, kind, int(m.in_channels)))
        elif _is_norm(m):
            norms.append(name)
    return CLRPlan(config, targets, norms, head, skipped)


def reprogramming_shapes(plan: CLRPlan) -> dict[str, tuple[int, ...]]:
    """State_dict key and shape of every reprogramming-layer tensor that attaching under ``plan`` creates."""
    shapes = {}
    for t in plan.targets:
        for name, shape in layer_class(t.layer).tensor_shapes(t, plan.config).items():
            shapes[_key(t.name, f"{CLR_ATTR}.{name}")] = shape
    return shapes


def _key(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _norm_tensors(name: str, m: nn.Module) -> Iterator[tuple[str, torch.Tensor, str]]:
    # The module's own dicts rather than named_parameters(recurse=False): same order, far less overhead on a path
    # (load_adapter, set_task) that runs once per norm layer.
    for pn, p in m._parameters.items():
        if p is not None:
            yield _key(name, pn), p, "norm_affine"
    for bn, b in m._buffers.items():
        if b is not None and bn not in m._non_persistent_buffers_set:
            yield _key(name, bn), b, "norm_stats"


def _adapter_tensors(model: nn.Module, plan: CLRPlan) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(state_dict key, tensor, kind) of everything a task's adapter owns, in a stable order.

    kind is one of "clr", "norm_affine", "norm_stats", "head". The reprogramming layers only exist once attached.
    """
    modules = dict(model.named_modules())
    for t in plan.targets:
        layer = getattr(modules[t.name], CLR_ATTR, None)
        if layer is not None:
            for pn, p in layer.params().items():
                yield _key(t.name, f"{CLR_ATTR}.{pn}"), p, "clr"
    if plan.config.train_norms:
        for name in plan.norms:
            yield from _norm_tensors(name, modules[name])
    if plan.config.train_head:
        for name in plan.head:
            m = modules[name]
            for pn, p in m.named_parameters():
                yield _key(name, pn), p, "head"
            for bn, b in m.named_buffers():
                yield _key(name, bn), b, "head"


def is_attached(model: nn.Module) -> bool:
    """Whether :func:`attach` has been applied to ``model`` (and not undone by :func:`detach`)."""
    return find_state(model) is not None


def get_config(model: nn.Module) -> CLRConfig:
    """The :class:`CLRConfig` a model was attached with."""
    return get_state(model).config


def current_plan(model: nn.Module) -> CLRPlan:
    """The plan of an attached model (its head may have been resized since attach)."""
    return plan_targets(model, get_state(model).config)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task's adapter: CLR kernels, per-task norm tensors and head, keyed as in ``model.state_dict()``."""
    return {k: t.detach() for k, t, _ in _adapter_tensors(model, current_plan(model))}


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the adapter's (CLR kernels, per-task norms, head)."""
    plan = current_plan(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, t, _ in _adapter_tensors(model, plan):
        if isinstance(t, nn.Parameter):
            t.requires_grad_(True)


def attach(model: nn.Module, config: CLRConfig | None = None, **overrides) -> nn.Module:
    """Attach CLR to a model in place: insert identity reprogramming layers and freeze all but the adapter.

    Args:
        model: Any timm CNN (or torch module with ``nn.Conv2d`` layers).
        config: What to reprogram; defaults to the paper's setting. ``CLRConfig.recommended(model)`` is the config
            measured best for the model's family (EfficientNet-Lite and MobileNetV2 so far; the paper's setting for
            any other family), its docstring giving the numbers, the learning rate and the benchmark command. The
            authors' other variants are ``CLRConfig.preset(name)`` (``"Ghost"``, ``"Ghost_a"``, ``"li18"``, ...).
        **overrides: Fields of :class:`CLRConfig` to override, e.g. ``depthwise="scale"``.

    Returns:
        The same model, which in eval mode computes exactly what it computed before (for every variant but the
        parallel 1x1 form, ``li18`` / ``li50``, whose extra convs start at PyTorch's default init, as the authors').

    Models with re-parameterisable blocks (RepVGG, MobileOne, FastViT, RepViT, LeViT, ...) can be attached in their
    training form or after ``timm.utils.reparameterize_model``; once attached, their ``fuse`` / ``reparameterize`` /
    ``switch_to_deploy`` methods raise :class:`~clr_timm.CLRError` until :func:`detach`, since fusing would silently
    drop the adapter.

    Weight decay never applies to the reprogramming layers: while attached, ``model.no_weight_decay()`` (what timm's
    ``create_optimizer_v2`` and ``param_groups_weight_decay`` ask) also names them, so any weight decay pulls only the
    head toward zero, never a kernel away from the identity (the README's "With timm's train.py" section says why).
    """
    if config is None:
        config = CLRConfig(**overrides) if overrides else CLRConfig()
    elif overrides:
        config = CLRConfig.from_dict({**config.to_dict(), **overrides})
    if not isinstance(config, CLRConfig):
        raise ConfigError(f"config must be a CLRConfig, got {type(config).__name__}")
    if is_attached(model):
        if get_config(model) == config:
            return model
        raise CLRError(
            f"model is already attached with {get_config(model)}; call clr_timm.detach(model) before attaching "
            f"with {config}"
        )
    plan = plan_targets(model, config)
    modules = dict(model.named_modules())
    for t in plan.targets:
        if hasattr(modules[t.name], CLR_ATTR):
            raise CLRError(f"module {t.name!r} already has an attribute {CLR_ATTR!r}; cannot attach CLR to it")
    frozen_stats = not (config.train_norms and config.update_norm_stats)
    frozen_norms = [n for n in plan.norms if _has_running_stats(modules[n])] if frozen_stats else []
    state = CLRState(
        config=config,
        targets=[t.name for t in plan.targets],
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        base={k: t.detach().clone() for k, t, _ in _adapter_tensors(model, plan)},
        num_classes=getattr(model, "num_classes", None),
        frozen_norms=frozen_norms,
    )
    for t in plan.targets:
        conv = modules[t.name]
        layer = layer_class(t.layer).from_conv(conv, config)
        conv.add_module(CLR_ATTR, layer)
        conv.register_forward_hook(_clr_input_hook if layer.reads_input else _clr_forward_hook)
    for n in frozen_norms:
        modules[n].register_forward_pre_hook(_frozen_norm_pre_hook)
    model.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    state.guarded = _guard_reparameterisation(model)
    _exclude_from_weight_decay(model, plan)
    object.__setattr__(model, STATE_ATTR, state)
    mark_only_adapter_as_trainable(model)
    return model


def _remove_hooks(module: nn.Module, hooks: dict, fn) -> None:
    for handle_id in [i for i, h in hooks.items() if h is fn]:
        del hooks[handle_id]
        for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            getattr(module, extra, {}).pop(handle_id, None)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def resize_head(model: nn.Module, num_classes: int) -> None:
    """Give the model a new classifier for ``num_classes`` through timm's ``reset_classifier``.

    The new head lives on the device and dtype of the old one, and is trainable when the model is attached with a
    per-task head.
    """
    if not hasattr(model, "reset_classifier"):
        raise CLRError(f"{type(model).__name__} has no reset_classifier(); cannot change its number of classes")
    ref = next(iter(model.parameters()), None)
    model.reset_classifier(num_classes)
    if ref is not None:
        for name in _head_modules(model):
            model.get_submodule(name).to(device=ref.device, dtype=ref.dtype)
    if is_attached(model):
        mark_only_adapter_as_trainable(model)


def _restore_base(model: nn.Module, state: CLRState) -> None:
    if getattr(model, "num_classes", None) != state.num_classes and state.num_classes is not None:
        resize_head(model, state.num_classes)
    tensors = _named_tensors(model)
    with torch.no_grad():
        for k, v in state.base.items():
            tensors[k].copy_(v)


def reset_adapter(model: nn.Module, num_classes: int | None = None) -> nn.Module:
    """Start a new task: identity kernels, the original norms, and the original (or a new) head.

    Args:
        model: An attached model.
        num_classes: When given, a freshly initialised head for this many classes.
    """
    state = get_state(model)
    refuse_fused(model, "resetting its adapter")
    _restore_base(model, state)
    for layer in model.modules():
        if isinstance(layer, ReprogrammingLayer):
            layer.reset_parameters()
    if num_classes is not None and num_classes != getattr(model, "num_classes", None):
        resize_head(model, num_classes)
    mark_only_adapter_as_trainable(model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove CLR: the model is then bit-identical, in state and outputs, to the model before :func:`attach`.

    The adapter's norm and head values are restored to the originals too: save the adapter first to keep it. Every
    mode the model is in (fused, memory-efficient) is left first.
    """
    state = get_state(model)
    state.teardown(model)
    modules = dict(model.named_modules())
    for name in state.targets:
        conv = modules[name]
        _remove_hooks(conv, conv._forward_hooks, _clr_forward_hook)
        _remove_hooks(conv, conv._forward_hooks, _clr_input_hook)
        if hasattr(conv, CLR_ATTR):
            delattr(conv, CLR_ATTR)
    for name in state.frozen_norms:
        _remove_hooks(modules[name], modules[name]._forward_pre_hooks, _frozen_norm_pre_hook)
        modules[name].training = model.training
    _remove_hooks(model, model._load_state_dict_post_hooks, _load_state_dict_post_hook)
    for name, method in state.guarded:
        if isinstance(modules[name].__dict__.get(method), _ReparamGuard):
            object.__delattr__(modules[name], method)
    _restore_weight_decay(model)
    _restore_base(model, state)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, True))
    object.__delattr__(model, STATE_ATTR)
    return model
