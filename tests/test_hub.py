"""Per-task adapters on the Hub: push, list, pull, model card, revisions, errors, offline use, CLI.

Every test drives the real huggingface_hub client over HTTP against the local Hub of tests/hub_server.py.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

import clr_timm
from clr_timm.adapter import ADAPTER_FILE
from clr_timm.cli import format_description
from clr_timm.cli import main as cli
from clr_timm.hub import CONFIG_FILE

from ._models import make_input, make_model

ALICE, BOB = "tok-alice", "tok-bob"
TASKS = {"flowers": 3, "pets": 5, "birds": 7}
BASE = "timm/resnet18.a1_in1k"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than several, and leaves the machine's cores to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _pristine(seed: int) -> torch.nn.Module:
    return make_model("resnet18", seed=seed).eval()


def _fresh(seed: int = 0) -> torch.nn.Module:
    """A new resnet18 with the backbone of ``make_model("resnet18", seed=seed)`` (a copy: faster than building one)."""
    return copy.deepcopy(_pristine(seed))


def _task_model(num_classes: int, seed: int, backbone_seed: int = 0) -> torch.nn.Module:
    """The shared backbone, attached, with an adapter of its own: every adapter tensor moved off its initial value."""
    model = clr_timm.attach(_fresh(backbone_seed))
    clr_timm.reset_adapter(model, num_classes=num_classes)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for key, t in clr_timm.adapter_state_dict(model).items():
            if key.endswith("running_var"):
                t.mul_(1 + 0.5 * torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model


def _x() -> torch.Tensor:
    return make_input(batch=1, size=32)


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _labels(n: int) -> list[str]:
    return [f"class-{i}" for i in range(n)]


def _new_repo(owner: str = "alice") -> str:
    return f"{owner}/clr-{uuid.uuid4().hex[:10]}"


def _head(hub_server, repo_id: str, branch: str = "main") -> tuple[str, dict[str, bytes]]:
    repo = hub_server.get_repo(repo_id)
    oid = repo.branches[branch]
    return oid, dict(repo.commits[oid].files)


@pytest.fixture(scope="module")
def pushed(hub_server):
    """One public repo with three tasks pushed one after the other; the models' outputs and the card after each."""
    repo_id = _new_repo()
    x = _x()
    outputs, cards, commits = {}, [], []
    for seed, (task, n) in enumerate(TASKS.items()):
        model = _task_model(n, seed)
        info = clr_timm.push_to_hub(model, repo_id, task=task, token=ALICE, label_names=_labels(n))
        outputs[task] = _out(model, x)
        cards.append(hub_server.read_file(repo_id, "README.md").decode())
        commits.append(info.oid)
    count = clr_timm.count_parameters(model)
    return SimpleNamespace(repo_id=repo_id, x=x, outputs=outputs, cards=cards, commits=commits, count=count)


# --------------------------------------------------------------------------------------------- push, list, pull


def test_list_tasks_gives_every_pushed_task(pushed):
    assert clr_timm.list_tasks(pushed.repo_id) == sorted(TASKS)
    assert clr_timm.list_tasks(f"hf-hub:{pushed.repo_id}") == sorted(TASKS)


def test_each_task_pulled_into_a_fresh_model_gives_bit_identical_outputs(pushed):
    for task, n in TASKS.items():
        fresh = make_model("resnet18")
        clr_timm.load_adapter(fresh, f"hf-hub:{pushed.repo_id}", task=task)
        assert fresh.num_classes == n
        assert torch.equal(_out(fresh, pushed.x), pushed.outputs[task]), task


def test_each_push_is_one_commit_with_adapter_config_and_card(hub_server, pushed):
    repo = hub_server.get_repo(pushed.repo_id)
    history = list(repo.history(repo.branches["main"]))
    assert [c.oid for c in history[:3]] == pushed.commits[::-1]
    assert len(history) == 4  # the repo's initial commit, then one per push
    for commit, task in zip(history[:3], reversed(TASKS)):
        assert commit.title == f"Add CLR adapter for task {task!r}"
        added = set(commit.files) - set(repo.commits[commit.parent].files)
        assert added == {f"{task}/{ADAPTER_FILE}", f"{task}/{CONFIG_FILE}"} | (
            {"README.md"} if task == "flowers" else set()
        )


