"""Inference from several threads at once, checked against running alone.

- A plain attached model (``clr_timm.attach`` / ``load_adapter``): its forward only reads the model, so any number
  of threads may call it at once.
- A :class:`~clr_timm.MultiTaskModel`: ``mt(x, task=...)`` and ``mt(x, tasks=[...])`` change the shared model for the
  duration of the call (the first re-points its adapter slots at the task's tensors, the second installs per-sample
  forwards on the CLR layers, norms and head), so the model serialises them, and every other call that binds a task,
  with one re-entrant lock. The tests force overlapping calls with a barrier inside the forward pass; the barrier
  gives up after a short timeout, which is what happens when the lock serialises the calls.
- One ``copy.deepcopy(mt)`` per thread runs in parallel: each thread owns its copy of the backbone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import torch
from torch import nn

import clr_timm
from clr_timm import MultiTaskModel

from ._models import make_input, make_model

SIZES = {"a": 3, "b": 5, "c": 7}
THREADS = 4
ROUNDS = 5
RENDEZVOUS_TIMEOUT_S = 2.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread each: the threads of the test are the concurrency being tested."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(tensors: dict[str, torch.Tensor], seed: int) -> None:
    """Move every adapter tensor off its initial value, so that tasks really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in tensors.items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if key.endswith("running_var"):
                t.mul_(torch.exp(0.3 * noise))
            else:
                t.add_(0.1 * noise)


def _mt() -> MultiTaskModel:
    mt = MultiTaskModel(make_model("test_resnet"))
    for seed, (task, n) in enumerate(SIZES.items()):
        mt.add_task(task, n)
        _perturb(mt.adapters[task].state_dict(keep_vars=True), seed)
    return mt.eval()


def _inputs(n: int = THREADS) -> list[torch.Tensor]:
    # Different batch sizes too: a call that ran with another call's per-sample state would fail loudly.
    return [make_input(batch=2 + i % 3, size=32, seed=10 + i) for i in range(n)]


def _mixes(xs: list[torch.Tensor]) -> list[list[str]]:
    names = list(SIZES)
    return [[names[(i + j) % len(names)] for j in range(x.shape[0])] for i, x in enumerate(xs)]


def _in_threads(calls: list[Callable[[], Any]], rounds: int = ROUNDS) -> list[list[Any]]:
    """Run each call ``rounds`` times in its own thread, all threads at once; the results, or the exceptions raised."""
    results: list[list[Any]] = [[] for _ in calls]
    start = threading.Barrier(len(calls))

    def work(i: int) -> None:
        start.wait()
        for _ in range(rounds):
            try:
                with torch.no_grad():
                    results[i].append(calls[i]())
            except Exception as e:  # reported by the test as a wrong result
                results[i].append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung"
    return results


def _same(got: Any, expected: Any) -> bool:
    if isinstance(got, Exception):
        return False
    if isinstance(expected, list):
        return len(got) == len(expected) and all(_same(g, e) for g, e in zip(got, expected))
    return got.shape == expected.shape and torch.equal(got, expected)


def _assert_all_as_alone(results: list[list[Any]], expected: list[Any]) -> None:
    for i, (runs, want) in enumerate(zip(results, expected)):
        for r, got in enumerate(runs):
            assert _same(got, want), f"thread {i}, round {r}: {got if isinstance(got, Exception) else 'other outputs'}"


@contextmanager
def _rendezvous(module: nn.Module, parties: int) -> Iterator[None]:
    """Hold each forward pass at ``module`` until ``parties`` threads are inside a forward pass at once.

    This forces calls to overlap at their most fragile point (after they set up their state, before they use it),
    instead of hoping the scheduler interleaves them. It waits at most RENDEZVOUS_TIMEOUT_S, once: if calls are
    serialised (a lock), the first one gives up waiting and every later one passes straight through.
    """
    barrier = threading.Barrier(parties, timeout=RENDEZVOUS_TIMEOUT_S)

    def hold(m: nn.Module, args: tuple) -> None:
        with suppress(threading.BrokenBarrierError):
            barrier.wait()

    handle = module.register_forward_pre_hook(hold)
    try:
        yield
    finally:
        handle.remove()


def _assert_left_clean(mt: MultiTaskModel, current_output: torch.Tensor, x: torch.Tensor) -> None:
    """After concurrent calls, the model is as it was: no leftover per-call forwards, the current task bound."""
    leftovers = [n for n, m in mt.named_modules() if "forward" in m.__dict__]
    assert not leftovers, f"per-call forwards left installed on {leftovers[:3]}"
    with torch.no_grad():
        assert _same(mt(x), current_output), "the current task no longer gives its own outputs"


# ------------------------------------------------------------------------------------------------ safe today


def test_a_plain_attached_model_serves_many_threads_as_alone():
    model = clr_timm.attach(make_model("test_resnet", num_classes=5)).eval()
    _perturb(clr_timm.adapter_state_dict(model), seed=0)
    xs = _inputs()
    with torch.no_grad():
        expected = [model(x) for x in xs]
    results = _in_threads([lambda x=x: model(x) for x in xs])
    _assert_all_as_alone(results, expected)


def test_the_current_task_serves_many_threads_as_alone():
    mt = _mt()
    mt.set_task("b")
    xs = _inputs()
    with torch.no_grad():
        expected = [mt(x) for x in xs]
    with _rendezvous(mt.model.layer2, THREADS):
        results = _in_threads([lambda x=x: mt(x) for x in xs])
    _assert_all_as_alone(results, expected)


