"""A thousand tasks on one backbone: memory, pauses, switching, mixed batches, saving and loading a MultiTaskModel.

    python benchmarks/many_tasks.py                  # 1,000 ten-class tasks on ResNet-50, CPU
    python benchmarks/many_tasks.py --tasks 100      # a quick run

Figures (CPU, random init: the weights do not change any of them):
  1. memory: RSS added per task against the adapter's fp32 size (floating tensors at 4 bytes, integer counters at
     8), and the Python objects each task adds (what a garbage-collection pass walks);
  2. add_task median and max, switching (``set_task`` to a random task, and to one of the last few), ``eval()``;
  3. forward: one task of the N against a plain attached model (same batch), and a batch of 64 images from 64
     tasks against a single-task batch of 64; PEFT's LoRA with ``adapter_names=`` as reference (if installed);
  4. ``save_pretrained`` of all tasks and of 100, per task (linear: the same per task), the ``clr_config.json``
     files read while saving, and saving 20 tasks one call each into the folder of all tasks;
  5. ``from_pretrained`` of every task of that folder into a fresh model;
  6. the slowest single call of add_task, set_task, eval() and train() (forward passes take what the backbone
     takes, saves and loads what their files take).

Forward passes run at ``--size`` pixels (default 64) to keep a 2-core run short; the ratios are what matters.
Set OMP_WAIT_POLICY=PASSIVE on shared machines (done here by default).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

import clr_timm
import clr_timm.card
from clr_timm import MultiTaskModel

RESULTS = Path(__file__).parent / "results"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    return statistics.median(_ms(fn) for _ in range(reps))


@contextmanager
def _count_config_reads():
    """Count the ``clr_config.json`` reads of clr_timm's card code (the only place that reads them when saving)."""
    real = clr_timm.card.read_in_folder
    reads = [0]

    def counting(folder, name, *args, **kwargs):
        reads[0] += str(name).endswith(clr_timm.card.CONFIG_FILE)
        return real(folder, name, *args, **kwargs)

    clr_timm.card.read_in_folder = counting
    try:
        yield reads
    finally:
        clr_timm.card.read_in_folder = real


def _adapter_bytes(mt: MultiTaskModel, task: str) -> int:
    return sum(
        v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in mt.adapter_state_dict(task).values()
    )


def _build(args: argparse.Namespace, calls: dict[str, list[float]]) -> tuple[MultiTaskModel, dict]:
    torch.manual_seed(0)  # the same random backbone again when loading (its fingerprint is checked)
    mt = MultiTaskModel(timm.create_model(args.model, pretrained=False))
    mt.add_task("t0", args.classes)
    gc.collect()
    rss0, objs0 = _rss(), len(gc.get_objects())
    for i in range(1, args.tasks):
        calls["add_task"].append(_ms(lambda i=i: mt.add_task(f"t{i}", args.classes)))
    gc.collect()
    n = args.tasks - 1
    per_task = (_rss() - rss0) / n
    adapter = _adapter_bytes(mt, "t0")
    return mt, {
        "adapter_fp32_bytes": adapter,
        "rss_per_task_bytes": per_task,
        "rss_per_task_ratio": per_task / adapter,
        "objects_per_task": (len(gc.get_objects()) - objs0) / n,
    }


def _peft_mixed_ratio(args: argparse.Namespace, x: torch.Tensor, n_adapters: int) -> dict:
    try:
        import peft
    except ImportError as e:
        return {"peft": f"not installed ({e})"}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, modules_to_save=["fc"])
    pm = peft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", config)
    pm.eval()
    names = [f"a{i % n_adapters}" for i in range(x.shape[0])]
    with torch.no_grad():
        pm.set_adapter("a0")
        single = _median_ms(lambda: pm(x), args.reps)
        mixed = _median_ms(lambda: pm(x, adapter_names=names), args.reps)
    return {"peft": peft.__version__, "peft_adapters": n_adapters, "peft_mixed_ratio": mixed / single}


