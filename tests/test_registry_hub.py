"""Hub downloads through the real huggingface_hub against a local fake Hub (tests/fake_hub.py)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
from pathlib import Path

import pytest
from fake_hub import TINY_MAIN, TINY_V1, FakeHub, point_hf_at, start_tiny_hub, tiny_model_files
from helpers import free_port

from sage_vllm_batch import registry
from sage_vllm_batch.registry import store


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    hub = start_tiny_hub(monkeypatch, tmp_path)
    yield hub
    hub.stop()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(store.ENV_ROOT, raising=False)
    return tmp_path / "reg"


def assert_same_files(folder: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def test_download_records_commit_and_checksums(hub: FakeHub, root: Path) -> None:
    record = registry.download_model("org/tiny", progress=False, root=root)

    assert record.path == root / "models" / "org--tiny" / "main"
    assert_same_files(record.path, tiny_model_files(0))  # huggingface_hub's .cache bookkeeping is gone
    assert record.source["kind"] == "hub" and record.source["commit"] == TINY_MAIN
    assert record.source["endpoint"] == hub.url and record.type == "text"
    weights = tiny_model_files(0)["model.safetensors"]
    assert record.files["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert registry.verify_model("org/tiny", root=root).ok
    assert not list((root / ".tmp").iterdir())
    # The LFS file went through the Hub's redirect to the "CDN" host, like the real Hub.
    assert hub.gets("/cdn/" + hashlib.sha256(weights).hexdigest() + "/model.safetensors")


def test_two_revisions_side_by_side(hub: FakeHub, root: Path) -> None:
    main = registry.download_model("org/tiny", progress=False, root=root)
    v1 = registry.download_model("org/tiny", revision="v1", progress=False, root=root)
    assert (main.path.name, v1.path.name) == ("main", "v1")
    assert (main.source["commit"], v1.source["commit"]) == (TINY_MAIN, TINY_V1)
    assert_same_files(main.path, tiny_model_files(0))
    assert_same_files(v1.path, tiny_model_files(1))
    assert registry.get_model_path("org/tiny", root=root) == main.path  # None prefers main


def test_resume_after_dropped_connection(hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # Small chunks, so part of the file is on disk when the connection drops (the default is 10 MB).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    hub.drop_once.add("model.safetensors")
    record = registry.download_model("org/tiny", progress=False, root=root)

    weights = tiny_model_files(0)["model.safetensors"]
    assert (record.path / "model.safetensors").read_bytes() == weights
    gets = hub.gets("/model.safetensors")
    assert len(gets) == 2 and gets[0][2] is None
    resumed_from = int(gets[1][2].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(weights) // 2  # resumed with a Range request, not restarted


def test_lfs_checksum_mismatch_is_refused(hub: FakeHub, root: Path) -> None:
    hub.corrupt.add("model.safetensors")
    with pytest.raises(registry.VerificationError, match=r"model\.safetensors \(sha256"):
        registry.download_model("org/tiny", progress=False, root=root)
    assert registry.list_models(root=root) == []
    assert not (root / "models" / "org--tiny").exists()
    assert not list((root / ".tmp").iterdir())  # the corrupt file is not kept for a resume

    hub.corrupt.clear()
    assert registry.download_model("org/tiny", progress=False, root=root).present


def test_interrupted_download_records_nothing_and_resumes(hub: FakeHub, root: Path) -> None:
    hub.fail.add("model.safetensors")
    with pytest.raises(registry.DownloadError, match="sage-vllm-models download org/tiny --revision main"):
        registry.download_model("org/tiny", progress=False, root=root)
    assert registry.list_models(root=root) == []
    assert not (root / "models" / "org--tiny" / "main").exists()
    staged = root / ".tmp" / "org--tiny@main.download"
    assert (staged / "config.json").is_file()  # completed files are kept for the next attempt

    hub.fail.clear()
    hub.requests.clear()
    record = registry.download_model("org/tiny", progress=False, root=root)
    assert_same_files(record.path, tiny_model_files(0))
    assert hub.gets("/config.json") == [] and hub.gets("/tokenizer.json") == []  # reused, not fetched again
    assert len(hub.gets("/model.safetensors")) == 1
    assert not staged.exists()


def test_offline_mode_fails_fast_with_the_fix(
    hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = count_hub_lookups(monkeypatch)
    with pytest.raises(registry.HubUnavailableError) as info:
        registry.ensure_model("org/tiny", root=root)
    # Fails before asking: one resolve, no model_info call, no request on the wire (below).
    assert (asked["resolve_commit"], asked["model_info"]) == (1, 0)
    message = str(info.value)
    assert "org/tiny" in message and "HF_HUB_OFFLINE" in message
    assert "sage-vllm-models download org/tiny" in message and "sage-vllm-models import org/tiny" in message
    assert isinstance(info.value, registry.ModelNotFoundError)
    assert hub.requests == []


def count_hub_lookups(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the registry's Hub lookups (``hub.resolve_commit``) and huggingface_hub's
    ``HfApi.model_info`` calls, passing each through."""
    from huggingface_hub import HfApi

    from sage_vllm_batch.registry import hub as hub_module

    calls = {"resolve_commit": 0, "model_info": 0}
    resolve, model_info = hub_module.resolve_commit, HfApi.model_info

    def counted_resolve(*args, **kwargs):
        calls["resolve_commit"] += 1
        return resolve(*args, **kwargs)

    def counted_model_info(self, *args, **kwargs):
        calls["model_info"] += 1
        return model_info(self, *args, **kwargs)

    monkeypatch.setattr(hub_module, "resolve_commit", counted_resolve)
    monkeypatch.setattr(HfApi, "model_info", counted_model_info)
    return calls


