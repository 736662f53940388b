"""The ``clr-timm`` command: count, info, --help, and errors without tracebacks."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clr_timm
from clr_timm.cli import main

from ._models import make_model

RESNET50_ROW = "| `resnet50` | 23,508,032 | 34,560 | 53,120 | 53,120 | 20,490 | 140,800 | 0.599% | 0.65 MB / 0.32 MB |"


def test_count_prints_a_markdown_table(capsys):
    assert main(["count", "resnet50", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| model | backbone params (no head) | CLR kernels |")
    assert RESNET50_ROW in out


def test_count_writes_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "c.json", tmp_path / "c.csv"
    assert main(["count", "resnet50", "vgg11", "--json", str(json_path), "--csv", str(csv_path)]) == 0
    data = json.loads(json_path.read_text())
    assert [m["model"] for m in data["models"]] == ["resnet50", "vgg11"]
    assert data["models"][0]["per_task"] == 140_800 and data["failed"] == {}
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["model"] == "resnet50" and rows[0]["backbone"] == "23508032"


def test_count_options_change_the_config(capsys):
    assert main(["count", "efficientnet_b0", "--depthwise", "skip", "--frozen-norms", "--num-classes", "10"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| `efficientnet_b0` | 4,007,548 | 288 | 0 | 0 | 12,810 | 288 | 0.007% |")


def test_unknown_model_is_an_error_with_suggestions(capsys):
    assert main(["count", "resnet5O"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown timm model 'resnet5O'; did you mean resnet50")
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [[], ["count"], ["info"], ["push"], ["pull"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: clr-timm")


def test_info_describes_an_adapter_file(tmp_path, capsys):
    model = clr_timm.attach(make_model("resnet18", num_classes=3))
    path = clr_timm.save_adapter(model, tmp_path / "a.safetensors", task="cats", label_names=["a", "b", "c"])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "base model            resnet18" in out
    assert "task                  cats" in out and "label names           a, b, c" in out
    kinds = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-6:]}
    c = clr_timm.count_parameters(model)
    assert kinds["clr"][:2] == ["17", f"{c.clr:,}"]
    assert kinds["norm_affine"][1] == f"{c.norm_affine:,}"
    assert kinds["head"][:2] == ["2", f"{c.head:,}"]
    assert kinds["total"][0] == str(len(clr_timm.read_adapter(path).tensors))


def test_info_counts_every_tensor_of_a_reprogramming_layer_as_clr(tmp_path, capsys):
    model = clr_timm.attach(make_model("resnet18", num_classes=3))
    path = clr_timm.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {**load_file(str(path)), "conv1.clr.bias": torch.zeros(64)}  # a layer kind with a bias too
    save_file(tensors, str(path), metadata=metadata)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    kinds = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-6:]}
    assert kinds["clr"][:2] == ["18", f"{clr_timm.count_parameters(model).clr + 64:,}"]
    assert "reprogrammed convs    17" in out


def test_info_describes_every_task_of_a_folder(tmp_path, capsys):
    for task, n in (("cats", 3), ("dogs", 4)):
        clr_timm.save_pretrained(clr_timm.attach(make_model("resnet18", num_classes=n)), tmp_path, task=task)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tasks: cats, dogs" in out and "  dogs: 4 classes" in out
    assert main(["info", str(tmp_path), "--task", "dogs", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["task"] == "dogs" and info["tensors_by_kind"]["clr"]["count"] == 17


def test_a_path_starting_with_a_slash_is_never_taken_for_a_hub_repo(capsys):
    assert main(["info", "/no-such-folder"]) == 2
    assert "no adapter file, folder or Hub repo named /no-such-folder" in capsys.readouterr().err


def test_info_of_a_missing_path_is_an_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_the_module_runs_as_a_command():
    result = subprocess.run(
        [sys.executable, "-m", "clr_timm.cli", "count", "resnet50", "--num-classes", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert RESNET50_ROW in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["count", "resnet18", "--json", "/no-such-folder/counts.json"],
        ["count", "resnet18", "--csv", "/no-such-folder/counts.csv"],
        ["info", "/tmp/" + "x" * 300],
        ["info", "x" * 300],
        ["push", "/tmp/" + "x" * 300, "org/name"],
        ["push", "/no-such-folder", "org//name"],
        ["pull", "org/name", "--revision", "../../outside"],
        ["pull", "org/name", "--task", "a" * 256],
    ],
    ids=["json", "csv", "long-path", "long-name", "push-long-path", "push-bad-repo", "revision", "task"],
)
def test_bad_input_on_the_command_line_is_an_error_without_a_traceback(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err) < 1000
