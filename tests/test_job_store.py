"""The job records of ``/v1/jobs`` (``service.job_store``) and what ``JobManager`` makes of them at
start, without an engine: a fake service stands in for the loaded models (our own logic only;
tests/test_service_jobs_durable.py runs the same against the real server)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from sage_vllm_batch.outputs import files
from sage_vllm_batch.service.job_store import RECORDS_DIR, JobStore, JobStoreLockedError
from sage_vllm_batch.service.jobs import JobManager


def _record(job_id: str, status: str, out: Path, *, model: str = "org/embed", t: float = 1.0) -> dict:
    return {
        "id": job_id, "overrides": ["task=embed", f"data.path=/data/{job_id}.jsonl"], "output_dir": str(out),
        "task": "embed", "model": model, "kind": "embedding", "model_revision": "r1", "adapter": None,
        "status": status, "error": "boom" if status == "failed" else None, "created_at": t, "submitted_at": t,
        "started_at": None, "finished_at": None, "rows_total": None,
    }  # fmt: skip


class _FakeService:
    """The two things JobManager asks of a service before composing a job: which kinds are
    loaded, and the slot of one (the model it serves)."""

    def __init__(self, model: str = "org/embed", revision: str = "r1") -> None:
        self._slot = SimpleNamespace(
            name=model, resolved=SimpleNamespace(id=model, revision=revision), model_cfg={"adapter": None}
        )

    def has(self, kind: str) -> bool:
        return kind == "embedding"

    def slot(self, kind: str):
        return self._slot


def test_records_round_trip_atomically(tmp_path):
    store = JobStore(tmp_path)
    rec = _record("job-a", "queued", tmp_path / "jobs" / "job-a")
    store.save(rec)
    assert store.path("job-a").parent == tmp_path.resolve() / RECORDS_DIR
    assert [p.name for p in store.dir.iterdir()] == ["job-a.json"]  # no temp file left behind
    records, problems = store.load_all()
    assert records == [rec] and problems == []


def test_a_write_that_dies_midway_leaves_the_old_record(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    old = _record("job-a", "queued", tmp_path / "o")
    store.save(old)

    def torn_dump(obj, f, **kw):
        f.write('{"id": "job-a", "sta')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.json, "dump", torn_dump)
    with pytest.raises(OSError):
        store.save({**old, "status": "running"})
    monkeypatch.undo()
    assert store.load_all() == ([old], [])


def test_unreadable_records_are_reported_and_skipped(tmp_path):
    store = JobStore(tmp_path)
    good = _record("job-good", "complete", tmp_path / "g")
    store.save(good)
    store.dir.joinpath("job-torn.json").write_text('{"id": "job-torn", "status": "runn')  # half written
    store.dir.joinpath("job-list.json").write_text("[1, 2]")
    store.dir.joinpath("job-other.json").write_text(json.dumps({**good, "id": "job-x"}))
    store.dir.joinpath("job-state.json").write_text(json.dumps({**good, "id": "job-state", "status": "odd"}))
    store.dir.joinpath(".job-good.json.tmp").write_text("{")  # a rename that never happened
    records, problems = store.load_all()
    assert records == [good]
    assert sorted(Path(p.split(":", 1)[0]).name for p in problems) == [
        "job-list.json", "job-other.json", "job-state.json", "job-torn.json",
    ]  # fmt: skip
    assert any("status 'odd'" in p for p in problems) and any("file name" in p for p in problems)
    assert store.dir.joinpath("job-torn.json").exists()  # reported, not deleted


def test_one_server_per_output_root(tmp_path):
    first = JobStore(tmp_path).lock()
    with pytest.raises(
        JobStoreLockedError, match=rf"in use by another server, pid {os.getpid()}.*serve.output_root"
    ):
        JobStore(tmp_path).lock()
    first.unlock()
    JobStore(tmp_path).lock().unlock()  # free again once the first lets go


def test_output_dirs_may_not_hold_the_records(tmp_path):
    store = JobStore(tmp_path)
    assert store.holds(tmp_path) and store.holds(store.dir) and store.holds(store.dir / "x")
    assert not store.holds(tmp_path / "jobs" / "job-a") and not store.holds(tmp_path / ".sage-jobsx")


def test_a_start_reads_every_record_and_resumes_nothing_it_should_not(tmp_path, caplog):
    """Corrupt records do not stop the start; finished jobs stay as they were; a queued job of
    another model fails with both models named instead of running on the wrong one."""
    store = JobStore(tmp_path)
    done = tmp_path / "jobs" / "job-done"
    done.mkdir(parents=True)
    (done / "part-000000.parquet").write_bytes(b"x")
    (done / files.LEDGER).write_text(
        json.dumps({"chunk": 0, "file": "part-000000.parquet", "rows": 7}) + "\n"
    )
    store.save(_record("job-done", "complete", done, t=1))
    store.save(_record("job-fail", "failed", tmp_path / "f", t=2))
    store.save(_record("job-stop", "cancelled", tmp_path / "c", t=3))
    store.save(_record("job-wrong", "queued", tmp_path / "w", model="org/other", t=4))
    store.dir.joinpath("job-torn.json").write_text("{")
    jobs = JobManager(_FakeService(), base_overrides={}, data_roots=[str(tmp_path)], output_root=tmp_path)
    try:
        listed = {j["id"]: j for j in jobs.list()}
        assert list(listed) == ["job-done", "job-fail", "job-stop", "job-wrong"]  # submission order
        assert listed["job-done"]["status"] == "complete" and listed["job-done"]["rows_done"] == 7
        assert listed["job-fail"]["status"] == "failed" and listed["job-fail"]["error"] == "boom"
        assert listed["job-stop"]["status"] == "cancelled" and listed["job-stop"]["queue_position"] is None
        wrong = listed["job-wrong"]
        assert (
            wrong["status"] == "failed"
            and "org/other@r1" in wrong["error"]
            and "org/embed@r1" in wrong["error"]
        )
        assert json.loads(store.path("job-wrong").read_text())["status"] == "failed"  # on disk too
        assert "job-torn.json" in caplog.text
        # DELETE of a finished job: the record goes, the output stays.
        assert jobs.delete("job-done")["deleted"] is True
        assert not store.path("job-done").exists() and (done / "part-000000.parquet").exists()
        assert "job-done" not in {j["id"] for j in jobs.list()}
        with pytest.raises(Exception, match="no job 'job-done'"):
            jobs.get("job-done")
    finally:
        jobs.shutdown()
    assert not jobs.store.locked
    JobStore(tmp_path).lock().unlock()  # shutdown gave up the root


def test_resume_jobs_false_marks_interrupted_jobs_cancelled(tmp_path):
    store = JobStore(tmp_path)
    store.save(_record("job-run", "running", tmp_path / "r"))
    jobs = JobManager(_FakeService(), base_overrides={}, data_roots=[], output_root=tmp_path, resume=False)
    try:
        (j,) = jobs.list()
        assert j["status"] == "cancelled" and "serve.resume_jobs=false" in j["error"]
    finally:
        jobs.shutdown()
