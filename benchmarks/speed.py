"""Speed and memory of CLR, each figure a ratio against the plain timm model measured side by side.

    python benchmarks/speed.py                       # CPU, resnet50 + tf_efficientnet_lite0, batch 1 and 32
    python benchmarks/speed.py --device cuda --size 224

Figures (interleaved repetitions, medians):
  1. inference latency, CLR attached vs plain model (eval, no_grad);
  2. the same after the deployment fast path ``clr_timm.fuse``; on models with depthwise convs, both again with
     ``depthwise="scale"`` (fused: the scales fold into the depthwise convs' filters);
  3. training step time and training memory: CLR (also with ``clr_timm.set_memory_efficient``) vs full fine-tuning
     vs linear probe (AdamW, same batch);
  4. a mixed batch of 8 tasks vs a single-task batch of the same size vs a loop of per-task sub-batches;
  5. loading one adapter from a local file, switching task, attaching to a fresh model (milliseconds);
  6. (``--only variants``) every variant of the authors' code (``CLRConfig.preset``): inference and a training step
     against the plain model's (its training step is full fine-tuning), at ``--variant-batch``.

Training memory on CPU is what training adds on top of the model: tensors saved for backward (counted exactly with
``torch.autograd.graph.saved_tensors_hooks``; the model's own weights, saved by reference, not counted), gradients
and optimizer state. On CUDA it is the peak allocated memory.
Set OMP_WAIT_POLICY=PASSIVE on shared machines (done here by default): spinning OpenMP threads stall for seconds
whenever another process holds a core.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import clr_timm
from clr_timm.state import MEMORY_EFFICIENT, find_state

MODELS = ["resnet50", "tf_efficientnet_lite0"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in alternating order so that load on the machine hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names if r % 2 == 0 else reversed(names):
            _sync(device)
            t = time.perf_counter()
            fns[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str, device: torch.device, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes).to(device).eval()


def perturb_adapter(model: nn.Module, seed: int) -> None:
    """Make an attached model's adapter differ from the identity, as a trained one would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in clr_timm.adapter_state_dict(model).items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g).to(t.device, t.dtype)
                t.add_(0.01 * noise) if not k.endswith("running_var") else t.mul_(1 + 0.01 * noise.abs())


def fig_inference(name, batch, size, device, reps, warmup) -> dict:
    """Plain vs CLR vs fused CLR, in the default (NCHW) layout and in channels_last.

    On a model with depthwise convs, also CLR with ``depthwise="scale"`` (one scale per channel after each depthwise
    conv instead of a 3x3 kernel), unfused and fused (``scale``, ``scale_fused``).
    """
    plain = build(name, device)
    clr = clr_timm.attach(build(name, device))
    perturb_adapter(clr, 1)
    x = torch.randn(batch, 3, size, size, device=device)
    fused = clr_timm.fuse(copy.deepcopy(clr), example_input=x[:2])
    cl = torch.channels_last
    variants = {"plain": plain, "clr": clr, "fused": fused}
    if any(t.depthwise for t in clr_timm.plan_targets(plain).targets):
        scale = clr_timm.attach(build(name, device), depthwise="scale")
        perturb_adapter(scale, 1)
        variants["scale"] = scale
        variants["scale_fused"] = clr_timm.fuse(copy.deepcopy(scale), example_input=x[:2])
    variants.update({f"{k}_cl": copy.deepcopy(m).to(memory_format=cl) for k, m in list(variants.items())})
    x_cl = x.contiguous(memory_format=cl)
    fns = {k: (lambda m=m, k=k: m(x_cl if k.endswith("_cl") else x)) for k, m in variants.items()}
    with torch.no_grad():
        t = interleaved(fns, reps, warmup, device)
        err = 0.0
        for unfused in [k for k in ("clr", "scale") if k in variants]:  # each fused model against its unfused one
            reference = variants[unfused](x)
            fused_out = variants["fused" if unfused == "clr" else "scale_fused"](x)
            err = max(err, (fused_out - reference).abs().max().item() / max(1.0, reference.abs().max().item()))
    out = {f"{k}_ms": 1e3 * v for k, v in t.items()}
    for suffix in ("", "_cl"):
        for k in [k for k in variants if not k.endswith("_cl") and k != "plain"]:
            out[f"{k}{suffix}_ratio"] = t[f"{k}{suffix}"] / t[f"plain{suffix}"]
    out["fused_rel_diff"] = err
    return out