def test_config_json_says_what_the_adapter_holds(hub_server, pushed):
    config = json.loads(hub_server.read_file(pushed.repo_id, f"pets/{CONFIG_FILE}"))
    assert config["task"] == "pets"
    assert config["num_classes"] == 5 and config["label_names"] == _labels(5)
    assert config["base_model"]["name"] == "resnet18.a1_in1k"
    assert config["base_model"]["hf_hub_id"] == BASE
    assert config["config"] == clr_timm.CLRConfig().to_dict()
    assert config["parameters"]["per_task"] == pushed.count.per_task
    assert config["file_size"] == len(hub_server.read_file(pushed.repo_id, f"pets/{ADAPTER_FILE}"))


def test_card_metadata_and_task_table_after_each_push(pushed):
    for i, text in enumerate(pushed.cards):
        present = list(TASKS)[: i + 1]
        for task in TASKS:
            assert (f"| `{task}` |" in text) == (task in present), (i, task)
    card = ModelCard(pushed.cards[-1])
    data = card.data
    assert data.library_name == "clr-timm"
    assert data.base_model == BASE
    assert data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0"
    assert {"clr", "continual-learning", "timm", "image-classification", f"base_model:adapter:{BASE}"} <= set(data.tags)
    row = next(line for line in card.text.splitlines() if line.startswith("| `pets` |"))
    assert row.startswith("| `pets` | `clr` |")  # the variant (CLRConfig.preset) the task was trained with
    assert f"{pushed.count.per_task:,}" in row and f"{pushed.count.percent_of_backbone:.3f}%" in row
    assert f'clr_timm.load_adapter(model, "hf-hub:{pushed.repo_id}"' in card.text
    assert card.text.count("<!-- clr-timm:tasks:start -->") == 1


def test_pushing_another_task_keeps_what_a_person_wrote_in_the_card(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_task_model(3, 0), repo_id, task="flowers", token=ALICE)
    card = ModelCard(hub_server.read_file(repo_id, "README.md").decode())
    card.data.tags = [*card.data.tags, "my-own-tag"]
    card.data.license = "mit"
    card.text = "# My adapters\n\nWritten by a person, above.\n" + card.text + "\n## Citation\n\nWritten below.\n"
    hub_server.commit(repo_id, {"README.md": str(card).encode()}, author="alice")

    clr_timm.push_to_hub(_task_model(5, 1), repo_id, task="pets", token=ALICE)
    text = hub_server.read_file(repo_id, "README.md").decode()
    after = ModelCard(text)
    assert "Written by a person, above." in text and "## Citation\n\nWritten below." in text
    assert "| `flowers` |" in text and "| `pets` |" in text
    assert "my-own-tag" in after.data.tags and "clr" in after.data.tags
    assert after.data.license == "mit"
    assert text.count("<!-- clr-timm:tasks:start -->") == 1


def test_commit_message_and_description_are_used(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(
        _task_model(3, 0), repo_id, task="pets", token=ALICE, commit_message="pets v1", commit_description="why"
    )
    commit = hub_server.get_repo(repo_id).commits[hub_server.get_repo(repo_id).branches["main"]]
    assert (commit.title, commit.message) == ("pets v1", "why")


# --------------------------------------------------------------------------------------------------- revisions


def test_branches_tags_and_commits_select_versions_of_a_task(hub_server):
    repo_id, x = _new_repo(), _x()
    v1, v2 = _task_model(5, 0), _task_model(5, 1)
    clr_timm.push_to_hub(v1, repo_id, task="pets", token=ALICE)
    HfApi(token=ALICE).create_tag(repo_id, tag="v1")
    info = clr_timm.push_to_hub(v2, repo_id, task="pets", revision="v2", token=ALICE)
    assert set(hub_server.get_repo(repo_id).branches) == {"main", "v2"}

    def pulled(source: str, **kwargs) -> torch.Tensor:
        return _out(clr_timm.load_adapter(_fresh(), source, task="pets", **kwargs), x)

    source = f"hf-hub:{repo_id}"
    assert torch.equal(pulled(source), _out(v1, x))  # main is untouched by a push to a branch
    assert torch.equal(pulled(source, revision="v1"), _out(v1, x))  # a tag
    assert torch.equal(pulled(source, revision="v2"), _out(v2, x))  # a branch
    assert torch.equal(pulled(f"{source}@v2"), _out(v2, x))  # timm's spelling
    assert torch.equal(pulled(source, revision=info.oid), _out(v2, x))  # a commit
    with pytest.raises(clr_timm.HubError, match="it is a tag"):
        clr_timm.push_to_hub(v2, repo_id, task="pets", revision="v1", token=ALICE)
    with pytest.raises(clr_timm.CLRError, match="two revisions"):
        clr_timm.download_adapter(f"{repo_id}@v1", "pets", revision="v2")


def test_create_pr_leaves_the_branch_as_it_was(hub_server):
    repo_id, x = _new_repo(), _x()
    clr_timm.push_to_hub(_task_model(3, 0), repo_id, task="flowers", token=ALICE)
    head = _head(hub_server, repo_id)
    proposal = _task_model(5, 1)
    info = clr_timm.push_to_hub(proposal, repo_id, task="pets", token=BOB, create_pr=True)  # bob may not write here
    assert info.pr_url and info.pr_revision == "refs/pr/1"
    assert _head(hub_server, repo_id) == head
    assert clr_timm.list_tasks(repo_id) == ["flowers"]
    assert clr_timm.list_tasks(repo_id, revision=info.pr_revision) == ["flowers", "pets"]
    fresh = clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}", task="pets", revision="refs/pr/1")
    assert torch.equal(_out(fresh, x), _out(proposal, x))


