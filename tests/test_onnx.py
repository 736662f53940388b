"""ONNX export: the file onnxruntime runs gives the PyTorch model's outputs, and exporting changes nothing."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

import clr_timm
from clr_timm.errors import CLRError

from ._models import assert_state_equal, make_input, make_model, state_copy

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = 32


def _task(name: str, config: clr_timm.CLRConfig | None = None, seed: int = 0) -> torch.nn.Module:
    """An attached model whose adapter (kernels, norms, statistics, head) holds values far from the identity."""
    model = clr_timm.attach(make_model(name), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in clr_timm.adapter_state_dict(model).items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(t.abs() + noise.abs() if key.endswith("running_var") else t + noise)
    return model.eval()


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


def _assert_close(got: np.ndarray, expected: torch.Tensor) -> None:
    expected = expected.detach().numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize(
    "name, config, folds_into_convs",
    [
        ("test_resnet", None, False),  # the paper's depthwise kernel: the norm folds into it, not into the conv
        ("tf_efficientnet_lite0", clr_timm.CLRConfig(depthwise="scale"), True),  # Conv2dSame; scales fold into convs
        ("test_resnet", clr_timm.CLRConfig.preset("Ghost_a"), False),  # gated: never folds into the conv
        ("test_resnet", clr_timm.CLRConfig.preset("li18"), True),  # parallel 1x1: into the centre tap, not the norm
    ],
)
def test_onnxruntime_gives_the_pytorch_outputs_at_any_batch_size(tmp_path, name, config, folds_into_convs):
    model = _task(name, config)
    path = clr_timm.export_onnx(model, tmp_path / "task.onnx", input_size=SIZE)
    for batch in (1, 5):
        x = make_input(batch=batch, size=SIZE, seed=batch)
        with torch.no_grad():
            _assert_close(_run(path, x), model(x))
    props = _props(path)
    assert (int(props["clr_timm.fused_convs"]) > 0) == folds_into_convs
    assert json.loads(props["clr_timm.input_size"]) == [3, SIZE, SIZE]
    assert json.loads(props["clr_timm.num_classes"]) == 5


def test_unfused_export_matches_too_and_folds_nothing(tmp_path):
    model = _task("test_efficientnet", clr_timm.CLRConfig(depthwise="scale"))
    path = clr_timm.export_onnx(model, tmp_path / "task.onnx", input_size=SIZE, fuse=False)
    x = make_input(batch=2, size=SIZE)
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))
    assert _props(path)["clr_timm.fused_convs"] == "0"


def test_a_fixed_batch_graph_refuses_another_batch_size(tmp_path):
    model = _task("test_resnet")
    path = clr_timm.export_onnx(model, tmp_path / "task.onnx", input_size=SIZE, dynamic_batch=False)
    x = make_input(batch=2, size=SIZE)
    with torch.no_grad():
        _assert_close(_run(path, x), model(x))
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _run(path, make_input(batch=3, size=SIZE))


def test_the_exported_model_is_left_bit_identical(tmp_path):
    model = _task("test_resnet").train()  # any mode: a copy is put in eval mode and fused, not the model
    before = state_copy(model)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    clr_timm.export_onnx(model, tmp_path / "task.onnx", input_size=SIZE)
    assert_state_equal(before, state_copy(model))
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert model.training and not clr_timm.is_fused(model)


def _multitask() -> clr_timm.MultiTaskModel:
    mt = clr_timm.MultiTaskModel(make_model("test_resnet"))
    mt.add_task("pets", 4, label_names=["a", "b", "c", "d"])
    mt.add_task("birds", 7)
    mt.add_task("cars", 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in mt.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(t.abs() + noise.abs() if key.endswith("running_var") else t + noise)
    mt.set_task("birds")
    return mt.eval()


def test_one_task_of_a_multitask_model_exports_without_disturbing_the_others(tmp_path):
    mt = _multitask()
    before = state_copy(mt)
    path = clr_timm.export_onnx(mt, tmp_path / "pets.onnx", task="pets", input_size=SIZE)
    x = make_input(batch=3, size=SIZE)
    with torch.no_grad():
        _assert_close(_run(path, x), mt(x, task="pets"))
    assert mt.current_task == "birds" and mt(x).shape == (3, 7)
    assert_state_equal(before, state_copy(mt))
    props = _props(path)
    assert props["clr_timm.task"] == "pets" and json.loads(props["clr_timm.label_names"]) == ["a", "b", "c", "d"]
    with pytest.raises(CLRError, match="fish"):
        clr_timm.export_onnx(mt, tmp_path / "fish.onnx", task="fish", input_size=SIZE)


def test_a_task_indexed_graph_runs_each_sample_through_its_own_task(tmp_path):
    mt = _multitask()
    before = state_copy(mt)
    tasks = ["cars", "pets"]  # a subset, in another order: task_index counts in this list
    path = clr_timm.export_onnx(mt, tmp_path / "zoo.onnx", tasks=tasks, input_size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for index in ([1, 0, 0, 1, 1], [1], [0, 0, 0]):  # any batch size, any mix (the trace saw [0, 1])
        x = make_input(batch=len(index), size=SIZE, seed=len(index))
        got = session.run(["logits"], {"input": x.numpy(), "task_index": np.array(index)})[0]
        with torch.no_grad():
            expected = mt(x, tasks=[tasks[i] for i in index])
        assert got.shape == (len(index), 4)
        for row, logits in zip(got, expected):
            _assert_close(row[: len(logits)], logits)
            assert not row[len(logits) :].any()  # zero past the task's own classes
    assert_state_equal(before, state_copy(mt))
    props = _props(path)
    assert json.loads(props["clr_timm.tasks"]) == tasks
    assert json.loads(props["clr_timm.num_classes"]) == [3, 4]


def test_a_task_indexed_graph_needs_a_multitask_model_and_distinct_tasks(tmp_path):
    with pytest.raises(CLRError, match="MultiTaskModel"):
        clr_timm.export_onnx(_task("test_resnet"), tmp_path / "zoo.onnx", tasks=["a"], input_size=SIZE)
    with pytest.raises(CLRError, match="distinct"):
        clr_timm.export_onnx(_multitask(), tmp_path / "zoo.onnx", tasks=["pets", "pets"], input_size=SIZE)
    with pytest.raises(CLRError, match=r"either task= .* or tasks="):
        clr_timm.export_onnx(_multitask(), tmp_path / "zoo.onnx", task="pets", tasks=["pets"], input_size=SIZE)
    assert _leftovers(tmp_path) == []


def test_an_existing_file_is_refused_unless_overwrite(tmp_path):
    model = _task("test_resnet")
    path = tmp_path / "task.onnx"
    path.write_bytes(b"not mine")
    with pytest.raises(CLRError, match="overwrite=True"):
        clr_timm.export_onnx(model, path, input_size=SIZE)
    assert path.read_bytes() == b"not mine"
    clr_timm.export_onnx(model, path, input_size=SIZE, overwrite=True, verify=False)
    assert onnx.load(str(path)).graph.input[0].name == "input"


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_a_failing_export_leaves_no_file(tmp_path, monkeypatch):
    def crash(model, args, f, **kwargs):  # dies half way through writing the file
        with open(f, "wb") as out:
            out.write(b"\x08\x07partial")
        raise RuntimeError("exporter died")

    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(CLRError, match="exporter died"):
        clr_timm.export_onnx(_task("test_resnet"), tmp_path / "task.onnx", input_size=SIZE)
    assert _leftovers(tmp_path) == []


def test_a_graph_onnxruntime_disagrees_with_is_not_written(tmp_path, monkeypatch):
    export = torch.onnx.export

    def wrong(model, args, f, **kwargs):  # an exporter that gets one bias wrong
        with torch.no_grad():
            model.get_classifier().bias.add_(1.0)
        return export(model, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", wrong)
    with pytest.raises(CLRError, match="onnxruntime's outputs differ"):
        clr_timm.export_onnx(_task("test_resnet"), tmp_path / "task.onnx", input_size=SIZE)
    assert _leftovers(tmp_path) == []


def test_without_onnx_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(CLRError, match=r"clr-timm\[onnx\]"):
        clr_timm.export_onnx(_task("test_resnet"), tmp_path / "task.onnx", input_size=SIZE)
    assert _leftovers(tmp_path) == []


def test_a_model_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(CLRError, match="attach"):
        clr_timm.export_onnx(make_model("test_resnet"), tmp_path / "task.onnx", input_size=SIZE)
