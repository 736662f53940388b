"""Serve many tasks from one backbone over HTTP, with requests for any mix of tasks batched into one forward.

``pip install "clr-timm[serve]"``, then ``clr-timm serve FOLDER_OR_REPO``, or from Python::

    from clr_timm.serve import create_app, load_model
    app = create_app(load_model("hf-hub:alice/resnet50-clr"), max_batch_size=32, max_wait_ms=5)
    uvicorn.run(app, port=8000)          # or mount it in your own FastAPI / Starlette app

Modules: :mod:`~clr_timm.serve.batcher` (the batching core, no web framework), :mod:`~clr_timm.serve.app` (the
FastAPI routes, errors and Prometheus metrics), :mod:`~clr_timm.serve.loading` (backbone and tasks, checked) and
:mod:`~clr_timm.serve.ray_app` (the same app as a Ray Serve deployment; needs ``clr-timm[ray]``, imported only there).

Why FastAPI + uvicorn rather than LitServe: the batching here is across *tasks* and must be one object shared by
the plain server and by Ray Serve replicas. LitServe's batching (``max_batch_size`` / ``batch_timeout`` on a
``LitAPI``) is per endpoint and owns the request loop, so a mixed-task queue with admin routes that change the task
set, per-item errors inside a batch and our own preprocessing pool would have to be fitted around it, and Ray Serve
could not reuse it. FastAPI (Starlette) and uvicorn are the ASGI framework and server most Python services already
run; Ray Serve's HTTP ingress is FastAPI itself, so the same app runs unchanged in each replica. Batching stays a
small asyncio object (:class:`~clr_timm.serve.batcher.Batcher`) that any of them can drive.
"""

from __future__ import annotations

from .app import create_app
from .batcher import MODES, Batcher, RequestError
from .loading import load_base_weights, load_model

__all__ = ["MODES", "Batcher", "RequestError", "create_app", "load_base_weights", "load_model"]
