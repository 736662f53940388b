"""ONNX export checked on real images: onnxruntime's logits against PyTorch's for a pretrained backbone and adapter.

ImageNet-pretrained ``tf_efficientnet_lite0`` (the offline weights of ``examples/offline_assets.py``) gets an adapter
far from the identity (kernels, norm affines, running statistics and head all perturbed), once per depthwise policy:
``clr`` (the kernels stay in the graph) and ``scale`` (folded into the convs by ``clr_timm.fuse``). Each is exported
with :func:`clr_timm.export_onnx` and run with onnxruntime on the 20 labelled ImageNet validation images that ship
with foolbox; the table gives the largest absolute difference of the logits, the largest logit, how often the top-1
class agrees, and the export time. Needs the ``onnx`` and ``examples`` extras.

The README's figures::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.onnx_export
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

import clr_timm
from examples.offline_assets import input_mean_std, load_imagenet_samples, load_pretrained, to_model_input

MODEL = "tf_efficientnet_lite0"
SIZE = 224


def perturbed_adapter(depthwise: str, seed: int = 0) -> torch.nn.Module:
    """The pretrained model with an adapter far from the identity, so that an export dropping any part of it shows."""
    model = clr_timm.attach(load_pretrained(MODEL), clr_timm.CLRConfig(depthwise=depthwise))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in clr_timm.adapter_state_dict(model).items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.05
                t.copy_(t.abs() + noise.abs() if key.endswith("running_var") else t + noise * t.abs().mean())
    return model.eval()


def measure(depthwise: str, x: torch.Tensor, folder: Path) -> dict:
    import onnxruntime as ort

    model = perturbed_adapter(depthwise)
    start = time.perf_counter()
    path = clr_timm.export_onnx(model, folder / f"{MODEL}_{depthwise}.onnx")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"input": x.numpy()})[0]
    return {
        "model": MODEL,
        "depthwise": depthwise,
        "images": len(x),
        "max_abs_diff": float(np.abs(out - ref).max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "same_top1": float((out.argmax(1) == ref.argmax(1)).mean()),
        "export_seconds": round(seconds, 2),
        "file_mb": round(path.stat().st_size / 2**20, 2),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | depthwise | images | max abs diff | max abs logit | same top-1 | export s | file MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['depthwise']} | {r['images']} | {r['max_abs_diff']:.1e} | {r['max_abs_logit']:.1f} "
            f"| {r['same_top1']:.0%} | {r['export_seconds']:.1f} | {r['file_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="folder for the md and json")
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    images, _ = load_imagenet_samples(SIZE)
    x = to_model_input(images, SIZE, *input_mean_std(MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(depthwise, x, Path(tmp)) for depthwise in ("clr", "scale")]
    text = table(rows)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    footer = f"\n\n`python -m benchmarks.onnx_export`, torch {torch.__version__}\n"
    (args.results / "onnx_export.md").write_text(text + footer)
    (args.results / "onnx_export.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