# ------------------------------------------------------------------------------------------------------ errors


def test_private_repo_needs_a_token(hub_server):
    repo_id, x = _new_repo(), _x()
    model = _task_model(5, 0)
    clr_timm.push_to_hub(model, repo_id, task="pets", private=True, token=ALICE)
    assert hub_server.get_repo(repo_id).private
    with pytest.raises(clr_timm.errors.HubAuthError, match=f"{repo_id}.*private.*token"):
        clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}", task="pets")
    with pytest.raises(clr_timm.errors.HubAuthError):
        clr_timm.list_tasks(repo_id)
    with pytest.raises(clr_timm.errors.HubRepoNotFoundError, match=repo_id):
        clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}", task="pets", token=BOB)
    fresh = clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}", task="pets", token=ALICE)
    assert torch.equal(_out(fresh, x), _out(model, x))


def test_each_hub_failure_raises_its_own_error_saying_what_to_do(pushed, tmp_path):
    repo_id = pushed.repo_id
    fresh = _fresh()
    with pytest.raises(clr_timm.errors.HubRepoNotFoundError, match=r"alice/no-such-repo.*check the name"):
        clr_timm.load_adapter(fresh, "hf-hub:alice/no-such-repo", task="pets", token=ALICE)
    with pytest.raises(clr_timm.errors.TaskNotFoundError, match=r"no task 'cats'.*\['birds', 'flowers', 'pets'\]"):
        clr_timm.load_adapter(fresh, f"hf-hub:{repo_id}", task="cats")
    with pytest.raises(clr_timm.errors.HubRevisionNotFoundError, match=r"'v9'.*branches: \['main'\]"):
        clr_timm.load_adapter(fresh, f"hf-hub:{repo_id}", task="pets", revision="v9")
    with pytest.raises(clr_timm.errors.HubOfflineError, match=r"not in the local cache.*local_files_only"):
        clr_timm.load_adapter(fresh, f"hf-hub:{repo_id}", task="pets", cache_dir=tmp_path, local_files_only=True)
    assert not clr_timm.is_attached(fresh)  # every failed load leaves the model as it was
    for error in (
        clr_timm.errors.HubRepoNotFoundError,
        clr_timm.errors.TaskNotFoundError,
        clr_timm.errors.HubOfflineError,
    ):
        assert issubclass(error, clr_timm.HubError) and issubclass(error, clr_timm.AdapterError)


def test_pushing_without_write_access_raises_hub_auth_error(hub_server):
    model = _task_model(3, 0)
    with pytest.raises(clr_timm.errors.HubAuthError, match="needs a token"):
        clr_timm.push_to_hub(model, _new_repo(), task="pets", token=False)
    with pytest.raises(clr_timm.errors.HubAuthError, match="create_pr=True"):
        clr_timm.push_to_hub(model, _new_repo("bob"), task="pets", token=ALICE)


def test_pushing_with_the_hub_down_says_so(hub_server):
    model = _task_model(3, 0)
    with hub_server.stopped(), pytest.raises(clr_timm.HubError, match="cannot reach the Hub"):
        clr_timm.push_to_hub(model, _new_repo(), task="pets", token=ALICE)


def test_a_failed_push_leaves_the_remote_unchanged(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_task_model(3, 0), repo_id, task="flowers", token=ALICE)
    before = _head(hub_server, repo_id)
    model = _task_model(5, 1)
    hub_server.fail(r"/commit/main$", status=422, times=None, method="POST")  # e.g. refused by a server-side hook
    try:
        with pytest.raises(clr_timm.HubError, match=repo_id):
            clr_timm.push_to_hub(model, repo_id, task="pets", token=ALICE)
    finally:
        hub_server.clear_faults()
    assert _head(hub_server, repo_id) == before
    clr_timm.push_to_hub(model, repo_id, task="pets", token=ALICE)
    assert clr_timm.list_tasks(repo_id) == ["flowers", "pets"]


