"""An unreliable Hub: server errors, timeouts, dropped connections, files deleted mid-way, and the cache after each.

Every test drives the real huggingface_hub client against the local Hub of tests/hub_server.py, with faults injected
on the server. What the client retries (a failed metadata request, 5xx and 429 answers, a dropped download) is
retried, with the client's backoff sleeps recorded instead of slept; what it does not is a :class:`clr_timm.HubError`
that names the cause. After every failure the model is as it was, and the Hub cache holds only complete files: the
next load, with the fault gone, is bit-identical to a load that never failed.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants, file_download
from huggingface_hub.utils import _http

import clr_timm
from clr_timm.adapter import ADAPTER_FILE

from ._models import make_input, make_model

ALICE = "tok-alice"
TASKS = {"flowers": 3, "pets": 5}
RESOLVE = "/resolve/main/{task}/" + ADAPTER_FILE


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _pristine() -> torch.nn.Module:
    return make_model("test_resnet").eval()


def _fresh() -> torch.nn.Module:
    return copy.deepcopy(_pristine())


def _task_model(num_classes: int, seed: int) -> torch.nn.Module:
    model = clr_timm.attach(_fresh())
    clr_timm.reset_adapter(model, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in clr_timm.adapter_state_dict(model).items():
            if t.is_floating_point() and not key.endswith("running_var"):
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(make_input(batch=1, size=32))


def _push(hub_server) -> SimpleNamespace:
    repo_id = f"alice/faults-{uuid.uuid4().hex[:10]}"
    outputs = {}
    for seed, (task, n) in enumerate(TASKS.items()):
        model = _task_model(n, seed)
        clr_timm.push_to_hub(model, repo_id, task=task, token=ALICE)
        outputs[task] = _out(model)
    return SimpleNamespace(repo_id=repo_id, source=f"hf-hub:{repo_id}", outputs=outputs)


@pytest.fixture(scope="module")
def repo(hub_server) -> SimpleNamespace:
    """A repo with two tasks that no test changes."""
    return _push(hub_server)


@pytest.fixture
def own_repo(hub_server) -> SimpleNamespace:
    """A repo with two tasks for a test that deletes or adds files."""
    return _push(hub_server)


@pytest.fixture(autouse=True)
def faults(hub_server) -> Iterator:
    """The server, with every fault a test adds removed after it."""
    yield hub_server
    hub_server.clear_faults()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's backoff sleeps between retries, recorded instead of slept (1 + 2 + 4 + 8 + 8 s otherwise)."""
    slept: list[float] = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=slept.append, time=time.time))
    return slept


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def _load(repo: SimpleNamespace, task: str, cache: Path, **kwargs) -> torch.nn.Module:
    return clr_timm.load_adapter(_fresh(), repo.source, task=task, cache_dir=cache, **kwargs)


def _assert_loads_as_pushed(repo: SimpleNamespace, task: str, cache: Path, **kwargs) -> None:
    assert torch.equal(_out(_load(repo, task, cache, **kwargs)), repo.outputs[task])


