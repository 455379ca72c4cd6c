"""The output directory across processes and runs: one writer at a time (a killed writer's lock is
taken over), SIGKILL at named points of a real run (half-written shard, finalize, vector-store
build) leaves partial files that the next run removes, foreign files are never deleted, and the
manifest catches a changed model and records the sinks. A stand-in engine (tests/fake_run.py)
replaces vLLM: what is under test is the runner's bookkeeping."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fake_engine import FakeEngine
from fake_run import MODEL
from helpers import compose_job, read_output

from sage_vllm_batch.errors import ResumeError
from sage_vllm_batch.faults import ENV as PAUSE_ENV
from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.outputs.lock import OutputLockedError
from sage_vllm_batch.outputs.shards import LEDGER
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import ResolvedModel
from sage_vllm_batch.run.point import prepare_point

FAKE_RUN = Path(__file__).with_name("fake_run.py")
ROWS = 250
BAD = (5, 170)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"text": None if i in BAD else f"verse {i}"}) + "\n")
    return path


def job(corpus: Path, out: Path, *extra: str):
    return compose_job(
        "data=jsonl", f"data.path={corpus}", "data.limit=null", "output.shard_rows=100", *extra, out_dir=out
    )


def run_here(cfg, model: ResolvedModel = MODEL) -> FakeEngine:
    engine = FakeEngine()
    run_on_engine([prepare_point(cfg, model=model)], engine, progress="none")
    return engine


def start_paused(corpus: Path, out: Path, point: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    """A real run in a child process, stopped at fault point ``point`` (waits until it is there)."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    env = {**os.environ, PAUSE_ENV: f"{point}:{marker}", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(FAKE_RUN), str(out), str(corpus), *extra], env=env)
    deadline = time.monotonic() + 60
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run exited (rc={proc.returncode}) before reaching {point}"
            assert time.monotonic() < deadline, f"the run never reached {point}"
            time.sleep(0.05)
    except BaseException:  # a failed wait (or the test's time limit) must not leave the run behind
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_complete_and_equal(out: Path, clean: Path) -> None:
    assert (out / "_SUCCESS").exists()
    assert read_output(out).equals(read_output(clean))
    assert not list(out.glob(".tmp-*"))


