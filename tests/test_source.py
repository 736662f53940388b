"""What a source is: an adapter file, a save_pretrained folder or a Hub repo, decided in one place."""

import pytest

import clr_timm
from clr_timm.source import Source, parse_repo_id, parse_source


def test_an_hf_hub_source_names_a_repo_and_a_revision():
    assert parse_source("hf-hub:org/name") == Source("hub", repo_id="org/name")
    assert parse_source("hf-hub:org/name@v1") == Source("hub", repo_id="org/name", revision="v1")
    assert parse_source("hf-hub:org/name", {"revision": "v2"}) == Source("hub", repo_id="org/name", revision="v2")


def test_local_paths_are_files_or_folders(tmp_path):
    assert parse_source(tmp_path) == Source("folder", path=tmp_path)
    assert parse_source(tmp_path / "a.safetensors") == Source("file", path=tmp_path / "a.safetensors")


def test_a_bare_repo_id_is_a_repo_only_where_asked_and_only_when_no_such_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("org/name").kind == "file"
    assert parse_source("org/name", bare_repo=True) == Source("hub", repo_id="org/name")
    assert parse_source("org/name@v1", bare_repo=True) == Source("hub", repo_id="org/name", revision="v1")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_source("org/name", bare_repo=True).kind == "folder"


@pytest.mark.parametrize("path", ["/org", "./org/name", "../name"])
def test_a_path_starting_with_a_slash_or_a_dot_is_never_a_repo(path):
    assert parse_source(path, bare_repo=True).kind == "file"


def test_hub_arguments_for_a_local_source_are_an_error(tmp_path):
    with pytest.raises(clr_timm.CLRError, match=r"\['revision', 'token'\] only apply to Hub repos"):
        parse_source(tmp_path / "a.safetensors", {"revision": "v1", "token": "x"})


def test_two_different_revisions_are_an_error():
    assert parse_repo_id("org/name@v1", "v1") == ("org/name", "v1")
    with pytest.raises(clr_timm.CLRError, match="two revisions"):
        parse_repo_id("hf-hub:org/name@v1", "v2")
    with pytest.raises(clr_timm.CLRError, match="names no revision"):
        parse_repo_id("org/name@")
