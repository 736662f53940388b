"""Writing files: overwrite=False holds under races, files get the user's umask, killed saves leave nothing behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch

import clr_timm
from clr_timm import adapter as adapter_module

from ._models import make_model

MODEL = "test_resnet"


@pytest.fixture(scope="module")
def model():
    return clr_timm.attach(make_model(MODEL, num_classes=3))


def _race(model, path: Path, tasks: list[str], monkeypatch) -> list[object]:
    """Save each task to ``path`` from its own thread, all writing at once: for each, the path saved or the error."""
    barrier = threading.Barrier(len(tasks), timeout=30)
    save_file = safetensors.torch.save_file
    waited = threading.local()

    def save_then_wait(*args, **kwargs):
        save_file(*args, **kwargs)
        if not getattr(waited, "once", False):  # every thread has written its temporary file: now all put it in place
            waited.once = True
            barrier.wait()

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_wait)
    results: list[object] = [None] * len(tasks)

    def save(i: int) -> None:
        try:
            results[i] = clr_timm.save_adapter(model, path, task=tasks[i])
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_of_two_saves_racing_to_one_new_path_exactly_one_wins(model, tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    tasks = ["pets", "flowers"]
    results = _race(model, path, tasks, monkeypatch)
    won = [t for t, r in zip(tasks, results) if isinstance(r, Path)]
    lost = [r for r in results if not isinstance(r, Path)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], clr_timm.AdapterError) and f"'{won[0]}'" in str(lost[0])
    assert clr_timm.read_adapter(path).task == won[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_the_race_is_lost_silently_by_a_check_then_write(model, tmp_path, monkeypatch):
    """The weakened copy: without the exclusive create, both saves succeed and one silently replaces the other."""
    monkeypatch.setattr(adapter_module, "_create_exclusively", lambda tmp, path: os.replace(tmp, path))
    results = _race(model, tmp_path / "a.safetensors", ["pets", "flowers"], monkeypatch)
    assert all(isinstance(r, Path) for r in results), results


def test_saves_of_one_task_racing_to_one_path_both_succeed(model, tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    results = _race(model, path, ["pets", "pets"], monkeypatch)
    assert all(isinstance(r, Path) for r in results) and clr_timm.read_adapter(path).task == "pets"


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_saved_files_get_the_permissions_of_any_new_file_of_the_user(model, tmp_path, umask):
    old = os.umask(umask)
    try:
        clr_timm.save_adapter(model, tmp_path / "a.safetensors", task="pets")
        clr_timm.save_adapter(model, tmp_path / "a.safetensors", task="pets")  # replaced: a new file all the same
        clr_timm.save_pretrained(model, tmp_path / "zoo", task="pets")
    finally:
        os.umask(old)
    written = [tmp_path / "a.safetensors", *sorted(p for p in (tmp_path / "zoo").rglob("*") if p.is_file())]
    assert len(written) == 4  # the adapter file; the folder's adapter, clr_config.json and README.md
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from clr_timm.adapter import atomic_path

with atomic_path(Path(sys.argv[1])) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_save(path: Path) -> None:
    """A process that dies mid-save, with no chance to clean up (the power cut, the OOM killer, kill -9)."""
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], cwd=Path(__file__).parents[1])
    assert done.returncode == -signal.SIGKILL


@pytest.mark.skipif(os.name != "posix", reason="tells a dead writer from a live one with POSIX signals")
def test_a_save_killed_outright_leaves_no_temporary_file_after_the_next_save(model, tmp_path):
    path = tmp_path / "a.safetensors"
    clr_timm.save_adapter(model, path, task="pets")
    _killed_save(path)
    stray = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert len(stray) == 1 and stray[0].startswith(".a.safetensors.") and stray[0].endswith(".tmp")
    live = tmp_path / f".a.safetensors.{os.getppid()}-{'0' * 16}.tmp"  # a save another live process is writing
    live.write_bytes(b"")
    clr_timm.save_adapter(model, path, task="pets")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])
    assert clr_timm.read_adapter(path).task == "pets"


@pytest.mark.skipif(os.name != "posix", reason="tells a dead writer from a live one with POSIX signals")
def test_without_the_cleanup_a_killed_save_leaves_its_file(model, tmp_path, monkeypatch):
    """The weakened copy: the test above fails when saves do not remove what killed saves left."""
    monkeypatch.setattr(adapter_module, "_remove_stale_temporaries", lambda path: None)
    path = tmp_path / "a.safetensors"
    _killed_save(path)
    clr_timm.save_adapter(model, path, task="pets")
    assert len(list(tmp_path.iterdir())) == 2


def test_an_interrupted_save_of_a_new_file_leaves_nothing(model, tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        clr_timm.save_adapter(model, tmp_path / "new.safetensors", task="pets")
    assert list(tmp_path.iterdir()) == []