class ResettingHub:
    """A Hub that is down behind a live address: it accepts each TCP connection, reads the request
    line, and resets the connection. ``requests`` lists the request lines, one per attempt."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1"))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not)
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.mark.parametrize("down", ["refused", "reset"])
def test_unreachable_hub_fails_after_one_try(
    hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch, down: str
) -> None:
    # refused: nothing listens on the port; reset: every connection is reset after its request line.
    resetting = ResettingHub() if down == "reset" else None
    point_hf_at(monkeypatch, resetting.url if resetting else f"http://127.0.0.1:{free_port()}")
    asked = count_hub_lookups(monkeypatch)
    try:
        with pytest.raises(
            registry.HubUnavailableError, match="cannot be reached.*sage-vllm-models import org/tiny"
        ):
            registry.ensure_model("org/tiny", root=root)
    finally:
        if resetting:
            resetting.close()
    # One try, no retry loop: a single model_info request, and no file was asked for.
    assert asked == {"resolve_commit": 1, "model_info": 1}
    if resetting:
        tries = [r for r in resetting.requests if "/api/models/org/tiny" in r]
        assert tries == ["GET /api/models/org/tiny/revision/main HTTP/1.1"], resetting.requests
        assert not [r for r in resetting.requests if "/resolve/" in r or "/cdn/" in r], resetting.requests
    assert hub.requests == []  # the working Hub was never contacted
    assert registry.list_models(root=root) == []
    assert not (root / "models").exists() or not list((root / "models").iterdir())


def test_present_model_never_touches_the_network(
    hub: FakeHub, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = registry.ensure_model("org/tiny", root=root)
    hub.requests.clear()
    hub.stop()
    point_hf_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    assert registry.ensure_model("org/tiny", root=root) == path
    assert registry.download_model("org/tiny", root=root).path == path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.ensure_model("org/tiny", root=root, allow_download=False) == path
    assert hub.requests == []


def test_unknown_repo_or_revision(hub: FakeHub, root: Path) -> None:
    with pytest.raises(registry.ModelNotFoundError, match="'org/nope' was not found on the Hub") as info:
        registry.download_model("org/nope", progress=False, root=root)
    assert not isinstance(info.value, registry.HubUnavailableError)
    with pytest.raises(registry.ModelNotFoundError, match="Revision 'v9' of 'org/tiny' does not exist"):
        registry.download_model("org/tiny", revision="v9", progress=False, root=root)
    assert registry.list_models(root=root) == []