class _SavedBytes:
    """Counts the bytes autograd saves for backward during a forward pass of ``model``.

    The model's own parameters and buffers (saved by reference, e.g. a conv's weight) are not counted: they exist
    whether or not the model trains, and the CUDA figure (peak minus what was allocated before) leaves them out too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.total = 0
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


@contextlib.contextmanager
def count_saved(model: nn.Module, pack: Callable[[torch.Tensor], object]):
    """Within it, ``pack(t)`` sees every tensor autograd keeps for backward in a forward pass of ``model``.

    ``clr_timm.set_memory_efficient`` installs its own saved-tensor hooks for the model's forward pass, which would
    hide the tensors from an outer hook: there only what its hooks let autograd keep reaches ``pack``, not what they
    replace by a recomputation note.
    """
    state = find_state(model)
    hooks = state.modes.get(MEMORY_EFFICIENT) if state is not None else None
    inner = hooks._pack if hooks is not None else None

    def kept(t: torch.Tensor):
        saved = inner(t)
        if saved is t:
            pack(t)
        return saved

    def outer(t: torch.Tensor) -> torch.Tensor:
        pack(t)
        return t

    if hooks is not None:
        hooks._pack = kept
    try:
        with torch.autograd.graph.saved_tensors_hooks(outer, lambda t: t):
            yield
    finally:
        if hooks is not None:
            hooks._pack = inner


def _train_variant(name: str, variant: str, device: torch.device) -> nn.Module:
    model = build(name, device)
    if variant in ("clr", "clr_memory_efficient"):
        clr_timm.attach(model)
        clr_timm.set_memory_efficient(model, variant == "clr_memory_efficient")
    elif variant == "linear_probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    return model.train()


def fig_training(name, batch, size, device, reps, warmup) -> dict:
    variants = ["full_ft", "clr", "clr_memory_efficient", "linear_probe"]
    models = {v: _train_variant(name, v, device) for v in variants}
    opts = {v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for v, m in models.items()}
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(v: str) -> None:
        loss = nn.functional.cross_entropy(models[v](x), y)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        opts[v].step()

    t = interleaved({v: (lambda v=v: step(v)) for v in variants}, reps, warmup, device)
    memory = {}
    for v in variants:
        m, opt = models[v], opts[v]
        if device.type == "cuda":
            opt.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(v)
            memory[v] = torch.cuda.max_memory_allocated(device) - base
        else:
            counter = _SavedBytes(m)
            with count_saved(m, counter.pack):
                loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            grads = sum(p.numel() * p.element_size() for p in m.parameters() if p.grad is not None)
            state = sum(
                s.numel() * s.element_size() for st in opt.state.values() for s in st.values() if torch.is_tensor(s)
            )
            memory[v] = counter.total + grads + state
    full = "full_ft"
    return {
        **{f"{v}_ms": 1e3 * t[v] for v in variants},
        **{f"{v}_memory_mb": memory[v] / 2**20 for v in variants},
        "clr_time_ratio": t["clr"] / t[full],
        "clr_memory_ratio": memory["clr"] / memory[full],
        "clr_memory_efficient_time_ratio": t["clr_memory_efficient"] / t[full],
        "clr_memory_efficient_memory_ratio": memory["clr_memory_efficient"] / memory[full],
        "linear_probe_time_ratio": t["linear_probe"] / t[full],
        "linear_probe_memory_ratio": memory["linear_probe"] / memory[full],
    }


VARIANT_PRESETS = ("Ghost_reduced_v1", "Ghost", "Ghost_reduced_v2", "Ghost_a", "li18")


def fig_variants(name, batch, size, device, reps, warmup) -> dict:
    """Each variant against the plain model: eval inference, and a training step (AdamW over what trains)."""
    models = {"plain": build(name, device)}
    for v in VARIANT_PRESETS:
        models[v] = clr_timm.attach(build(name, device), clr_timm.CLRConfig.preset(v))
        perturb_adapter(models[v], 1)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():
        infer = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, reps, warmup, device)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}

    def step(k: str) -> None:
        loss = nn.functional.cross_entropy(models[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    for m in models.values():
        m.train()
    train = interleaved({k: (lambda k=k: step(k)) for k in models}, max(reps // 3, 3), 1, device)
    out = {"plain_infer_ms": 1e3 * infer["plain"], "plain_train_ms": 1e3 * train["plain"]}
    for v in VARIANT_PRESETS:
        out[f"{v}_infer_ms"], out[f"{v}_train_ms"] = 1e3 * infer[v], 1e3 * train[v]
        out[f"{v}_infer_ratio"], out[f"{v}_train_ratio"] = infer[v] / infer["plain"], train[v] / train["plain"]
    return out


def fig_mixed(name, batch, size, device, reps, warmup, num_tasks=8) -> dict:
    mt = clr_timm.MultiTaskModel(build(name, device))
    names = [f"t{i}" for i in range(num_tasks)]
    for i, n in enumerate(names):
        mt.add_task(n, num_classes=10)
        mt.set_task(n)
        perturb_adapter(mt.model, 10 + i)
    mt.eval()
    x = torch.randn(batch, 3, size, size, device=device)
    tasks = [names[i % num_tasks] for i in range(batch)]
    groups = {n: [i for i, t in enumerate(tasks) if t == n] for n in names}
    mt.set_task(names[0])

    def loop() -> None:
        for n, idx in groups.items():
            mt(x[idx], task=n)

    with torch.no_grad():
        t = interleaved(
            {"single": lambda: mt(x), "mixed": lambda: mt(x, tasks=tasks), "loop": loop}, reps, warmup, device
        )
    return {
        "single_ms": 1e3 * t["single"],
        "mixed_ms": 1e3 * t["mixed"],
        "loop_ms": 1e3 * t["loop"],
        "mixed_vs_single": t["mixed"] / t["single"],
        "loop_vs_single": t["loop"] / t["single"],
    }


def fig_overheads(name, device, reps) -> dict:
    model = clr_timm.attach(build(name, device))
    perturb_adapter(model, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = clr_timm.save_adapter(model, Path(tmp) / "a.safetensors")
        target = clr_timm.attach(build(name, device))
        load = [_timed(lambda: clr_timm.load_adapter(target, path)) for _ in range(reps)]
    mt = clr_timm.MultiTaskModel(build(name, device))
    mt.add_task("a", num_classes=10)
    mt.add_task("b", num_classes=10)
    switch = [_timed(lambda i=i: mt.set_task("a" if i % 2 else "b")) for i in range(max(reps, 50))]
    fresh = [build(name, device) for _ in range(min(reps, 5))]
    attach = [_timed(lambda m=m: clr_timm.attach(m)) for m in fresh]
    return {
        "load_adapter_ms": 1e3 * statistics.median(load),
        "set_task_ms": 1e3 * statistics.median(switch),
        "attach_ms": 1e3 * statistics.median(attach),
    }


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _table(header: str, rows: list[str]) -> list[str]:
    """A markdown table (after a blank line), or nothing when a figure was not run (``--only``)."""
    if not rows:
        return []
    return ["", header, "|---|" + "---:|" * (header.count("|") - 2), *rows]


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}"]
    rows = []
    for r in results["inference"]:
        for suffix, layout in (("", "NCHW"), ("_cl", "channels_last")):
            rows.append(
                f"| {r['model']} | {r['batch']} | {layout} | {r[f'plain{suffix}_ms']:.1f} | "
                f"{r[f'clr{suffix}_ms']:.1f} | "
                f"{r[f'clr{suffix}_ratio']:.3f}x | {r[f'fused{suffix}_ms']:.1f} | {r[f'fused{suffix}_ratio']:.3f}x | "
                f"{r['fused_rel_diff']:.1e} |"
            )
    lines += _table(
        "| model | batch | layout | plain ms | CLR ms | CLR / plain | fused ms | fused / plain "
        "| fused vs unfused (rel.) |",
        rows,
    )
    rows = []
    for r in [r for r in results["inference"] if "scale_ratio" in r]:
        for suffix, layout in (("", "NCHW"), ("_cl", "channels_last")):
            rows.append(
                f"| {r['model']} | {r['batch']} | {layout} | {r[f'plain{suffix}_ms']:.1f} | "
                f"{r[f'scale{suffix}_ms']:.1f} | {r[f'scale{suffix}_ratio']:.3f}x | "
                f"{r[f'scale_fused{suffix}_ms']:.1f} | {r[f'scale_fused{suffix}_ratio']:.3f}x |"
            )
    if rows:
        lines += ["", 'With `depthwise="scale"` (models with depthwise convs):']
    lines += _table("| model | batch | layout | plain ms | scale ms | scale / plain | fused ms | fused / plain |", rows)
    rows = [
        f"| {r['model']} | {r['batch']} | {r['full_ft_ms']:.0f} | {r['clr_ms']:.0f} | "
        f"{r['clr_memory_efficient_ms']:.0f} | {r['linear_probe_ms']:.0f} | {r['clr_time_ratio']:.3f}x | "
        f"{r['clr_memory_ratio']:.3f}x | {r['clr_memory_efficient_time_ratio']:.3f}x | "
        f"{r['clr_memory_efficient_memory_ratio']:.3f}x | {r['linear_probe_memory_ratio']:.3f}x |"
        for r in results["training"]
    ]
    lines += _table(
        "| model | batch | full FT ms | CLR ms | CLR mem-eff ms | probe ms | CLR / full FT time | memory "
        "| CLR mem-eff / full FT time | memory | probe / full FT memory |",
        rows,
    )
    rows = [
        f"| {r['model']} | {r['batch']} | {r['single_ms']:.1f} | {r['mixed_ms']:.1f} | {r['loop_ms']:.1f} | "
        f"{r['mixed_vs_single']:.3f}x | {r['loop_vs_single']:.3f}x |"
        for r in results["mixed"]
    ]
    lines += _table(
        "| model | batch | single-task ms | mixed 8 tasks ms | per-task loop ms | mixed / single | loop / single |",
        rows,
    )
    rows = [
        f"| {r['model']} | {r['load_adapter_ms']:.2f} | {r['set_task_ms']:.3f} | {r['attach_ms']:.1f} |"
        for r in results["overheads"]
    ]
    lines += _table("| model | load adapter ms | switch task ms | attach ms |", rows)
    rows = [
        f"| {r['model']} | {r['batch']} | `{v}` | {r[f'{v}_infer_ms']:.1f} | {r[f'{v}_infer_ratio']:.3f}x | "
        f"{r[f'{v}_train_ms']:.0f} | {r[f'{v}_train_ratio']:.3f}x |"
        for r in results.get("variants", [])
        for v in VARIANT_PRESETS
    ]
    lines += _table(
        "| model | batch | variant | inference ms | / plain | training step ms | / plain (full fine-tuning) |", rows
    )
    return "\n".join(lines)


def machine_description(device: torch.device, size: int) -> str:
    """The device, CPU count, library versions, threads and resolution a run measured on (for its tables)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"timm {timm.__version__}, {size} px, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128, help="input resolution (%(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["inference", "training", "mixed", "overheads", "variants"],
        default=["inference", "training", "mixed", "overheads"],
    )
    parser.add_argument("--variant-batch", type=int, default=8, help="batch of the variants figure (%(default)s)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--md", type=Path, default=Path("benchmarks/results/speed.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict = {
        "machine": machine_description(device, args.size),
        "args": {k: str(v) for k, v in vars(args).items()},
        "inference": [],
        "training": [],
        "mixed": [],
        "overheads": [],
        "variants": [],
    }
    for m in args.models:
        if "inference" in args.only:
            for b in args.batches:
                results["inference"].append(
                    {"model": m, "batch": b, **fig_inference(m, b, args.size, device, args.reps, args.warmup)}
                )
                print(results["inference"][-1], flush=True)
        if "training" in args.only:
            results["training"].append(
                {
                    "model": m,
                    "batch": args.train_batch,
                    **fig_training(m, args.train_batch, args.size, device, max(args.reps // 3, 3), 1),
                }
            )
            print(results["training"][-1], flush=True)
        if "mixed" in args.only:
            results["mixed"].append(
                {"model": m, "batch": 32, **fig_mixed(m, 32, args.size, device, args.reps, args.warmup)}
            )
            print(results["mixed"][-1], flush=True)
        if "overheads" in args.only:
            results["overheads"].append({"model": m, **fig_overheads(m, device, args.reps)})
            print(results["overheads"][-1], flush=True)
        if "variants" in args.only:
            b = args.variant_batch
            results["variants"].append(
                {"model": m, "batch": b, **fig_variants(m, b, args.size, device, args.reps, args.warmup)}
            )
            print(results["variants"][-1], flush=True)
    table = markdown(results)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    command = " ".join(sys.argv[1:] if argv is None else argv)
    args.md.write_text(f"# CLR speed and memory\n\nGenerated by `python benchmarks/speed.py {command}`.\n\n{table}\n")
    return results


if __name__ == "__main__":
    main()
