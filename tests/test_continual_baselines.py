"""benchmarks/continual_baselines.py runs end to end on a tiny setting (the figures come from the real run)."""

import json

import pytest
import torch

import clr_timm
from benchmarks import continual_baselines, long_sequence


def test_baselines_benchmark_measures_forgetting_per_method(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = continual_baselines.main(
            [
                "--tasks",
                "uci_digits",
                "lfw_faces",
                "--methods",
                "probe",
                "clr",
                "sequential",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--max-train",
                "48",
                "--max-test",
                "24",
                "--batch-size",
                "16",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    by_key = {r.key: r for r in results}
    assert set(by_key) == {"probe", "clr", "sequential"}
    saved = json.loads((tmp_path / "continual_baselines.json").read_text())
    assert saved and (tmp_path / "continual_baselines.md").read_text().count("|") > 10
    assert by_key["clr"].forgetting == 0.0 and by_key["probe"].forgetting == 0.0
    assert by_key["clr"].per_task_trained > by_key["probe"].per_task_trained
    assert len(by_key["clr"].matrix) == 2 and by_key["clr"].matrix[1][0] == by_key["clr"].matrix[0][0]


def test_runs_of_single_seeds_merge_into_one_table_and_mismatches_are_refused(tmp_path):
    threads = torch.get_num_threads()
    common = "--tasks uci_digits lfw_faces --methods probe sequential --epochs 1 --image-size 32 --max-train 32 "
    common += "--max-test 16 --batch-size 16 --threads 1 --no-progress --out"
    try:
        for seed in (0, 1):
            continual_baselines.main([*common.split(), str(tmp_path), "--seeds", str(seed), "--name", f"s{seed}"])
        merged = continual_baselines.main(
            ["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(tmp_path), "--name", "m"]
        )
        continual_baselines.main([*common.split(), str(tmp_path), "--seeds", "3", "--methods", "probe", "--name", "s3"])
        uneven = continual_baselines.main(
            ["--merge", *(str(tmp_path / f"s{i}.json") for i in (0, 1, 3)), "--out", str(tmp_path), "--name", "u"]
        )
        other = common.replace("--max-train 32", "--max-train 24")
        continual_baselines.main([*other.split(), str(tmp_path), "--seeds", "2", "--name", "s2"])
    finally:
        torch.set_num_threads(threads)
    assert sorted((r.key, r.seed) for r in merged) == [("probe", 0), ("probe", 1), ("sequential", 0), ("sequential", 1)]
    table = (tmp_path / "m.md").read_text()
    assert "Merged by" in table and "--seeds 0" in table and "--seeds 1" in table and table.count(" ± ") >= 8
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1] and len(saved["results"]) == 4
    assert len(uneven) == 5  # probe over three seeds, sequential over two: each row says how many
    rows = [line.split(" | ") for line in (tmp_path / "u.md").read_text().splitlines() if line.startswith("| ")]
    seeds = {cells[0]: cells[2] for cells in rows if len(cells) > 2}
    assert seeds["| linear probe"] == "3" and seeds["| sequential fine-tuning, shared backbone"] == "2"
    for pair, error in ((("s0", "s2"), "max_train"), (("s0", "s0"), "repeat seed 0 of method 'probe'")):
        with pytest.raises(SystemExit, match=error):
            files = [str(tmp_path / f"{name}.json") for name in pair]
            continual_baselines.main(["--merge", *files, "--out", str(tmp_path), "--name", "bad"])


def test_placement_group_holds_every_preset_every_depthwise_policy_and_the_baselines():
    methods = continual_baselines.parse_args(["--methods", "placement", "--tasks", "uci_digits"]).methods
    configs = [continual_baselines.METHODS[k].config for k in methods if continual_baselines.METHODS[k].kind == "clr"]
    for preset in ("clr", "clr-full", "clr-pointwise-scale", "clr-gated", "parallel-1x1"):
        assert clr_timm.CLRConfig.preset(preset, update_norm_stats=False) in configs, preset
    assert {c.depthwise for c in configs if c.layer == "clr"} == {"clr", "scale", "skip"}
    assert {"norm_head", "supsup_frozen_bn", "lora", "full"} <= set(methods)


def test_long_sequence_has_at_least_15_pip_tasks_of_relabelled_class_subsets():
    pip_only = ["mnist", "animal_mnist", "elpv", "uci_digits", "lfw_faces"]
    spec = long_sequence.sequence_spec(pip_only)
    assert len(spec) >= 15 and len({name for name, *_ in spec}) == len(spec)
    assert all(source in pip_only for _, source, _, _ in spec)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 2, 3])
    x = torch.arange(8).view(8, 1, 1).expand(8, 2, 2)
    xs, ys = long_sequence._subset(x, y, (2, 3), None, 0)
    assert ys.tolist() == [0, 1, 0, 1] and xs[:, 0, 0].tolist() == [2, 3, 6, 7]
    xs, ys = long_sequence._subset(x, y, None, 4, 0)
    assert len(ys) == 4 and len(set(xs[:, 0, 0].tolist())) == 4
