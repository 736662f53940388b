"""The reprogramming layers, and the protocol through which the rest of clr_timm uses any of them.

A reprogramming layer follows a frozen conv and transforms its output; it is the identity when attached, so a
freshly attached model computes exactly what it did before. Every kind is a :class:`ReprogrammingLayer` subclass
registered under a name with :func:`register_layer`, and owns everything about itself that the rest of the package
needs: its tensors and their shapes (attach, counting, adapter validation), its identity initialisation (attach and
new tasks), its computation with given tensors (memory-efficient recomputation), its per-sample forward (mixed-task
batches) and how it folds into the norm after it or the conv before it (``fuse``). No other module branches on the
kind.

Built in (the authors' variants, github.com/gyhandy/Channel-wise-Lightweight-Reprogramming, are configs of these;
see :meth:`clr_timm.CLRConfig.preset`):

- ``"clr"``, :class:`CLRConv2d`: the paper's channel-wise lightweight reprogramming, a depthwise k x k conv (one
  kernel per channel, no bias, 'same' padding) initialised to a centred 1. Identity at attach.
- ``"scale"``, :class:`CLRScale`: one learned scale per channel (the authors' 1x1 depthwise kernel after 1x1 convs,
  and the cheap alternative after depthwise convs). Identity at attach.
- ``"gated"``, :class:`CLRGated`: the authors' ``Ghost_a`` block, ``y + A * ghost(y)``, a depthwise k x k conv with
  PyTorch's default init and a per-channel gate ``A`` starting at zero. Identity at attach (through the gate).
- ``"parallel"``, :class:`CLRParallel`: the authors' ``li18`` / ``li50`` block, a dense 1x1 conv from the conv's
  *input* at the conv's stride, added to its output, with PyTorch's default init. **Not** the identity at attach.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = [
    "ReprogrammingLayer",
    "CLRConv2d",
    "CLRScale",
    "CLRGated",
    "CLRParallel",
    "register_layer",
    "layer_class",
    "layer_kinds",
]


class ReprogrammingLayer(nn.Module):
    """Base class of every reprogramming layer: what attach, fuse, mixed batches, counting and memory mode call.

    A subclass sets :attr:`kind`, builds itself from the conv it follows (:meth:`from_conv`), declares its tensors
    (:meth:`tensor_shapes`), initialises them (:meth:`reset_parameters`; the identity, unless the variant it
    implements starts otherwise) and computes with given tensors (:meth:`compute`, whose keyword arguments are its
    parameter names). Its ``forward`` calls ``compute`` with its own parameters, written out so that TorchScript can
    compile it. The per-sample forward and the two folds have defaults that are always correct: a loop over the
    samples, and "cannot fold".

    The inputs of ``forward``, ``compute`` and ``forward_per_sample`` are the conv's output ``y``, and its input ``x``
    too when :attr:`reads_input` is set.
    """

    kind: ClassVar[str] = ""
    reads_input: ClassVar[bool] = False
    """Whether the layer also takes the conv's input: ``forward(y, x)`` instead of ``forward(y)``."""

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Any) -> ReprogrammingLayer:
        """A new identity layer for the output of ``conv`` under a :class:`~clr_timm.CLRConfig`."""
        w = conv.weight
        return cls(int(conv.out_channels), device=w.device, dtype=w.dtype)

    @classmethod
    def tensor_shapes(cls, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        """Name and shape of each of the layer's parameters after the conv ``target`` describes (no model needed).

        ``target`` is a :class:`clr_timm.attach.Target`: ``channels`` and ``in_channels`` of the conv, ``depthwise``.
        """
        raise NotImplementedError

    @classmethod
    def num_values(cls, target: Any, config: Any) -> int:
        """How many values the layer adds to a task's adapter."""
        return sum(math.prod(s) for s in cls.tensor_shapes(target, config).values())

    def reset_parameters(self) -> None:
        """Set the layer to its initial state (the identity for the paper's kinds)."""
        raise NotImplementedError

    def compute(self, *inputs: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """The layer's computation on its inputs with the given tensors (one per parameter name, same shapes)."""
        raise NotImplementedError

    def params(self) -> dict[str, torch.Tensor]:
        """The layer's own tensors, by parameter name: what :meth:`compute` takes."""
        return {n: p for n, p in self._parameters.items() if p is not None}

    def forward_per_sample(self, params: dict[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """The layer on a batch whose samples each have their own tensors: ``params[name][i]`` is sample i's.

        The default runs :meth:`compute` once per sample; built-in kinds override it with one vectorised call.
        """
        return torch.cat(
            [
                self.compute(*(x[i : i + 1] for x in inputs), **{n: t[i] for n, t in params.items()})
                for i in range(len(inputs[0]))
            ]
        )

    def fold_norm(self, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Tensors for :meth:`compute_folded` equal to this layer followed by ``y * scale + shift`` per channel (an
        eval-mode BatchNorm), or None when that is not one layer of this kind (then the norm is not folded)."""
        return None

    def compute_folded(self, x: torch.Tensor, folded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The layer with :meth:`fold_norm`'s tensors."""
        raise NotImplementedError

    def fold_into_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, folded: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Filters and bias of one conv equal to the frozen conv (``weight``, ``bias``) followed by this layer, with
        the norm after it if ``folded`` (from :meth:`fold_norm`) is given; None when that is not exact or costs more.
        """
        return None

    def extra_repr(self) -> str:
        return f"{getattr(self, 'channels', '')}"


_REGISTRY: dict[str, type[ReprogrammingLayer]] = {}


def register_layer(cls: type[ReprogrammingLayer]) -> type[ReprogrammingLayer]:
    """Make a :class:`ReprogrammingLayer` subclass available to :class:`~clr_timm.CLRConfig` under ``cls.kind``.

    Usable as a class decorator. Registering another class under a taken name replaces it (re-running a notebook
    cell), and the built-in names are refused.
    """
    if not (isinstance(cls, type) and issubclass(cls, ReprogrammingLayer)) or not cls.kind:
        raise ConfigError(f"register_layer takes a ReprogrammingLayer subclass with a kind name, got {cls!r}")
    if cls.kind in _BUILT_IN and _REGISTRY.get(cls.kind, cls) is not cls:
        raise ConfigError(f"{cls.kind!r} is a built-in reprogramming layer kind; give {cls.__name__} another kind")
    _REGISTRY[cls.kind] = cls
    return cls


def layer_class(kind: str) -> type[ReprogrammingLayer]:
    """The layer class registered under ``kind``."""
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown reprogramming layer kind {kind!r}; registered: {layer_kinds()}") from None


def layer_kinds() -> list[str]:
    """The registered layer kinds."""
    return sorted(_REGISTRY)


class _DepthwiseKernel(ReprogrammingLayer):
    """What the depthwise k x k kinds share: their kernel, 'same' padding, and their fold into one depthwise conv."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, device=device, dtype=dtype))

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Any) -> _DepthwiseKernel:
        w = conv.weight
        return cls(int(conv.out_channels), config.kernel_size, device=w.device, dtype=w.dtype)

    def compute_folded(self, x: torch.Tensor, folded: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.conv2d(x, folded["weight"], folded["bias"], 1, self.kernel_size // 2, 1, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"


class CLRConv2d(_DepthwiseKernel):
    """Depthwise k x k reprogramming conv, identity at initialisation.

    Args:
        channels: Number of channels of the reprogrammed feature map.
        kernel_size: Odd kernel size k; padding k // 2 keeps the spatial size.
    """

    kind = "clr"

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, device, dtype)
        self.reset_parameters()

    @classmethod
    def tensor_shapes(cls, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        return {"weight": (target.channels, 1, config.kernel_size, config.kernel_size)}

    def reset_parameters(self) -> None:
        """Set every kernel to the identity (a centred 1)."""
        with torch.no_grad():
            self.weight.zero_()
            c = self.kernel_size // 2
            self.weight[:, 0, c, c] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.weight)

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, 1, self.kernel_size // 2, 1, self.channels)

    def forward_per_sample(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _depthwise_per_sample(x, params["weight"], self.kernel_size)

    def fold_norm(self, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": self.weight * scale.reshape(-1, 1, 1, 1), "bias": shift.to(self.weight.dtype)}

    # fold_into_conv: a dense k x k conv followed by a depthwise one is a (k + 2) x (k + 2) conv, more work, not less;
    # two 'same'-padded depthwise convs compose into a larger one everywhere except on the one-pixel border, where the
    # zero padding of the intermediate map differs. So neither is folded (the base class's None).


class CLRScale(ReprogrammingLayer):
    """One learned scale per channel (the ``depthwise="scale"`` policy), identity at initialisation."""

    kind = "scale"

    def __init__(
        self,
        channels: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))

    @classmethod
    def tensor_shapes(cls, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        return {"weight": (target.channels,)}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.weight)

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * weight.to(x.dtype).view(-1, 1, 1)

    def forward_per_sample(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * params["weight"].to(x.dtype).view(b, c, *([1] * (x.ndim - 2)))

    def fold_norm(self, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": self.weight * scale, "bias": shift.to(self.weight.dtype)}

    def compute_folded(self, x: torch.Tensor, folded: dict[str, torch.Tensor]) -> torch.Tensor:
        w, b = folded["weight"], folded["bias"]
        return torch.addcmul(b.to(x.dtype).view(-1, 1, 1), x, w.to(x.dtype).view(-1, 1, 1))

    def fold_into_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, folded: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A conv followed by a per-channel affine is the same conv with scaled filters and a bias.
        scale = (folded or {}).get("weight", self.weight).to(weight.dtype)
        shift = (folded or {}).get("bias")
        b = torch.zeros_like(scale) if shift is None else shift.to(weight.dtype)
        if bias is not None:
            b = b + bias * scale
        return weight * scale.reshape(-1, 1, 1, 1), b


def _depthwise_per_sample(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """One depthwise k x k conv per (sample, channel): a grouped conv over the batch folded into the channels."""
    b, c = x.shape[:2]
    y = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), weight.reshape(b * c, 1, k, k), None, 1, k // 2, 1, b * c)
    return y.view(b, c, *y.shape[2:])


class CLRGated(_DepthwiseKernel):
    """The authors' gated block (``Ghost_a``): ``y + A * ghost(y)`` with a depthwise k x k ``ghost`` conv.

    ``ghost`` starts as PyTorch initialises a conv (Kaiming-uniform, ``a = sqrt(5)``) and the per-channel gate ``A``
    at zero, so the block is the identity at attach and the gate opens as it trains. The authors exempt ``A`` from
    their weight penalty; with ``weight_decay`` in an optimizer, put ``gate`` in a group without it.

    Args:
        channels: Number of channels of the reprogrammed feature map.
        kernel_size: Odd kernel size k of ``ghost``.
    """

    kind = "gated"

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, device, dtype)
        self.gate = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def tensor_shapes(cls, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        k = config.kernel_size
        return {"weight": (target.channels, 1, k, k), "gate": (target.channels,)}

    def reset_parameters(self) -> None:
        """``ghost`` as a freshly made ``nn.Conv2d``, the gate closed."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.gate.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.weight, self.gate)

    def compute(self, x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ghost = F.conv2d(x, weight, None, 1, self.kernel_size // 2, 1, self.channels)
        return torch.addcmul(x, ghost, gate.to(x.dtype).view(-1, 1, 1))

    def forward_per_sample(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        ghost = _depthwise_per_sample(x, params["weight"], self.kernel_size)
        return torch.addcmul(x, ghost, params["gate"].to(x.dtype).view(*x.shape[:2], *([1] * (x.ndim - 2))))

    def fold_norm(self, scale: torch.Tensor, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        # y + A * (w * y) is one depthwise conv with the kernel (centred 1) + A * w
        kernel = self.weight * self.gate.view(-1, 1, 1, 1)
        c = self.kernel_size // 2
        kernel[:, 0, c, c] += 1.0
        return {"weight": kernel * scale.reshape(-1, 1, 1, 1), "bias": shift.to(self.weight.dtype)}


class CLRParallel(ReprogrammingLayer):
    """The authors' parallel block (``li18`` / ``li50``): a dense 1x1 conv from the conv's input, added to its output.

    It samples the input at the conv's stride, as the authors' ``Conv2d(in, out, 1, stride=conv.stride)`` does, and
    its output is cropped to the conv's (a conv whose padding is not ``(k - 1) // 2`` makes the two differ in size).
    It starts as PyTorch initialises a conv, so unlike the other kinds it changes the model's outputs at attach.
    ``fuse`` adds it to the centre tap of a dense conv whose padding centres its window (exact); it cannot fold into
    the norm after it (that would scale the conv's output too).

    Args:
        in_channels: Channels of the conv's input.
        channels: Channels of the conv's output.
        stride: The conv's stride.
        centre: The conv's centre tap, when the 1x1 conv lines up with it (a dense conv with static padding
            ``(k - 1) // 2 * dilation``); None otherwise.
    """

    kind = "parallel"
    reads_input = True

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: tuple[int, int] = (1, 1),
        centre: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.channels, self.stride = in_channels, channels, tuple(stride)
        self.centre = centre
        self.weight = nn.Parameter(torch.empty(channels, in_channels, 1, 1, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Module, config: Any) -> CLRParallel:
        w = conv.weight
        stride, kernel = _pair(conv.stride), _pair(conv.kernel_size)
        centre = tuple(k // 2 for k in kernel)
        padding = getattr(conv, "padding", None)
        lined_up = (
            getattr(conv, "groups", 1) == 1
            and isinstance(padding, tuple)
            and all(k % 2 for k in kernel)
            and padding == tuple(c * d for c, d in zip(centre, _pair(getattr(conv, "dilation", 1))))
        )
        return cls(
            int(conv.in_channels),
            int(conv.out_channels),
            stride,
            centre if lined_up else None,
            device=w.device,
            dtype=w.dtype,
        )

    @classmethod
    def tensor_shapes(cls, target: Any, config: Any) -> dict[str, tuple[int, ...]]:
        return {"weight": (target.channels, target.in_channels, 1, 1)}

    def reset_parameters(self) -> None:
        """As a freshly made ``nn.Conv2d`` (Kaiming-uniform, ``a = sqrt(5)``)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.compute(y, x, self.weight)

    def compute(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        r = F.conv2d(x, weight.to(x.dtype), None, self.stride)
        return y + r[..., : y.shape[-2], : y.shape[-1]]

    def forward_per_sample(self, params: dict[str, torch.Tensor], y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        xs = x[..., :: self.stride[0], :: self.stride[1]][..., : y.shape[-2], : y.shape[-1]]
        b, c, h, w = xs.shape
        r = torch.bmm(params["weight"].to(x.dtype).view(b, self.channels, c), xs.reshape(b, c, h * w))
        return y + r.view(b, self.channels, h, w)

    def fold_into_conv(
        self, weight: torch.Tensor, bias: torch.Tensor | None, folded: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.centre is None or folded is not None or weight.shape[:2] != self.weight.shape[:2]:
            return None
        merged = weight.clone()
        merged[:, :, self.centre[0], self.centre[1]] += self.weight[:, :, 0, 0].to(weight.dtype)
        return merged, bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.channels}, stride={self.stride}"


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


_BUILT_IN = (CLRConv2d.kind, CLRScale.kind, CLRGated.kind, CLRParallel.kind)
for _cls in (CLRConv2d, CLRScale, CLRGated, CLRParallel):
    register_layer(_cls)
