"""A real task is learned: offline ImageNet weights, a real dataset, a short CPU training of the adapter only."""

import pytest
import torch
from torch import nn

import clr_timm
from examples import offline_assets as assets

from ._models import state_copy


@pytest.mark.slow
def test_clr_learns_a_real_task_on_a_frozen_pretrained_backbone():
    torch.manual_seed(0)
    task = assets.load_task("animal_mnist", max_train=600, max_test=300, seed=0)
    mean, std = assets.input_mean_std("tf_efficientnet_lite0")
    x_train = assets.to_model_input(task.x_train, 64, mean, std)
    x_test = assets.to_model_input(task.x_test, 64, mean, std)

    model = assets.load_pretrained("tf_efficientnet_lite0", num_classes=task.num_classes)
    # Pretrained BatchNorm statistics kept, affines trained: the recipe that transfers on small batches (README).
    clr_timm.attach(model, update_norm_stats=False)
    frozen = {k: v for k, v in state_copy(model).items() if k not in clr_timm.adapter_state_dict(model)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for epoch in range(3):
        for xb, yb in assets.iterate_batches(x_train, task.y_train, 32, shuffle=True, seed=epoch):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == task.y_test).float().mean().item()
    chance = 1 / task.num_classes
    assert accuracy > chance + 0.45, f"accuracy {accuracy:.3f} vs chance {chance:.3f}"
    after = state_copy(model)
    assert all(torch.equal(v, after[k]) for k, v in frozen.items()), "a frozen backbone tensor changed"
