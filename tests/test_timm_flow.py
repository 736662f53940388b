"""timm's own training flow with one inserted line, then `clr-timm extract`, `load_adapter` and `create_model`.

A tiny run trains an attached timm model with timm's utilities (ImageFolder dataset and loader factory,
create_optimizer_v2 with weight decay, ModelEmaV3, CheckpointSaver, resume_checkpoint), starting, as train.py's
--pretrained-path does, from a local weights file, so that the checkpoints are real timm-format files. Everything
downloads nothing: the "pretrained" weights are a random init saved to a safetensors file.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3

import clr_timm
from clr_timm.adapter import read_adapter
from clr_timm.checkpoint import extract_adapter, read_checkpoint
from clr_timm.cli import main

ARCH, CLASSES, SIZE = "test_resnet", 2, 32


def _write_images(root: Path) -> None:
    """A tiny ImageFolder: two classes of real PNG files (bright and dark noise)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["bright", "dark"]):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 128, (SIZE, SIZE, 3), dtype=np.uint8) + 127 * (1 - c)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / name / f"{i}.png")


def _train_model(base: Path) -> torch.nn.Module:
    """What train.py builds with --pretrained --pretrained-path BASE --num-classes 2, plus the one inserted line."""
    overlay = {"file": str(base), "num_classes": -1}
    model = timm.create_model(ARCH, pretrained=True, num_classes=CLASSES, pretrained_cfg_overlay=overlay)
    clr_timm.attach(model)  # the line inserted after create_model
    return model


def _args(base: Path) -> argparse.Namespace:
    """The train.py arguments extract reads (a subset of the real Namespace, with its names and types)."""
    return argparse.Namespace(
        model=ARCH,
        num_classes=CLASSES,
        pretrained=True,
        pretrained_path=str(base),
        initial_checkpoint="",
        in_chans=None,
        input_size=None,
        gp=None,
        bn_eps=None,
        model_kwargs={},
        model_ema=True,
        model_ema_decay=0.5,
        model_ema_force_cpu=False,
        eval_metric="top1",
        weight_decay=0.05,
        opt="adamw",
        lr=0.05,
        betas=None,
    )


def _epoch(model, ema, optimizer, loader, step: int) -> int:
    model.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        ema.update(model, step=step)
    return step


@torch.no_grad()
def _top1(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs with a resume between them; returns the folder, the trained and EMA models and a test batch."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("timm_flow")
    base = root / "base.safetensors"
    save_file(timm.create_model(ARCH, num_classes=1000).state_dict(), str(base))
    _write_images(root / "data")
    dataset = create_dataset("", root=str(root / "data"), split="train", is_training=True)
    loader = create_loader(
        dataset, (3, SIZE, SIZE), batch_size=4, is_training=True, use_prefetcher=False, num_workers=0, device="cpu"
    )
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])  # the loader's transforms, one pass
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    args, out = _args(base), root / "out"
    out.mkdir()

    model = _train_model(base)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(out), recovery_dir=str(out))
    step = _epoch(model, ema, optimizer, loader, 0)
    saver.save_checkpoint(0, metric=_top1(ema.module, x, y))

    # --resume: a fresh process would rebuild the model the same way and load the last checkpoint
    model = _train_model(base)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    start = resume_checkpoint(model, str(out / "last.pth.tar"), optimizer=optimizer)
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    load_checkpoint(ema.module, str(out / "last.pth.tar"), use_ema=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(out), recovery_dir=str(out))
    saver.load_state_dict_from_checkpoint(str(out / "last.pth.tar"))
    _epoch(model, ema, optimizer, loader, step)
    saver.save_checkpoint(start, metric=_top1(ema.module, x, y))
    return {"out": out, "base": base, "model": model.eval(), "ema": ema.module.eval(), "x": x, "args": args}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``clr-timm ARGV`` in this process (a subprocess would spend seconds importing torch): status, stdout, stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _fresh(base: Path) -> torch.nn.Module:
    """A new model from the same base weights, as a user on another machine builds it."""
    return timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(base), "num_classes": -1})


