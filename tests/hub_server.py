"""A small in-memory Hugging Face Hub-compatible HTTP server for tests.

The real ``huggingface_hub`` client talks to it over HTTP on 127.0.0.1 (point ``HF_ENDPOINT`` at :attr:`HubServer.url`
before ``huggingface_hub`` is imported), so tests exercise the client exactly as it runs against the Hub, without
monkeypatching it and without network access. It implements the subset of the Hub protocol that huggingface_hub
2.4.0 uses (read from its source, checked by ``tests/test_hub_server.py``): repo creation and deletion, model/dataset
info, tree listing, paths-info, refs, commit listing, branches, tags, preupload (always ``"regular"``), NDJSON
commits (additions, deletions, pull requests on ``refs/pr/N``), file download with ``Range``, ``whoami-v2`` and
``validate-yaml``, with the same error headers (``X-Error-Code``) and status codes as the Hub.

State lives on the :class:`HubServer` object, not on the socket, so a server can be stopped (to test offline use of
the local cache) and restarted on the same port with its repositories intact. Faults (5xx answers, delays, dropped
connections, callbacks such as deleting a file between a listing and a download) are injected with
:meth:`HubServer.add_fault` and its shortcuts.

Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Commit", "Fault", "HubServer", "RecordedRequest", "Repo", "git_blob_oid", "reserve_port"]

DEFAULT_BRANCH = "main"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
"""URL segment under ``/api/`` -> repo type."""
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
"""Repo type -> prefix of the repo's web and ``resolve`` URLs."""
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
"""Content of the ``.gitattributes`` file that the Hub puts in the initial commit of every new repo."""
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"
"""The Hub's ``X-Error-Message`` for an unknown token; the client maps it to a plain ``HfHubHTTPError``."""
_COMMIT_OID = re.compile(r"[0-9a-f]{40}")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def reserve_port(host: str = "127.0.0.1") -> int:
    """Return a currently free TCP port on ``host``.

    The client reads ``HF_ENDPOINT`` when ``huggingface_hub`` is imported, so a test suite picks the port with this
    function first, exports ``HF_ENDPOINT``, and later starts ``HubServer(port=...)`` on it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def git_blob_oid(data: bytes) -> str:
    """Git blob SHA-1 of ``data``: the ``oid`` and ``ETag`` the Hub reports for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def format_date(moment: datetime) -> str:
    """Format a date as the Hub does (``%Y-%m-%dT%H:%M:%S.%fZ`` with milliseconds); the client parses only this."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repo's files (path -> content) plus its metadata."""

    oid: str
    parent: str | None
    files: Mapping[str, bytes]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Repo:
    """A repository: its commits, the refs pointing at them, and who may see it."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    """Pull request number -> head commit of ``refs/pr/N``."""
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        """The user or organization owning the repo."""
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> str | None:
        """Commit id of a branch, tag, ``refs/heads/*``, ``refs/tags/*``, ``refs/pr/N`` or full commit id."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/"):
            return self.branches.get(revision.removeprefix("refs/heads/"))
        if revision.startswith("refs/tags/"):
            return self.tags.get(revision.removeprefix("refs/tags/"))
        if match := _PR_REF.fullmatch(revision):
            return self.pull_requests.get(int(match[1]))
        if _COMMIT_OID.fullmatch(revision) and revision in self.commits:
            return revision
        return None

    def history(self, oid: str) -> Iterator[Commit]:
        """Commits reachable from ``oid``, newest first."""
        current: str | None = oid
        while current is not None:
            commit = self.commits[current]
            yield commit
            current = commit.parent


@dataclass
class Fault:
    """A rule that intercepts requests whose method and unquoted path match, to simulate an unreliable Hub.

    Every matching rule that is not exhausted applies, in list order: it sleeps ``delay`` seconds, runs ``action``
    (e.g. delete a file on the server), then, when ``status`` is set, answers that status instead of handling the
    request, or, when ``drop`` is set, closes the connection without answering; ``body`` rewrites the body of the
    answer the server gives (its ``Content-Length`` follows: a file served shorter or longer than its metadata said).
    ``hits`` counts the requests it intercepted; after ``times`` hits (``None``: never) it stops applying. The request
    body is always read first.
    """

    pattern: str
    """Regular expression searched in the unquoted request path (query string excluded)."""
    method: str | None = None
    """HTTP method to match (``"GET"``, ``"HEAD"``, ...); ``None`` matches any."""
    times: int | None = 1
    status: int | None = None
    delay: float = 0.0
    drop: bool = False
    action: Callable[[], object] | None = None
    hits: int = 0
    body: Callable[[bytes], bytes] | None = None

    @property
    def exhausted(self) -> bool:
        """Whether the rule has intercepted as many requests as it was allowed to."""
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to a request."""
        return (
            not self.exhausted
            and (self.method is None or self.method.upper() == method)
            and re.search(self.pattern, path) is not None
        )


@dataclass(frozen=True)
class RecordedRequest:
    """A request the server answered (or dropped, with status 0), kept in :attr:`HubServer.requests`."""

    method: str
    path: str
    query: str
    status: int
    user: str | None


@dataclass
class _Request:
    """A parsed incoming request."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    user: str | None
    base_url: str

    def param(self, name: str) -> str | None:
        """Last value of a query parameter, if present."""
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        """Whether a boolean query parameter is set (``1`` or ``true``)."""
        return (self.param(name) or "").lower() in ("1", "true")

    def json(self) -> dict[str, Any]:
        """The body parsed as a JSON object (empty if there is no body)."""
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as error:
            raise _HubError(400, f"Invalid JSON body: {error}") from error
        if not isinstance(data, dict):
            raise _HubError(400, "Expected a JSON object")
        return data


@dataclass
class _Response:
    """An answer to send: status, extra headers and body."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class _HubError(Exception):
    """An error answer, with the Hub's ``X-Error-Code`` when the client needs one to pick its exception class."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def to_response(self) -> _Response:
        """Render as a JSON error answer with ``X-Error-Code``/``X-Error-Message`` headers."""
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Response(self.status, json.dumps({"error": self.message}).encode(), headers)


def _json_response(data: object, status: int = 200) -> _Response:
    return _Response(status, json.dumps(data).encode())


class HubServer:
    """In-memory Hub-compatible HTTP server, run in a daemon thread.

    Args:
        tokens: access token -> username. Requests carry ``Authorization: Bearer <token>``; an unknown token is
            answered 401, as on the Hub. Writes need a token whose user owns the namespace.
        orgs: organization name -> member usernames; members may write to (and read private repos of) the org.
        host: interface to listen on.
        port: TCP port; 0 lets the OS choose one at the first :meth:`start` (later restarts reuse it).
        verbose: log requests to stderr (``http.server`` format); silent by default.

    Use it as a context manager, or call :meth:`start` / :meth:`stop`. Repositories survive a stop and restart.
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        orgs: Mapping[str, Iterable[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
    ) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.orgs: dict[str, set[str]] = {org: set(members) for org, members in (orgs or {}).items()}
        self.host = host
        self.port = port
        self.verbose = verbose
        self.repos: dict[tuple[str, str], Repo] = {}
        """(repo type, repo id) -> repo."""
        self.faults: list[Fault] = []
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []
        """Tracebacks of unexpected exceptions raised while handling requests (answered 500)."""
        self._lock = threading.RLock()
        self._oid_counter = itertools.count()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the server (what ``HF_ENDPOINT`` must be); known before start when a port was given."""
        if self.port == 0:
            raise RuntimeError("The port is chosen at start(): start the server or construct it with a port")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    def start(self) -> HubServer:
        """Bind the port and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            return self
        httpd = _HTTPServer((self.host, self.port), self)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release the port and close kept-alive connections, so clients see a Hub that is down."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the server for the duration of a ``with`` block, then restart it on the same port."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ fault injection

    def add_fault(
        self,
        pattern: str,
        *,
        method: str | None = None,
        times: int | None = 1,
        status: int | None = None,
        delay: float = 0.0,
        drop: bool = False,
        action: Callable[[], object] | None = None,
        body: Callable[[bytes], bytes] | None = None,
    ) -> Fault:
        """Append a :class:`Fault` rule to :attr:`faults` and return it (its ``hits`` count can be checked later)."""
        fault = Fault(pattern, method, times, status, delay, drop, action, body=body)
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(self, pattern: str, status: int = 500, *, times: int | None = 1, method: str | None = None) -> Fault:
        """Answer ``status`` (default 500) to the next ``times`` requests matching ``pattern``."""
        return self.add_fault(pattern, method=method, times=times, status=status)

    def delay(self, pattern: str, seconds: float, *, times: int | None = 1, method: str | None = None) -> Fault:
        """Sleep ``seconds`` before handling the next ``times`` requests matching ``pattern``."""
        return self.add_fault(pattern, method=method, times=times, delay=seconds)

    def drop(self, pattern: str, *, times: int | None = 1, method: str | None = None) -> Fault:
        """Close the connection without answering the next ``times`` requests matching ``pattern``."""
        return self.add_fault(pattern, method=method, times=times, drop=True)

    def on_request(
        self, pattern: str, action: Callable[[], object], *, times: int | None = 1, method: str | None = None
    ) -> Fault:
        """Run ``action`` just before handling the next ``times`` requests matching ``pattern``."""
        return self.add_fault(pattern, method=method, times=times, action=action)

    def rewrite(
        self, pattern: str, body: Callable[[bytes], bytes], *, times: int | None = 1, method: str | None = None
    ) -> Fault:
        """Serve ``body(content)`` instead of the content to the next ``times`` requests matching ``pattern``."""
        return self.add_fault(pattern, method=method, times=times, body=body)

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        with self._lock:
            self.faults.clear()

    # ------------------------------------------------------------------ direct state access (no HTTP)

    def token_for(self, user: str) -> str:
        """A token of ``user`` from the ``tokens`` mapping."""
        for token, owner in self.tokens.items():
            if owner == user:
                return token
        raise KeyError(f"No token for user {user!r}")

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a ``.gitattributes`` file) on ``main``."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise ValueError(f"Repo {repo_type}/{repo_id} already exists")
            repo = Repo(repo_type, repo_id, private, datetime.now(timezone.utc))
            oid = self._add_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit", "", repo.namespace)
            repo.branches[DEFAULT_BRANCH] = oid
            self.repos[key] = repo
            return repo

    def get_repo(self, repo_id: str, *, repo_type: str = "model") -> Repo:
        """The repo, or ``KeyError``."""
        return self.repos[(repo_type, repo_id)]

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        deletions: Iterable[str] = (),
        *,
        branch: str = DEFAULT_BRANCH,
        message: str = "Server-side commit",
        author: str = "server",
        repo_type: str = "model",
    ) -> str:
        """Commit files (path -> content) and deletions on a branch, bypassing HTTP; returns the commit id."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type=repo_type)
            parent = repo.branches[branch]
            snapshot = dict(repo.commits[parent].files)
            for path in deletions:
                del snapshot[path]
            snapshot.update(files or {})
            oid = self._add_commit(repo, parent, snapshot, message, "", author)
            repo.branches[branch] = oid
            return oid

    def delete_file(self, repo_id: str, path: str, *, branch: str = DEFAULT_BRANCH, repo_type: str = "model") -> str:
        """Delete one file in a new commit on ``branch`` (e.g. from a fault's ``action``); returns the commit id."""
        return self.commit(repo_id, deletions=[path], branch=branch, message=f"Delete {path}", repo_type=repo_type)

    def read_file(self, repo_id: str, path: str, *, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        """Content of a file at a revision, or ``KeyError``."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type=repo_type)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"Unknown revision {revision!r}")
            return repo.commits[oid].files[path]

    # ------------------------------------------------------------------ request handling

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> _Response | None:
        """Apply faults, route and answer one request; ``None`` means: drop the connection without answering."""
        split = urlsplit(raw_path)
        path = unquote(split.path)
        user: str | None = None
        response: _Response | None = None
        dropped = False
        rewrites: list[Callable[[bytes], bytes]] = []
        try:
            dropped, response, rewrites = self._apply_faults(method, path)
            if not dropped and response is None:
                user, response = self._route(method, split.path, split.query, headers, body)
            for rewrite in rewrites:
                response.body = rewrite(response.body)
        except _HubError as error:
            response = error.to_response()
        except Exception:  # any bug must reach the client as a 500, and the test through `errors`
            self.errors.append(traceback.format_exc())
            response = _HubError(500, "Internal server error").to_response()
        if dropped:
            response = None
        with self._lock:
            self.requests.append(RecordedRequest(method, path, split.query, response.status if response else 0, user))
        return response

    def _apply_faults(self, method: str, path: str) -> tuple[bool, _Response | None, list[Callable[[bytes], bytes]]]:
        """Run the matching fault rules; returns (drop the connection, injected answer, rewrites of the answer)."""
        with self._lock:
            matching = [fault for fault in self.faults if fault.matches(method, path)]
            for fault in matching:
                fault.hits += 1
        for fault in matching:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.action is not None:
                fault.action()
            if fault.drop:
                return True, None, []
            if fault.status is not None:
                return False, _HubError(fault.status, f"Injected fault: HTTP {fault.status}").to_response(), []
        return False, None, [fault.body for fault in matching if fault.body is not None]

    def _authenticate(self, headers: Message) -> str | None:
        authorization = headers.get("Authorization") or ""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise _HubError(401, INVALID_TOKEN_MESSAGE)
        return user

    def _route(
        self, method: str, raw_path: str, query: str, headers: Message, body: bytes
    ) -> tuple[str | None, _Response]:
        user = self._authenticate(headers)
        request = _Request(
            method=method,
            segments=[unquote(part) for part in raw_path.split("/")[1:]],
            query=parse_qs(query, keep_blank_values=True),
            headers=headers,
            body=body,
            user=user,
            base_url=f"http://{headers.get('Host') or f'{self.host}:{self.port}'}",
        )
        segments = request.segments
        with self._lock:
            if segments[:1] == ["api"]:
                return user, self._route_api(request, segments[1:])
            return user, self._route_web(request, segments)

    def _route_api(self, request: _Request, segments: list[str]) -> _Response:
        method = request.method
        if segments == ["whoami-v2"] and method == "GET":
            return self._whoami(request)
        if segments == ["repos", "create"] and method == "POST":
            return self._create_repo(request)
        if segments == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(request)
        if segments == ["validate-yaml"] and method == "POST":
            return _json_response({"errors": [], "warnings": []})
        if len(segments) >= 3 and segments[0] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[segments[0]], f"{segments[1]}/{segments[2]}", segments[3:]
            action, args = (rest[0], _join_revision(rest[1:])) if rest else ("", ("", []))
            revision, tail = args
            routes: dict[tuple[str, str], Callable[[], _Response]] = {
                ("", "GET"): lambda: self._repo_info(request, repo_type, repo_id, None),
                ("revision", "GET"): lambda: self._repo_info(request, repo_type, repo_id, revision),
                ("tree", "GET"): lambda: self._tree(request, repo_type, repo_id, revision, "/".join(tail)),
                ("paths-info", "POST"): lambda: self._paths_info(request, repo_type, repo_id, revision),
                ("refs", "GET"): lambda: self._refs(request, repo_type, repo_id),
                ("commits", "GET"): lambda: self._commits(request, repo_type, repo_id, revision or DEFAULT_BRANCH),
                ("branch", "POST"): lambda: self._create_branch(request, repo_type, repo_id, revision),
                ("branch", "DELETE"): lambda: self._delete_branch(request, repo_type, repo_id, revision),
                ("tag", "POST"): lambda: self._create_tag(request, repo_type, repo_id, revision),
                ("tag", "DELETE"): lambda: self._delete_tag(request, repo_type, repo_id, revision),
                ("preupload", "POST"): lambda: self._preupload(request, repo_type, repo_id, revision),
                ("commit", "POST"): lambda: self._commit(request, repo_type, repo_id, revision),
                ("settings", "PUT"): lambda: self._settings(request, repo_type, repo_id),
            }
            if (action, method) in routes:
                return routes[(action, method)]()
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _route_web(self, request: _Request, segments: list[str]) -> _Response:
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
        if len(segments) >= 5 and segments[2] == "resolve" and request.method in ("GET", "HEAD"):
            revision, path = _join_revision(segments[3:])
            return self._resolve(request, repo_type, f"{segments[0]}/{segments[1]}", revision, "/".join(path))
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    # ------------------------------------------------------------------ permissions

    def _owns(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def _readable(self, request: _Request, repo_type: str, repo_id: str) -> Repo:
        """The repo if the requester may read it; otherwise the Hub's answer (401 anonymous, 404 authenticated)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._owns(request.user, repo.namespace)):
            status = 401 if request.user is None else 404
            raise _HubError(status, f"Repository not found: {repo_type}s/{repo_id}", "RepoNotFound")
        return repo

    def _writable(self, request: _Request, repo_type: str, repo_id: str) -> Repo:
        """The repo if the requester may write to it; 401 anonymous, 403 another user's (visible) repo."""
        repo = self._readable(request, repo_type, repo_id)
        if request.user is None:
            raise _HubError(401, "You must be authenticated to write to this repository")
        if not self._owns(request.user, repo.namespace):
            raise _HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        return repo

    def _resolved(self, repo: Repo, revision: str) -> Commit:
        oid = repo.resolve(revision)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # ------------------------------------------------------------------ endpoints

    def _whoami(self, request: _Request) -> _Response:
        if request.user is None:
            raise _HubError(401, INVALID_TOKEN_MESSAGE)
        orgs = [
            {"type": "org", "name": org, "fullname": org}
            for org, members in self.orgs.items()
            if request.user in members
        ]
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(request.user.encode()).hexdigest()[:24],
                "name": request.user,
                "fullname": request.user,
                "email": f"{request.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _repo_url(self, request: _Request, repo: Repo) -> str:
        return f"{request.base_url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _create_repo(self, request: _Request) -> _Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        name = payload.get("name")
        if not name or "/" in name:
            raise _HubError(400, "Invalid repo name")
        if request.user is None:
            raise _HubError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or request.user
        if not self._owns(request.user, namespace):
            raise _HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        repo_id = f"{namespace}/{name}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._repo_url(request, existing)
            message = f"You already created this {repo_type} repo"
            return _Response(409, json.dumps({"error": message, "url": url}).encode(), {"X-Error-Message": message})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.create_repo(repo_id, repo_type=repo_type, private=private)
        return _json_response({"url": self._repo_url(request, repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request) -> _Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or request.user or ""
        repo = self._writable(request, repo_type, f"{namespace}/{payload.get('name')}")
        del self.repos[(repo.repo_type, repo.repo_id)]
        return _json_response({})

    def _settings(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        payload = request.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return _json_response({})

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        commit = self._resolved(repo, revision or DEFAULT_BRANCH)
        with_blobs = request.flag("blobs")
        siblings = []
        for path, content in sorted(commit.files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(content), blobId=git_blob_oid(content))
            siblings.append(sibling)
        info: dict[str, object] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": format_date(commit.date),
            "createdAt": format_date(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(content) for content in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json_response(info)

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, object]:
        """Tree / paths-info entry of a file or directory present in ``commit``."""
        if path in commit.files:
            content = commit.files[path]
            entry: dict[str, object] = {
                "type": "file",
                "oid": git_blob_oid(content),
                "size": len(content),
                "path": path,
            }
        else:
            entry = {"type": "directory", "oid": _tree_oid(commit.files, path), "size": 0, "path": path}
        if expand:
            last = _last_commit_touching(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": format_date(last.date)}
        return entry

    def _tree(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        commit = self._resolved(repo, revision or DEFAULT_BRANCH)
        path = path.strip("/")
        directories = _directories(commit.files)
        if path and path not in directories:
            raise _HubError(404, f"Directory not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        prefix = f"{path}/" if path else ""
        recursive = request.flag("recursive")
        entries = [
            candidate
            for candidate in sorted(directories | set(commit.files))
            if candidate and candidate.startswith(prefix) and (recursive or "/" not in candidate[len(prefix) :])
        ]
        return _json_response([self._entry(repo, commit, entry, request.flag("expand")) for entry in entries])

    def _paths_info(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        commit = self._resolved(repo, revision or DEFAULT_BRANCH)
        if (request.headers.get("Content-Type") or "").startswith("application/json"):
            payload = request.json()
            paths, expand = payload.get("paths") or [], str(payload.get("expand", "")).lower() in ("1", "true")
        else:
            form = parse_qs(request.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand") or [""])[-1].lower() in ("1", "true")
        directories = _directories(commit.files)
        present = [
            path.strip("/") for path in paths if path.strip("/") in commit.files or path.strip("/") in directories
        ]
        return _json_response([self._entry(repo, commit, path, expand) for path in present])

    def _refs(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        branches = sorted(repo.branches.items(), key=lambda item: (item[0] != DEFAULT_BRANCH, item[0]))
        refs: dict[str, object] = {
            "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in branches],
            "converts": [],
            "tags": [
                {"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.tags.items())
            ],
        }
        if request.flag("include_prs"):
            refs["pullRequests"] = [
                {"name": f"refs/pr/{number}", "ref": f"refs/pr/{number}", "targetCommit": oid}
                for number, oid in sorted(repo.pull_requests.items())
            ]
        return _json_response(refs)

    def _commits(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        head = self._resolved(repo, revision)
        return _json_response(
            [
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": format_date(commit.date),
                }
                for commit in repo.history(head.oid)
            ]
        )

    def _create_branch(self, request: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        if not branch or branch.startswith("refs/"):
            raise _HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._resolved(repo, request.json().get("startingPoint") or DEFAULT_BRANCH).oid
        return _json_response({})

    def _delete_branch(self, request: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        if branch == DEFAULT_BRANCH:
            raise _HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(branch, None) is None:
            raise _HubError(404, f"Branch not found: {branch}", "RevisionNotFound")
        return _json_response({})

    def _create_tag(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        tag = request.json().get("tag")
        if not tag:
            raise _HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HubError(409, f"Tag already exists: {tag}")
        repo.tags[tag] = self._resolved(repo, revision or DEFAULT_BRANCH).oid
        return _json_response({})

    def _delete_tag(self, request: _Request, repo_type: str, repo_id: str, tag: str) -> _Response:
        repo = self._writable(request, repo_type, repo_id)
        if repo.tags.pop(tag, None) is None:
            raise _HubError(404, f"Tag not found: {tag}", "RevisionNotFound")
        return _json_response({})

    def _committable(self, request: _Request, repo_type: str, repo_id: str, create_pr: bool) -> Repo:
        """Repo for preupload/commit: pull requests need read access and a token, direct commits write access."""
        if not create_pr:
            return self._writable(request, repo_type, repo_id)
        repo = self._readable(request, repo_type, repo_id)
        if request.user is None:
            raise _HubError(401, "You must be authenticated to open a pull request")
        return repo

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._committable(request, repo_type, repo_id, request.flag("create_pr"))
        commit = self._resolved(repo, revision or DEFAULT_BRANCH)
        files = []
        for item in request.json().get("files") or []:
            path = item.get("path")
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return _json_response({"files": files, "commitOid": commit.oid})

    def _commit(self, request: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        create_pr = request.flag("create_pr")
        repo = self._committable(request, repo_type, repo_id, create_pr)
        revision = revision or DEFAULT_BRANCH
        header, operations = _parse_ndjson(request.body)
        base = self._resolved(repo, revision)
        pr_number: int | None = None
        if create_pr:
            pr_number = repo.next_discussion
        elif revision.removeprefix("refs/heads/") in repo.branches:
            revision = revision.removeprefix("refs/heads/")
        elif not _PR_REF.fullmatch(revision):
            raise _HubError(400, f"Invalid rev id: {revision} is not a branch")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != base.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        snapshot = _apply_operations(dict(base.files), operations, self._blobs_by_sha256(), base.oid)
        oid = self._add_commit(
            repo,
            base.oid,
            snapshot,
            header.get("summary") or "Commit",
            header.get("description") or "",
            request.user or "",
        )
        pr_url = None
        if pr_number is not None:
            repo.next_discussion += 1
            repo.pull_requests[pr_number] = oid
            pr_url = f"{self._repo_url(request, repo)}/discussions/{pr_number}"
        elif match := _PR_REF.fullmatch(revision):
            repo.pull_requests[int(match[1])] = oid
        else:
            repo.branches[revision] = oid
        return _json_response(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self._repo_url(request, repo)}/commit/{oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    def _resolve(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable(request, repo_type, repo_id)
        commit = self._resolved(repo, revision)
        content = commit.files.get(path)
        if content is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        range_header = request.headers.get("Range")
        if not range_header:
            return _Response(200, content, headers, "application/octet-stream")
        byte_range = _parse_range(range_header, len(content))
        if byte_range is None:
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"}, "text/plain")
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Response(206, content[start : end + 1], headers, "application/octet-stream")

    # ------------------------------------------------------------------ helpers

    def _add_commit(
        self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> str:
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n{next(self._oid_counter)}".encode()
        oid = hashlib.sha1(seed).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, title, message, author, datetime.now(timezone.utc))
        return oid

    def _blobs_by_sha256(self) -> dict[str, bytes]:
        """Every stored file content by SHA-256, to accept ``lfsFile`` operations that point at a known content."""
        return {
            hashlib.sha256(content).hexdigest(): content
            for repo in self.repos.values()
            for commit in repo.commits.values()
            for content in commit.files.values()
        }


def _join_revision(segments: list[str]) -> tuple[str, list[str]]:
    """Split path segments into (revision, rest), keeping an unencoded ``refs/pr/N`` together."""
    if len(segments) >= 3 and segments[0] == "refs" and segments[1] == "pr":
        return "/".join(segments[:3]), segments[3:]
    if not segments:
        return "", []
    return segments[0], segments[1:]


def _directories(files: Iterable[str]) -> set[str]:
    """Every directory (ancestor path) of the given file paths."""
    return {"/".join(parts[:depth]) for parts in (path.split("/") for path in files) for depth in range(1, len(parts))}


def _tree_oid(files: Mapping[str, bytes], directory: str) -> str:
    """A stable id of a directory's content (not git's tree hash, which no client checks)."""
    listing = "".join(
        f"{path}\0{git_blob_oid(content)}\n"
        for path, content in sorted(files.items())
        if path.startswith(f"{directory}/")
    )
    return hashlib.sha1(f"tree {directory}\n{listing}".encode()).hexdigest()


def _path_state(files: Mapping[str, bytes], path: str) -> object:
    """What a file or directory holds in a snapshot, to find the commit that last changed it."""
    if path in files:
        return files[path]
    return tuple(sorted((name, content) for name, content in files.items() if name.startswith(f"{path}/")))


def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
    """Newest ancestor of ``commit`` (itself included) that changed ``path``."""
    state = _path_state(commit.files, path)
    last = commit
    for ancestor in itertools.islice(repo.history(commit.oid), 1, None):
        if _path_state(ancestor.files, path) != state:
            break
        last = ancestor
    return last


def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split a commit payload into its header value and its operations (``{"key": ..., "value": ...}`` lines)."""
    header: dict[str, Any] = {}
    operations: list[dict[str, Any]] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise _HubError(400, f"Invalid NDJSON line: {error}") from error
        if item.get("key") == "header":
            header = item.get("value") or {}
        else:
            operations.append(item)
    return header, operations


def _apply_operations(
    files: dict[str, bytes], operations: list[dict[str, Any]], blobs: Mapping[str, bytes], base_oid: str
) -> dict[str, bytes]:
    """Apply commit operations to a snapshot, failing like the Hub on deletions of missing paths."""
    for operation in operations:
        key, value = operation.get("key"), operation.get("value") or {}
        path = str(value.get("path", "")).strip("/")
        if not path or path.startswith("../") or "/../" in f"/{path}/":
            raise _HubError(400, f"Invalid path: {value.get('path')!r}")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise _HubError(400, f"Unsupported encoding: {value.get('encoding')}")
            try:
                files[path] = base64.b64decode(value.get("content", ""), validate=True)
            except ValueError as error:
                raise _HubError(400, f"Invalid base64 content for {path}") from error
        elif key == "lfsFile":
            content = blobs.get(str(value.get("oid")))
            if content is None:
                raise _HubError(400, f"LFS object not found for {path}: this server only stores regular files")
            files[path] = content
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                message = f"A file with this name doesn't exist: {path}"
                raise _HubError(404, message, "EntryNotFound", {"X-Repo-Commit": base_oid})
        elif key == "deletedFolder":
            inside = [name for name in files if name.startswith(f"{path}/")]
            if not inside:
                message = f"A folder with this name doesn't exist: {path}"
                raise _HubError(404, message, "EntryNotFound", {"X-Repo-Commit": base_oid})
            for name in inside:
                del files[name]
        else:
            raise _HubError(400, f"Unknown commit operation: {key}")
    return files


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of a single ``bytes=`` range, or ``None`` when it cannot be satisfied."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        return (max(size - suffix, 0), size - 1) if suffix > 0 and size > 0 else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start <= end else None


class _HTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that knows its :class:`HubServer` and can close its kept-alive connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection, which ends their handler threads."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Keep stderr quiet: a client hanging up is normal, anything else is recorded in ``hub.errors``."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.hub.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    """Reads each request fully (kept-alive connections stay in step) and sends the hub's answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid a 40 ms delayed-ACK stall on each
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        body = self._read_body()
        response = self.server.hub.handle(self.command, self.path, self.headers, body)
        if response is None:
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _serve