def _assert_refused(error: type[Exception], match: str, repo: SimpleNamespace, task: str, cache: Path) -> None:
    model = _fresh()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        clr_timm.load_adapter(model, repo.source, task=task, cache_dir=cache)
    assert not clr_timm.is_attached(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _assert_cache_consistent(hub_server, cache: Path) -> list[str]:
    """Every file the cache shows is complete: byte-identical to the server's at its commit. Returns their paths.

    Partial downloads may wait in ``blobs/*.incomplete`` (the client resumes them); a snapshot never links to one.
    """
    shown = []
    for snapshot in sorted(cache.glob("models--*/snapshots/*")):
        repo_id = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
        files = hub_server.get_repo(repo_id).commits[snapshot.name].files
        for f in sorted(p for p in snapshot.rglob("*") if not p.is_dir()):
            path = f.relative_to(snapshot).as_posix()
            assert f.exists() and not f.resolve().name.endswith(".incomplete"), f"{path} links to a partial file"
            assert f.read_bytes() == files[path], f"{path} in the cache differs from the Hub's"
            shown.append(path)
    return shown


# ------------------------------------------------------------------------------------------------- server errors


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_a_transient_server_error_is_retried_and_the_task_loads(faults, repo, cache, sleeps, status):
    fault = faults.fail(RESOLVE.format(task="pets"), status, method="HEAD")
    _assert_loads_as_pushed(repo, "pets", cache)
    assert fault.hits == 1
    assert _assert_cache_consistent(faults, cache) == [f"pets/{ADAPTER_FILE}"]


def test_a_server_that_keeps_failing_raises_a_hub_error_naming_the_status(faults, repo, cache, sleeps):
    fault = faults.fail(RESOLVE.format(task="pets"), 503, times=None, method="HEAD")
    _assert_refused(clr_timm.HubError, r"HTTP 503.*try again", repo, "pets", cache)
    assert fault.hits > 2 and len(sleeps) >= 2, "the client retries with backoff before giving up"
    assert _assert_cache_consistent(faults, cache) == []


def test_a_cached_task_loads_while_the_hub_answers_server_errors(faults, repo, cache, sleeps):
    _assert_loads_as_pushed(repo, "flowers", cache)
    faults.fail("/", 500, times=None)
    _assert_loads_as_pushed(repo, "flowers", cache)
    _assert_refused(clr_timm.HubError, "HTTP 500", repo, "pets", cache)


def test_a_failed_download_leaves_no_file_in_the_cache_and_the_next_one_completes(faults, repo, cache, sleeps):
    faults.fail(RESOLVE.format(task="pets"), 500, times=None, method="GET")
    _assert_refused(clr_timm.HubError, r"HTTP 500.*try again", repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == []
    faults.clear_faults()
    _assert_loads_as_pushed(repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == [f"pets/{ADAPTER_FILE}"]


def test_a_listing_that_fails_once_is_retried(faults, repo, sleeps):
    fault = faults.fail(f"/api/models/{repo.repo_id}/tree/", 503)
    assert clr_timm.list_tasks(repo.repo_id) == sorted(TASKS)
    assert fault.hits == 1


def test_a_push_refused_by_a_server_error_commits_nothing_and_can_be_repeated(faults, own_repo, sleeps):
    before = faults.get_repo(own_repo.repo_id).branches["main"]
    faults.fail(r"/commit/main$", 503, method="POST")
    model = _task_model(7, seed=9)
    with pytest.raises(clr_timm.HubError, match=r"HTTP 503.*try again"):
        clr_timm.push_to_hub(model, own_repo.repo_id, task="birds", token=ALICE)
    assert faults.get_repo(own_repo.repo_id).branches["main"] == before
    clr_timm.push_to_hub(model, own_repo.repo_id, task="birds", token=ALICE)
    assert clr_timm.list_tasks(own_repo.repo_id) == sorted([*TASKS, "birds"])


# ---------------------------------------------------------------------------------- network errors and timeouts


def test_a_dropped_download_is_resumed(faults, repo, cache, sleeps):
    fault = faults.drop(RESOLVE.format(task="pets"), method="GET")
    _assert_loads_as_pushed(repo, "pets", cache)
    assert fault.hits == 1


def test_a_dropped_metadata_request_raises_a_hub_error_or_uses_the_cache(faults, repo, cache, sleeps):
    faults.drop(RESOLVE.format(task="pets"), method="HEAD")
    _assert_refused(clr_timm.HubError, "cannot reach the Hub", repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == []
    _assert_loads_as_pushed(repo, "flowers", cache)
    faults.drop(RESOLVE.format(task="flowers"), method="HEAD")
    _assert_loads_as_pushed(repo, "flowers", cache)  # the client cannot ask the Hub: the cached copy is used


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> float:
    """Client timeouts of 0.2 s (HF_HUB_ETAG_TIMEOUT, its retry's, HF_HUB_DOWNLOAD_TIMEOUT) instead of 10 s and 60 s."""
    timeout = 0.2
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", timeout)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", timeout)
    monkeypatch.setattr(file_download, "_ETAG_RETRY_TIMEOUT", timeout)
    return timeout


def test_a_hub_that_answers_too_slowly_raises_a_hub_error_saying_so(faults, repo, cache, sleeps, short_timeouts):
    faults.delay(RESOLVE.format(task="pets"), 5 * short_timeouts, times=None, method="HEAD")
    _assert_refused(clr_timm.errors.HubOfflineError, r"did not answer within.*HF_HUB_ETAG_TIMEOUT", repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == []


def test_a_slow_answer_once_is_retried(faults, repo, cache, sleeps, short_timeouts):
    fault = faults.delay(RESOLVE.format(task="pets"), 5 * short_timeouts, method="HEAD")
    _assert_loads_as_pushed(repo, "pets", cache)
    assert fault.hits == 1


def test_a_cached_task_loads_while_the_hub_is_too_slow(faults, repo, cache, sleeps, short_timeouts):
    _assert_loads_as_pushed(repo, "flowers", cache)
    faults.delay("/", 5 * short_timeouts, times=None)
    _assert_loads_as_pushed(repo, "flowers", cache)


def test_a_hub_that_is_down_raises_hub_offline_error_for_a_task_not_in_the_cache(faults, repo, cache, sleeps):
    _assert_loads_as_pushed(repo, "flowers", cache)
    with faults.stopped():
        _assert_refused(
            clr_timm.errors.HubOfflineError, r"'pets'.*not in the local cache.*\['flowers'\]", repo, "pets", cache
        )
        _assert_loads_as_pushed(repo, "flowers", cache)
    assert _assert_cache_consistent(faults, cache) == [f"flowers/{ADAPTER_FILE}"]


# ---------------------------------------------------------------------------------- files deleted mid-way


def test_a_task_deleted_between_listing_and_download_raises_task_not_found(faults, own_repo, cache):
    assert clr_timm.list_tasks(own_repo.repo_id) == sorted(TASKS)
    path = f"pets/{ADAPTER_FILE}"
    faults.on_request(RESOLVE.format(task="pets"), lambda: faults.delete_file(own_repo.repo_id, path), method="HEAD")
    _assert_refused(clr_timm.errors.TaskNotFoundError, r"no task 'pets'.*\['flowers'\]", own_repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == []


def test_a_task_deleted_between_metadata_and_download_raises_task_not_found(faults, own_repo, cache):
    path = f"pets/{ADAPTER_FILE}"
    faults.on_request(RESOLVE.format(task="pets"), lambda: faults.delete_file(own_repo.repo_id, path), method="GET")
    _assert_refused(clr_timm.errors.TaskNotFoundError, r"no task 'pets'.*\['flowers'\]", own_repo, "pets", cache)
    assert _assert_cache_consistent(faults, cache) == []


def test_a_multitask_model_is_not_built_when_a_listed_task_disappears(faults, own_repo, cache):
    path = f"pets/{ADAPTER_FILE}"
    faults.on_request(RESOLVE.format(task="pets"), lambda: faults.delete_file(own_repo.repo_id, path), method="HEAD")
    model = _fresh()
    with pytest.raises(clr_timm.errors.TaskNotFoundError, match="no task 'pets'"):
        clr_timm.MultiTaskModel.from_pretrained(model, own_repo.source, cache_dir=cache)
    assert not clr_timm.is_attached(model)
    assert _assert_cache_consistent(faults, cache) == [f"flowers/{ADAPTER_FILE}"]


# ---------------------------------------------------------------------------------- files that are not what they said


@pytest.mark.parametrize("served", [lambda b: b[:-100], lambda b: b + b"\0" * 100], ids=["shorter", "longer"])
def test_a_file_served_with_another_size_than_announced_raises_a_hub_error(faults, repo, cache, sleeps, served):
    fault = faults.rewrite(RESOLVE.format(task="pets"), served, times=None, method="GET")
    _assert_refused(clr_timm.HubError, r"could not be downloaded: Consistency check failed", repo, "pets", cache)
    assert fault.hits >= 1
    assert _assert_cache_consistent(faults, cache) == []
    faults.clear_faults()
    _assert_loads_as_pushed(repo, "pets", cache)