@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
def test_extract_then_load_adapter_gives_the_trained_logits(run, tmp_path, capsys, ema):
    target = tmp_path / "task.safetensors"
    status, out, err = _cli(
        capsys, "extract", str(run["out"] / "last.pth.tar"), "-o", str(target), f"--{'' if ema else 'no-'}ema"
    )
    assert status == 0, err
    assert Path(out.strip()) == target
    trained = run["ema"] if ema else run["model"]
    fresh = clr_timm.load_adapter(_fresh(run["base"]), target).eval()
    with torch.no_grad():
        assert torch.equal(fresh(run["x"]), trained(run["x"]))
        other = run["model"] if ema else run["ema"]
        assert not torch.equal(fresh(run["x"]), other(run["x"]))  # the two choices really differ


def test_validate_py_with_the_inserted_line_loads_the_checkpoint(run):
    """validate.py's --checkpoint (timm.models.load_checkpoint, strict) after the same line works; --use-ema picks."""
    for use_ema, trained in ((False, run["model"]), (True, run["ema"])):
        model = clr_timm.attach(timm.create_model(ARCH, num_classes=CLASSES))  # create_model, then the line
        load_checkpoint(model, str(run["out"] / "last.pth.tar"), use_ema=use_ema)
        with torch.no_grad():
            assert torch.equal(model.eval()(run["x"]), trained(run["x"]))


def test_extract_records_the_local_base_by_sha256_and_no_pretrained_tag(run, tmp_path):
    target = extract_adapter(run["out"] / "model_best.pth.tar", tmp_path / "a.safetensors", ema=True, task="shades")
    adapter = read_adapter(target)
    assert adapter.base_weights_sha256 == hashlib.sha256(run["base"].read_bytes()).hexdigest()
    assert (adapter.architecture, adapter.pretrained_tag, adapter.hf_hub_id) == (ARCH, None, None)
    assert adapter.task == "shades" and adapter.num_classes == CLASSES


def test_adapters_of_pretrained_tags_keep_the_file_format(run, tmp_path):
    model = clr_timm.attach(timm.create_model(ARCH, num_classes=CLASSES))
    path = clr_timm.save_adapter(model, tmp_path / "plain.safetensors")
    adapter = read_adapter(path)
    assert "base_weights_sha256" not in adapter.metadata and adapter.base_weights_sha256 is None
    assert adapter.pretrained_tag == model.pretrained_cfg["tag"]


def test_create_model_from_an_extracted_adapter_is_ready_for_timm_eval(run, tmp_path):
    target = extract_adapter(run["out"] / "last.pth.tar", tmp_path / "a.safetensors", ema=False)
    model = clr_timm.create_model(str(target), base_weights=run["base"])
    assert not model.training and clr_timm.is_attached(model)
    assert resolve_data_config({}, model=model)["input_size"][0] == 3
    with torch.no_grad():
        assert torch.equal(model(run["x"]), run["model"](run["x"]))


def test_create_model_from_a_save_pretrained_folder(run, tmp_path):
    extracted = extract_adapter(run["out"] / "last.pth.tar", tmp_path / "a.safetensors", ema=True)
    clr_timm.save_pretrained(clr_timm.load_adapter(_fresh(run["base"]), extracted), tmp_path / "repo", task="shades")
    model = clr_timm.create_model(tmp_path / "repo", task="shades", base_weights=run["base"])
    with torch.no_grad():
        assert torch.equal(model(run["x"]), run["ema"](run["x"]))


def test_a_run_from_a_pretrained_tag_records_the_tag(run, tmp_path):
    path = _rewritten(run, tmp_path, pretrained_path="")  # as if train.py had loaded timm's default weights
    adapter = read_adapter(extract_adapter(path, tmp_path / "a.safetensors", ema=False))
    default = timm.models.get_pretrained_cfg(ARCH)
    assert (adapter.pretrained_tag, adapter.hf_hub_id) == (default.tag, default.hf_hub_id)
    assert adapter.base_weights_sha256 is None


def test_create_model_asks_for_the_local_base_it_was_trained_on(run, tmp_path):
    target = extract_adapter(run["out"] / "last.pth.tar", tmp_path / "a.safetensors", ema=False)
    with pytest.raises(clr_timm.CLRError, match="base_weights=FILE"):
        clr_timm.create_model(str(target))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_file(timm.create_model(ARCH).state_dict(), str(other))
    with pytest.raises(clr_timm.BackboneMismatchError):
        clr_timm.create_model(str(target), base_weights=other)


