"""The reprogramming layers inserted after a frozen conv.

``CLRConv2d`` is the paper's channel-wise lightweight reprogramming: a depthwise k x k conv (one kernel per channel,
no bias, 'same' padding) initialised to the identity, so a freshly attached model computes exactly what it did
before. ``CLRScale`` is the cheap alternative for the output of depthwise convs: one learned scale per channel.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLRConv2d", "CLRScale", "CLR_LAYERS"]


class CLRConv2d(nn.Module):
    """Depthwise k x k reprogramming conv, identity at initialisation.

    Args:
        channels: Number of channels of the reprogrammed feature map.
        kernel_size: Odd kernel size k; padding k // 2 keeps the spatial size.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every kernel to the identity (a centred 1)."""
        with torch.no_grad():
            self.weight.zero_()
            c = self.kernel_size // 2
            self.weight[:, 0, c, c] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        if "fused_bias" in self._buffers:  # clr_timm.fuse folded the following BatchNorm in
            return F.conv2d(x, self._buffers["fused_weight"], self._buffers["fused_bias"], 1, p, 1, self.channels)
        return F.conv2d(x, self.weight, None, 1, p, 1, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"


class CLRScale(nn.Module):
    """One learned scale per channel (the ``depthwise="scale"`` policy), identity at initialisation."""

    def __init__(
        self,
        channels: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "fused_conv_weight" in self._buffers:  # clr_timm.fuse folded this scale into the conv's filters
            return x
        if "fused_bias" in self._buffers:  # clr_timm.fuse folded the following BatchNorm in
            w, b = self._buffers["fused_weight"], self._buffers["fused_bias"]
            return torch.addcmul(b.to(x.dtype).view(-1, 1, 1), x, w.to(x.dtype).view(-1, 1, 1))
        return x * self.weight.to(x.dtype).view(-1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.channels}"


CLR_LAYERS = (CLRConv2d, CLRScale)


def conv_computations() -> dict:
    """``type(conv).forward`` -> ``f(conv, x, weight, bias)``, the same conv with given filters, for the conv classes
    whose forward is exactly one convolution (``nn.Conv2d`` and timm's ``Conv2dSame``, which pads first)."""
    forwards = {nn.Conv2d.forward: _plain_conv}
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:  # pragma: no cover - every supported timm has it
        return forwards
    forwards[Conv2dSame.forward] = _same_conv
    return forwards


def _plain_conv(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return conv._conv_forward(x, w, b)


def _same_conv(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    from timm.layers.conv2d_same import conv2d_same

    return conv2d_same(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


class InstanceForward:
    """A ``forward`` set on one module instance: calls ``fn(module, *extra, *args, **kwargs)``.

    It holds the module weakly, so that module -> ``__dict__`` -> forward -> module is no reference cycle (a deleted
    model is freed at once, not at the next garbage collection), and a deep copy or a pickle of the module gets a
    forward bound to the copy.
    """

    def __init__(self, fn: Callable, module: nn.Module, *extra) -> None:
        self.fn, self.extra = fn, extra
        self._module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        return self.fn(self._module(), *self.extra, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> InstanceForward:
        module = copy.deepcopy(self._module(), memo)
        return InstanceForward(copy.deepcopy(self.fn, memo), module, *copy.deepcopy(self.extra, memo))

    def __reduce__(self):
        return InstanceForward, (self.fn, self._module(), *self.extra)
