"""The HTTP server: a real uvicorn on 127.0.0.1 with a tiny timm model and three tasks, talked to over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import clr_timm
from clr_timm import MultiTaskModel

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
serve = pytest.importorskip("clr_timm.serve")

TASKS = {"cats": 3, "dogs": 5, "birds": 4, "fish": 6}
SERVED = ["cats", "dogs", "birds"]  # fish is added at run time
TOKEN = "s3cret-token"
MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A save_pretrained folder of four distinct tasks, the backbone's weights, and other weights."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    base = timm.create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, root / "base.safetensors")
    torch.manual_seed(1)
    other = timm.create_model("test_resnet")
    torch.save({"state_dict": other.state_dict()}, root / "other.pth.tar")
    mt = MultiTaskModel(base)
    g = torch.Generator().manual_seed(2)
    for name, n in TASKS.items():
        mt.add_task(name, n, label_names=[f"{name}-{i}" for i in range(n)])
        with torch.no_grad():  # tasks that differ everywhere, not only in their heads
            for p in mt.trainable_parameters(name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    mt.save_pretrained(root / "zoo")
    return {"zoo": root / "zoo", "base": root / "base.safetensors", "other": root / "other.pth.tar"}


class Server:
    """uvicorn running an app in a thread, on a port the OS picked."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def reference(zoo) -> MultiTaskModel:
    """The same tasks in a MultiTaskModel of our own: what every answer must equal."""
    return serve.load_model(zoo["zoo"], base_weights=zoo["base"])


@pytest.fixture(scope="module")
def server(zoo) -> Iterator[Server]:
    """The server users get: no admin token, small limits so that the bad-input cases are small."""
    mt = serve.load_model(zoo["zoo"], SERVED, base_weights=zoo["base"])
    limits = dict(max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS, data_config={"input_size": (3, 96, 96)})
    app = serve.create_app(mt, max_batch_size=16, max_wait_ms=40, **limits)
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def admin_server(zoo) -> Iterator[Server]:
    """A server with an admin token and a long batching window (so a request can wait while its task is removed)."""
    mt = serve.load_model(zoo["zoo"], SERVED, base_weights=zoo["base"])
    with Server(serve.create_app(mt, max_batch_size=16, max_wait_ms=400, admin_token=TOKEN)) as s:
        yield s