def test_a_push_racing_another_commit_fails_instead_of_overwriting_it(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_task_model(3, 0), repo_id, task="flowers", token=ALICE)
    other = {"README.md": b"---\nlicense: mit\n---\nA person's edit, committed while the push was under way.\n"}
    hub_server.on_request(r"/preupload/", lambda: hub_server.commit(repo_id, other), method="POST")
    try:
        with pytest.raises(clr_timm.HubError, match=r"changed while pushing.*push again"):
            clr_timm.push_to_hub(_task_model(5, 1), repo_id, task="pets", token=ALICE)
    finally:
        hub_server.clear_faults()
    assert hub_server.read_file(repo_id, "README.md") == other["README.md"]
    assert clr_timm.list_tasks(repo_id) == ["flowers"]


def test_a_repo_keeps_to_one_backbone(hub_server):
    repo_id = _new_repo()
    clr_timm.push_to_hub(_task_model(3, 0), repo_id, task="flowers", token=ALICE)
    before = _head(hub_server, repo_id)
    with pytest.raises(clr_timm.HubError, match=r"other backbone weights.*another repo"):
        clr_timm.push_to_hub(_task_model(3, 1, backbone_seed=1), repo_id, task="pets", token=ALICE)
    assert _head(hub_server, repo_id) == before


# ------------------------------------------------------------------------------------------------- offline use


def test_a_task_pulled_once_loads_with_no_server(hub_server, pushed, tmp_path, monkeypatch):
    repo_id, expected = pushed.repo_id, pushed.outputs["birds"]
    source = f"hf-hub:{repo_id}"
    clr_timm.load_adapter(_fresh(), source, task="birds", cache_dir=tmp_path)
    with hub_server.stopped():
        for kwargs in ({"local_files_only": True}, {}):  # {}: the client finds the Hub down and uses the cache
            fresh = clr_timm.load_adapter(_fresh(), source, task="birds", cache_dir=tmp_path, **kwargs)
            assert torch.equal(_out(fresh, pushed.x), expected)
    requests = len(hub_server.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fresh = clr_timm.load_adapter(_fresh(), source, task="birds", cache_dir=tmp_path)
    assert torch.equal(_out(fresh, pushed.x), expected)
    with pytest.raises(clr_timm.errors.HubOfflineError, match=r"HF_HUB_OFFLINE.*in the cache: \['birds'\]"):
        clr_timm.load_adapter(_fresh(), source, task="pets", cache_dir=tmp_path)
    with pytest.raises(clr_timm.errors.HubOfflineError, match="HF_HUB_OFFLINE"):
        clr_timm.list_tasks(repo_id)
    assert len(hub_server.requests) == requests  # offline mode sent nothing


# ------------------------------------------------------------------------------------------- folders on disk


def test_save_pretrained_writes_the_hub_layout_and_loads_back(tmp_path):
    x, models = _x(), {"flowers": _task_model(3, 0), "pets": _task_model(5, 1)}
    for task, model in models.items():
        where = clr_timm.save_pretrained(model, tmp_path, task=task, dtype=None)
        assert where == tmp_path / task
        assert sorted(p.name for p in where.iterdir()) == [ADAPTER_FILE, CONFIG_FILE]
    card = ModelCard((tmp_path / "README.md").read_text())
    assert card.data.base_model == BASE and "| `flowers` |" in card.text and "| `pets` |" in card.text
    for task, model in models.items():
        fresh = clr_timm.load_adapter(_fresh(), tmp_path, task=task)
        assert torch.equal(_out(fresh, x), _out(model, x))
    info = clr_timm.describe(tmp_path)
    assert info["kind"] == "folder" and info["tasks"] == ["flowers", "pets"] and not info["root_adapter"]
    one = clr_timm.describe(tmp_path, task="pets")
    assert one["kind"] == "adapter" and one["num_classes"] == 5 and one["num_reprogrammed"] == 17
    assert one["num_tensors"] == len(clr_timm.adapter_state_dict(models["pets"]))
    assert clr_timm.describe(tmp_path / "pets" / ADAPTER_FILE)["task"] == "pets"


def test_describe_means_by_task_what_load_adapter_does(tmp_path):
    clr_timm.save_pretrained(_task_model(5, 1), tmp_path, task="pets")
    file = tmp_path / "pets" / ADAPTER_FILE
    assert clr_timm.describe(tmp_path, task="pets")["path"] == str(file)  # in a folder: the task's subfolder
    assert clr_timm.describe(file, task="pets")["task"] == "pets"  # for a file: the task it must record
    with pytest.raises(clr_timm.AdapterMismatchError, match="records task 'pets', not task 'birds'"):
        clr_timm.describe(file, task="birds")
    with pytest.raises(clr_timm.AdapterError, match=r"no task 'birds'.*\['pets'\]"):
        clr_timm.describe(tmp_path, task="birds")


def test_push_folder_uploads_every_task_in_one_commit(hub_server, tmp_path):
    repo_id = _new_repo()
    for seed, (task, n) in enumerate(TASKS.items()):
        clr_timm.save_pretrained(_task_model(n, seed), tmp_path, task=task)
    clr_timm.push_folder(tmp_path, repo_id, token=ALICE)
    repo = hub_server.get_repo(repo_id)
    assert len(list(repo.history(repo.branches["main"]))) == 2
    assert clr_timm.list_tasks(repo_id) == sorted(TASKS)
    text = hub_server.read_file(repo_id, "README.md").decode()
    assert all(f"| `{task}` |" in text for task in TASKS) and f"hf-hub:{repo_id}" in text
    info = clr_timm.describe(repo_id)
    assert info["kind"] == "repo" and info["tasks"] == sorted(TASKS) and info["commit"] == repo.branches["main"]
    assert {a["task"]: a["num_classes"] for a in info["adapters"]} == TASKS
    one = clr_timm.describe(f"hf-hub:{repo_id}", task="birds")
    assert one["num_classes"] == 7 and one["repo_id"] == repo_id
    assert "birds" in format_description(info) and "resnet18.a1_in1k" in format_description(one)


def test_task_none_uses_the_repo_root(hub_server):
    repo_id, x = _new_repo(), _x()
    model = _task_model(4, 0)
    clr_timm.push_to_hub(_task_model(3, 1), repo_id, task="pets", token=ALICE)
    with pytest.raises(clr_timm.errors.TaskNotFoundError, match=r"no adapter at its root.*\['pets'\]"):
        clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}")
    info = clr_timm.push_to_hub(model, repo_id, token=ALICE)
    assert hub_server.get_repo(repo_id).commits[info.oid].title == "Add CLR adapter for the repo root"
    assert torch.equal(_out(clr_timm.load_adapter(_fresh(), f"hf-hub:{repo_id}"), x), _out(model, x))
    assert clr_timm.list_tasks(repo_id) == ["pets"]
    described = clr_timm.describe(repo_id)
    assert described["root_adapter"] and described["tasks"] == ["pets"]
    assert "| (repo root) | `clr` | 4 |" in hub_server.read_file(repo_id, "README.md").decode()


