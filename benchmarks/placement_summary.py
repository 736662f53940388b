"""Placement on depthwise-separable nets: the validation choice and the issue's goal check, from benchmark JSONs.

Reads results written by :mod:`benchmarks.continual_baselines` (validation runs: ``--validation``; test runs: any
seeds, several files merged per method and seed) and prints two markdown tables:

- *validation*: every (method, learning rate) tried on the held-out training images, best first, with its storage;
  the choice is the best config that stores at most ``--max-stored`` percent of the backbone per task.
- *goal*: on the test images, each method's mean and per-seed accuracy, and for the chosen method whether it beats
  norm + head and SupSup by ``--margin`` points on the mean *and* on every seed, and is within ``--margin`` of
  per-task full fine-tuning or above.

Example (the README's placement section)::

    cd benchmarks/results && python -m benchmarks.placement_summary --validation continual_placement_val_lite0*.json \\
        --test continual_placement_lite0.json continual_placement_lite0_seeds12.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["choose", "goal_check", "main"]


def _load(paths: Sequence[Path]) -> list[dict]:
    """Result rows; ``stored_pct``: bytes each task adds (SupSup: its bit mask) over the float32 backbone's bytes."""
    rows = [r for path in paths for r in json.loads(Path(path).read_text())["results"]]
    return [{**r, "stored_pct": 100 * r["per_task_stored_bytes"] / (4 * r["backbone"])} for r in rows]


def choose(validation: Sequence[dict], max_stored: float) -> tuple[list[dict], dict | None]:
    """Validation rows (best first) and the best one storing at most ``max_stored`` % of the backbone per task."""
    rows = sorted(validation, key=lambda r: -r["average_accuracy"])
    fits = [r for r in rows if r["stored_pct"] <= max_stored and r["key"] != "full"]
    return rows, (fits[0] if fits else None)


def goal_check(test: Sequence[dict], key: str, margin: float = 1.0) -> dict[str, object]:
    """Does ``key`` beat norm + head and SupSup by ``margin`` points on the mean and every seed, and come within
    ``margin`` of full fine-tuning (or above)? Compared on the seeds every method has."""
    by: dict[str, dict[int, float]] = {}
    for r in test:
        by.setdefault(r["key"], {})[r["seed"]] = 100 * r["average_accuracy"]
    out: dict[str, object] = {}
    for rival, need in (("norm_head", margin), ("supsup_frozen_bn", margin), ("full", -margin)):
        if key not in by or rival not in by:
            out[rival] = "not measured"
            continue
        seeds = sorted(set(by[key]) & set(by[rival]))
        diffs = [by[key][s] - by[rival][s] for s in seeds]
        ok = statistics.mean(diffs) >= need and (rival == "full" or min(diffs) >= need)
        out[rival] = {"seeds": seeds, "differences": [round(d, 1) for d in diffs], "met": ok}
    return out


def _table(rows: Iterable[dict], chosen: dict | None) -> str:
    lines = ["| method | lr | val avg acc (%) | stored per task (% of backbone bytes) |", "|---|---:|---:|---:|"]
    for r in rows:
        mark = " **(chosen)**" if r is chosen else ""
        lines.append(f"| {r['label']}{mark} | {r['lr']:g} | {100 * r['average_accuracy']:.1f} | "
                     f"{r['stored_pct']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def _test_table(test: Sequence[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in test:
        groups.setdefault(r["key"], []).append(r)
    lines = [
        "| method | lr | seeds | mean (%) | per seed (%) | stored (% of backbone bytes) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for runs in groups.values():
        accs = [100 * r["average_accuracy"] for r in sorted(runs, key=lambda r: r["seed"])]
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        lines.append(f"| {runs[0]['label']} | {runs[0]['lr']:g} | {len(runs)} | {statistics.mean(accs):.1f}{spread} | "
                     f"{', '.join(f'{a:.1f}' for a in accs)} | {runs[0]['stored_pct']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--validation", nargs="+", type=Path, required=True)
    p.add_argument("--test", nargs="*", type=Path, default=[])
    p.add_argument("--max-stored", type=float, default=5.0, help="percent of the backbone per task (%(default)s)")
    p.add_argument("--margin", type=float, default=1.0, help="points (%(default)s)")
    args = p.parse_args(list(argv) if argv is not None else None)
    rows, chosen = choose(_load(args.validation), args.max_stored)
    print(_table(rows, chosen))
    result: dict[str, object] = {"chosen": chosen and {"key": chosen["key"], "lr": chosen["lr"]}}
    if args.test:
        test = _load(args.test)
        print("\n" + _test_table(test))
        if chosen:
            result["goal"] = goal_check(test, chosen["key"], args.margin)
            print("\n" + json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
