"""Many tasks on one backbone at scale: few objects per task, eval() that ignores the tasks, linear saves, one hash."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

import clr_timm
import clr_timm.multitask_io
from clr_timm import MultiTaskModel
from clr_timm.card import CARD_FILE, CONFIG_FILE, write_local_card
from clr_timm.errors import AdapterError, BackboneMismatchError

from ._models import make_input, make_model, train_steps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mt(n: int = 3, seed: int = 0) -> MultiTaskModel:
    mt = MultiTaskModel(make_model("resnet18", seed=seed))
    for i in range(n):
        mt.add_task(f"t{i}", 3 + i % 3)
    return mt.eval()


def test_a_task_adds_a_few_python_objects_not_a_module_tree():
    mt = _mt(1)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1, 11):
        mt.add_task(f"t{i}", 4)
    gc.collect()
    per_task = (len(gc.get_objects()) - before) / 10
    assert per_task < 60, f"{per_task:.0f} objects per task (a module tree per task is several hundred)"
    assert len(list(mt.adapters["t5"].modules())) == 2, "the task and its head"


def test_eval_and_train_set_the_shared_model_without_visiting_the_tasks():
    mt = _mt(3)
    idle = mt.adapters["t2"].fc
    idle.train(True)  # a head that is not bound keeps its mode until it is bound
    mt.eval()
    assert not mt.training and not mt.model.training and idle.training
    mt.train()
    assert mt.model.training and mt.model.fc.training
    mt.eval()
    assert torch.equal(mt(make_input(size=32), task="t2"), mt(make_input(size=32), task="t2"))
    assert not idle.training, "binding a task gives its head the model's mode"


def test_switching_through_many_tasks_gives_the_same_outputs_as_before():
    mt = _mt(10)
    x = make_input(size=32)
    with torch.no_grad():
        first = {t: mt(x, task=t) for t in mt.tasks}
        for t in reversed(mt.tasks):  # more tasks than are kept made: each is made again from its storage
            assert torch.equal(mt(x, task=t), first[t])
        mixed = mt(x, tasks=["t9", "t0"])
    assert torch.allclose(mixed[0], first["t9"][0], atol=1e-5) and torch.allclose(mixed[1], first["t0"][1], atol=1e-5)


def test_an_optimizer_keeps_training_its_task_after_switching_away_and_back():
    mt = _mt(10).train()
    mt.set_task("t0")
    params = mt.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    before = {k: v.clone() for k, v in mt.adapter_state_dict("t0").items()}
    for t in mt.tasks[1:]:
        mt.set_task(t)
    mt.set_task("t0")
    assert [id(p) for p in mt.trainable_parameters()] == [id(p) for p in params]
    x = make_input(batch=4, size=32)
    opt.zero_grad()
    mt(x).logsumexp(1).sum().backward()
    opt.step()
    after = mt.adapter_state_dict("t0")
    assert not torch.equal(after["conv1.clr.weight"], before["conv1.clr.weight"])  # (the blocks' last BN is 0)
    assert mt.model.conv1.clr.weight is mt.adapters["t0"].get_parameter("conv1.clr.weight")


def test_copies_and_pickles_hold_their_own_tasks():
    mt = _mt(3)
    x = make_input(size=32)
    with torch.no_grad():
        expected = {t: mt(x, task=t) for t in mt.tasks}
        for other in (copy.deepcopy(mt), pickle.loads(pickle.dumps(mt))):
            for t in mt.tasks:
                assert torch.equal(other(x, task=t), expected[t])
            other.adapters["t1"].state_dict(keep_vars=True)["conv1.clr.weight"].add_(1.0)
            assert not torch.equal(other(x, task="t1"), expected["t1"])
            assert torch.equal(mt(x, task="t1"), expected["t1"])


def test_saving_a_task_into_a_folder_reads_no_other_tasks_config(tmp_path):
    mt = _mt(3)
    folder = tmp_path / "zoo"
    mt.save_pretrained(folder)
    for t in ["t1", "t2"]:
        (folder / t / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(AdapterError, match="not a readable JSON"):
        write_local_card(folder)  # what a rebuild from every task's file would meet
    mt.add_task("t3", 7)
    mt.save_pretrained(folder, ["t0", "t3"], overwrite=True)
    card = (folder / CARD_FILE).read_text()
    rows = [line for line in card.splitlines() if line.startswith("| `t")]
    assert [r.split(" | ")[0] for r in rows] == ["| `t0`", "| `t1`", "| `t2`", "| `t3`"]
    assert rows[3].split(" | ")[2] == "7", "the new task's row comes from what was just written"
    plain = clr_timm.load_adapter(make_model("resnet18"), folder, task="t3")
    x = make_input(size=32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), mt(x, task="t3"))


def test_a_task_folder_without_a_row_in_the_card_is_read_for_it(tmp_path):
    mt = _mt(2)
    folder = tmp_path / "zoo"
    mt.save_pretrained(folder)
    (folder / CARD_FILE).unlink()
    mt.save_pretrained(folder, ["t1"], overwrite=True)
    assert "| `t0` |" in (folder / CARD_FILE).read_text()


def test_loading_many_tasks_hashes_the_backbone_once(tmp_path, monkeypatch):
    mt = _mt(4)
    mt.save_pretrained(tmp_path / "zoo")
    real = clr_timm.multitask_io.backbone_fingerprint
    calls = []
    monkeypatch.setattr(clr_timm.multitask_io, "backbone_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = MultiTaskModel.from_pretrained(make_model("resnet18"), tmp_path / "zoo")
    assert loaded.tasks == mt.tasks and len(calls) == 1
    with pytest.raises(BackboneMismatchError, match="other backbone weights"):
        MultiTaskModel.from_pretrained(make_model("resnet18", seed=1), tmp_path / "zoo")


def test_converting_keeps_a_trained_tasks_parameters():
    mt = _mt(2).train()
    mt.set_task("t1")
    params = mt.trainable_parameters()
    train_steps(mt, steps=1)
    mt.double()
    assert [id(p) for p in mt.trainable_parameters()] == [id(p) for p in params]
    assert all(p.dtype == torch.float64 for p in params)
    mt.eval()
    with torch.no_grad():
        out = mt(make_input(size=32).double(), tasks=["t0", "t1"])
    assert out[0].dtype == torch.float64
