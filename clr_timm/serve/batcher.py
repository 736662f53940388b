"""The batching core: requests for any mix of tasks become one mixed-task batch through a :class:`MultiTaskModel`.

Plain Python and asyncio, no web framework: the FastAPI app (:mod:`clr_timm.serve.app`) and the Ray Serve deployment
(:mod:`clr_timm.serve.ray_app`) both drive the same :class:`Batcher`. One request's life:

1. ``await batcher.predict(task, image_bytes)`` checks the task, then decodes and transforms the image in a thread
   pool (timm's eval transform of the base model), off the event loop and while the model runs the previous batch.
2. The tensor joins a queue. A collector task takes the oldest request and every request that arrives within
   ``max_wait_ms`` of it, up to ``max_batch_size``: any task (``"cross-task"``), only the oldest request's task
   (``"same-task"``), or none (``"none"``: one request per forward; the benchmark's baselines).
3. The batch runs as ``mt(x, tasks=[...])`` on one model thread; the event loop keeps accepting and preprocessing.

A request whose image is bad fails alone, before it is queued; a request whose task was removed while it waited gets
a 410 and the rest of its batch runs; should a batch forward fail, each of its requests is retried alone, so one item
never fails the others. Task removals run on the model thread too, between batches, so a batch never sees a task
vanish half-way; additions read their files in another thread and only take the model's lock to register.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import warnings
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CLRError, RequestError, shown
from ..multitask import MultiTaskModel

__all__ = ["MODES", "Batcher", "BatchObserver", "RequestError"]

MODES = ("cross-task", "same-task", "none")
"""How requests are grouped: any tasks together, one task per batch, or one request per forward."""

MAX_TOP_K = 100


class BatchObserver:
    """What the batcher reports, for metrics; the default does nothing (the app plugs Prometheus in)."""

    def batch(self, size: int, num_tasks: int, seconds: float) -> None:
        """A batch of ``size`` requests over ``num_tasks`` tasks ran in ``seconds``."""

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` between joining the queue and its batch starting."""


@dataclass
class _Item:
    task: str
    x: torch.Tensor
    top_k: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _TaskInfo:
    num_classes: int | None
    label_names: list[str] | None


