"""The serving app as a Ray Serve deployment: several replicas behind Ray's router, each one :func:`create_app`.

``pip install "clr-timm[ray]"``. Each replica loads the backbone and the tasks itself (:func:`load_model`) and runs
the same app and batching core as ``clr-timm serve``; Ray's proxy spreads requests over the replicas, and each
replica batches the requests it holds across tasks. Typical use::

    import ray
    from ray import serve
    from clr_timm.serve.ray_app import deployment

    ray.init()
    serve.run(deployment("hf-hub:alice/resnet50-clr", num_replicas=2), route_prefix="/")

**The Hub cache.** Replicas read the adapters and timm's backbone weights through ``huggingface_hub``'s cache. On one
machine every replica shares ``HF_HOME`` (default ``~/.cache/huggingface``): the first download fills it and the
others read it. On a cluster, point ``HF_HOME`` (or ``HF_HUB_CACHE``) at a shared disk in the workers' environment
(``ray.init(runtime_env={"env_vars": {"HF_HOME": "/shared/hf"}})``), fill it once
(``huggingface-cli download org/name``, or one replica started alone) and pass ``local_files_only=True`` so that no
replica contacts the Hub at start. Offline machines use ``base_weights=`` (a file on the shared disk) for the
backbone.

**Sizing replicas.** A replica holds one backbone plus ``tasks x adapter size`` (for ResNet-50: about 100 MB fp32 for
the backbone, 0.65 MB per 10-class task), plus activations of one batch. On CPU, give each replica
``num_cpus`` cores and the same number of torch threads (``torch_threads``): replicas x threads should not exceed
the cores, or the threads fight for them. Fewer, wider replicas batch more requests per forward (better throughput
per core with CNNs); more, narrower replicas help when preprocessing (JPEG decoding) or the Python per-request
overhead is the bottleneck. Keep ``max_ongoing_requests`` per replica at a few times ``max_batch_size`` so that a
replica sees enough requests to fill its batches. On GPUs, one replica per GPU (``num_gpus=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["deployment"]


def deployment(
    source: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    *,
    base_weights: str | os.PathLike | None = None,
    num_replicas: int = 2,
    num_cpus: float = 1,
    torch_threads: int | None = None,
    max_ongoing_requests: int | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
    name: str = "clr_timm",
    **app_kwargs: Any,
) -> Any:
    """A bound Ray Serve application serving ``source``'s tasks on ``num_replicas`` replicas; run it with ``serve.run``.

    Args:
        source: A ``save_pretrained`` folder (on a disk every replica sees), ``"hf-hub:org/name"`` or a file.
        tasks: The tasks to serve (default: all).
        base_weights: The backbone's weights file, as in :func:`~clr_timm.serve.load_model`.
        num_replicas: Replicas behind Ray's router.
        num_cpus: Cores Ray reserves for each replica.
        torch_threads: Torch threads per replica (default: ``num_cpus`` rounded down, at least 1).
        max_ongoing_requests: Requests a replica holds at once (default: 4 x ``max_batch_size``).
        hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` for Hub sources.
        name: The deployment's name.
        **app_kwargs: :func:`~clr_timm.serve.create_app`'s options (``max_batch_size``, ``max_wait_ms``, ...).
    """
    from ray import serve

    threads = torch_threads or max(1, int(num_cpus))
    source = os.fspath(source)
    weights = os.fspath(base_weights) if base_weights is not None else None
    hub = dict(hub_kwargs or {})

    def build_app() -> Any:  # runs in each replica as it starts: the replica loads the model itself
        import torch

        from clr_timm.serve import create_app, load_model

        torch.set_num_threads(threads)
        return create_app(load_model(source, tasks, base_weights=weights, **hub), **app_kwargs)

    ongoing = max_ongoing_requests or 4 * app_kwargs.get("max_batch_size", 32)
    ingress = serve.ingress(build_app)()
    options = {"num_cpus": num_cpus}
    return serve.deployment(
        ingress, name=name, num_replicas=num_replicas, max_ongoing_requests=ongoing, ray_actor_options=options
    ).bind()
