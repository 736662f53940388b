"""The local Hub server (tests/hub_server.py) driven by the real huggingface_hub client over HTTP."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .hub_server import HubServer, git_blob_oid


@pytest.fixture
def api() -> HfApi:
    """A client with no default token: each call says whose token it uses."""
    return HfApi()


@pytest.fixture
def alice(hub_server: HubServer) -> str:
    return hub_server.token_for("alice")


@pytest.fixture
def bob(hub_server: HubServer) -> str:
    return hub_server.token_for("bob")


@pytest.fixture
def populated_repo(api: HfApi, alice: str, hub_repo_id: str, tmp_path: Path) -> str:
    """A public repo of alice with README.md, config.json and sub/notes.txt uploaded in one commit."""
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n# Test model\n")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    (folder / "sub" / "notes.txt").write_text("notes v1")
    api.create_repo(hub_repo_id, token=alice)
    api.upload_folder(repo_id=hub_repo_id, folder_path=folder, commit_message="Upload v1", token=alice)
    return hub_repo_id


def test_env_points_client_at_local_server(hub_server: HubServer) -> None:
    assert hub_server.url == huggingface_hub.constants.ENDPOINT
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET


def test_create_repo_and_exist_ok(api: HfApi, alice: str, hub_repo_id: str, hub_server: HubServer) -> None:
    url = api.create_repo(hub_repo_id, token=alice)
    assert url.repo_id == hub_repo_id
    assert url == f"{hub_server.url}/{hub_repo_id}"
    assert api.create_repo(hub_repo_id, token=alice, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(hub_repo_id, token=alice)
    assert error.value.response.status_code == 409
    assert api.repo_exists(hub_repo_id)
    assert not api.repo_exists(f"{hub_repo_id}-missing")
    info = api.model_info(hub_repo_id)
    assert info.id == hub_repo_id
    assert info.private is False
    assert [sibling.rfilename for sibling in info.siblings or []] == [".gitattributes"]
    assert info.sha == api.list_repo_refs(hub_repo_id).branches[0].target_commit
    api.delete_repo(hub_repo_id, token=alice)
    assert not api.repo_exists(hub_repo_id)
    api.delete_repo(hub_repo_id, token=alice, missing_ok=True)


def test_upload_folder_is_one_commit_and_listed(api: HfApi, populated_repo: str, hub_server: HubServer) -> None:
    assert sorted(api.list_repo_files(populated_repo)) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "sub/notes.txt",
    ]
    commits = api.list_repo_commits(populated_repo)
    assert [commit.title for commit in commits] == ["Upload v1", "initial commit"]
    assert commits[0].authors == ["alice"]
    top_level = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(populated_repo)}
    assert top_level == {
        ".gitattributes": "RepoFile",
        "README.md": "RepoFile",
        "config.json": "RepoFile",
        "sub": "RepoFolder",
    }
    (notes,) = api.list_repo_tree(populated_repo, path_in_repo="sub", expand=True)
    assert notes.path == "sub/notes.txt" and notes.blob_id == git_blob_oid(b"notes v1") and notes.size == 8
    assert notes.last_commit is not None and notes.last_commit.title == "Upload v1"
    paths = api.get_paths_info(populated_repo, ["config.json", "sub", "missing.txt"])
    assert [entry.path for entry in paths] == ["config.json", "sub"]
    assert hub_server.errors == []


def test_unchanged_upload_makes_no_commit(api: HfApi, alice: str, populated_repo: str) -> None:
    head = api.model_info(populated_repo).sha
    info = api.upload_file(
        path_or_fileobj=b"notes v1", path_in_repo="sub/notes.txt", repo_id=populated_repo, token=alice
    )
    assert info.oid == head
    assert len(api.list_repo_commits(populated_repo)) == 2


def test_download_at_main_branch_tag_and_commit(api: HfApi, alice: str, populated_repo: str) -> None:
    v1 = api.model_info(populated_repo).sha
    assert v1 is not None
    api.create_tag(populated_repo, tag="v1", token=alice)
    api.create_branch(populated_repo, branch="dev", token=alice)
    api.create_branch(populated_repo, branch="dev", token=alice, exist_ok=True)
    api.upload_file(path_or_fileobj=b"notes main", path_in_repo="sub/notes.txt", repo_id=populated_repo, token=alice)
    dev = api.upload_file(
        path_or_fileobj=b"notes dev", path_in_repo="sub/notes.txt", repo_id=populated_repo, revision="dev", token=alice
    )

    def read(revision: str | None) -> str:
        return Path(hf_hub_download(populated_repo, "sub/notes.txt", revision=revision)).read_text()

    assert read(None) == "notes main"
    assert read("main") == "notes main"
    assert read("dev") == "notes dev"
    assert read("v1") == "notes v1"
    assert read(v1) == "notes v1"
    assert read(dev.oid) == "notes dev"
    refs = api.list_repo_refs(populated_repo)
    assert {ref.name: ref.target_commit for ref in refs.branches}["dev"] == dev.oid
    assert [(ref.name, ref.target_commit) for ref in refs.tags] == [("v1", v1)]
    assert api.file_exists(populated_repo, "sub/notes.txt", revision="v1")
    assert not api.file_exists(populated_repo, "sub/other.txt")


def test_file_metadata_and_range_requests(api: HfApi, populated_repo: str, hub_server: HubServer) -> None:
    head = api.model_info(populated_repo).sha
    url = huggingface_hub.hf_hub_url(populated_repo, "sub/notes.txt")
    metadata = huggingface_hub.get_hf_file_metadata(url)
    assert (metadata.commit_hash, metadata.etag, metadata.size) == (head, git_blob_oid(b"notes v1"), 8)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=2-4"})) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == "bytes 2-4/8"
        assert response.read() == b"tes"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=-2"})) as response:
        assert response.read() == b"v1"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=8-"}))
    assert error.value.code == 416


def test_snapshot_download(populated_repo: str) -> None:
    folder = Path(snapshot_download(populated_repo))
    assert (folder / "sub" / "notes.txt").read_text() == "notes v1"
    assert json.loads((folder / "config.json").read_text()) == {"architecture": "resnet18"}


def test_private_repo_needs_owner_token(api: HfApi, alice: str, bob: str, hub_repo_id: str) -> None:
    api.create_repo(hub_repo_id, private=True, token=alice)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="secret.txt", repo_id=hub_repo_id, token=alice)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        hf_hub_download(hub_repo_id, "secret.txt")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        hf_hub_download(hub_repo_id, "secret.txt", token=bob)
    assert other_user.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files(hub_repo_id)
    assert not api.repo_exists(hub_repo_id)
    assert Path(hf_hub_download(hub_repo_id, "secret.txt", token=alice)).read_bytes() == b"secret"
    assert api.model_info(hub_repo_id, token=alice).private is True
    api.update_repo_settings(hub_repo_id, private=False, token=alice)
    assert api.model_info(hub_repo_id).private is False


def test_writes_outside_own_namespace_are_forbidden(api: HfApi, alice: str, bob: str, populated_repo: str) -> None:
    with pytest.raises(HfHubHTTPError) as create:
        api.create_repo(populated_repo.replace("alice/", "alice/other-"), token=bob)
    assert create.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as upload:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=populated_repo, token=bob)
    assert upload.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=populated_repo)
    assert anonymous.value.response.status_code == 401
    assert api.create_repo(populated_repo, token=bob, exist_ok=True).repo_id == populated_repo
    org_repo = populated_repo.replace("alice/", "clr-org/")
    assert api.create_repo(org_repo, token=alice).repo_id == org_repo
    with pytest.raises(HfHubHTTPError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=org_repo, token=bob)


def test_invalid_token(api: HfApi, alice: str, populated_repo: str) -> None:
    assert api.whoami(token=alice)["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as error:
        api.whoami(token="tok-unknown")
    assert error.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as listing:
        api.list_repo_files(populated_repo, token="tok-unknown")
    assert not isinstance(listing.value, RepositoryNotFoundError)


def test_missing_file_revision_and_repo(api: HfApi, alice: str, populated_repo: str) -> None:
    with pytest.raises(RemoteEntryNotFoundError) as missing_file:
        hf_hub_download(populated_repo, "missing.txt")
    assert isinstance(missing_file.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(populated_repo, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(populated_repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=populated_repo, revision="no-such-branch", token=alice
        )
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{populated_repo}-missing", "config.json")
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(populated_repo, path_in_repo="no-such-dir"))


def test_create_commit_with_additions_and_deletions(api: HfApi, alice: str, populated_repo: str) -> None:
    info = api.create_commit(
        populated_repo,
        operations=[
            CommitOperationAdd("weights/a.bin", b"\x00\x01"),
            CommitOperationAdd("weights/b.bin", b"\x02"),
            CommitOperationDelete("config.json"),
            CommitOperationDelete("sub/"),
        ],
        commit_message="Restructure",
        token=alice,
    )
    assert sorted(api.list_repo_files(populated_repo)) == [
        ".gitattributes",
        "README.md",
        "weights/a.bin",
        "weights/b.bin",
    ]
    assert api.list_repo_commits(populated_repo)[0].commit_id == info.oid
    assert Path(hf_hub_download(populated_repo, "weights/a.bin")).read_bytes() == b"\x00\x01"
    with pytest.raises(EntryNotFoundError):
        api.delete_file("config.json", repo_id=populated_repo, token=alice)
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(
            path_or_fileobj=b"late",
            path_in_repo="late.txt",
            repo_id=populated_repo,
            parent_commit="0" * 40,
            token=alice,
        )
    assert stale.value.response.status_code == 412


def test_create_pr(api: HfApi, alice: str, bob: str, populated_repo: str) -> None:
    main_before = api.model_info(populated_repo).sha
    first = api.upload_file(
        path_or_fileobj=b"proposal", path_in_repo="sub/notes.txt", repo_id=populated_repo, create_pr=True, token=alice
    )
    assert (first.pr_revision, first.pr_num) == ("refs/pr/1", 1)
    assert first.pr_url == f"{huggingface_hub.constants.ENDPOINT}/{populated_repo}/discussions/1"
    assert api.model_info(populated_repo).sha == main_before
    assert Path(hf_hub_download(populated_repo, "sub/notes.txt", revision="refs/pr/1")).read_text() == "proposal"
    assert Path(hf_hub_download(populated_repo, "sub/notes.txt")).read_text() == "notes v1"
    second = api.create_commit(
        populated_repo,
        operations=[CommitOperationAdd("bob.txt", b"from bob")],
        commit_message="Bob's proposal",
        create_pr=True,
        token=bob,
    )
    assert second.pr_revision == "refs/pr/2"
    refs = api.list_repo_refs(populated_repo, include_pull_requests=True)
    assert [(ref.ref, ref.target_commit) for ref in refs.pull_requests or []] == [
        ("refs/pr/1", first.oid),
        ("refs/pr/2", second.oid),
    ]
    assert api.file_exists(populated_repo, "bob.txt", revision="refs/pr/2")


def test_dataset_repo(api: HfApi, alice: str, hub_repo_id: str) -> None:
    url = api.create_repo(hub_repo_id, repo_type="dataset", token=alice)
    assert url.repo_type == "dataset"
    api.upload_file(
        path_or_fileobj=b"a,b\n", path_in_repo="data.csv", repo_id=hub_repo_id, repo_type="dataset", token=alice
    )
    assert Path(hf_hub_download(hub_repo_id, "data.csv", repo_type="dataset")).read_bytes() == b"a,b\n"
    assert api.dataset_info(hub_repo_id).sha is not None
    assert not api.repo_exists(hub_repo_id)


def test_offline_from_cache_after_stop(
    api: HfApi, populated_repo: str, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = hf_hub_download(populated_repo, "config.json")
    with hub_server.stopped():
        assert hf_hub_download(populated_repo, "config.json", local_files_only=True) == cached
        assert hf_hub_download(populated_repo, "config.json") == cached
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(populated_repo, "README.md", local_files_only=True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert hf_hub_download(populated_repo, "config.json") == cached
        with pytest.raises(OfflineModeIsEnabled):
            api.list_repo_files(populated_repo)
        monkeypatch.undo()
    assert api.list_repo_files(populated_repo)


def test_fault_5xx_is_retried_by_the_client(api: HfApi, populated_repo: str, hub_server: HubServer) -> None:
    fault = hub_server.fail(f"/api/models/{populated_repo}/tree/", status=503)
    try:
        assert "config.json" in api.list_repo_files(populated_repo)
    finally:
        hub_server.clear_faults()
    assert fault.hits == 1 and fault.exhausted
    statuses = [
        request.status for request in hub_server.requests if "/tree/" in request.path and populated_repo in request.path
    ]
    assert statuses[-2:] == [503, 200]


def test_fault_delay_and_delete_between_listing_and_download(populated_repo: str, hub_server: HubServer) -> None:
    files = HfApi().list_repo_files(populated_repo)
    assert "config.json" in files
    deleted = hub_server.on_request(
        "/resolve/main/config.json", lambda: hub_server.delete_file(populated_repo, "config.json")
    )
    slow = hub_server.delay("/resolve/main/README.md", 0.3, method="HEAD")
    try:
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(populated_repo, "config.json")
        started = time.monotonic()
        hf_hub_download(populated_repo, "README.md")
        assert time.monotonic() - started >= 0.3
    finally:
        hub_server.clear_faults()
    assert (deleted.hits, slow.hits) == (1, 1)


def test_dropped_connections(populated_repo: str, hub_server: HubServer) -> None:
    """A dropped metadata (HEAD) call escapes as httpx2's error; a dropped download (GET) is resumed by the client."""
    head = hub_server.drop("/resolve/main/sub/notes.txt", method="HEAD")
    try:
        with pytest.raises(httpx2.RemoteProtocolError):
            hf_hub_download(populated_repo, "sub/notes.txt")
        get = hub_server.drop("/resolve/main/sub/notes.txt", method="GET")
        assert Path(hf_hub_download(populated_repo, "sub/notes.txt")).read_text() == "notes v1"
    finally:
        hub_server.clear_faults()
    assert (head.hits, get.hits) == (1, 1)


def test_chunked_body_keeps_connection_in_step(hub_server: HubServer) -> None:
    connection = http.client.HTTPConnection(hub_server.host, hub_server.port, timeout=5)
    try:
        body = json.dumps({"content": "---\n---\n", "repoType": "model"}).encode()
        connection.request("POST", "/api/validate-yaml", body=iter([body[:5], body[5:]]), encode_chunked=True)
        first = connection.getresponse()
        assert (first.status, json.loads(first.read())) == (200, {"errors": [], "warnings": []})
        connection.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {hub_server.token_for('bob')}"})
        second = connection.getresponse()
        assert json.loads(second.read())["name"] == "bob"
    finally:
        connection.close()
