"""benchmarks/fuzz_adapters.py runs end to end (a smoke test of 50 cases; the figures come from the 10,000-case run)."""

import json

from benchmarks import fuzz_adapters


def test_the_fuzz_benchmark_runs_every_kind_of_case_without_a_failure(tmp_path):
    results = fuzz_adapters.main(
        ["--cases", "50", "--seed", "3", "--json", str(tmp_path / "f.json"), "--md", str(tmp_path / "f.md")]
    )
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["cases"] == results["cases"] == 50 and saved["failures"] == 0, saved["kinds"]
    assert set(saved["kinds"]) == set(fuzz_adapters.KINDS)  # every kind runs at least once
    assert saved["loaded"] and saved["refused"] and saved["loaded"] + saved["refused"] == 50
    assert saved["max_message_chars"] <= 2000 and saved["max_load_s"] < 2
    assert "| **all** | **50** |" in (tmp_path / "f.md").read_text()
