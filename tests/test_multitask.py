"""Many tasks on one backbone: switching by pointer, isolation, mixed-task batches, files, the Hub, task oracles."""

from __future__ import annotations

import uuid

import pytest
import timm
import torch
from torch import nn

import clr_timm
from clr_timm import AdapterMismatchError, CLRError, MultiTaskModel
from clr_timm.multitask import EntropyOracle

from ._models import assert_state_equal, make_input, make_model, train_steps

SIZES = {"a": 3, "b": 5, "c": 7}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models and inputs are tiny: on a busy machine a second thread only adds contention (float64 most)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(mt: MultiTaskModel, seed: int = 1) -> None:
    """Make every task's adapter really differ: kernels, norm affines and BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in mt.tasks:
            for key, t in mt.adapters[name].state_dict(keep_vars=True).items():
                if not t.is_floating_point():
                    continue
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                if key.endswith("running_var"):
                    t.mul_(torch.exp(0.3 * noise))  # stays positive
                else:
                    t.add_(0.1 * noise)


def _mt(name: str = "resnet18", sizes: dict[str, int] = SIZES, **kwargs) -> MultiTaskModel:
    mt = MultiTaskModel(make_model(name, **kwargs))
    for task, n in sizes.items():
        mt.add_task(task, n)
    _perturb(mt)
    return mt.eval()


def _out(module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x, **kwargs)


def _snapshot(mt: MultiTaskModel, task: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mt.adapter_state_dict(task).items()}


# --------------------------------------------------------------------------------------------- tasks


def test_tasks_are_added_switched_and_removed():
    mt = _mt()
    assert mt.tasks == ["a", "b", "c"]
    assert mt.current_task == "a", "the first task added becomes the current one"
    x = make_input(size=32)
    for task, n in SIZES.items():
        mt.set_task(task)
        assert mt.current_task == task and mt.num_classes == n == mt.model.num_classes
        assert _out(mt, x).shape == (2, n)
    mt.remove_task("c")
    assert mt.tasks == ["a", "b"] and mt.current_task is None
    with pytest.raises(CLRError, match="no current task"):
        _out(mt, x)
    with pytest.raises(CLRError, match=r"no task 'c'; tasks: \['a', 'b'\]"):
        mt.set_task("c")
    with pytest.raises(CLRError, match="already exists"):
        mt.add_task("a", 3)
    for bad in ("x.y", "x/y", ""):
        with pytest.raises(CLRError, match="task name"):
            mt.add_task(bad, 3)


def test_a_task_may_be_named_like_a_module_method():
    mt = MultiTaskModel(make_model("resnet18"))
    mt.add_task("train", 3)
    mt.add_task("items", 4)
    assert mt.tasks == ["train", "items"] and callable(mt.train)
    assert {k.split(".")[1] for k in mt.state_dict() if k.startswith("adapters.")} == {"train", "items"}


def test_switching_repoints_the_model_at_the_tasks_own_tensors_without_copying():
    mt = _mt()
    before = {t: _snapshot(mt, t) for t in mt.tasks}
    for task in ["b", "c", "a", "c"]:
        mt.set_task(task)
        own = mt.adapters[task].state_dict(keep_vars=True)
        live = mt.model.state_dict(keep_vars=True)
        for key, tensor in own.items():
            assert live[key] is tensor and live[key].data_ptr() == tensor.data_ptr(), key
        assert mt.model.fc is mt.adapters[task].fc
    for task in mt.tasks:
        assert_state_equal(before[task], mt.adapter_state_dict(task))


def test_a_new_task_starts_from_identity_kernels_and_the_original_norms_and_changes_no_other():
    x = make_input(size=32)
    plain = make_model("resnet18", global_pool="max").eval()
    mt = _mt("resnet18", global_pool="max")
    a_out = _out(mt, x, task="a")
    mt.add_task("fresh", 5)
    assert mt.model.global_pool.pool_type == "max", "timm's reset_classifier must not reset the shared pooling"
    assert torch.equal(_out(mt, x, task="a"), a_out)

    def features(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True)

    mt.set_task("fresh")
    assert (features(mt.model) - features(plain)).abs().max().item() <= 1e-6
    mt.set_task("a")
    assert (features(mt.model) - features(plain)).abs().max().item() > 1e-3


def test_only_the_current_tasks_parameters_require_grad():
    mt = _mt()
    for task in mt.tasks:
        mt.set_task(task)
        trainable = {id(p) for p in mt.parameters() if p.requires_grad}
        assert (
            trainable == {id(p) for p in mt.trainable_parameters()} == {id(p) for p in mt.adapters[task].parameters()}
        )
        assert {id(p) for p in mt.trainable_parameters("c")} == {id(p) for p in mt.adapters["c"].parameters()}


def test_training_one_task_leaves_every_other_task_bit_identical():
    mt = _mt("resnet18")
    x = make_input(size=32)
    a_tensors, a_out = _snapshot(mt, "a"), _out(mt, x, task="a")
    b_tensors = _snapshot(mt, "b")
    backbone = {k: v.clone() for k, v in mt.state_dict().items() if k.startswith("model.")}

    mt.set_task("b")
    train_steps(mt, steps=2)  # a plain loop over [p for p in mt.parameters() if p.requires_grad], BN in train mode

    assert_state_equal(a_tensors, mt.adapter_state_dict("a"))
    assert torch.equal(_out(mt, x, task="a"), a_out)
    assert_state_equal(backbone, {k: v for k, v in mt.state_dict().items() if k.startswith("model.")})
    after = mt.adapter_state_dict("b")
    changed = {k for k in b_tensors if not torch.equal(b_tensors[k], after[k])}
    assert any(".clr." in k for k in changed) and "fc.weight" in changed
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= changed


# --------------------------------------------------------------------------------------------- mixed-task batches


@pytest.mark.parametrize("name", ["resnet50", "tf_efficientnet_lite0", "resnetv2_50x1_bit", "convnext_tiny"])
def test_a_mixed_batch_equals_each_sample_run_alone_with_its_task(name):
    # float64 so that the comparison tests the logic, not float32's batch-size-dependent rounding.
    mt = _mt(name).double()
    x = make_input(batch=5, size=32).double()
    tasks = ["a", "b", "c", "c", "a"]
    mixed = _out(mt, x, tasks=tasks)
    assert [m.shape for m in mixed] == [(SIZES[t],) for t in tasks]
    for i, task in enumerate(tasks):
        alone = _out(mt, x[i : i + 1], task=task)[0]
        assert (mixed[i] - alone).abs().max().item() <= 1e-5, (i, task)
    # The tasks really differ (norm statistics and affines included), so the check above means something.
    assert (mixed[0][:3] - _out(mt, x[:1], task="c")[0][:3]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])  # two per-sample BatchNorm paths
def test_a_mixed_batch_in_float32_matches_to_float32_precision(layout):
    mt = _mt("resnet18").to(memory_format=layout)
    x = make_input(batch=6, size=64).contiguous(memory_format=layout)
    tasks = ["c", "a", "b", "a", "c", "b"]
    mixed = _out(mt, x, tasks=tasks)
    for i, task in enumerate(tasks):
        assert (mixed[i] - _out(mt, x[i : i + 1], task=task)[0]).abs().max().item() <= 1e-5


def test_a_mixed_batch_runs_the_backbone_once():
    mt = _mt("resnet18")
    calls = []
    mt.model.conv1.register_forward_hook(lambda *args: calls.append(1))
    _out(mt, make_input(batch=4, size=32), tasks=["a", "b", "c", "a"])
    assert len(calls) == 1
    assert "forward" not in vars(mt.model.layer1[0].bn1) and mt.model.fc is mt.adapters["a"].fc


class _TinyNet(nn.Module):
    """A timm-style model with a norm that has no vectorised per-sample form (RmsNorm2d) and a depthwise conv."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = timm.layers.RmsNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.num_classes = num_classes
        self.fc = nn.Linear(8, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.dw(torch.relu(self.norm(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def test_other_norms_and_scale_layers_work_in_mixed_batches():
    torch.manual_seed(0)
    mt = MultiTaskModel(_TinyNet(), clr_timm.CLRConfig(depthwise="scale"))
    for task, n in SIZES.items():
        mt.add_task(task, n)
    _perturb(mt)
    assert isinstance(mt.model.dw.clr, clr_timm.layers.CLRScale) and "norm.weight" in mt.adapter_state_dict("a")
    x = make_input(batch=4, size=16)
    tasks = ["b", "a", "c", "b"]
    mixed = _out(mt, x, tasks=tasks)
    for i, task in enumerate(tasks):
        assert (mixed[i] - _out(mt, x[i : i + 1], task=task)[0]).abs().max().item() <= 1e-5


def test_mixed_batches_and_other_tasks_are_refused_in_train_mode():
    mt = _mt().train()
    x = make_input(size=32)
    with pytest.raises(CLRError, match="eval mode"):
        mt(x, tasks=["a", "b"])
    with pytest.raises(CLRError, match=r"set_task\('b'\)"):
        mt(x, task="b")
    with pytest.raises(CLRError, match="2 samples"):
        mt.eval()(x, tasks=["a"])


# --------------------------------------------------------------------------------------------- state_dict, devices


def test_state_dict_holds_every_task_once_and_loads_back():
    mt = _mt()
    state = mt.state_dict()
    for task in mt.tasks:
        own = mt.adapter_state_dict(task)
        assert all(torch.equal(state[f"adapters.{task}.{k}"], v) for k, v in own.items())
    assert "model.fc.weight" not in state and "model.layer1.0.conv1.clr.weight" not in state
    assert "model.layer1.0.conv1.weight" in state

    other = MultiTaskModel(make_model("resnet18"))
    for task, n in SIZES.items():
        other.add_task(task, n)
    other.set_task("c")  # another current task than mt's
    other.load_state_dict(state)
    x = make_input(size=32)
    for task in mt.tasks:
        assert torch.equal(_out(other, x, task=task), _out(mt, x, task=task))


def test_converting_the_model_keeps_the_bound_task_in_place():
    mt = _mt().double()
    mt.set_task("b")
    for task in ["b", "a"]:
        mt.set_task(task)
        live = mt.model.state_dict(keep_vars=True)
        own = mt.adapters[task].state_dict(keep_vars=True)
        assert all(live[k] is v and v.dtype in (torch.float64, torch.int64) for k, v in own.items())
    assert _out(mt, make_input(size=32).double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------- files and the Hub


def test_a_saved_task_loads_into_a_plain_model_bit_identically(tmp_path):
    mt = _mt()
    path = mt.save_task("b", tmp_path / "b.safetensors")
    adapter = clr_timm.read_adapter(path)
    assert adapter.task == "b" and adapter.num_classes == 5
    plain = clr_timm.load_adapter(make_model("resnet18"), path)
    assert set(adapter.tensors) == set(clr_timm.adapter_state_dict(plain))
    x = make_input(size=32)
    assert torch.equal(_out(plain, x), _out(mt, x, task="b"))
    assert mt.current_task == "a" and torch.equal(_out(mt, x), _out(mt, x, task="a"))


def test_save_pretrained_and_from_pretrained_round_trip_every_task(tmp_path):
    mt = _mt()
    mt.adapters["a"].label_names = ["x", "y", "z"]
    mt.save_pretrained(tmp_path / "zoo")
    loaded = MultiTaskModel.from_pretrained(make_model("resnet18"), tmp_path / "zoo")
    assert sorted(loaded.tasks) == mt.tasks and loaded.adapters["a"].label_names == ["x", "y", "z"]
    x = make_input(size=32)
    for task in mt.tasks:
        assert torch.equal(_out(loaded, x, task=task), _out(mt, x, task=task))
    plain = clr_timm.load_adapter(make_model("resnet18"), tmp_path / "zoo", task="c")
    assert torch.equal(_out(plain, x), _out(mt, x, task="c"))


def test_single_task_files_load_as_tasks(tmp_path):
    x = make_input(size=32)
    paths, outputs = {}, {}
    for seed, (task, n) in enumerate([("pets", 4), ("birds", 6)]):
        model = clr_timm.attach(make_model("resnet18"))
        clr_timm.reset_adapter(model, num_classes=n)
        train_steps(model, steps=1, seed=seed)
        paths[task] = clr_timm.save_adapter(model, tmp_path / f"{task}.safetensors", task=f"{task}-v1")
        outputs[task] = _out(model, x)
    mt = MultiTaskModel.from_adapters(make_model("resnet18"), paths)
    assert mt.tasks == ["pets", "birds"] and mt.current_task == "pets"
    for task in mt.tasks:
        assert torch.equal(_out(mt, x, task=task), outputs[task])
    assert mt.load_task(None, paths["pets"]) == "pets-v1", "named after the task recorded in the file"
    assert torch.equal(_out(mt, x, task="pets-v1"), outputs["pets"])


def test_load_task_checks_the_task_a_file_records(tmp_path):
    mt = _mt()
    path = mt.save_task("b", tmp_path / "b.safetensors", dtype="fp16")
    with pytest.raises(AdapterMismatchError, match=r"records task 'b', not task 'c'"):
        mt.load_task("b2", path, task="c")
    assert mt.tasks == ["a", "b", "c"]
    assert mt.load_task("b2", path, task="b") == "b2" and mt.adapters["b2"].num_classes == 5


def test_a_saved_task_records_its_own_label_names_only(tmp_path):
    model = clr_timm.attach(make_model("resnet18"))
    clr_timm.reset_adapter(model, num_classes=3)
    labelled = clr_timm.save_adapter(model, tmp_path / "pets.safetensors", task="pets", label_names=["x", "y", "z"])
    mt = MultiTaskModel(clr_timm.load_adapter(make_model("resnet18"), labelled), task="pets")
    mt.add_task("birds", 3)
    assert clr_timm.read_adapter(mt.save_task("birds", tmp_path / "birds.safetensors")).label_names is None
    assert clr_timm.read_adapter(mt.save_task("pets", tmp_path / "pets2.safetensors")).label_names == ["x", "y", "z"]


def test_an_adapter_that_does_not_fit_adds_no_task(tmp_path):
    other = clr_timm.attach(make_model("resnet34"))
    path = clr_timm.save_adapter(other, tmp_path / "r34.safetensors")
    mt = _mt()
    before = mt.state_dict()
    with pytest.raises(AdapterMismatchError):
        mt.load_task("r34", path)
    assert mt.tasks == ["a", "b", "c"]
    assert_state_equal(before, mt.state_dict())


def test_adopting_an_attached_model_keeps_its_adapter_without_copying(tmp_path):
    model = clr_timm.attach(make_model("resnet18"))
    train_steps(model, steps=1)
    x = make_input(size=32)
    expected = _out(model, x)
    kernel = model.layer1[0].conv1.clr.weight
    mt = MultiTaskModel(model, task="pets")
    assert mt.tasks == ["pets"] and mt.adapters["pets"].get_parameter("layer1.0.conv1.clr.weight") is kernel
    mt.add_task("birds", 3)
    assert torch.equal(_out(mt, x), expected)


def test_many_tasks_go_to_and_come_back_from_the_hub(hub_server):
    mt = _mt()
    repo_id = f"alice/clr-mt-{uuid.uuid4().hex[:10]}"
    mt.push_to_hub(repo_id, token=hub_server.token_for("alice"))
    loaded = MultiTaskModel.from_pretrained(make_model("resnet18"), f"hf-hub:{repo_id}")
    assert sorted(loaded.tasks) == mt.tasks
    x = make_input(size=32)
    for task in mt.tasks:
        assert torch.equal(_out(loaded, x, task=task), _out(mt, x, task=task))


# --------------------------------------------------------------------------------------------- task oracles


def test_the_entropy_oracle_routes_an_easy_synthetic_case():
    """Two input domains; each task's head is confident on its own domain only. The oracle must find the task."""
    mt = MultiTaskModel(make_model("resnet18"))
    mt.add_task("red", 4)
    mt.add_task("blue", 6)
    mt.eval()
    g = torch.Generator().manual_seed(0)
    red = torch.randn(8, 3, 32, 32, generator=g) * 0.2
    blue = red.clone()
    red[:, 0] += 2.0
    blue[:, 2] += 2.0
    with torch.no_grad():
        features = mt.model.forward_head(mt.model.forward_features(torch.cat([red, blue])), pre_logits=True)
        f_red, f_blue = features[:8].mean(0), features[8:].mean(0)
        direction = f_red - f_blue
        middle = (direction * (f_red + f_blue) / 2).sum()
        scale = 50.0 / (direction * direction).sum().sqrt() ** 2
        for task, sign in [("red", 1.0), ("blue", -1.0)]:
            head = mt.adapters[task].fc
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0] = sign * scale * direction  # class 0 fires on the task's own domain, and only there
            head.bias[0] = -sign * scale * middle
    x = torch.cat([red[:4], blue[:4], red[4:], blue[4:]])
    truth = ["red"] * 4 + ["blue"] * 4 + ["red"] * 4 + ["blue"] * 4
    routed = mt.predict_task(x, oracle="entropy")
    assert routed == truth
    tasks, entropy = EntropyOracle().scores(mt, x)
    assert tasks == ["red", "blue"] and entropy.shape == (16, 2) and bool(((entropy >= 0) & (entropy <= 1)).all())
    out = _out(mt, x, tasks=EntropyOracle())
    assert [o.shape[0] for o in out] == [4 if t == "red" else 6 for t in truth]
