"""The core guarantees of CLR, on one timm model per conv and norm type."""

import pytest
import torch

import clr_timm
from clr_timm.attach import CLR_ATTR

from ._models import MATRIX, assert_state_equal, make_input, make_model, state_copy, train_steps


def _with_head(model, num_classes):
    torch.manual_seed(7)
    model.reset_classifier(num_classes)
    return model


@pytest.mark.parametrize("name", MATRIX)
def test_attached_model_computes_exactly_what_the_original_did(name):
    model = make_model(name).eval()
    x = make_input()
    with torch.no_grad():
        before = model(x)
    clr_timm.attach(model)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-6
    assert clr_timm.count_parameters(model).num_reprogrammed > 0


@pytest.mark.parametrize("name", MATRIX)
def test_attach_only_adds_clr_keys_to_the_state_dict(name):
    model = make_model(name)
    original = state_copy(model)
    clr_timm.attach(model)
    attached = state_copy(model)
    extra = set(attached) - set(original)
    assert set(original) <= set(attached)
    assert extra and all(k.endswith(f".{CLR_ATTR}.weight") for k in extra)
    assert_state_equal(original, {k: attached[k] for k in original})


@pytest.mark.parametrize("name", MATRIX)
def test_training_changes_only_the_adapter_and_save_load_detach_round_trip(name, tmp_path):
    model = make_model(name)
    clr_timm.attach(model)
    before = state_copy(model)
    adapter_keys = set(clr_timm.adapter_state_dict(model))
    train_steps(model)
    after = state_copy(model)

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert changed <= adapter_keys, f"frozen tensors changed: {sorted(changed - adapter_keys)[:5]}"
    assert any(f".{CLR_ATTR}." in k for k in changed), "no CLR kernel was trained"

    # Every trainable parameter received a gradient: the reprogramming layers are on the path of the loss.
    x = make_input()
    model.train()
    model(x).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"no gradient reached {no_grad[:5]}"
    model.zero_grad(set_to_none=True)
    model.eval()

    path = clr_timm.save_adapter(model, tmp_path / "task.safetensors")
    fresh = _with_head(make_model(name), 1000)  # same backbone weights, another head size
    clr_timm.load_adapter(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert_state_equal(state_copy(model), state_copy(fresh))

    clr_timm.detach(fresh)
    pristine = _with_head(make_model(name), 1000).eval()
    assert_state_equal(state_copy(pristine), state_copy(fresh))
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in pristine.parameters()]
    with torch.no_grad():
        assert torch.equal(fresh(x), pristine(x))
    assert not any(CLR_ATTR in n for n, _ in fresh.named_modules())
