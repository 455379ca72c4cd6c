"""The Batch API's own logic, fast: the file store's limits, OpenAI's validation of a batch file, and
a batch's lifecycle (validate, run, finalize, cancel, restart) over a fake JobManager that writes
the job's OpenAI batch output file itself. The real server is in tests/test_batch_api.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import wait_until

from sage_vllm_batch.service.batches import BatchManager, validate_batch_file
from sage_vllm_batch.service.errors import NotFound, ServiceError
from sage_vllm_batch.service.files import FileStore


def _line(cid, url="/v1/chat/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {"messages": []}})


class FakeJobs:
    """JobManager's public API; a job finishes when the test says so, writing one output line per
    input line (``bad`` custom_ids as errors)."""

    def __init__(self, bad=()):
        self.jobs, self.bad, self.submits = {}, set(bad), []

    def submit(self, overrides, *, internal_roots=()):
        o = dict(x.split("=", 1) for x in overrides)
        assert Path(o["data.path"]).parent == Path(internal_roots[0])  # reads from the file store
        job_id = "job-" + str(abs(hash(tuple(overrides))))[:8]
        self.submits.append(job_id)
        old = self.jobs.get(job_id)
        if old and old["status"] == "running":
            return old, False
        self.jobs[job_id] = {
            "id": job_id,
            "status": "running",
            "rows_done": 0,
            "metrics": {},
            "model": "m",
            "o": o,
        }
        return self.jobs[job_id], True

    def get(self, job_id):
        if job_id not in self.jobs:
            raise NotFound("no job")
        return self.jobs[job_id]

    def cancel(self, job_id):
        self.jobs[job_id]["status"] = "cancelled"
        return self.jobs[job_id]

    def finish(self):
        for j in self.jobs.values():
            if j["status"] != "running":
                continue
            out = Path(j["o"]["output.dir"])
            out.mkdir(parents=True, exist_ok=True)
            with open(j["o"]["data.path"]) as src, open(out / "openai_batch_output.jsonl", "w") as dst:
                for line in src:
                    cid = json.loads(line)["custom_id"]
                    err = "bad request: no" if cid in self.bad else None
                    dst.write(
                        json.dumps({"id": "x", "custom_id": cid, "response": None, "error": err}) + "\n"
                    )
            j["status"] = "complete"


def _manager(tmp_path, jobs, **kw):
    files = FileStore(tmp_path / "files", max_bytes=10_000, max_lines=100)
    return BatchManager(
        jobs, files, root=tmp_path / "batches", serves=lambda k: True, poll_s=0.02, **kw
    ).start()


def _store(files, lines):
    up = files.upload("b.jsonl")
    up.write(("\n".join(lines) + "\n").encode())
    return up.commit()["id"]


def _wait(m, batch_id, statuses):
    return wait_until(lambda: m.get(batch_id), lambda b: b["status"] in statuses, timeout=10, interval=0.02)


def test_validation_names_bad_lines(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(
        "\n".join([_line("a"), "{oops", "[1]", _line("b", "/v1/embeddings"), _line("a"), "", _line("c")])
        + "\n"
    )
    total, errors = validate_batch_file(p, "/v1/chat/completions")
    assert total == 6
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "invalid_json_line"),
        (3, "invalid_json_line"),
        (4, "mismatched_url"),
        (5, "duplicate_custom_id"),
    ]


def test_upload_limits(tmp_path):
    files = FileStore(tmp_path, max_bytes=100, max_lines=3)
    up = files.upload("x.jsonl")
    up.write(b"{}\n{}\n{}\n")
    with pytest.raises(ServiceError, match="serve.batch_max_file_lines") as e:
        up.write(b"{}")  # a 4th line, even without its newline
    assert e.value.status == 400 and not list(tmp_path.iterdir())  # nothing left behind
    up = files.upload("x.jsonl")
    with pytest.raises(ServiceError, match="serve.batch_max_file_bytes") as e:
        up.write(b"x" * 101)
    assert e.value.status == 413 and files.list() == []


def test_lifecycle_counts_and_files(tmp_path):
    jobs = FakeJobs(bad={"b"})
    m = _manager(tmp_path, jobs)
    try:
        fid = _store(m.files, [_line("a"), _line("b"), _line("c")])
        b = m.create(
            {
                "input_file_id": fid,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": "v"},
            }
        )
        assert b["status"] == "validating" and b["expires_at"] is None  # no expiry unless serve.batch_expire
        assert _wait(m, b["id"], ("in_progress",))["request_counts"]["total"] == 3
        jobs.finish()
        done = _wait(m, b["id"], ("completed",))
        assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        ok = [
            json.loads(x)["custom_id"] for x in b"".join(m.files.content(done["output_file_id"])).splitlines()
        ]
        bad = [
            json.loads(x)["custom_id"] for x in b"".join(m.files.content(done["error_file_id"])).splitlines()
        ]
        assert (ok, bad) == (["a", "c"], ["b"])
        assert m.files.get(done["output_file_id"])["purpose"] == "batch_output"
        assert m.list(limit=1)["data"][0]["id"] == b["id"]
        with pytest.raises(ServiceError) as e:
            m.cancel(b["id"])
        assert e.value.status == 409
    finally:
        m.shutdown()


def test_a_restart_resubmits_unfinished_batches(tmp_path):
    jobs = FakeJobs()
    m = _manager(tmp_path, jobs)
    fid = _store(m.files, [_line("a"), _line("b")])
    b = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    _wait(m, b["id"], ("in_progress",))
    m.shutdown()
    jobs.jobs.clear()  # the server died: its jobs with it
    m2 = _manager(tmp_path, jobs)  # a new server on the same output root
    try:
        wait_until(lambda: jobs.jobs, bool, timeout=10, interval=0.02, what="the resubmitted job")
        assert len(set(jobs.submits)) == 1 and len(jobs.submits) == 2  # the same job, again
        jobs.finish()
        assert _wait(m2, b["id"], ("completed",))["request_counts"]["completed"] == 2
    finally:
        m2.shutdown()


def test_cancel_keeps_what_is_done_and_refuses_deleting_the_input(tmp_path):
    jobs = FakeJobs()
    m = _manager(tmp_path, jobs)
    try:
        fid = _store(m.files, [_line("a")])
        b = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        _wait(m, b["id"], ("in_progress",))
        assert m.reads(fid) == b["id"]
        assert m.cancel(b["id"])["status"] == "cancelling"
        done = _wait(m, b["id"], ("cancelled",))
        assert done["cancelled_at"] and done["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
        assert m.reads(fid) is None
    finally:
        m.shutdown()


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"endpoint": "/v1/moderations"}, "endpoint"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"input_file_id": "file-nope"}, "no file"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_create_refuses_bad_requests(tmp_path, body, needle):
    m = _manager(tmp_path, FakeJobs())
    try:
        fid = _store(m.files, [_line("a")])
        req = {"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h", **body}
        with pytest.raises(ServiceError, match=needle):
            m.create(req)
    finally:
        m.shutdown()


def test_an_empty_file_completes_with_an_empty_output(tmp_path):
    jobs = FakeJobs()
    m = _manager(tmp_path, jobs)
    try:
        up = m.files.upload("empty.jsonl")
        fid = up.commit()["id"]
        b = m.create({"input_file_id": fid, "endpoint": "/v1/embeddings", "completion_window": "24h"})
        done = _wait(m, b["id"], ("completed",))
        assert done["request_counts"] == {"total": 0, "completed": 0, "failed": 0} and not jobs.jobs
        assert b"".join(m.files.content(done["output_file_id"])) == b"" and done["error_file_id"] is None
    finally:
        m.shutdown()


def test_expiry_only_when_asked_keeps_the_lines_done(tmp_path, monkeypatch):
    from sage_vllm_batch.service.batches import serving as batches

    jobs = FakeJobs()
    m = _manager(tmp_path, jobs, expire=True)
    try:
        fid = _store(m.files, [_line("a")])
        b = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "1h"})
        assert b["expires_at"] == b["created_at"] + 3600
        _wait(m, b["id"], ("in_progress",))
        now = time.time()
        monkeypatch.setattr(batches, "_now", lambda: int(now) + 7200)  # two hours later
        done = _wait(m, b["id"], ("expired",))
        assert done["expired_at"] == int(now) + 7200 and done["output_file_id"]
        assert [j["status"] for j in jobs.jobs.values()] == ["cancelled"]
    finally:
        m.shutdown()