def test_one_copy_per_thread_serves_mixed_batches_as_alone():
    mt = _mt()
    xs = _inputs()
    mixes = _mixes(xs)
    with torch.no_grad():
        expected = [mt(x, tasks=m) for x, m in zip(xs, mixes)]
    copies = [copy.deepcopy(mt) for _ in xs]
    results = _in_threads([lambda c=c, x=x, m=m: c(x, tasks=m) for c, x, m in zip(copies, xs, mixes)])
    _assert_all_as_alone(results, expected)


# -------------------------------------------- calls that change the shared model for their duration (serialised)


def test_mixed_batches_from_many_threads_match_running_alone():
    mt = _mt()
    xs = _inputs()
    mixes = _mixes(xs)
    with torch.no_grad():
        expected = [mt(x, tasks=m) for x, m in zip(xs, mixes)]
        current = mt(xs[0])
    with _rendezvous(mt.model.layer2, THREADS):
        results = _in_threads([lambda x=x, m=m: mt(x, tasks=m) for x, m in zip(xs, mixes)], rounds=2)
    _assert_all_as_alone(results, expected)
    _assert_left_clean(mt, current, xs[0])


def test_per_call_tasks_from_many_threads_match_running_alone():
    mt = _mt()
    xs = _inputs(len(SIZES) + 1)
    # One thread per task through task=..., and one plain call of the current task ("a") among them.
    calls: list[dict[str, Any]] = [{"task": t} for t in SIZES] + [{}]
    with torch.no_grad():
        expected = [mt(x, **kw) for x, kw in zip(xs, calls)]
        current = mt(xs[0])
    with _rendezvous(mt.model.layer2, len(calls)):
        results = _in_threads([lambda x=x, kw=kw: mt(x, **kw) for x, kw in zip(xs, calls)], rounds=2)
    _assert_all_as_alone(results, expected)
    _assert_left_clean(mt, current, xs[0])


# ------------------------------------------------------------------------ other operations during a mixed batch


@contextmanager
def _paused_mixed_batch(mt: MultiTaskModel, x: torch.Tensor, tasks: list[str]) -> Iterator[None]:
    """A mixed batch running in another thread, held inside the forward pass with its per-sample forwards installed
    (at the head's pooling), until the block ends."""
    inside, release = threading.Event(), threading.Event()

    def hold(m: nn.Module, args: tuple) -> None:
        if not release.is_set():
            inside.set()
            release.wait(30)

    handle = mt.model.global_pool.register_forward_pre_hook(hold)
    batch = threading.Thread(target=lambda: mt(x, tasks=tasks), daemon=True)
    batch.start()
    assert inside.wait(30), "the mixed batch never reached the pause"
    try:
        yield
    finally:
        release.set()
        batch.join(30)
        handle.remove()


def _during_a_mixed_batch(mt: MultiTaskModel, operation: Callable[[], Any]) -> tuple[Any, bool]:
    """Run ``operation`` in a thread while a mixed batch is paused; its result, and whether it finished meanwhile."""
    x = make_input(batch=3, size=32, seed=5)
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", operation()), daemon=True)
    with _paused_mixed_batch(mt, x, ["a", "b", "c"]):
        worker.start()
        worker.join(0.5)
        finished_meanwhile = not worker.is_alive()
    worker.join(60)
    assert "value" in result, "the operation failed or hung"
    return result["value"], finished_meanwhile


def _outputs(mt: MultiTaskModel) -> list[Any]:
    x = make_input(batch=3, size=32, seed=6)
    with torch.no_grad():
        return [mt(x, tasks=["c", "a", "b"]), mt(x, task="b"), mt(x)]


def test_a_deepcopy_taken_during_a_mixed_batch_is_a_clean_working_model():
    mt = _mt()
    expected = _outputs(mt)
    copied, finished_meanwhile = _during_a_mixed_batch(mt, lambda: copy.deepcopy(mt))
    assert not finished_meanwhile  # it waited for the batch to finish
    assert not [n for n, m in copied.named_modules() if "forward" in m.__dict__]
    assert all(_same(got, want) for got, want in zip(_outputs(copied), expected))


def test_what_the_lock_prevents_a_bare_copy_of_the_shared_model_keeps_the_per_sample_forwards():
    # The weakened version of the test above: copying mt.model itself, which no lock guards, mid-batch.
    mt = _mt()
    copied, finished_meanwhile = _during_a_mixed_batch(mt, lambda: copy.deepcopy(mt.model))
    assert finished_meanwhile and [n for n, m in copied.named_modules() if "forward" in m.__dict__]


def test_pickling_during_a_mixed_batch_gives_a_clean_working_model():
    import pickle

    mt = _mt()
    expected = _outputs(mt)
    data, _ = _during_a_mixed_batch(mt, lambda: pickle.dumps(mt))
    restored = pickle.loads(data)
    assert not [n for n, m in restored.named_modules() if "forward" in m.__dict__]
    assert all(_same(got, want) for got, want in zip(_outputs(restored), expected))


def test_state_dict_during_a_mixed_batch_is_the_quiet_one():
    mt = _mt()
    quiet = mt.state_dict()
    during, _ = _during_a_mixed_batch(mt, mt.state_dict)
    assert list(during) == list(quiet) and all(torch.equal(during[k], quiet[k]) for k in quiet)


def test_load_task_during_a_mixed_batch_accepts_a_valid_file(tmp_path):
    mt = _mt()
    path = mt.save_task("b", tmp_path / "b.safetensors")
    name, _ = _during_a_mixed_batch(mt, lambda: mt.load_task("b2", path))
    assert name == "b2" and mt.tasks == ["a", "b", "c", "b2"]
    assert all(torch.equal(v, mt.adapter_state_dict("b")[k]) for k, v in mt.adapter_state_dict("b2").items())
