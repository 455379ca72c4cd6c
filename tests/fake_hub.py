"""Registry test helpers: a local stand-in for the Hugging Face Hub, and tiny model folders.

The fake Hub lets tests run the real ``huggingface_hub`` without a network.

It serves the endpoints ``snapshot_download`` uses, with the Hub's headers:

* ``GET /api/models/<repo>/revision/<rev>``: model info (``sha``, ``siblings``).
* ``GET /api/models/<repo>/tree/<rev>?recursive=...``: file list with git blob ids and LFS sha256.
* ``HEAD|GET /<repo>/resolve/<rev>/<file>``: small files inline (``ETag`` = git blob id,
  ``X-Repo-Commit``, ``Content-Length``); LFS files answer ``302`` to a "CDN" URL on another host
  name (``localhost`` instead of ``127.0.0.1``) with ``X-Linked-Etag`` / ``X-Linked-Size``, as the Hub does.
* ``HEAD|GET /cdn/<sha256>``: blob bytes with ``Range`` support (``206`` + ``Content-Range``).

Faults to inject, per file path: ``drop_once`` (close the connection half-way through the first
full GET), ``corrupt`` (serve other bytes of the same size than the advertised checksums),
``fail`` (HTTP 500 on GET). ``requests`` logs ``(method, path, range)`` of every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob (what the Hub reports as ``oid`` / ``ETag`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


@dataclass
class FakeRepo:
    """A model repository: named refs pointing at commits, each commit a mapping path -> bytes."""

    repo_id: str
    refs: dict[str, str]
    commits: dict[str, dict[str, bytes]]

    def commit_for(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        # Another host name for the same server: huggingface_hub does not follow redirects off the Hub.
        return f"http://localhost:{self.port}"

    def add_repo(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for data in files.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return data
        return None

    def gets(self, path_suffix: str) -> list[tuple[str, str, str | None]]:
        """Logged GETs whose path ends with ``path_suffix``."""
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(path_suffix)]

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client pools connections
    state: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: object, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _lookup(self, repo_id: str, rev: str) -> tuple[FakeRepo, str] | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        commit = repo.commit_for(unquote(rev))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    # -- verbs -----------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append((self.command, unquote(path), self.headers.get("Range")))
        if m := _API.match(path):
            found = self._lookup(unquote(m["repo"]), m["rev"])
            if found:
                repo, commit = found
                if m["kind"] == "revision":
                    self._model_info(repo, commit)
                else:
                    self._tree(repo, commit)
        elif m := _RESOLVE.match(path):
            found = self._lookup(unquote(m["repo"]), m["rev"])
            if found:
                self._resolve(found[0], found[1], unquote(m["file"]))
        elif m := _CDN.match(path):
            data = self.state.blob(m["sha"])
            if data is None:
                self._send(404)
            else:
                self._content(unquote(m["file"]), data, {"ETag": f'"{m["sha"]}"'})
        else:
            self._send(404)

    def _model_info(self, repo: FakeRepo, commit: str) -> None:
        files = repo.commits[commit]
        self._json(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "transformers",
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
        )

    def _tree(self, repo: FakeRepo, commit: str) -> None:
        entries = []
        for name, data in sorted(repo.commits[commit].items()):
            entry: dict[str, object] = {"type": "file", "path": name, "size": len(data)}
            if name.endswith(LFS_SUFFIXES):
                pointer = lfs_pointer(data)
                entry["oid"] = git_blob_id(pointer)
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": len(pointer),
                }
            else:
                entry["oid"] = git_blob_id(data)
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo: FakeRepo, commit: str, name: str) -> None:
        data = repo.commits[commit].get(name)
        if data is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", commit=commit)
            return
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            self._send(
                302,
                headers={
                    "Location": f"{self.state.cdn_url}/cdn/{sha}/{name}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                },
            )
            return
        self._content(name, data, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": commit})

    def _content(self, name: str, data: bytes, headers: dict[str, str]) -> None:
        state = self.state
        if self.command == "GET" and name in state.fail:
            self._send(500, b"internal error", {"X-Error-Message": "injected failure"})
            return
        if self.command == "GET" and name in state.corrupt:
            data = bytes(b ^ 0xFF for b in data)  # same size, different checksum
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        range_header = self.headers.get("Range")
        if range_header and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())):
            start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers)
            return
        if self.command == "GET" and name in state.drop_once:
            state.drop_once.discard(name)
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            # The connection drops mid-file: the client sees a short body and must resume with Range.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(200, data, headers)


def tiny_model_files(seed: int = 0, weights_size: int = 300_000) -> dict[str, bytes]:
    """A tiny, fake Llama-style model repository (content differs with ``seed``)."""
    weights = hashlib.sha256(str(seed).encode()).digest() * (weights_size // 32 + 1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8 + seed}
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps(
            {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}
        ).encode(),
        "README.md": f"# tiny model {seed}\n".encode(),
        "model.safetensors": weights[:weights_size],
    }


TINY_MAIN = "a" * 40
TINY_V1 = "b" * 40


def point_hf_at(monkeypatch, url: str) -> None:  # noqa: ANN001
    """Make ``url`` the Hub, as if ``HF_ENDPOINT`` had been set before huggingface_hub was imported.

    The registry reads ``HF_ENDPOINT`` at call time; huggingface_hub's constants were fixed at
    import, so they are patched consistently (``ENDPOINT`` and the ``resolve`` URL template built
    from it), else its best-effort telemetry lookup would still try the real Hub.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def start_tiny_hub(monkeypatch, tmp_path) -> FakeHub:  # noqa: ANN001 - pytest fixtures
    """Start a FakeHub serving ``org/tiny`` (``main`` and ``v1``) and point huggingface_hub at it.

    Xet is disabled (the fake Hub serves plain HTTP only) and offline mode cleared.
    """
    from huggingface_hub import constants

    hub = FakeHub().start()
    hub.add_repo(
        FakeRepo(
            "org/tiny",
            refs={"main": TINY_MAIN, "v1": TINY_V1},
            commits={TINY_MAIN: tiny_model_files(0), TINY_V1: tiny_model_files(1)},
        )
    )
    point_hf_at(monkeypatch, hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    return hub


def make_model_dir(
    base: Path, name: str, arch: str = "LlamaForCausalLM", seed: int = 0, size: int = 4096
) -> Path:
    """A tiny Hugging Face-like folder: config.json, a weights file and a nested file."""
    folder = base / name
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "seed": seed}))
    (folder / "model.safetensors").write_bytes(
        hashlib.sha256(f"{name}{seed}".encode()).digest() * (size // 32)
    )
    (folder / "sub" / "extra.txt").write_text(f"nested {seed}")
    return folder
