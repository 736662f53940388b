"""benchmarks/speed.py runs end to end (a smoke test on a tiny setting; the figures come from the real run)."""

import json

import torch

from benchmarks import speed


def test_speed_benchmark_writes_every_figure(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = _run(tmp_path)
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["inference"][0]["fused_rel_diff"] <= 1e-5
    for figure in ("inference", "training", "mixed", "overheads"):
        assert saved[figure] and results[figure]
    training = saved["training"][0]
    assert training["clr_memory_mb"] < training["full_ft_memory_mb"]
    # the norms' copies of the reprogramming outputs are recomputed, the rest is still counted
    assert 0.5 * training["clr_memory_mb"] < training["clr_memory_efficient_memory_mb"] < training["clr_memory_mb"]
    assert "| resnet18 |" in (tmp_path / "s.md").read_text()


def test_speed_benchmark_times_the_scale_policy_on_a_model_with_depthwise_convs(tmp_path):
    threads = torch.get_num_threads()
    argv = "tf_efficientnet_lite0 --size 32 --batches 1 --reps 1 --warmup 0 --threads 1 --only inference"
    try:
        results = speed.main([*argv.split(), "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md")])
    finally:
        torch.set_num_threads(threads)
    row = results["inference"][0]
    assert row["scale_fused_ratio"] > 0 and row["scale_fused_cl_ratio"] > 0 and row["fused_rel_diff"] <= 1e-5
    assert 'With `depthwise="scale"`' in (tmp_path / "s.md").read_text()


def test_profile_benchmark_times_the_added_operators_and_breaks_memory_down(tmp_path):
    from benchmarks import profile_speed

    threads = torch.get_num_threads()
    try:
        argv = "resnet18 --size 32 --batches 2 --layouts NCHW --train-batch 2 --reps 1 --threads 1 --name p --out"
        results = profile_speed.main([*argv.split(), str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    inference = results["inference"][0]
    assert inference["clr_layers"] == 17  # resnet18: the 7x7 stem and the sixteen 3x3 convs of its blocks
    assert 0 < inference["extra_macs_percent"] < 5 and inference["clr_ops_ms"] > 0 and inference["folded_bn_ms"] > 0
    assert inference["clr_ops_in_model_ms"] > 0 and inference["fused_floor_in_model"] > 0
    memory = results["training"][0]
    assert memory["clr"]["saved_mb"]["CLR layers (their inputs)"] > 0
    assert memory["clr_memory_efficient"]["total_mb"] < memory["clr"]["total_mb"] < memory["full_ft"]["total_mb"]
    assert results["load"][0]["load_adapter, all of it"] > 0
    assert "| resnet18 |" in (tmp_path / "p.md").read_text() and json.loads((tmp_path / "p.json").read_text())


def _run(tmp_path):
    return speed.main(
        [
            "resnet18",
            "--size",
            "32",
            "--batches",
            "2",
            "--train-batch",
            "2",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "s.json"),
            "--md",
            str(tmp_path / "s.md"),
        ]
    )


def test_speed_benchmark_times_every_variant_against_the_plain_model(tmp_path):
    threads = torch.get_num_threads()
    argv = "resnet18 --size 32 --variant-batch 2 --reps 1 --warmup 0 --threads 1 --only variants"
    try:
        results = speed.main([*argv.split(), "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md")])
    finally:
        torch.set_num_threads(threads)
    row = results["variants"][0]
    for v in speed.VARIANT_PRESETS:
        assert row[f"{v}_infer_ratio"] > 0 and row[f"{v}_train_ratio"] > 0
    assert "| resnet18 | 2 | `Ghost_a` |" in (tmp_path / "s.md").read_text()