def test_a_folder_of_bare_adapter_files_gets_its_configs_written_on_push(hub_server, tmp_path):
    repo_id, model = _new_repo(), _task_model(5, 0)
    clr_timm.save_adapter(model, tmp_path / "pets" / ADAPTER_FILE, task="pets")
    clr_timm.push_folder(tmp_path, repo_id, token=ALICE)
    config = json.loads(hub_server.read_file(repo_id, f"pets/{CONFIG_FILE}"))
    assert config["parameters"] == clr_timm.count_parameters(model).to_dict()  # counted on a weightless build
    assert config["num_classes"] == 5


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_push_and_pull_end_to_end(hub_server, tmp_path, capsys):
    repo_id, x = _new_repo(), _x()
    models = {"flowers": _task_model(3, 0), "pets": _task_model(5, 1)}
    for task, model in models.items():
        clr_timm.save_pretrained(model, tmp_path / "mine", task=task)

    assert cli(["push", str(tmp_path / "mine"), repo_id, "--token", ALICE, "-m", "two tasks"]) == 0
    assert f"{repo_id}/commit/" in capsys.readouterr().out
    assert clr_timm.list_tasks(repo_id) == ["flowers", "pets"]

    assert cli(["pull", repo_id, "--task", "pets", "--out", str(tmp_path / "pulled")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "pulled" / "pets" / ADAPTER_FILE and (path.parent / CONFIG_FILE).is_file()
    fresh = clr_timm.load_adapter(_fresh(), tmp_path / "pulled", task="pets")
    assert torch.equal(_out(fresh, x), _out(models["pets"], x))

    assert cli(["pull", f"{repo_id}@main", "--task", "flowers"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()

    assert cli(["pull", repo_id, "--task", "cats"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "['flowers', 'pets']" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""

    assert cli(["info", repo_id]) == 0
    out = capsys.readouterr().out
    assert "tasks: flowers, pets" in out and "resnet18.a1_in1k" in out
