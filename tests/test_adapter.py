"""The adapter file: what it holds, round trips, and refusing bad input without touching the model."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clr_timm
from clr_timm.adapter import FORMAT_VERSION

from ._models import assert_state_equal, make_input, make_model, state_copy, train_steps


@pytest.fixture
def trained(tmp_path):
    """A resnet18 with a trained 3-class adapter saved to disk."""
    model = clr_timm.attach(make_model("resnet18", num_classes=3))
    train_steps(model)
    path = clr_timm.save_adapter(model, tmp_path / "pets.safetensors", task="pets", label_names=["a", "b", "c"])
    return model, path


def _rewrite(path, out, tensors=None, metadata=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path)) if tensors is None else tensors
    save_file(tensors, str(out), metadata=metadata if metadata is not None else meta)
    return out


def _assert_unchanged(model, before):
    assert not clr_timm.is_attached(model)
    assert_state_equal(before, state_copy(model))


def test_file_holds_only_the_task_delta_and_its_metadata(trained):
    model, path = trained
    tensors = load_file(str(path))
    assert set(tensors) == set(clr_timm.adapter_state_dict(model))
    assert not any(k == "conv1.weight" or k.endswith(".conv1.weight") for k in tensors)
    info = clr_timm.read_adapter(path)
    assert info.task == "pets" and info.label_names == ["a", "b", "c"] and info.num_classes == 3
    assert info.architecture == "resnet18" and info.config == clr_timm.CLRConfig()
    assert info.backbone_fingerprint == clr_timm.adapter.backbone_fingerprint(model)
    assert {"torch", "timm", "safetensors", "clr_timm"} <= set(info.versions)
    assert info.metadata["clr_format_version"] == str(FORMAT_VERSION)


def test_load_into_a_fresh_model_attaches_resizes_the_head_and_is_bit_exact(trained):
    model, path = trained
    fresh = make_model("resnet18", num_classes=1000)
    fresh_backbone = make_model("resnet18", num_classes=3)  # same backbone weights as `model` was built with
    fresh.load_state_dict(
        {k: v for k, v in fresh_backbone.state_dict().items() if not k.startswith("fc.")}, strict=False
    )
    clr_timm.load_adapter(fresh, path)
    assert fresh.num_classes == 3 and clr_timm.is_attached(fresh)
    x = make_input()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_storage_halves_the_file(trained, tmp_path, dtype, torch_dtype):
    model, full = trained
    half = clr_timm.save_adapter(model, tmp_path / f"{dtype}.safetensors", dtype=dtype, task="pets")
    assert os.path.getsize(half) < 0.55 * os.path.getsize(full)
    assert load_file(str(half))["conv1.clr.weight"].dtype == torch_dtype
    fresh = make_model("resnet18", num_classes=3)
    clr_timm.load_adapter(fresh, half)
    assert fresh.conv1.clr.weight.dtype == torch.float32
    assert torch.allclose(fresh.conv1.clr.weight, model.conv1.clr.weight, atol=1e-2)


def test_load_into_an_attached_model_replaces_its_adapter(trained):
    model, path = trained
    other = clr_timm.attach(make_model("resnet18", num_classes=3))
    clr_timm.load_adapter(other, path)
    assert_state_equal(state_copy(model), state_copy(other))


def test_saving_leaves_the_model_as_it_was(trained, tmp_path):
    model, _ = trained  # saved with task="pets" and label names: saving records nothing on the model
    before = state_copy(model)
    again = clr_timm.read_adapter(clr_timm.save_adapter(model, tmp_path / "again.safetensors"))
    assert again.task is None and again.label_names is None
    assert_state_equal(before, state_copy(model))


def test_a_loaded_adapter_gives_the_task_and_labels_the_next_save_records(trained, tmp_path):
    _, path = trained
    fresh = clr_timm.load_adapter(make_model("resnet18", num_classes=3), path)
    resaved = clr_timm.read_adapter(clr_timm.save_adapter(fresh, tmp_path / "resaved.safetensors"))
    assert resaved.task == "pets" and resaved.label_names == ["a", "b", "c"]
    renamed = clr_timm.read_adapter(clr_timm.save_adapter(fresh, tmp_path / "renamed.safetensors", task="cats"))
    assert renamed.task == "cats"


def test_task_names_the_task_a_single_file_must_record(trained):
    _, path = trained
    model = make_model("resnet18", num_classes=3)
    before = state_copy(model)
    with pytest.raises(clr_timm.AdapterMismatchError, match=r"records task 'pets', not task 'flowers'"):
        clr_timm.load_adapter(model, path, task="flowers")
    _assert_unchanged(model, before)
    clr_timm.load_adapter(model, path, task="pets")
    assert clr_timm.is_attached(model)


def test_a_file_that_records_no_task_loads_only_without_task(trained, tmp_path):
    model, _ = trained
    anonymous = clr_timm.save_adapter(model, tmp_path / "anonymous.safetensors")
    fresh = make_model("resnet18", num_classes=3)
    with pytest.raises(clr_timm.AdapterMismatchError, match=r"records no task name, not task 'pets'"):
        clr_timm.load_adapter(fresh, anonymous, task="pets")
    assert clr_timm.is_attached(clr_timm.load_adapter(fresh, anonymous))


def test_dtype_and_task_are_keyword_only(trained, tmp_path):
    model, _ = trained
    with pytest.raises(TypeError):
        clr_timm.save_adapter(model, tmp_path / "x.safetensors", "fp16")
    with pytest.raises(TypeError):
        clr_timm.save_pretrained(model, tmp_path / "zoo", "pets")


def test_save_requires_an_attached_model(tmp_path):
    with pytest.raises(clr_timm.CLRError, match="attach"):
        clr_timm.save_adapter(make_model("resnet18"), tmp_path / "x.safetensors")


def test_save_refuses_to_overwrite_another_tasks_adapter(trained, tmp_path):
    model, path = trained
    before = path.read_bytes()
    with pytest.raises(clr_timm.AdapterError, match="'pets'"):
        clr_timm.save_adapter(model, path, task="flowers")
    assert path.read_bytes() == before
    clr_timm.save_adapter(model, path, task="pets")  # the same task: a checkpoint, replaced
    clr_timm.save_adapter(model, path, task="flowers", overwrite=True)
    assert clr_timm.read_adapter(path).task == "flowers"


def test_save_refuses_to_overwrite_a_file_that_is_not_an_adapter(trained, tmp_path):
    model, _ = trained
    other = tmp_path / "notes.safetensors"
    other.write_text("my notes")
    with pytest.raises(clr_timm.AdapterError, match="not a clr_timm adapter"):
        clr_timm.save_adapter(model, other)
    assert other.read_text() == "my notes"


def test_an_interrupted_save_leaves_the_previous_file_intact(trained, monkeypatch):
    model, path = trained
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        clr_timm.save_adapter(model, path, task="pets")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_different_architecture_is_refused_and_the_model_is_untouched(trained):
    _, path = trained
    other = make_model("resnet34", num_classes=3)
    before = state_copy(other)
    with pytest.raises(clr_timm.AdapterMismatchError, match="resnet18"):
        clr_timm.load_adapter(other, path)
    _assert_unchanged(other, before)


def test_other_backbone_weights_are_refused_unless_overridden(trained):
    _, path = trained
    other = make_model("resnet18", num_classes=3, seed=123)
    before = state_copy(other)
    with pytest.raises(clr_timm.BackboneMismatchError, match="check_backbone=False"):
        clr_timm.load_adapter(other, path)
    _assert_unchanged(other, before)
    clr_timm.load_adapter(other, path, check_backbone=False)
    assert clr_timm.is_attached(other)


def test_a_model_attached_with_another_config_is_refused(trained):
    _, path = trained
    model = clr_timm.attach(make_model("resnet18", num_classes=3), kernel_size=5)
    before = state_copy(model)
    with pytest.raises(clr_timm.AdapterMismatchError, match="detach"):
        clr_timm.load_adapter(model, path)
    assert_state_equal(before, state_copy(model))


def _damaged(path, tmp_path, how):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    out = tmp_path / f"{how}.safetensors"
    if how == "missing_key":
        del tensors["layer1.0.conv1.clr.weight"]
    elif how == "extra_key":
        tensors["layer9.clr.weight"] = torch.zeros(3, 1, 3, 3)
    elif how == "wrong_shape":
        tensors["layer1.0.conv1.clr.weight"] = torch.zeros(64, 1, 5, 5)
    elif how == "wrong_dtype":
        tensors["bn1.weight"] = tensors["bn1.weight"].to(torch.int32)
    elif how == "nan":
        tensors["bn1.weight"][0] = float("nan")
    elif how == "newer_version":
        meta["clr_format_version"] = str(FORMAT_VERSION + 1)
    elif how == "no_metadata":
        meta = {}
    elif how == "bad_config_json":
        meta["config"] = "{not json"
    elif how == "unknown_config_field":
        meta["config"] = json.dumps({**json.loads(meta["config"]), "rank": 4})
    elif how == "bad_num_classes":
        meta["num_classes"] = '"three"'
    return _rewrite(path, out, tensors, meta)


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing_key", "no tensor 'layer1.0.conv1.clr.weight'"),
        ("extra_key", "'layer9.clr.weight'"),
        ("wrong_shape", r"shape \(64, 1, 5, 5\)"),
        ("wrong_dtype", "dtype"),
        ("nan", "NaN"),
        ("newer_version", "upgrade clr_timm"),
        ("no_metadata", "not a clr_timm adapter"),
        ("bad_config_json", "CLRConfig"),
        ("unknown_config_field", "rank"),
        ("bad_num_classes", "num_classes"),
    ],
)
def test_a_damaged_adapter_raises_adapter_error_and_leaves_the_model_as_it_was(trained, tmp_path, how, message):
    _, path = trained
    bad = _damaged(path, tmp_path, how)
    model = make_model("resnet18", num_classes=3)
    before = state_copy(model)
    with pytest.raises(clr_timm.AdapterError, match=message):
        clr_timm.load_adapter(model, bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (os.urandom(256), "not a readable safetensors"),
        (None, "truncated"),
        ("pickle", "pickle"),
    ],
)
def test_files_that_are_not_adapters_are_refused_without_unpickling(trained, tmp_path, content, message):
    _, path = trained
    bad = tmp_path / "bad.safetensors"
    if content is None:
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "pickle":
        torch.save({"conv1.clr.weight": torch.zeros(1)}, bad)
    else:
        bad.write_bytes(content)
    model = make_model("resnet18", num_classes=3)
    before = state_copy(model)
    with pytest.raises(clr_timm.AdapterError, match=message):
        clr_timm.load_adapter(model, bad)
    _assert_unchanged(model, before)


def test_a_missing_file_raises_adapter_error(tmp_path):
    with pytest.raises(clr_timm.AdapterError, match="no adapter file"):
        clr_timm.load_adapter(make_model("resnet18"), tmp_path / "nope.safetensors")


def test_every_library_error_is_a_clr_error():
    for cls in (
        clr_timm.ConfigError,
        clr_timm.AdapterError,
        clr_timm.AdapterMismatchError,
        clr_timm.BackboneMismatchError,
    ):
        assert issubclass(cls, clr_timm.CLRError)