def _forward(args: argparse.Namespace, mt: MultiTaskModel, calls: dict[str, list[float]]) -> dict:
    torch.manual_seed(0)
    mt.eval()
    x1 = torch.randn(args.batch, 3, args.size, args.size)
    x64 = torch.randn(64, 3, args.size, args.size)
    plain = clr_timm.attach(timm.create_model(args.model, pretrained=False, num_classes=args.classes)).eval()
    task = f"t{args.tasks // 2}"
    k = min(64, args.tasks)
    tasks64 = [f"t{(i * args.tasks) // k}" for i in range(k)] * (64 // k) + ["t0"] * (64 % k)
    out = {}
    with torch.no_grad():
        mt(x1, task=task), plain(x1)  # warm up
        single, alone = [], []
        for _ in range(args.reps):  # interleaved
            single.append(_ms(lambda: mt(x1, task=task)))
            alone.append(_ms(lambda: plain(x1)))
        calls["forward"] += single
        out["single_task_forward_ratio"] = statistics.median(single) / statistics.median(alone)
        batch_single, batch_mixed = [], []
        for _ in range(args.reps):
            batch_single.append(_ms(lambda: mt(x64, task=task)))
            batch_mixed.append(_ms(lambda: mt(x64, tasks=tasks64)))
        calls["forward"] += batch_single + batch_mixed
        out["mixed_64_tasks_ratio"] = statistics.median(batch_mixed) / statistics.median(batch_single)
        out["single_task_batch64_ms"] = statistics.median(batch_single)
    if not args.no_peft:
        out.update(_peft_mixed_ratio(args, x64, k))
    return out


def _switching(args: argparse.Namespace, mt: MultiTaskModel, calls: dict[str, list[float]]) -> dict:
    rng = random.Random(0)
    names = mt.tasks
    anywhere = [_ms(lambda: mt.set_task(rng.choice(names))) for _ in range(200)]
    recent = [_ms(lambda i=i: mt.set_task(names[i % 4])) for i in range(200)]
    evals = [_ms(mt.eval) for _ in range(20)]
    trains = [_ms(mt.train) for _ in range(20)]
    mt.eval()
    calls["set_task"] += anywhere + recent
    calls["eval/train"] += evals + trains
    return {
        "switch_random_task_ms": statistics.median(anywhere),
        "switch_recent_task_ms": statistics.median(recent),
        "eval_ms": statistics.median(evals),
        "train_ms": statistics.median(trains),
    }


def _saving(args: argparse.Namespace, mt: MultiTaskModel, root: Path) -> tuple[dict, Path]:
    out = {}
    small = min(100, args.tasks)
    for label, tasks in [("small", mt.tasks[:small]), ("all", mt.tasks)]:
        with _count_config_reads() as reads:
            ms = _ms(lambda tasks=tasks, label=label: mt.save_pretrained(root / label, tasks))
        out[f"save_{label}_tasks"] = len(tasks)
        out[f"save_{label}_ms_per_task"] = ms / len(tasks)
        out[f"save_{label}_config_reads"] = reads[0]
    one_by_one = mt.tasks[: min(20, args.tasks)]
    with _count_config_reads() as reads:
        ms = _ms(lambda: [mt.save_pretrained(root / "all", [t], overwrite=True) for t in one_by_one])
    out["save_one_into_all_ms_per_task"] = ms / len(one_by_one)
    out["save_one_into_all_config_reads"] = reads[0]
    out["save_one_into_all_saves"] = len(one_by_one)
    return out, root / "all"


def _loading(args: argparse.Namespace, folder: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    gc.collect()
    t = time.perf_counter()
    loaded = MultiTaskModel.from_pretrained(model, folder)
    seconds = time.perf_counter() - t
    return {"load_tasks": len(loaded.tasks), "load_all_s": seconds}


def _table(r: dict) -> str:
    def f(key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else str(r.get(key, "-"))

    n = r["tasks"]
    rows = [
        ("RSS per task / adapter fp32 bytes", f"{f('rss_per_task_ratio')}x "
         f"({r['rss_per_task_bytes'] / 1e6:.3f} MB / {r['adapter_fp32_bytes'] / 1e6:.3f} MB)", "<= 1.2x"),
        ("Python objects per task", f("objects_per_task", "{:.0f}"), "few"),
        ("add_task median / max (ms)", f"{f('add_task_median_ms')} / {f('add_task_max_ms')}", "max <= 50"),
        ("set_task, random / recent task (ms)", f"{f('switch_random_task_ms')} / {f('switch_recent_task_ms')}", ""),
        ("eval() / train() (ms)", f"{f('eval_ms')} / {f('train_ms')}", "independent of tasks"),
        ("single-task forward vs plain attached model", f"{f('single_task_forward_ratio')}x", "~1x"),
        ("64 images from 64 tasks vs single-task batch of 64", f"{f('mixed_64_tasks_ratio')}x", ""),
        ("PEFT LoRA, adapter_names= mixed vs single (reference)", f"{f('peft_mixed_ratio')}x "
         f"({r.get('peft_adapters', '-')} adapters)" if "peft_mixed_ratio" in r else str(r.get("peft", "skipped")), ""),
        (f"save_pretrained of {r['save_small_tasks']} / {r['save_all_tasks']} tasks, ms per task",
         f"{f('save_small_ms_per_task')} / {f('save_all_ms_per_task')}", "linear: equal"),
        ("clr_config.json reads in those saves", f"{r['save_small_config_reads']} / {r['save_all_config_reads']}", ""),
        (f"{r['save_one_into_all_saves']} saves of 1 task into the {n}-task folder: ms per save, config reads",
         f"{f('save_one_into_all_ms_per_task')}, {r['save_one_into_all_config_reads']}", ""),
        (f"from_pretrained of all {r['load_tasks']} tasks (s)", f("load_all_s"), "< 5"),
        ("slowest add_task / set_task / eval / train call (ms)", f"{f('max_call_ms')} ({r['max_call']})", "<= 50"),
    ]  # fmt: skip
    lines = [f"{n} tasks x {r['classes']} classes on {r['model']}, CPU, {r['threads']} threads, "
             f"forward at {r['size']}px", "", "| Figure | Measured | Goal |", "|---|---:|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=64, help="image size of the forward passes")
    p.add_argument("--batch", type=int, default=8, help="batch of the single-task forward ratio")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "many_tasks"), help="results path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls: dict[str, list[float]] = {"add_task": [], "set_task": [], "eval/train": [], "forward": []}
    command = "python " + " ".join(["benchmarks/many_tasks.py", *(argv if argv is not None else sys.argv[1:])])
    r: dict = {"tasks": args.tasks, "classes": args.classes, "model": args.model, "size": args.size,
               "threads": args.threads, "torch": torch.__version__, "timm": timm.__version__,
               "python": platform.python_version(), "command": command}  # fmt: skip

    def phase(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)

    phase(f"adding {args.tasks} tasks")
    mt, memory = _build(args, calls)
    r.update(memory)
    r["add_task_median_ms"] = statistics.median(calls["add_task"])
    r["add_task_max_ms"] = max(calls["add_task"])
    phase("switching")
    r.update(_switching(args, mt, calls))
    phase("forward")
    r.update(_forward(args, mt, calls))
    phase("saving")
    with tempfile.TemporaryDirectory(prefix="clr-many-") as tmp:
        saved, folder = _saving(args, mt, Path(tmp))
        r.update(saved)
        del mt
        gc.collect()
        phase("loading")
        r.update(_loading(args, folder))
    slowest = max(((max(v), k) for k, v in calls.items() if v and k != "forward"))
    r["max_call_ms"], r["max_call"] = slowest
    table = _table(r)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"`{r['command']}`\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
