"""Where CLR's extra inference time and training memory go: the floors under the targets of benchmarks/speed.py.

    python benchmarks/profile_speed.py                 # resnet50 + tf_efficientnet_lite0, 128 px
    python benchmarks/profile_speed.py --threads 1     # one thread: less noise on a shared machine

1. Inference. Every CLR layer's depthwise conv is timed on its own, on the exact input it sees inside the model
   (captured once), and summed over layers: the time the added operators cost if nothing else changed. Next to it:
   the BatchNorms that ``clr_timm.fuse`` folds into those convs, timed the same way, the added multiply-accumulates
   as a share of the model's, and the measured end-to-end ratios (interleaved medians, as in speed.py). The floor of
   CLR / plain is ``1 + CLR ops / plain``; of fused / plain, ``1 + (CLR ops - folded BatchNorms) / plain``. Both
   again with the operators timed where they run, inside the model's own forward passes (hooks): on CPU a
   memory-bound operator costs more there than alone on a warm input.
2. Training memory (batch 32). The bytes autograd saves for backward, grouped by the kind of module that saved them,
   plus gradients and AdamW state, for full fine-tuning and for CLR. A method that trains the norm layers must keep
   every norm layer's input (its weight gradient needs it), so full fine-tuning's saved activations less the ones only
   frozen convolutions would need are a floor for CLR too.
3. ``load_adapter``: the milliseconds of each phase (read and check the file, validate against the model, copy).

Writes ``benchmarks/results/profile_speed.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clr_timm
from benchmarks.speed import MODELS, build, count_saved, interleaved, machine_description, perturb_adapter
from clr_timm.layers import CLRConv2d

CLR_TYPES = (CLRConv2d,)


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of one function on the CPU (speed.py's timing loop)."""
    return 1e3 * interleaved({"fn": fn}, reps, warmup, torch.device("cpu"))["fn"]


