"""Load test of ``clr-timm serve``: concurrent HTTP clients over many tasks, three batching modes, and Ray Serve.

    python benchmarks/serve_load.py                              # ResNet-50 and tf_efficientnet_lite0, 50 tasks
    python benchmarks/serve_load.py --models resnet50 --requests 400 --concurrency 32 --input-size 224 --no-ray

For each model: build it (ResNet-50 at random init, which is fine for throughput; tf_efficientnet_lite0 with its
real ImageNet weights from ``examples/offline_assets.py``), add ``--tasks`` ten-class tasks whose adapters all differ,
``save_pretrained`` them and save the backbone's weights. Then, for each batching mode, start the real server as a
user does (``clr-timm serve ZOO --base-weights FILE --batching MODE``, a separate process) and send ``--requests``
requests from ``--concurrency`` concurrent clients (httpx), each request for a random task and one of ``--images``
random JPEG images: arrivals are random across tasks. Modes: (a) ``cross-task`` (any tasks in one forward),
(b) ``same-task`` (one task per forward), (c) ``none`` (one request per forward). One more row runs (a) as a Ray
Serve deployment with two replicas on a local Ray cluster (``clr-timm[ray]``; one core and one torch thread each).

Every answer is checked against that image's single-task output computed offline (``mt(x, task=t)`` on the same
preprocessed tensor): same top-1 class and probability within 1e-3; the table counts the wrong ones (must be 0).
Throughput is completed requests over wall time; latency is per request as the client sees it. Figures on a shared
machine are noisy: compare rows of one run. Set OMP_WAIT_POLICY=PASSIVE on shared machines (done here by default).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import io
import json
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("cross-task", "same-task", "none")
WEIGHTS_NOTE = "resnet50 at random init, fine for throughput; tf_efficientnet_lite0 with its ImageNet weights"


def build_zoo(name: str, num_tasks: int, folder: Path, seed: int = 0):
    """The model with ``num_tasks`` distinct tasks, saved in ``folder/zoo``; its backbone in ``folder/base``."""
    import timm
    from safetensors.torch import save_file

    from clr_timm import MultiTaskModel

    torch.manual_seed(seed)
    if name == "tf_efficientnet_lite0":
        from examples.offline_assets import load_pretrained

        model = load_pretrained(name)
    else:
        model = timm.create_model(name, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "base.safetensors")
    mt = MultiTaskModel(model)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(num_tasks):
        task = f"task{i:03d}"
        mt.add_task(task, 10, label_names=[f"{task}-c{c}" for c in range(10)])
        with torch.no_grad():
            for p in mt.trainable_parameters(task):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    mt.save_pretrained(folder / "zoo")
    return mt.eval()


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(120, 260, 2))
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


def expected_outputs(mt, jobs: list[tuple[str, int]], images: list[bytes], size: int) -> dict[tuple[str, int], list]:
    """Each (task, image)'s probabilities, one image and one task at a time, preprocessed as the server does."""
    from clr_timm.serve import Batcher

    batcher = Batcher(mt, data_config={"input_size": (3, size, size)})
    tensors = {i: batcher.preprocess(images[i]) for i in {i for _, i in jobs}}
    out = {}
    with torch.inference_mode():
        for task, i in dict.fromkeys(jobs):
            out[(task, i)] = mt(tensors[i][None], task=task)[0].softmax(-1).tolist()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            try:
                if (await client.get(f"{url}/healthz", timeout=5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"no server on {url} after {timeout:.0f} s")


def is_right(body: dict, task: str, p: list[float]) -> bool:
    top = body.get("top") or [{}]
    best = int(np.argmax(p))
    return body.get("task") == task and top[0].get("index") == best and abs(top[0].get("p", -1) - p[best]) <= 1e-3


async def load(url: str, jobs, images, expected, concurrency: int, warmup: int) -> dict:
    """``concurrency`` clients send the jobs (the first ``warmup`` untimed) as fast as answers come back."""
    import httpx

    latencies: list[float] = []
    wrong = failed = 0
    queue = list(jobs)

    async def client_loop(client: httpx.AsyncClient, record: bool) -> None:
        nonlocal wrong, failed
        while queue:
            task, i = queue.pop()
            start = time.perf_counter()
            r = await client.post(f"/v1/tasks/{task}/predict", files={"image": ("x.jpg", images[i])})
            if not record:
                continue
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failed += 1
            elif not is_right(r.json(), task, expected[(task, i)]):
                wrong += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = list(jobs[:warmup])
        await asyncio.gather(*(client_loop(client, False) for _ in range(concurrency)))
        queue = list(jobs[warmup:])
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, True) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "wrong": wrong,
        "failed": failed,
        "mean_batch": mean_batch(metrics),
    }