def image_bytes(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def expected(reference: MultiTaskModel, app, task: str, data: bytes) -> torch.Tensor:
    """The task's probabilities for the image, preprocessed exactly as the server does, run one image at a time."""
    x = app.state.batcher.preprocess(data)
    with torch.no_grad():
        return reference(x[None], task=task)[0].softmax(-1)


def assert_matches(body: dict, task: str, p: torch.Tensor) -> None:
    assert body["task"] == task
    top = body["top"]
    assert [t["index"] for t in top] == p.topk(len(top)).indices.tolist()
    assert [t["label"] for t in top] == [f"{task}-{t['index']}" for t in top]
    assert np.allclose([t["p"] for t in top], p[[t["index"] for t in top]].tolist(), atol=1e-5)


def predict(url: str, task: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/tasks/{task}/predict", files={"image": ("x.png", data)}, params=params, timeout=30)


async def predict_all(url: str, jobs: list[tuple[str, bytes]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        posts = [client.post(f"/v1/tasks/{t}/predict", files={"image": ("x", d)}, params={"top_k": 3}) for t, d in jobs]
        return await asyncio.gather(*posts)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# ------------------------------------------------------------------------------------------------ predictions


def test_import_clr_timm_does_not_import_fastapi() -> None:
    code = "import sys, clr_timm; assert 'fastapi' not in sys.modules and 'clr_timm.serve' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prediction_equals_the_multitask_model(server, reference) -> None:
    for i, task in enumerate(SERVED):
        for fmt in ("PNG", "JPEG"):
            data = image_bytes(i, fmt=fmt)
            r = predict(server.url, task, data, top_k=3)
            assert r.status_code == 200, r.text
            assert_matches(r.json(), task, expected(reference, server.app, task, data))


def test_tasks_route_lists_tasks_labels_and_base_model(server) -> None:
    info = httpx.get(f"{server.url}/v1/tasks").json()
    assert sorted(info["tasks"]) == sorted(SERVED)
    assert info["tasks"]["dogs"] == {"num_classes": 5, "label_names": [f"dogs-{i}" for i in range(5)]}
    assert info["base_model"]["architecture"] == "test_resnet"
    assert info["data_config"]["input_size"] == [3, 96, 96]  # the override; the model says 160
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


def test_concurrent_requests_across_tasks_are_batched_and_all_correct(server, reference) -> None:
    jobs = [(SERVED[i % 3], image_bytes(100 + i)) for i in range(24)]
    responses = asyncio.run(predict_all(server.url, jobs))
    for (task, data), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert_matches(r.json(), task, expected(reference, server.app, task, data))
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "clr_batch_size_count") > metric(text, 'clr_batch_size_bucket{le="1.0"}')  # a batch > 1
    assert metric(text, "clr_batch_tasks_count") > metric(text, 'clr_batch_tasks_bucket{le="1.0"}')  # mixed tasks
    assert metric(text, 'clr_requests_total{status="200",task="dogs"}') >= 8
    assert metric(text, "clr_queue_seconds_count") >= 24 and metric(text, "clr_request_seconds_count") >= 24


def test_one_failing_item_does_not_fail_its_batch(zoo, reference) -> None:
    """A tensor the model cannot take, batched with good ones: it fails alone."""
    batcher = serve.Batcher(serve.load_model(zoo["zoo"], SERVED, base_weights=zoo["base"]), max_wait_ms=200)
    good = [batcher.preprocess(image_bytes(i)) for i in range(3)]

    async def run() -> list:
        jobs = [batcher.submit(t, x) for t, x in zip(SERVED, good)] + [batcher.submit("cats", torch.zeros(3, 7))]
        try:
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await batcher.stop()

    *ok, bad = asyncio.run(run())
    assert isinstance(bad, clr_timm.CLRError) and "the model failed on this request" in str(bad)
    for task, x, body in zip(SERVED, good, ok):
        with torch.no_grad():
            assert_matches(body, task, reference(x[None], task=task)[0].softmax(-1))


# ------------------------------------------------------------------------------------------------ bad input


def test_bytes_that_are_not_an_image_are_a_400(server) -> None:
    r = predict(server.url, "cats", b"this is not an image at all")
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image"
    r = predict(server.url, "cats", image_bytes(1)[:300])  # a PNG cut short
    assert r.status_code == 400 and "cannot be decoded" in r.json()["error"]["message"]


def test_decompression_bomb_is_refused_before_decoding(server) -> None:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(out, format="PNG")  # 4 Mpixels in a few KB
    assert len(out.getvalue()) < MAX_UPLOAD
    r = predict(server.url, "cats", out.getvalue())
    assert r.status_code == 413 and "2000x2000" in r.json()["error"]["message"]


def test_oversized_upload_is_a_413_declared_or_streamed(server) -> None:
    big = b"\0" * (MAX_UPLOAD + 1)
    r = predict(server.url, "cats", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'.encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count while it reads
        yield head
        for _ in range(40):
            yield b"\0" * 10_000

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    r = httpx.post(f"{server.url}/v1/tasks/cats/predict", content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]


def test_unknown_task_bad_parameters_and_bad_forms_are_4xx(server) -> None:
    r = predict(server.url, "zebras", image_bytes(0))
    assert r.status_code == 404 and "zebras" in r.json()["error"]["message"]
    assert predict(server.url, "cats", image_bytes(0), top_k="many").status_code == 422
    assert predict(server.url, "cats", image_bytes(0), top_k=0).json()["error"]["code"] == "bad_top_k"
    r = httpx.post(f"{server.url}/v1/tasks/cats/predict", content=image_bytes(0))
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_multipart"
    r = httpx.post(f"{server.url}/v1/tasks/cats/predict", files={"picture": ("x.png", image_bytes(0))})
    assert r.status_code == 400 and "'image'" in r.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(server, reference) -> None:
    jobs = [("cats", b"junk"), ("dogs", image_bytes(7)), ("zebras", image_bytes(8)), ("birds", image_bytes(9))]
    codes = [r.status_code for r in asyncio.run(predict_all(server.url, jobs))]
    assert codes == [400, 200, 404, 200]
    r = predict(server.url, "birds", image_bytes(9))
    assert_matches(r.json(), "birds", expected(reference, server.app, "birds", image_bytes(9)))
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, 'clr_requests_total{status="404",task="unknown"}') >= 1


# ------------------------------------------------------------------------------------------------ admin


def test_admin_routes_are_disabled_without_a_token(server, zoo) -> None:
    r = httpx.post(f"{server.url}/v1/admin/tasks", json={"source": str(zoo["zoo"]), "task": "fish"})
    assert r.status_code == 403 and "--admin-token" in r.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/v1/admin/tasks/cats").status_code == 403
    assert predict(server.url, "cats", image_bytes(0)).status_code == 200


def test_admin_needs_the_right_token(admin_server, zoo) -> None:
    body = {"source": str(zoo["zoo"]), "task": "fish"}
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert "fish" not in httpx.get(f"{admin_server.url}/v1/tasks").json()["tasks"]


def test_malformed_admin_json_is_a_4xx(admin_server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", content=b'{"source": ', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", content=b'{"path": "x"}', headers=auth)
    assert r.status_code == 422 and "source" in r.json()["error"]["message"]
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", json={"source": "/no/such/folder"}, headers=auth)
    assert r.status_code == 400 and "/no/such/folder" in r.json()["error"]["message"]


def test_add_and_remove_a_task_while_serving(admin_server, zoo, reference) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = admin_server.url
    r = httpx.post(f"{url}/v1/admin/tasks", json={"source": str(zoo["zoo"]), "task": "fish"}, headers=auth)
    assert r.status_code == 201 and r.json()["added"] == "fish"
    data = image_bytes(3)
    assert_matches(predict(url, "fish", data).json(), "fish", expected(reference, admin_server.app, "fish", data))

    async def remove_while_queued() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            jobs = [client.post(f"/v1/tasks/{t}/predict", files={"image": ("x", data)}) for t in ("fish", "cats")]
            queued = [asyncio.ensure_future(j) for j in jobs]
            await asyncio.sleep(0.15)  # both are waiting in the 400 ms batching window
            removed = await client.delete("/v1/admin/tasks/fish", headers=auth)
            return [removed, *await asyncio.gather(*queued)]

    removed, fish, cats = asyncio.run(remove_while_queued())
    assert removed.status_code == 200 and "fish" not in removed.json()["tasks"]
    assert fish.status_code == 410 and "removed while this request waited" in fish.json()["error"]["message"]
    assert_matches(cats.json(), "cats", expected(reference, admin_server.app, "cats", data))
    assert predict(url, "fish", data).status_code == 404


# ------------------------------------------------------------------------------------------------ the backbone


def test_other_base_weights_are_refused_before_serving(zoo, capsys) -> None:
    with pytest.raises(clr_timm.BackboneMismatchError, match=r"other\.pth\.tar"):
        serve.load_model(zoo["zoo"], base_weights=zoo["other"])
    from clr_timm.cli import main

    assert main(["serve", str(zoo["zoo"]), "--base-weights", str(zoo["other"]), "--port", "1"]) == 2
    assert "are not the backbone the adapters were trained on" in capsys.readouterr().err


@pytest.mark.parametrize("wrap", ["timm", "model"])
def test_base_weights_from_a_training_checkpoint_serve_the_adapters_backbone(zoo, tmp_path, wrap) -> None:
    weights = load_file(zoo["base"])
    if wrap == "timm":  # what timm's train.py writes: its arguments as an argparse.Namespace beside the weights
        payload = {"state_dict": weights, "args": argparse.Namespace(model="test_resnet"), "epoch": 3}
    else:  # other training scripts: the weights under "model"
        payload = {"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}
    torch.save(payload, tmp_path / "base.pth.tar")
    mt = serve.load_model(zoo["zoo"], base_weights=tmp_path / "base.pth.tar")  # checks the backbone's fingerprint
    assert sorted(mt.tasks) == sorted(TASKS)


def test_base_weights_that_do_not_fit_are_a_clear_error(zoo, tmp_path) -> None:
    save_file({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(clr_timm.CLRError, match=r"wrong.safetensors do not fit"):
        serve.load_model(zoo["zoo"], base_weights=tmp_path / "wrong.safetensors")


def test_tasks_load_from_the_hub_at_start_and_at_run_time(
    admin_server, zoo, hub_server, hub_repo_id, reference
) -> None:
    """``clr-timm serve hf-hub:org/name`` and the admin route with an ``hf-hub:`` source (the local test Hub)."""
    clr_timm.push_folder(zoo["zoo"], hub_repo_id, token=hub_server.token_for("alice"))
    mt = serve.load_model(f"hf-hub:{hub_repo_id}", ["dogs"], base_weights=zoo["base"])
    assert mt.tasks == ["dogs"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"source": f"hf-hub:{hub_repo_id}", "task": "fish", "name": "hub_fish"}
    r = httpx.post(f"{admin_server.url}/v1/admin/tasks", json=body, headers=auth, timeout=60)
    assert r.status_code == 201 and "hub_fish" in r.json()["tasks"]
    data = image_bytes(11)
    body = predict(admin_server.url, "hub_fish", data).json()
    p = expected(reference, admin_server.app, "fish", data)
    assert [t["index"] for t in body["top"]] == p.topk(len(body["top"])).indices.tolist()
