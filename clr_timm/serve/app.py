"""The HTTP API: a FastAPI app around a :class:`~clr_timm.serve.batcher.Batcher`.

| route | what |
|---|---|
| ``POST /v1/tasks/{task}/predict?top_k=5`` | field ``image`` -> ``{"task", "top": [{"label", "index", "p"}]}`` |
| ``GET /v1/tasks`` | tasks, their classes and label names, the base model, the input transform |
| ``GET /healthz`` | liveness |
| ``GET /metrics`` | Prometheus text: requests by task and status, batch sizes, queue time, latency |
| ``POST /v1/admin/tasks`` | ``{"source": folder / file / "hf-hub:org/name", "name"?, "task"?, "revision"?}`` |
| ``DELETE /v1/admin/tasks/{task}`` | stop serving a task (its queued requests get a 410) |

Admin routes need ``Authorization: Bearer <token>`` and are disabled (403) when no token is configured. Every error is
``{"error": {"code": ..., "message": ...}}`` with a 4xx status naming the problem; the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..adapter import base_model_info
from ..errors import CLRError, shown
from ..multitask import MultiTaskModel
from ..version import __version__
from .batcher import Batcher, BatchObserver, RequestError

__all__ = ["create_app"]

MAX_ADMIN_BODY = 64 * 1024
_ADMIN_FIELDS = {"source": str, "name": str, "task": str, "revision": str, "local_files_only": bool}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Metrics(BatchObserver):
    """Prometheus metrics in the app's own registry (two apps in one process never share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("clr_requests", "Predictions by task and HTTP status", ["task", "status"], registry=r)
        self.latency = Histogram("clr_request_seconds", "Prediction latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("clr_queue_seconds", "Queued to batch start", buckets=_LATENCY_BUCKETS, registry=r)
        self.sizes = Histogram(
            "clr_batch_size", "Requests per forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_tasks = Histogram(
            "clr_batch_tasks", "Distinct tasks per forward", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.forward = Histogram("clr_forward_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.tasks = Gauge("clr_tasks", "Tasks served", registry=r)

    def batch(self, size: int, num_tasks: int, seconds: float) -> None:
        self.sizes.observe(size)
        self.batch_tasks.observe(num_tasks)
        self.forward.observe(seconds)

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"error": {"code": e.code, "message": str(e)}}, status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is declared or read past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        too_large = f"the request body is {int(declared):,} bytes, over the limit of {limit:,}"
        raise RequestError(413, "upload_too_large", too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "upload_too_large", f"the request body is over the limit of {limit:,} bytes")
    return bytes(body)


async def _read_image(request: Request, limit: int) -> bytes:
    """The bytes of the multipart field ``image``, the body being read under ``limit``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "not_multipart", "send the image as the multipart field 'image' (curl -F image=@x.jpg)")
    body = await _read_body(request, limit)
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=8) as form:
            image = form.get("image")
            if not isinstance(image, UploadFile):
                raise RequestError(400, "no_image", "the multipart form has no file field 'image'")
            return await image.read()
    except HTTPException as e:  # starlette's multipart parser: malformed form
        raise RequestError(400, "bad_multipart", f"the multipart body cannot be parsed: {e.detail}") from None


def _authorize(request: Request, token: str | None) -> None:
    if not token:
        raise RequestError(
            403,
            "admin_disabled",
            "admin endpoints are disabled: start the server with --admin-token TOKEN (or CLR_TIMM_ADMIN_TOKEN)",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "unauthorized", "admin endpoints need the header 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(403, "forbidden", "the admin token is wrong")


def _admin_request(body: bytes) -> dict[str, Any]:
    """``POST /v1/admin/tasks``'s JSON body, checked field by field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, "malformed_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("source"), str):
        raise RequestError(422, "bad_request", 'the body must be a JSON object with a string "source"')
    for key, value in data.items():
        if key not in _ADMIN_FIELDS:
            raise RequestError(422, "bad_request", f"unknown field {shown(key)}; fields: {sorted(_ADMIN_FIELDS)}")
        if not isinstance(value, _ADMIN_FIELDS[key]):
            raise RequestError(422, "bad_request", f"field {key!r} must be a {_ADMIN_FIELDS[key].__name__}")
    return data


def _add_prediction_routes(app: FastAPI, batcher: Batcher, metrics: _Metrics, max_upload_bytes: int) -> None:
    @app.post("/v1/tasks/{task}/predict")
    async def predict(task: str, request: Request, top_k: int = 5) -> Response:
        start, status = time.perf_counter(), 200
        label = task if batcher.has_task(task) else "unknown"  # bounded label values
        try:
            batcher.check_task(task)
            result = await batcher.predict(task, await _read_image(request, max_upload_bytes), top_k)
            return JSONResponse(result)
        except RequestError as e:
            status = e.status
            return _error(e)
        except CLRError as e:
            status = 500
            return JSONResponse({"error": {"code": "model_error", "message": str(e)}}, status_code=500)
        finally:
            metrics.requests.labels(label, str(status)).inc()
            if status == 200:
                metrics.latency.observe(time.perf_counter() - start)

    @app.get("/v1/tasks")
    async def tasks() -> dict[str, Any]:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in batcher.data_config.items()}
        return {"base_model": base_model_info(batcher.mt.model), "tasks": batcher.tasks, "data_config": config}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(batcher.tasks), "version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.tasks.set(len(batcher.tasks))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_admin_routes(app: FastAPI, batcher: Batcher, admin_token: str | None) -> None:
    @app.post("/v1/admin/tasks", status_code=201)
    async def add_task(request: Request) -> Response:
        try:
            _authorize(request, admin_token)
            data = _admin_request(await _read_body(request, MAX_ADMIN_BODY))
            name = await batcher.add_task(data.pop("source"), name=data.pop("name", None), **data)
        except RequestError as e:
            return _error(e)
        except CLRError as e:
            return _error(RequestError(400, "cannot_add_task", f"the task cannot be added: {e}"))
        return JSONResponse({"added": name, "tasks": sorted(batcher.tasks)}, status_code=201)

    @app.delete("/v1/admin/tasks/{task}")
    async def remove_task(task: str, request: Request) -> Response:
        try:
            _authorize(request, admin_token)
            await batcher.remove_task(task)
        except RequestError as e:
            return _error(e)
        return JSONResponse({"removed": task, "tasks": sorted(batcher.tasks)})


def create_app(
    mt: MultiTaskModel,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    mode: str = "cross-task",
    admin_token: str | None = None,
    max_upload_bytes: int = 10 * 1024 * 1024,
    max_image_pixels: int = 40_000_000,
    data_config: Mapping[str, Any] | None = None,
    preprocess_threads: int = 2,
) -> FastAPI:
    """The serving app for ``mt``'s tasks, to run with any ASGI server (``uvicorn.run(app)``) or mount in yours.

    Args:
        mt: The model with its tasks (e.g. from :func:`~clr_timm.serve.load_model`); the app owns it from now on.
        max_batch_size: Most requests per forward.
        max_wait_ms: How long a request waits for others to join its batch.
        mode: ``"cross-task"`` (default), ``"same-task"`` or ``"none"`` (see :data:`~clr_timm.serve.batcher.MODES`).
        admin_token: Bearer token of the admin routes; None disables them.
        max_upload_bytes: Largest request body, enforced while it is read.
        max_image_pixels: Largest image (width x height), checked before its pixels are decoded.
        data_config: Overrides of timm's data config (e.g. ``{"input_size": (3, 128, 128)}``).
        preprocess_threads: Threads that decode and transform images.

    Returns:
        A FastAPI app; ``app.state.batcher`` is its :class:`~clr_timm.serve.batcher.Batcher` and
        ``app.state.metrics_registry`` its Prometheus registry.
    """
    metrics = _Metrics()
    batcher = Batcher(
        mt,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        mode=mode,
        data_config=data_config,
        preprocess_threads=preprocess_threads,
        max_image_pixels=max_image_pixels,
        observer=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="clr_timm", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics_registry = metrics.registry

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg')}" for p in e.errors())
        return _error(RequestError(422, "invalid_parameter", problems))

    _add_prediction_routes(app, batcher, metrics, max_upload_bytes)
    _add_admin_routes(app, batcher, admin_token)
    return app
