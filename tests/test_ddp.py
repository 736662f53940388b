"""Training across processes: examples/ddp_train.py under torchrun (plain DDP and Accelerate), SyncBatchNorm with CLR.

The main test runs the example with two processes (``torchrun --standalone --nproc_per_node 2``, gloo, CPU) on a tiny
model, once wrapping the model in DDP itself and once through Hugging Face Accelerate, then the same script as one
process on the same global batches, and compares the adapters. They agree to float32 rounding: the gradients are the
same sums taken in another order (per process, then all-reduced), and AdamW turns that into differences of ~2e-6 after
six steps at lr 1e-2. The tolerance, ATOL / RTOL below, is ten times that, and a hundred times smaller than how far
training moves the adapter.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import clr_timm

from ._models import make_input, make_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_train.py"
ARGS = ["--model", "test_resnet", "--image-size", "32", "--train-size", "64", "--batch-size", "8", "--steps", "6"]
ATOL, RTOL = 2e-5, 1e-4
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [*command, str(EXAMPLE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _summary(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example run as one process (no torchrun) on the same global batches: the adapter it saves."""
    from examples import ddp_train

    out = tmp_path_factory.mktemp("single") / "single.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = ddp_train.main([*ARGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert summary["world_size"] == 1 and summary["synchronised"] is None
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["--accelerate"]], ids=["torch", "accelerate"])
def test_two_processes_train_the_adapter_one_process_trains_on_the_global_batch(tmp_path, single_process, launcher):
    run = _torchrun(2, [*ARGS, *launcher, "--out", str(tmp_path / "ddp.safetensors")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "find_unused_parameters" not in run.stderr and "Warning" not in run.stderr, run.stderr[-3000:]
    ddp = _summary(run.stdout)
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["accelerate"] == bool(launcher)
    # DDP's gradient buckets hold exactly the adapter's parameters: no frozen tensor is ever all-reduced.
    assert ddp["synchronised"] == {
        "buckets": ddp["synchronised"]["buckets"],
        "tensors": ddp["trainable_tensors"],
        "values": ddp["synchronised"]["values"],
        "frozen_tensors_synchronised": 0,
        "trainable_tensors_not_synchronised": 0,
        "adapter_only": True,
    }
    assert ddp["frozen_tensors"] > 0

    a, b = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(single_process))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
    from examples import ddp_train

    initial = clr_timm.adapter_state_dict(ddp_train.build_model(ddp_train.parse_args([*ARGS, "--out", "x"]), 10))
    moved = max((b[k] - initial[k]).abs().max().item() for k in b if b[k].is_floating_point())
    assert moved > 100 * ATOL, "training should move the adapter far more than the tolerance"
    assert clr_timm.read_adapter(
        tmp_path / "ddp.safetensors"
    ).backbone_fingerprint == clr_timm.adapter.backbone_fingerprint(
        clr_timm.attach(make_model("test_resnet", num_classes=10))
    )


def test_sync_batchnorm_converted_before_attach_gives_the_same_adapter_format():
    plain = clr_timm.attach(make_model("test_resnet", num_classes=4))
    synced = timm.layers.convert_sync_batchnorm(make_model("test_resnet", num_classes=4))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    clr_timm.attach(synced)
    assert clr_timm.plan_targets(synced).norms == clr_timm.plan_targets(plain).norms
    assert list(clr_timm.adapter_state_dict(synced)) == list(clr_timm.adapter_state_dict(plain))
    assert clr_timm.adapter.backbone_fingerprint(synced) == clr_timm.adapter.backbone_fingerprint(plain)
    trainable = [n for n, p in synced.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in plain.named_parameters() if p.requires_grad]


def test_an_adapter_trained_with_sync_batchnorm_loads_into_a_plain_model(tmp_path):
    synced = clr_timm.attach(timm.layers.convert_sync_batchnorm(make_model("test_resnet", num_classes=4)))
    with torch.no_grad():
        for t in clr_timm.adapter_state_dict(synced).values():
            if t.is_floating_point():
                t.mul_(1.1)
    path = clr_timm.save_adapter(synced, tmp_path / "synced.safetensors", task="pets")
    plain = clr_timm.load_adapter(make_model("test_resnet", num_classes=4), path)
    x = make_input(size=32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), synced.eval()(x))


def test_sync_batchnorm_keeps_frozen_statistics_when_converted_before_attach():
    model = timm.layers.convert_sync_batchnorm(make_model("test_resnet", num_classes=4))
    clr_timm.attach(model, update_norm_stats=False)
    before = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k})
    model.train()(make_input(batch=4, size=32))  # no process group: SyncBatchNorm runs as BatchNorm
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_a_variant_with_two_tensors_per_layer_trains_the_same_under_ddp(tmp_path):
    # the gated form (kernel + gate per layer): every adapter tensor in DDP's buckets, the same result as one process
    from examples import ddp_train

    args = [*ARGS, "--variant", "Ghost_a"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = ddp_train.main([*args, "--out", str(tmp_path / "single.safetensors")])
    finally:
        torch.set_num_threads(threads)
    run = _torchrun(2, [*args, "--out", str(tmp_path / "ddp.safetensors")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = _summary(run.stdout)
    assert ddp["variant"] == single["variant"] == "Ghost_a" and ddp["synchronised"]["adapter_only"]
    a, b = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "single.safetensors"))
    assert sorted(a) == sorted(b) and any(k.endswith(".clr.gate") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