def mean_batch(metrics: str) -> float | None:
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("clr_batch_size_sum", "clr_batch_size_count")):
            values[line.split()[0]] = float(line.split()[-1])
    count = values.get("clr_batch_size_count")
    return values["clr_batch_size_sum"] / count if count else None


def run_mode(args, folder: Path, mode: str, jobs, images, expected) -> dict:
    """Start ``clr-timm serve`` in a process of its own, load it, stop it."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "clr_timm.cli", "serve", str(folder / "zoo"),
        "--base-weights", str(folder / "base.safetensors"), "--port", str(port), "--batching", mode,
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--input-size", str(args.input_size),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_healthy(url, 600, proc))
        return asyncio.run(load(url, jobs, images, expected, args.concurrency, args.warmup))
    finally:
        proc.terminate()
        proc.wait(30)


def run_ray(args, folder: Path, jobs, images, expected) -> dict:
    """The cross-task server as a Ray Serve deployment with ``--ray-replicas`` replicas on a local Ray cluster."""
    import ray
    from ray import serve

    from clr_timm.serve.ray_app import deployment

    port = free_port()
    ray.init(num_cpus=args.ray_replicas, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(
            folder / "zoo",
            base_weights=folder / "base.safetensors",
            num_replicas=args.ray_replicas,
            num_cpus=1,
            torch_threads=1,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            data_config={"input_size": (3, args.input_size, args.input_size)},
        )
        serve.run(app, name="clr", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_healthy(url, 600))
        result = asyncio.run(load(url, jobs, images, expected, args.concurrency, args.warmup))
        result["mean_batch"] = None  # each replica has its own metrics; the router picks which one answers
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_model(args, name: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        mt = build_zoo(name, args.tasks, folder)
        print(f"{name}: {args.tasks} tasks built and saved in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rng = random.Random(0)
        images = make_images(args.images)
        tasks = mt.tasks
        jobs = [(rng.choice(tasks), rng.randrange(len(images))) for _ in range(args.requests + args.warmup)]
        t = time.perf_counter()
        expected = expected_outputs(mt, jobs, images, args.input_size)
        print(f"{name}: expected outputs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        del mt
        warm, timed = jobs[: args.warmup], jobs[args.warmup :]
        runs = [(mode, "process", 1) for mode in MODES]
        if args.ray and name in args.ray_models:
            runs.append(("cross-task", "ray", args.ray_replicas))
        for mode, runner, replicas in runs:
            t = time.perf_counter()
            if runner == "ray":
                result = run_ray(args, folder, warm + timed, images, expected)
            else:
                result = run_mode(args, folder, mode, warm + timed, images, expected)
            row = {"model": name, "input_size": args.input_size, "mode": mode, "runner": runner,
                   "replicas": replicas, "tasks": args.tasks, "concurrency": args.concurrency, **result}  # fmt: skip
            print(f"{name} {mode} {runner}: {json.dumps(row)} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | mode | server | requests | req/s | vs no batching | p50 ms | p99 ms | mean batch | wrong | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["mode"] == "none"), None)
        ratio = f"{r['throughput'] / base['throughput']:.2f}x" if base else "-"
        server = "uvicorn, 1 process" if r["runner"] == "process" else f"Ray Serve, {r['replicas']} replicas"
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        lines.append(
            f"| {r['model']} @{r['input_size']} | {r['mode']} | {server} | {r['requests']} | {r['throughput']:.1f} | "
            f"{ratio} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {batch} | {r['wrong']} | {r['failed']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,tf_efficientnet_lite0")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--requests", type=int, default=160, help="timed requests per row")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=20)
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray Serve row")
    parser.add_argument("--ray-models", default="resnet50", help="models that get a Ray Serve row")
    parser.add_argument("--ray-replicas", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    args = parser.parse_args(argv)
    args.ray_models = args.ray_models.split(",")
    rows = [row for name in args.models.split(",") for row in bench_model(args, name)]
    table = format_table(rows)
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"
    text = (
        f"{table}\n\n`{command.strip()}` ({env}; {args.tasks} tasks, {args.concurrency} concurrent clients; "
        f"{WEIGHTS_NOTE})\n"
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    meta = {"command": command.strip(), "environment": env, "args": vars(args)}
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["wrong"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