def _decode(data: bytes, max_pixels: int) -> Any:
    """Image bytes -> an RGB PIL image; the size is checked from the header, before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    413,
                    "image_too_large",
                    f"the image is {width}x{height} = {width * height:,} pixels, more than the server's limit of "
                    f"{max_pixels:,}; send a smaller image",
                )
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, "image_too_large", f"the image is a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise RequestError(
            400, "not_an_image", f"the upload ({len(data):,} bytes) is not an image format PIL can read"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data
        raise RequestError(400, "bad_image", f"the image cannot be decoded: {shown(str(e))}") from None


class Batcher:
    """Dynamic batching of image requests for many tasks over one :class:`~clr_timm.MultiTaskModel`.

    Args:
        mt: The model, in eval mode, with its tasks. The batcher owns it from now on: change its tasks through
            :meth:`add_task` and :meth:`remove_task`.
        max_batch_size: Most requests in one forward.
        max_wait_ms: How long the oldest queued request waits for others to join its batch.
        mode: One of :data:`MODES`.
        data_config: Overrides of timm's data config of the base model (e.g. ``{"input_size": (3, 128, 128)}``).
        preprocess_threads: Threads that decode and transform images.
        max_image_pixels: Largest image (width x height) accepted, checked before decoding.
        observer: Receives batch sizes and queue times (:class:`BatchObserver`).
    """

    def __init__(
        self,
        mt: MultiTaskModel,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        mode: str = "cross-task",
        data_config: Mapping[str, Any] | None = None,
        preprocess_threads: int = 2,
        max_image_pixels: int = 40_000_000,
        observer: BatchObserver | None = None,
    ) -> None:
        if mode not in MODES:
            raise CLRError(f"unknown batching mode {mode!r}; modes: {list(MODES)}")
        if max_batch_size < 1 or max_wait_ms < 0:
            raise CLRError(f"max_batch_size must be >= 1 and max_wait_ms >= 0, got {max_batch_size}, {max_wait_ms}")
        import timm.data

        self.mt = mt.eval()
        self.max_batch_size = 1 if mode == "none" else max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.mode = mode
        self.max_image_pixels = max_image_pixels
        self.observer = observer or BatchObserver()
        self.data_config = timm.data.resolve_data_config(dict(data_config or {}), model=mt.model)
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        self._tasks = {name: self._info(name) for name in mt.tasks}
        self._pre_pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="clr-preprocess")
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="clr-model")
        self._queue: asyncio.Queue[_Item] | None = None
        self._held: deque[_Item] = deque()
        self._collector: asyncio.Task | None = None

    # ---------------------------------------------------------------------------------------------- tasks

    def _info(self, name: str) -> _TaskInfo:
        adapter = self.mt.adapters[name]
        return _TaskInfo(adapter.num_classes, adapter.label_names)

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Each task's number of classes and label names."""
        return {n: {"num_classes": i.num_classes, "label_names": i.label_names} for n, i in self._tasks.items()}

    def has_task(self, task: str) -> bool:
        """Whether ``task`` is served (requests for it are accepted)."""
        return task in self._tasks

    def check_task(self, task: str) -> None:
        """Raise a 404 :class:`RequestError` for a task the model does not serve."""
        if task not in self._tasks:
            raise RequestError(404, "unknown_task", f"no task {shown(task)}; tasks: {sorted(self._tasks)}")

    async def add_task(self, source: str | os.PathLike, *, name: str | None = None, **load_kwargs: Any) -> str:
        """Load a task while serving (as :meth:`MultiTaskModel.load_task`); requests in flight are not disturbed."""
        if name is not None and name in self._tasks:
            raise RequestError(409, "task_exists", f"task {shown(name)} already exists; remove it first")
        loop = asyncio.get_running_loop()
        added = await loop.run_in_executor(None, lambda: self.mt.load_task(name, source, **load_kwargs))
        self._tasks[added] = self._info(added)
        return added

    async def remove_task(self, name: str) -> None:
        """Stop serving a task; its queued requests get a 410, the others proceed."""
        self.check_task(name)
        del self._tasks[name]  # new requests: 404 from now on
        await asyncio.get_running_loop().run_in_executor(self._model_pool, self.mt.remove_task, name)

    # ---------------------------------------------------------------------------------------------- requests

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Image bytes -> the model's input tensor (C, H, W), as the base model's eval transform makes it."""
        return self.transform(_decode(data, self.max_image_pixels))

    async def predict(self, task: str, data: bytes, top_k: int = 5) -> dict[str, Any]:
        """One image for one task -> ``{"task": ..., "top": [{"label", "index", "p"}, ...]}``.

        Raises:
            RequestError: 404 unknown task, 400 / 413 bad image, 410 task removed while the request waited.
        """
        self.check_task(task)
        if not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, "bad_top_k", f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        loop = asyncio.get_running_loop()
        x = await loop.run_in_executor(self._pre_pool, self.preprocess, data)
        self.check_task(task)  # removed while decoding
        return await self.submit(task, x, top_k)

    async def submit(self, task: str, x: torch.Tensor, top_k: int = 5) -> dict[str, Any]:
        """Queue an already preprocessed image (C, H, W) and wait for its prediction."""
        self._ensure_started()
        item = _Item(task, x, top_k, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(item)
        return await item.future

    # ---------------------------------------------------------------------------------------------- the loop

    def _ensure_started(self) -> None:
        if self._collector is None or self._collector.done():
            self._queue = asyncio.Queue()
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def start(self) -> None:
        """Start collecting batches on the running event loop (also done by the first request)."""
        self._ensure_started()

    async def stop(self) -> None:
        """Stop collecting; queued requests are failed with a 503, and the threads are released."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        for item in [*self._held, *self._drain()]:
            if not item.future.done():
                item.future.set_exception(RequestError(503, "shutting_down", "the server is shutting down"))
        self._held.clear()
        self._pre_pool.shutdown(wait=False)
        self._model_pool.shutdown(wait=True)

    def _drain(self) -> list[_Item]:
        items = []
        while self._queue is not None and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            try:
                results = await loop.run_in_executor(self._model_pool, self._run, batch)
            except Exception as e:  # the pool is shut down: nothing ran
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                if item.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _next_batch(self) -> list[_Item]:
        """The oldest request and those that may join it, waiting up to ``max_wait`` from its arrival."""
        first = self._held.popleft() if self._held else await self._queue.get()
        batch = [first]
        fits = (lambda item: item.task == first.task) if self.mode == "same-task" else (lambda item: True)
        for item in [i for i in self._held if fits(i)][: self.max_batch_size - 1]:
            self._held.remove(item)
            batch.append(item)
        deadline = first.queued_at + self.max_wait
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            (batch if fits(item) else self._held).append(item)
        return batch

    # ---------------------------------------------------------------------------------------------- the model

    def _run(self, batch: list[_Item]) -> list[dict[str, Any] | BaseException]:
        """On the model thread: one forward for the batch's live requests; the others get their error."""
        start = time.perf_counter()
        for item in batch:
            self.observer.queued(start - item.queued_at)
        live = [i for i, item in enumerate(batch) if item.task in self.mt.adapters]
        results: list[Any] = [
            RequestError(410, "task_removed", f"task {shown(item.task)} was removed while this request waited")
            for item in batch
        ]
        if live:
            for i, result in zip(live, self._forward([batch[i] for i in live])):
                results[i] = result
            self.observer.batch(len(live), len({batch[i].task for i in live}), time.perf_counter() - start)
        return results

    def _forward(self, items: list[_Item]) -> list[dict[str, Any] | BaseException]:
        try:
            with torch.inference_mode():
                logits = self.mt(torch.stack([item.x for item in items]), tasks=[item.task for item in items])
            return [self._top(item, out) for item, out in zip(items, logits)]
        except Exception as e:
            if len(items) == 1:
                return [CLRError(f"the model failed on this request: {shown(str(e))}")]
            return [r for item in items for r in self._forward([item])]  # isolate the one that fails

    def _top(self, item: _Item, logits: torch.Tensor) -> dict[str, Any]:
        p = logits.float().softmax(-1)
        values, indices = p.topk(min(item.top_k, p.numel()))
        labels = self.mt.adapters[item.task].label_names
        return {
            "task": item.task,
            "top": [
                {"label": labels[i] if labels and i < len(labels) else str(i), "index": i, "p": v}
                for v, i in zip(values.tolist(), indices.tolist())
            ],
        }
