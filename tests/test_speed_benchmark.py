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
    assert saved["training"][0]["clr_memory_mb"] < saved["training"][0]["full_ft_memory_mb"]
    assert "| resnet18 |" in (tmp_path / "s.md").read_text()


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
