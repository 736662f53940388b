"""Shared pytest configuration and fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from .hub_server import HubServer, reserve_port

# ---------------------------------------------------------------------------------------------------------------------
# Local Hugging Face Hub server (tests/hub_server.py).
#
# huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE & co. when it is first imported (timm imports it too), so
# this block runs at conftest import time, before any test module is collected: it reserves the server's port, points
# the client at it, gives it a throw-away HF_HOME (cache and token file), and removes any credential or offline
# setting inherited from the environment. The `hub_server` fixture then starts the server on that port.
# ---------------------------------------------------------------------------------------------------------------------
if "huggingface_hub" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT and HF_HOME")

HUB_HOST = "127.0.0.1"
HUB_PORT = reserve_port(HUB_HOST)
HUB_TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
"""Access token -> user known to the local Hub; `hub_server.token_for("alice")` gives alice's token."""
HUB_ORGS = {"clr-org": ["alice"]}
"""Organization -> members: alice may write to `clr-org/*`, bob may not."""

_HF_HOME = tempfile.mkdtemp(prefix="clr_timm-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
for _variable in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_CO_STAGING",
):
    os.environ.pop(_variable, None)
os.environ.update(
    HF_ENDPOINT=f"http://{HUB_HOST}:{HUB_PORT}",
    HF_HOME=_HF_HOME,
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)
for _variable in ("NO_PROXY", "no_proxy"):  # never send loopback traffic through a proxy from the environment
    os.environ[_variable] = ",".join(filter(None, [os.environ.get(_variable), HUB_HOST, "localhost"]))


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The local Hub, running on HF_ENDPOINT for the whole session; its repos persist across tests.

    Tests that add faults must remove them (`hub_server.clear_faults()`); tests that stop it (`hub_server.stopped()`)
    get it restarted on the same port with the same repos.
    """
    with HubServer(tokens=HUB_TOKENS, orgs=HUB_ORGS, host=HUB_HOST, port=HUB_PORT) as server:
        yield server


@pytest.fixture
def hub_repo_id(hub_server: HubServer) -> str:
    """A fresh, not yet created repo id in alice's namespace, unique to the test."""
    return f"alice/test-{uuid.uuid4().hex[:12]}"
