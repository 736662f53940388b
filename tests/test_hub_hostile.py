"""Folders, repos and names from strangers: no link followed, nothing raw on the screen or in the card, every failure a
CLRError.

Each behaviour is shown against a weakened copy of the check that gives it (monkeypatched in the test), so the test is
seen to fail without it. Hub tests drive the real huggingface_hub client against the local Hub of tests/hub_server.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clr_timm
from clr_timm import card, source
from clr_timm.adapter import ADAPTER_FILE
from clr_timm.card import CARD_FILE, CONFIG_FILE
from clr_timm.cli import main as cli

from ._models import make_model

ALICE = "tok-alice"
SECRET = b"-----BEGIN PRIVATE KEY----- not for the Hub"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _pristine() -> torch.nn.Module:
    return clr_timm.attach(make_model("test_resnet", num_classes=3)).eval()


def _model() -> torch.nn.Module:
    return copy.deepcopy(_pristine())


def _new_repo() -> str:
    return f"alice/hostile-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A private file outside the folder that is pushed, its content unique to the test."""
    path = tmp_path / "private" / "id_key"
    path.parent.mkdir()
    path.write_bytes(SECRET + uuid.uuid4().hex.encode())
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A save_pretrained folder with task 't'."""
    clr_timm.save_pretrained(_model(), tmp_path / "z", task="t")
    return tmp_path / "z"


def _everything_on(hub_server) -> bytes:
    """Every file of every commit of every repo on the local Hub, joined."""
    return b"".join(
        data for repo in hub_server.repos.values() for c in repo.commits.values() for data in c.files.values()
    )


def _link(path: Path, target: Path) -> None:
    if path.is_dir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    else:
        path.unlink()
    path.symlink_to(target)


# ---------------------------------------------------------------------------------------- no link followed


@pytest.mark.parametrize("linked", [CARD_FILE, f"t/{CONFIG_FILE}", f"t/{ADAPTER_FILE}", "t"])
def test_push_refuses_a_file_or_task_folder_linked_out_of_the_folder(hub_server, folder, secret, linked, capsys):
    target = secret if linked != "t" else secret.parent
    if linked == "t":
        (secret.parent / ADAPTER_FILE).write_bytes((folder / "t" / ADAPTER_FILE).read_bytes())
        (secret.parent / CONFIG_FILE).write_bytes(secret.read_bytes())
    _link(folder / linked, target)
    repo_id = _new_repo()
    assert cli(["push", str(folder), repo_id, "--token", ALICE]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / linked} is a symbolic link")
    assert "Traceback" not in err
    assert ("model", repo_id) not in hub_server.repos
    assert secret.read_bytes() not in _everything_on(hub_server)


def test_a_push_that_followed_links_would_upload_the_private_file(hub_server, folder, secret, monkeypatch):
    """The weakened copy of the test above: a reader that follows links, as the library had, leaks the file."""

    def naive(where: Path, relative: str, limit: int) -> bytes | None:
        path = where / relative
        return path.read_bytes() if path.exists() else None

    monkeypatch.setattr(card, "read_in_folder", naive)
    _link(folder / CARD_FILE, secret)
    repo_id = _new_repo()
    assert cli(["push", str(folder), repo_id, "--token", ALICE]) == 0
    assert secret.read_bytes() in hub_server.read_file(repo_id, CARD_FILE)


def test_save_pretrained_writes_nothing_through_a_linked_task_folder_or_card(folder, secret, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "u").symlink_to(outside, target_is_directory=True)
    with pytest.raises(clr_timm.AdapterError, match="symbolic link"):
        clr_timm.save_pretrained(_model(), folder, task="u")
    assert list(outside.iterdir()) == []

    _link(folder / CARD_FILE, secret)
    with pytest.raises(clr_timm.AdapterError, match=f"{CARD_FILE} is a symbolic link"):
        clr_timm.save_pretrained(_model(), folder, task="t")
    assert secret.read_bytes().startswith(SECRET) and (folder / CARD_FILE).is_symlink()


def test_loading_from_a_folder_refuses_a_linked_task(folder, tmp_path):
    moved = tmp_path / "elsewhere"
    (folder / "t").rename(moved)
    (folder / "t").symlink_to(moved, target_is_directory=True)
    with pytest.raises(clr_timm.AdapterError, match="symbolic link"):
        clr_timm.load_adapter(make_model("test_resnet"), folder, task="t")
    with pytest.raises(clr_timm.AdapterError, match="symbolic link"):
        clr_timm.describe(folder)


def test_what_is_uploaded_is_the_bytes_that_were_checked(hub_server, folder):
    """A file changed on disk between the check and the upload: the checked bytes are uploaded, not the new ones."""
    adapter = folder / "t" / ADAPTER_FILE
    checked = adapter.read_bytes()
    fault = hub_server.on_request(r"/preupload/", lambda: adapter.write_bytes(b"{not an adapter}"), method="POST")
    repo_id = _new_repo()
    try:
        clr_timm.push_folder(folder, repo_id, token=ALICE)
    finally:
        hub_server.clear_faults()
    assert fault.hits == 1 and adapter.read_bytes() == b"{not an adapter}"
    assert hub_server.read_file(repo_id, f"t/{ADAPTER_FILE}") == checked


# ----------------------------------------------------------------------------- text escaped on screen and in the card


def _with_metadata(path: Path, **fields: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, **fields})


def test_info_escapes_control_characters_and_cuts_long_values(tmp_path, capsys, monkeypatch):
    path = clr_timm.save_adapter(_model(), tmp_path / "a.safetensors", label_names=["\x1b[2Jwiped", "b\nc", "x" * 5000])
    _with_metadata(path, versions=json.dumps({"clr_timm": "1\x1b]0;owned\x07", "torch": "2"}))
    assert cli(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "b\nc" not in out
    assert "\\x1b[2Jwiped" in out and "b\\nc" in out and "clr_timm 1\\x1b]0;owned\\x07" in out
    assert "x" * 81 not in out

    monkeypatch.setattr("clr_timm.cli.printable", lambda text, limit=0: text)  # the weakened copy
    assert cli(["info", str(path)]) == 0
    assert "\x1b[2Jwiped" in capsys.readouterr().out


def _hostile_name(folder: Path) -> None:
    config = folder / "t" / CONFIG_FILE
    summary = json.loads(config.read_text())
    summary["base_model"]["name"] = 'x")\n<!-- clr-timm:tasks:end -->\n| a | b |\n```\n<!-- clr-timm:tasks:start -->'
    summary["dtype"] = "float32 | `<!-- clr-timm:tasks:end -->`"
    config.write_text(json.dumps(summary))


def _renders(folder: Path, times: int) -> list[str]:
    cards = []
    for _ in range(times):
        card.write_local_card(folder)
        cards.append((folder / CARD_FILE).read_text())
    return cards


def test_text_from_a_config_cannot_break_the_cards_generated_section(folder):
    _hostile_name(folder)
    first, second, third = _renders(folder, 3)
    assert first == second == third
    assert first.count("<!-- clr-timm:tasks:start -->") == first.count("<!-- clr-timm:tasks:end -->") == 1
    assert "| a | b |" not in first
    assert 'create_model("test_resnet"' in first  # the recorded name is no model name: the architecture is shown


def test_a_card_that_took_text_as_it_is_would_grow_on_every_save(folder, monkeypatch):
    """The weakened copy of the test above: without the check on names, the section grows with each save."""
    monkeypatch.setattr(card, "_timm_name", lambda value: value if isinstance(value, str) else None)
    _hostile_name(folder)
    cards = _renders(folder, 3)
    assert len(cards[0]) < len(cards[1]) < len(cards[2])


def test_error_messages_quote_a_hostile_value_cut_and_escaped(tmp_path, capsys):
    with pytest.raises(clr_timm.CLRError) as error:
        clr_timm.load_adapter(make_model("test_resnet"), "hf-hub:" + "\x1b[2J" * 50_000 + "/name")
    assert len(str(error.value)) < 600 and "\x1b" not in str(error.value)
    assert cli(["pull", "org/name", "--revision", "\x1b[2J" * 50_000]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err) < 600 and "\x1b" not in err


# ----------------------------------------------------------------------------------- revisions, repo ids, task names


BAD_REVISIONS = ["..", "../../outside", "/etc", "a\\b", "a//b", "a\x00b", "", "v1/", "refs/.x", "a b", "x.lock"]


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_revision_that_is_not_a_git_ref_is_refused_before_any_request(hub_server, revision, tmp_path):
    before = len(hub_server.requests)
    with pytest.raises(clr_timm.CLRError, match="is not a branch, tag or commit name"):
        clr_timm.download_adapter("alice/any", "t", revision=revision, cache_dir=tmp_path)
    with pytest.raises(clr_timm.CLRError, match="is not a branch, tag or commit name"):
        clr_timm.load_adapter(make_model("test_resnet"), "hf-hub:alice/any", revision=revision)
    with pytest.raises(clr_timm.CLRError, match="is not a branch, tag or commit name"):
        clr_timm.push_to_hub(_model(), "alice/any", revision=revision, token=ALICE)
    assert len(hub_server.requests) == before


def test_an_unchecked_revision_would_reach_the_hub(hub_server, monkeypatch, tmp_path):
    """The weakened copy of the test above: without the check, huggingface_hub is asked for '../../outside'."""
    monkeypatch.setattr(source, "_check_revision", lambda revision: None)
    before = len(hub_server.requests)
    with pytest.raises(clr_timm.CLRError):  # whatever the client makes of it, it was asked
        clr_timm.download_adapter("alice/any", "t", revision="../../outside", cache_dir=tmp_path)
    assert len(hub_server.requests) > before


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "0" * 40, "feature/x-y_z"])
def test_git_ref_names_are_revisions(revision):
    assert source.parse_repo_id("org/name", revision) == ("org/name", revision)


@pytest.mark.parametrize("repo_id", ["bad//id", "a/b/c", "a/-b", "a/b-", "a--b/c", "a/b..c", "a/" + "b" * 100, "a b/c"])
def test_an_invalid_repo_id_is_a_clr_error_everywhere(repo_id, capsys):
    with pytest.raises(clr_timm.CLRError, match="is not a Hub repo id"):
        clr_timm.list_tasks(repo_id)
    with pytest.raises(clr_timm.CLRError, match="is not a Hub repo id"):
        clr_timm.push_to_hub(_model(), repo_id, token=ALICE)
    assert cli(["pull", repo_id]) == 2
    err = capsys.readouterr().err
    assert "is not a Hub repo id" in err and "Traceback" not in err


BAD_TASKS = ["a\x00b", "x" * 256, "é" * 128, "a:b", "a|b", "new\nline", "<!--", "a/b", ".."]


@pytest.mark.parametrize("task", BAD_TASKS)
def test_an_invalid_task_name_is_a_clr_error_everywhere(hub_server, folder, task, tmp_path):
    for call in (
        lambda: clr_timm.save_pretrained(_model(), tmp_path / "out", task=task),
        lambda: clr_timm.load_adapter(make_model("test_resnet"), folder, task=task),
        lambda: clr_timm.describe(folder, task=task),
        lambda: clr_timm.download_adapter("alice/any", task, cache_dir=tmp_path),
    ):
        with pytest.raises(clr_timm.CLRError, match="a task name must be"):
            call()
    assert not (tmp_path / "out").exists()


def test_an_invalid_task_name_on_the_command_line_is_an_error_without_a_traceback(folder, capsys):
    for argv in (["info", str(folder), "--task", "x" * 300], ["pull", "alice/any", "--task", "a:b"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: a task name must be") and "Traceback" not in err


# -------------------------------------------------------------------------------- every failure a CLRError


NESTED = b"[" * 100_000 + b"]" * 100_000
WRONG = [
    json.dumps({"base_model": ["x"], "parameters": 3}).encode(),
    json.dumps({"parameters": [1, 2]}).encode(),
    json.dumps({"label_names": [1, 2], "num_classes": "3"}).encode(),
    json.dumps({"config": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}).encode(),
    NESTED,
]


@pytest.mark.parametrize("config", WRONG, ids=["base_model", "parameters", "labels", "deep_config", "nested"])
def test_a_broken_config_in_a_folder_is_a_clr_error(folder, config, capsys):
    (folder / "t" / CONFIG_FILE).write_bytes(config)
    with pytest.raises(clr_timm.AdapterError, match=CONFIG_FILE):
        clr_timm.describe(folder)
    assert cli(["info", str(folder)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_config_read_as_it_is_would_fail_with_a_raw_attribute_error(folder, monkeypatch):
    """The weakened copy of the test above: without the check on its shape, describe fails inside the library."""
    monkeypatch.setattr(card, "_wrong_field", lambda data: None)
    (folder / "t" / CONFIG_FILE).write_bytes(WRONG[0])
    with pytest.raises(AttributeError):
        cli(["info", str(folder)])


@pytest.mark.parametrize("config", WRONG, ids=["base_model", "parameters", "labels", "deep_config", "nested"])
def test_a_repo_with_a_broken_config_is_described_and_pushed_to(hub_server, config, capsys):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_model(), repo_id, task="t", token=ALICE)
    hub_server.commit(repo_id, {f"t/{CONFIG_FILE}": config})
    info = clr_timm.describe(repo_id)
    assert info["tasks"] == ["t"] and info["adapters"][0]["task"] == "t"
    assert cli(["info", repo_id]) == 0
    assert "  t: ? classes" in capsys.readouterr().out
    clr_timm.push_to_hub(_model(), repo_id, task="u", token=ALICE)
    assert clr_timm.list_tasks(repo_id) == ["t", "u"]


def test_a_repo_folder_whose_name_is_no_task_name_is_not_a_task(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_model(), repo_id, task="t", token=ALICE)
    adapter = hub_server.read_file(repo_id, f"t/{ADAPTER_FILE}")
    hub_server.commit(repo_id, {f"a|<!-- b -->/{ADAPTER_FILE}": adapter})
    assert clr_timm.list_tasks(repo_id) == ["t"]
    clr_timm.push_to_hub(_model(), repo_id, task="u", token=ALICE)
    assert hub_server.read_file(repo_id, CARD_FILE).decode().count("<!--") == 3  # the two markers and the notice


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_card_that_is_a_named_pipe_is_refused_without_waiting(folder):
    (folder / CARD_FILE).unlink()
    os.mkfifo(folder / CARD_FILE)
    with pytest.raises(clr_timm.AdapterError, match="not a regular file"):
        clr_timm.save_pretrained(_model(), folder, task="t")
