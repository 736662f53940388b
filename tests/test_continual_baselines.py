"""benchmarks/continual_baselines.py runs end to end on a tiny setting (the figures come from the real run)."""

import json

import torch

from benchmarks import continual_baselines


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