def test_extract_without_an_ema_choice_explains_which_score_chose_model_best(run, tmp_path, capsys):
    status, _, err = _cli(
        capsys, "extract", str(run["out"] / "model_best.pth.tar"), "-o", str(tmp_path / "a.safetensors")
    )
    assert status == 2
    assert "--ema or --no-ema" in err and "EMA" in err and "top1" in err
    assert not (tmp_path / "a.safetensors").exists()


def test_timm_optimizer_never_decays_clr_kernels_and_detach_removes_the_hook(run):
    model = _train_model(run["base"])
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kernels = {n for n in names.values() if n.endswith(".clr.weight")}
    assert kernels and not kernels & decayed
    assert decayed == {"fc.weight"}  # the head's matrix; 1-D tensors (norms, biases) timm never decays
    clr_timm.detach(model)
    assert "no_weight_decay" not in vars(model) and not hasattr(model, "no_weight_decay")


def test_detach_gives_back_a_models_own_no_weight_decay():
    model = timm.create_model("test_vit", num_classes=CLASSES)  # ViTs name their position embedding
    own = model.no_weight_decay()
    clr_timm.attach(model, include=["patch_embed.*"])
    assert own < model.no_weight_decay()
    clr_timm.detach(model)
    assert "no_weight_decay" not in vars(model) and model.no_weight_decay() == own


class _Payload:
    """Unpickling this would create a file: proof of whether any code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(run, tmp_path, zipped):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth.tar"
    data = {"state_dict": run["model"].state_dict(), "args": run["args"], "payload": _Payload(marker)}
    torch.save(data, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(clr_timm.CLRError, match=r"open|Unsupported global") as e:
        extract_adapter(path, tmp_path / "a.safetensors", ema=False)
    assert str(path) in str(e.value)
    assert not marker.exists() and not (tmp_path / "a.safetensors").exists()


def test_a_truncated_checkpoint_is_a_clear_error(run, tmp_path):
    path = tmp_path / "cut.pth.tar"
    path.write_bytes((run["out"] / "last.pth.tar").read_bytes()[:50_000])
    with pytest.raises(clr_timm.CLRError, match=r"damaged|truncated"):
        read_checkpoint(path)


def _rewritten(run, tmp_path: Path, **changes) -> Path:
    """The last checkpoint with some of its training arguments changed (the test trusts its own file)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(run["out"] / "last.pth.tar", weights_only=True)
    data["args"] = argparse.Namespace(**{**vars(data["args"]), **changes})
    path = tmp_path / "changed.pth.tar"
    torch.save(data, path)
    return path


def test_a_checkpoint_of_another_architecture_is_refused(run, tmp_path):
    path = _rewritten(run, tmp_path, model="test_efficientnet")
    with pytest.raises(clr_timm.CLRError, match="does not fit 'test_efficientnet'"):
        extract_adapter(path, tmp_path / "a.safetensors", ema=False)


def test_a_backbone_other_than_the_base_weights_is_refused(run, tmp_path):
    other = tmp_path / "other.safetensors"
    torch.manual_seed(2)
    save_file(timm.create_model(ARCH).state_dict(), str(other))
    with pytest.raises(clr_timm.CLRError, match="was not trained on"):
        extract_adapter(run["out"] / "last.pth.tar", tmp_path / "a.safetensors", ema=False, base_weights=other)
    assert not (tmp_path / "a.safetensors").exists()


def test_a_run_from_a_local_file_that_is_gone_asks_for_base_weights(run, tmp_path):
    path = _rewritten(run, tmp_path, pretrained_path=str(tmp_path / "gone.safetensors"))
    with pytest.raises(clr_timm.CLRError, match="--base-weights"):
        extract_adapter(path, tmp_path / "a.safetensors", ema=False)


def test_checkpoint_pickles_only_hold_what_torch_and_timm_allow(run):
    """Guards TIMM_GLOBALS: a CheckpointSaver file names argparse.Namespace and nothing else unsafe."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(run["out"] / "last.pth.tar"))
    assert found == ["argparse.Namespace"]