def _macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all conv/linear multiply-accumulates, those of the CLR layers) for one forward pass of ``x``."""
    total = [0, 0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
            return
        macs = out.numel() * m.weight[0].numel()  # a conv: per output value, one MAC per weight of its filter
        total[0] += macs
        if isinstance(m, CLR_TYPES):
            total[1] += macs

    kinds = (nn.Conv2d, nn.Linear, *CLR_TYPES)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0], total[1]


def _captured_ops(model: nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """The CLR convs and the BatchNorms right after them, each with the input it saw in a forward pass of ``x``."""
    clr_ops, bn_ops = [], []
    clr_outputs: set[int] = set()

    def clr_hook(m, inputs, out):
        clr_ops.append((m, inputs[0].detach().clone()))
        clr_outputs.add(id(out))

    def bn_hook(m, inputs, out):
        if id(inputs[0]) in clr_outputs:
            bn_ops.append((m, inputs[0].detach().clone()))

    handles = [m.register_forward_hook(clr_hook) for m in model.modules() if isinstance(m, CLR_TYPES)]
    handles += [
        m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return clr_ops, bn_ops


class _InModel:
    """Wall time spent inside some modules during a model's own forward passes (forward pre- and post-hooks).

    Unlike an operator timed alone on a captured input (warm caches, its output buffer freshly freed and reused),
    this is what the operators cost where they run: after the conv that produced their input, with the model's
    allocations around them.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.seconds, self._start = 0.0, 0.0
        self.handles = [
            h for m in modules for h in (m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post))
        ]

    def _pre(self, module: nn.Module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module: nn.Module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_inference(name: str, batch: int, size: int, layout: str, reps: int) -> dict:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    plain = build(name, torch.device("cpu")).to(memory_format=fmt)
    clr = clr_timm.attach(build(name, torch.device("cpu")))
    perturb_adapter(clr, 1)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    fused = clr_timm.fuse(copy.deepcopy(clr), example_input=x[:2]).to(memory_format=fmt)
    clr = clr.to(memory_format=fmt)
    macs, clr_macs = _macs(clr, x[:1])
    clr_ops, bn_ops = _captured_ops(clr, x)
    names = {id(m): n for n, m in clr.named_modules()}
    clr_names, bn_names = [names[id(m)] for m, _ in clr_ops], [names[id(m)] for m, _ in bn_ops]
    with torch.no_grad():
        clr_ms = sum(_median_ms(lambda m=m, i=i: m(i), reps) for m, i in clr_ops)
        bn_ms = sum(_median_ms(lambda m=m, i=i: m(i), reps) for m, i in bn_ops)
        passes, warmup = {"plain": lambda: plain(x), "clr": lambda: clr(x), "fused": lambda: fused(x)}, 2
        t = interleaved(passes, reps, warmup, x.device)
        # the same three passes again, timing the added and the folded modules where they run
        timers = {
            "clr": _InModel([clr.get_submodule(n) for n in clr_names]),
            "bn": _InModel([plain.get_submodule(n) for n in bn_names]),
            "fused_clr": _InModel([fused.get_submodule(n) for n in clr_names]),
            "fused_bn": _InModel([fused.get_submodule(n) for n in bn_names]),  # the activation is all that is left
        }
        interleaved(passes, reps, warmup, x.device)
        for timer in timers.values():
            timer.remove()
        in_model = {k: 1e3 * timer.seconds / (reps + warmup) for k, timer in timers.items()}
    plain_ms = 1e3 * t["plain"]
    return {
        "model": name,
        "batch": batch,
        "layout": layout,
        "clr_layers": len(clr_ops),
        "extra_macs_percent": 100.0 * clr_macs / (macs - clr_macs),
        "plain_ms": plain_ms,
        "clr_ops_ms": clr_ms,
        "folded_bn_ms": bn_ms,
        "clr_floor": 1 + clr_ms / plain_ms,
        "fused_floor": 1 + (clr_ms - bn_ms) / plain_ms,
        "clr_ops_in_model_ms": in_model["clr"],
        "folded_bn_in_model_ms": in_model["bn"] - in_model["fused_bn"],
        "clr_floor_in_model": 1 + in_model["clr"] / plain_ms,
        "fused_floor_in_model": 1 + (in_model["fused_clr"] - (in_model["bn"] - in_model["fused_bn"])) / plain_ms,
        "clr_measured": t["clr"] / t["plain"],
        "fused_measured": t["fused"] / t["plain"],
    }


class _SavedByModule:
    """Bytes saved for backward, attributed to the innermost module running when autograd saved them."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[nn.Module] = []
        self.bytes: collections.Counter[str] = collections.Counter()
        # the model's own weights are saved by reference: not memory that training adds (as in speed.py)
        self.seen: set[int] = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, inputs) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, inputs, output) -> None:
        self.stack.pop()  # returns None: the module's output stays as it is

    @staticmethod
    def kind(m: nn.Module | None) -> str:
        if isinstance(m, CLR_TYPES):
            return "CLR layers (their inputs)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "norm layers (their inputs)"
        if isinstance(m, nn.Conv2d):
            return "convolutions (their inputs)"
        if isinstance(m, nn.Linear):
            return "classifier"
        if m is None:
            return "outside modules"
        return "activations, pooling, other"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.bytes[self.kind(self.stack[-1] if self.stack else None)] += t.untyped_storage().nbytes()
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_training_memory(name: str, batch: int, size: int) -> dict:
    out = {"model": name, "batch": batch}
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    for variant in ("full_ft", "clr", "clr_memory_efficient"):
        model = build(name, torch.device("cpu")).train()
        if variant != "full_ft":
            clr_timm.attach(model)
            clr_timm.set_memory_efficient(model, variant == "clr_memory_efficient")
        counter = _SavedByModule(model)
        with count_saved(model, counter.pack):
            loss = F.cross_entropy(model(x), y)
        counter.remove()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        loss.backward()
        opt.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
        state = sum(s.numel() * s.element_size() for st in opt.state.values() for s in st.values() if s.dim())
        out[variant] = {
            "saved_mb": {k: v / 2**20 for k, v in sorted(counter.bytes.items())},
            "saved_total_mb": sum(counter.bytes.values()) / 2**20,
            "grads_and_adamw_state_mb": (grads + state) / 2**20,
        }
        out[variant]["total_mb"] = out[variant]["saved_total_mb"] + out[variant]["grads_and_adamw_state_mb"]
    full, clr = out["full_ft"], out["clr"]
    conv_only = full["saved_mb"].get("convolutions (their inputs)", 0.0)  # what frozen convs need not keep
    out["ratio"] = clr["total_mb"] / full["total_mb"]
    out["memory_efficient_ratio"] = out["clr_memory_efficient"]["total_mb"] / full["total_mb"]
    out["floor"] = (full["saved_total_mb"] - conv_only) / full["total_mb"]
    return out


def profile_training_time(name: str, batch: int, size: int, reps: int) -> dict:
    """Step time (AdamW) of full fine-tuning, CLR, the norms alone (CLR without kernels) and the linear probe.

    Training the norms of the first layers already needs the input gradient of every frozen conv above them: the
    norms-only step is the floor of any method that trains something in every block, CLR included.
    """
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for variant in ("full_ft", "clr", "norms_only", "linear_probe"):
        model = build(name, torch.device("cpu")).train()
        if variant == "clr":
            clr_timm.attach(model)
        elif variant == "norms_only":
            clr_timm.attach(model, clr_timm.CLRConfig(include=[]))
        elif variant == "linear_probe":
            clr_timm.attach(model, clr_timm.CLRConfig(include=[], train_norms=False))
        models[variant] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))

    def step(v: str) -> None:
        model, opt = models[v]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = interleaved({v: (lambda v=v: step(v)) for v in models}, reps, 1, x.device)
    return {"model": name, "batch": batch, **{f"{v}_ms": 1e3 * t[v] for v in models},
            **{f"{v}_ratio": t[v] / t["full_ft"] for v in models}}  # fmt: skip


def profile_load(name: str, reps: int) -> dict:
    from clr_timm import adapter as A

    model = clr_timm.attach(build(name, torch.device("cpu")))
    perturb_adapter(model, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = clr_timm.save_adapter(model, Path(tmp) / "a.safetensors")
        target = clr_timm.attach(build(name, torch.device("cpu")))
        tensors = A._named_tensors(target)
        adapter = A.read_adapter(path)
        phases = {
            "read and check the file": lambda: A.read_adapter(path),
            "walk the model (state_dict)": lambda: A._named_tensors(target),
            "validate shapes and backbone fingerprint": lambda: A.validate_adapter(target, adapter, tensors=tensors),
            "copy the tensors in": lambda: A._copy_in(target, adapter, tensors),
            "load_adapter, all of it": lambda: clr_timm.load_adapter(target, path),
        }
        return {"model": name, **{k: _median_ms(f, reps) for k, f in phases.items()}}


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", "", "**Inference: the added operators, timed alone and in the model**"]
    lines += [
        "",
        "*Alone*: each operator on its captured input, summed. *In model*: the time spent inside those modules during "
        "the model's own forward passes (hooks; for the folded BatchNorms, plain minus what the fused model still "
        "spends in them, its activation). Floor = 1 + (added - folded) / plain.",
        "",
        "| model | batch | layout | CLR layers | extra MACs | plain ms | CLR convs alone / in model ms "
        "| folded BNs alone / in model ms | CLR / plain floor alone / in model | measured "
        "| fused / plain floor alone / in model | measured |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["inference"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['layout']} | {r['clr_layers']} | {r['extra_macs_percent']:.2f}% | "
            f"{r['plain_ms']:.1f} | {r['clr_ops_ms']:.2f} / {r['clr_ops_in_model_ms']:.2f} | "
            f"{r['folded_bn_ms']:.2f} / {r['folded_bn_in_model_ms']:.2f} | "
            f"{r['clr_floor']:.3f}x / {r['clr_floor_in_model']:.3f}x | {r['clr_measured']:.3f}x | "
            f"{r['fused_floor']:.3f}x / {r['fused_floor_in_model']:.3f}x | {r['fused_measured']:.3f}x |"
        )
    if results.get("training_time"):
        lines += ["", "**Training step time (ms, interleaved medians) and its ratio to full fine-tuning**", ""]
        lines += [
            "| model | batch | full FT | CLR | norms only (CLR without kernels) | linear probe |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["training_time"]:
            cells = [f"{r[f'{v}_ms']:.0f} ({r[f'{v}_ratio']:.3f}x)" for v in ("full_ft", "clr", "norms_only")]
            cells.append(f"{r['linear_probe_ms']:.0f} ({r['linear_probe_ratio']:.3f}x)")
            lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    for r in results["training"]:
        lines += ["", f"**Training memory, {r['model']}, batch {r['batch']} (MB)**", ""]
        variants = ("full_ft", "clr", "clr_memory_efficient")
        kinds = sorted(set().union(*(r[v]["saved_mb"] for v in variants)))
        lines += ["| saved for backward by | full fine-tuning | CLR | CLR, memory-efficient |", "|---|---:|---:|---:|"]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(f"{r[v]['saved_mb'].get(k, 0):.0f}" for v in variants) + " |")
        state = " | ".join(f"{r[v]['grads_and_adamw_state_mb']:.0f}" for v in variants)
        lines.append(f"| gradients + AdamW state | {state} |")
        lines.append("| **total** | " + " | ".join(f"{r[v]['total_mb']:.0f}" for v in variants) + " |")
        lines += [
            "",
            f"CLR / full fine-tuning: {r['ratio']:.3f}x; memory-efficient: {r['memory_efficient_ratio']:.3f}x; floor "
            f"for any method that trains the norms: {r['floor']:.3f}x.",
        ]
    if not results["load"]:
        return "\n".join(lines)
    lines += ["", "**load_adapter phases (ms, medians)**", ""]
    phases = [k for k in results["load"][0] if k != "model"]
    lines += ["| model | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for r in results["load"]:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[k]:.2f}" for k in phases) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=MODELS)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--layouts", nargs="+", default=["NCHW", "channels_last"], choices=["NCHW", "channels_last"])
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--parts",
        nargs="+",
        default=["inference", "training_time", "memory", "load"],
        choices=["inference", "training_time", "memory", "load"],
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="profile_speed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "machine": machine_description(torch.device("cpu"), args.size),
        "args": {k: str(v) for k, v in vars(args).items()},
        "inference": [],
        "training_time": [],
        "training": [],
        "load": [],
    }
    for m in args.models:
        if "inference" in args.parts:
            for b in args.batches:
                for layout in args.layouts:
                    results["inference"].append(profile_inference(m, b, args.size, layout, args.reps))
                    print(results["inference"][-1], flush=True)
        if "training_time" in args.parts:
            results["training_time"].append(profile_training_time(m, args.train_batch, args.size, args.reps))
            print(results["training_time"][-1], flush=True)
        if "memory" in args.parts:
            results["training"].append(profile_training_memory(m, args.train_batch, args.size))
            print(json.dumps(results["training"][-1]), flush=True)
        if "load" in args.parts:
            results["load"].append(profile_load(m, max(args.reps, 20)))
            print(results["load"][-1], flush=True)
    table = markdown(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"{args.name}.md").write_text(
        f"# Where CLR's time and memory go\n\nGenerated by `python benchmarks/profile_speed.py {command}`.\n\n{table}\n"
    )
    return results


if __name__ == "__main__":
    main()