@pytest.fixture
def clean(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "clean"
    run_here(job(corpus, out))
    return out


def test_kill_mid_shard_second_writer_refused_then_lock_taken_over(corpus, tmp_path, clean):
    out = tmp_path / "out"
    proc = start_paused(corpus, out, "shard.half#2", tmp_path)  # shard 0 committed, shard 1 half written
    try:
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            prepare_point(job(corpus, out), model=MODEL)  # the same command, while the first runs
    finally:
        kill(proc)
    half = out / ".tmp-part-000001.parquet"
    assert half.stat().st_size > 0
    with pytest.raises(Exception, match="(?i)parquet"):  # no footer: a torn file
        pq.read_metadata(half)
    assert [json.loads(x)["chunk"] for x in (out / LEDGER).read_text().splitlines()] == [0]

    shard0 = (out / "part-000000.parquet").stat().st_mtime_ns
    engine = run_here(job(corpus, out))  # takes over the dead run's lock
    assert not half.exists()
    assert len(engine.ran) == ROWS - 100 - sum(1 for i in BAD if i >= 100)  # only the uncommitted rows
    m = json.loads((out / "metrics.json").read_text())
    assert (m["rows_skipped_resumed"], m["rows_in"], m["rows_out"]) == (100, ROWS - 100, ROWS - 100)
    assert (out / "part-000000.parquet").stat().st_mtime_ns == shard0  # the committed shard stays
    assert_complete_and_equal(out, clean)


@pytest.mark.parametrize(
    ("point", "extra", "partial"),
    [
        ("finalize.success", (), "metrics.json"),
        ("vector_store.write", ("output.vector_store.type=faiss",), "vectors/.tmp-ids.parquet"),
    ],
)
def test_kill_during_finalize_then_resume_finishes_without_redoing_rows(
    corpus, tmp_path, clean, point, extra, partial
):
    out = tmp_path / "out"
    kill(start_paused(corpus, out, point, tmp_path, *extra))
    assert (out / partial).exists() and not (out / "_SUCCESS").exists()
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(shards) == 3
    engine = run_here(job(corpus, out, *extra))
    assert engine.ran == []  # every shard was committed: only finalize is redone
    m = json.loads((out / "metrics.json").read_text())
    assert (m["rows_skipped_resumed"], m["rows_in"], m["rows_out"]) == (ROWS, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == shards
    assert_complete_and_equal(out, clean)
    if extra:
        import faiss

        assert not list((out / "vectors").glob(".tmp-*"))  # the partial store files were replaced
        assert faiss.read_index(str(out / "vectors" / "index.faiss")).ntotal == ROWS - len(BAD)


# -- what is in the directory --------------------------------------------------------------------


def test_foreign_files_are_refused_and_never_deleted(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".hydra").mkdir()  # Hydra's own run-dir files are expected
    (out / "test.log").write_text("")
    with pytest.raises(ResumeError, match=r"not empty .*notes\.txt.*output\.overwrite=true"):
        prepare_point(job(corpus, out), model=MODEL)
    assert not (out / MANIFEST).exists()
    run_here(job(corpus, out, "output.overwrite=true"))  # written next to it ...
    assert (out / "notes.txt").read_text() == "mine" and read_output(out).num_rows == ROWS  # ... and kept

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "part-000000.parquet").write_bytes(b"someone else's shard")
    with pytest.raises(ResumeError, match=r"named like this runner's outputs \(part-000000\.parquet\)"):
        prepare_point(job(corpus, theirs, "output.overwrite=true"), model=MODEL)
    assert (theirs / "part-000000.parquet").read_bytes() == b"someone else's shard"


def test_manifest_records_model_content_and_refuses_a_changed_model(corpus, tmp_path):
    out = tmp_path / "out"
    run_here(job(corpus, out, "data.limit=20"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"]["content_sha256"] == MODEL.content_sha256
    assert manifest["sinks"] == {"parquet": {"compression": "zstd"}, "vector_store": None}
    changed = ResolvedModel(id=MODEL.id, revision=MODEL.revision, path=MODEL.path, content_sha256="1" * 64)
    with pytest.raises(ResumeError, match="model.content_sha256"):
        prepare_point(job(corpus, out, "data.limit=20"), model=changed)


def test_registry_fingerprint_follows_the_files(tmp_path):
    from fake_hub import make_model_dir

    from sage_vllm_batch import registry

    root = tmp_path / "reg"
    registry.import_model("org/m", path=make_model_dir(tmp_path, "a", seed=1), root=root)
    first = registry.model_fingerprint("org/m", root=root)
    assert first == registry.model_fingerprint("org/m", root=root)  # cached in the record
    assert json.loads((root / "metadata.json").read_text())["models"]["org/m"]["local"]["content_sha256"]
    registry.import_model("org/m", path=make_model_dir(tmp_path, "b", seed=2), root=root, force=True)
    assert registry.model_fingerprint("org/m", root=root)["content_sha256"] != first["content_sha256"]


def test_complete_run_asked_for_a_vector_store_builds_it_from_its_shards(corpus, tmp_path):
    import faiss

    out = tmp_path / "out"
    run_here(job(corpus, out))
    assert not (out / "vectors").exists()
    engine = run_here(job(corpus, out, "output.vector_store.type=faiss"))
    assert engine.ran == []
    assert faiss.read_index(str(out / "vectors" / "index.faiss")).ntotal == ROWS - len(BAD)
    sinks = json.loads((out / MANIFEST).read_text())["sinks"]
    assert sinks["vector_store"] == {"type": "faiss", "path": str(out / "vectors"), "table": None}


def test_a_run_holds_a_lease_on_its_model_until_it_lets_go(tmp_path):
    from fake_hub import make_model_dir

    from sage_vllm_batch import registry
    from sage_vllm_batch.run.model import hold_model

    root = tmp_path / "reg"
    src = make_model_dir(tmp_path, "src", arch="BertModel")
    cfg = compose_job(
        "model.id=org/tiny", f"model.source=path:{src}", out_dir=tmp_path / "out", registry_root=root
    )
    with hold_model(cfg) as model:
        assert Path(model.path).is_dir() and model.revision == "local"
        assert model.content_sha256 == registry.model_fingerprint("org/tiny", root=root)["content_sha256"]
        with pytest.raises(registry.ModelInUseError, match=f"pid {os.getpid()} .*job test"):
            registry.delete_model("org/tiny", root=root)
    assert [r.model_id for r in registry.delete_model("org/tiny", root=root)] == ["org/tiny"]
