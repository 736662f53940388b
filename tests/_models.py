"""Shared helpers for the tests: small timm models at random init, deterministic inputs."""

from __future__ import annotations

import copy

import timm
import torch
from torch import nn

# One model per conv / norm type the library must handle (see the core issue's test matrix).
MATRIX = [
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "tf_efficientnet_lite0",  # Conv2dSame
    "mobilenetv3_large_100",
    "convnext_tiny",  # LayerNorm2d, 7x7 depthwise
    "regnety_016",
    "densenet121",
    "resnetv2_50x1_bit",  # StdConv2d, GroupNormAct
    "dm_nfnet_f0",  # ScaledStdConv2dSame, no norm layers
    "mixnet_s",  # MixedConv2d
    "efficientnet_cc_b0_4e",  # CondConv2d
    "legacy_xception",
    "vgg11",
    "repvgg_a2",
]

# Small enough to be fast, large enough for every model in MATRIX to run.
INPUT_SIZE = 64


# Built once per session (the matrix's large models take seconds to initialise): the model and the random state its
# creation left behind, so that a copy leaves the global generator exactly where building the model would.
_BUILT: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}


def make_model(name: str, num_classes: int = 5, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model at a fixed random init (two calls with the same seed give the same weights)."""
    key = (name, num_classes, seed)
    if name in MATRIX and not kwargs and key in _BUILT:
        model, rng_state = _BUILT[key]
        torch.set_rng_state(rng_state)
        return copy.deepcopy(model)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if name in MATRIX and not kwargs:
        _BUILT[key] = (copy.deepcopy(model), torch.get_rng_state())
    return model


def make_input(batch: int = 2, size: int = INPUT_SIZE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def train_steps(model: nn.Module, steps: int = 2, batch: int = 4, lr: float = 1e-2, seed: int = 3) -> None:
    """A plain PyTorch loop: AdamW on the trainable parameters, BatchNorm in train mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=g)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
