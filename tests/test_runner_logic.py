"""The runner's own logic around the engine: ordering, chunk commits, exactly-once resume, the
manifest check, crash leftovers. The fake engine stands in for vLLM here (it returns results out of
order, and can crash); the real engine is exercised in test_engine_*.py."""

from __future__ import annotations

import errno
import json
import os
import time

import pyarrow.parquet as pq
import pytest
from fake_engine import Crash, FakeEngine
from helpers import compose_job, read_output

from sage_vllm_batch.errors import ResumeError, SageBatchError
from sage_vllm_batch.outputs.files import LOCK
from sage_vllm_batch.outputs.shards import LEDGER
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import ResolvedModel
from sage_vllm_batch.run.point import prepare_point

MODEL = ResolvedModel(id="fake/model", revision="1", path="/nowhere")


def shuffled(runner: str = "pooling", **kw) -> FakeEngine:
    """The fake engine as these tests use it: a window of 7, results out of order."""
    return FakeEngine(runner, max_in_flight=7, shuffle=True, **kw)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(250):
            row = {"text": f"verse {i}", "ref": f"r{i}"}
            if i in (5, 170):
                row["text"] = None
            if i == 77:
                row["text"] = ""
            f.write(json.dumps(row) + "\n")
    return path


def job(corpus, out, *extra):
    return compose_job(
        "data=jsonl",
        f"data.path={corpus}",
        "data.limit=null",
        "data.id_column=ref",
        "output.shard_rows=100",
        *extra,
        out_dir=out,
    )


def run_once(cfg, engine):
    point = prepare_point(cfg, model=MODEL)
    run_on_engine([point], engine, progress="none")
    return point


def test_rows_in_order_in_chunks_with_error_rows(corpus, tmp_path):
    out = tmp_path / "out"
    point = run_once(job(corpus, out), shuffled())
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-00000{i}.parquet" for i in range(3)]
    t = read_output(out)
    assert t.column("id").to_pylist() == list(range(250))
    assert t.column("ref").to_pylist() == [f"r{i}" for i in range(250)]
    assert t.schema.field("embedding").type.list_size == 4
    errors = {i: e for i, e in enumerate(t.column("error").to_pylist()) if e}
    assert sorted(errors) == [5, 77, 170]
    assert errors[5].startswith("null input") and errors[77].startswith("empty input")
    assert t.column("embedding").null_count == 3
    m = json.loads((out / "metrics.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["error_rows"]) == (250, 250, 3)
    assert m["errors_by_reason"] == {"null input": 2, "empty input": 1}
    assert m["status"] == "complete" and (out / "_SUCCESS").exists()
    assert point.metrics.shards_committed == 3


def test_crash_then_resume_is_exactly_once_and_identical(corpus, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_once(job(corpus, clean), shuffled())
    with pytest.raises(Crash):
        run_once(job(corpus, crashed), shuffled(crash_after=160))
    ledger = (crashed / LEDGER).read_text().splitlines()
    assert 1 <= len(ledger) < 3 and not (crashed / "_SUCCESS").exists()
    committed_rows = sum(json.loads(line)["rows"] for line in ledger)
    second = shuffled()
    point = run_once(job(corpus, crashed), second)
    # Only the uncommitted rows reach the engine again (minus error rows, which never do).
    assert len(second.ran) == 250 - committed_rows - sum(1 for i in (5, 77, 170) if i >= committed_rows)
    assert point.metrics.rows_skipped_resumed == committed_rows
    assert point.metrics.rows_in == point.metrics.rows_out == 250 - committed_rows
    for name in sorted(p.name for p in clean.glob("part-*.parquet")):
        assert pq.read_table(clean / name).equals(pq.read_table(crashed / name)), name
    assert read_output(crashed).column("id").to_pylist() == list(range(250))


def test_resume_into_a_different_config_is_refused_with_what_changed(corpus, tmp_path):
    out = tmp_path / "out"
    run_once(job(corpus, out), shuffled())
    with pytest.raises(ResumeError, match=r"data\.limit: None -> 10"):
        prepare_point(job(corpus, out, "data.limit=10"), model=MODEL)
    point = prepare_point(job(corpus, out, "data.limit=10", "output.overwrite=true"), model=MODEL)
    run_on_engine([point], shuffled(), progress="none")
    assert read_output(out).num_rows == 10


def test_complete_run_is_not_redone(corpus, tmp_path):
    out = tmp_path / "out"
    run_once(job(corpus, out), shuffled())
    again = shuffled()
    point = prepare_point(job(corpus, out), model=MODEL)
    assert point.state == "complete"

    def outputs():  # the lock's holder record goes when the run releases it
        return {
            p.name: (p.stat().st_mtime_ns, p.read_bytes())
            for p in out.iterdir()
            if p.is_file() and p.name != LOCK
        }

    files = outputs()
    run_on_engine([point], again, progress="none")
    assert again.ran == [] and point.metrics.rows_in == point.metrics.rows_out == 0
    # This run of it ended at once: its metrics (a service job's, on a resubmit) stay put.
    first = point.metrics.to_dict()["wall_seconds"]
    time.sleep(0.01)
    assert point.metrics.to_dict()["wall_seconds"] == first
    assert outputs() == files


def test_crash_leftovers_are_removed_and_redone(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Crash):
        run_once(job(corpus, out), shuffled(crash_after=120))
    (out / ".tmp-part-000001.parquet").write_bytes(b"half a file")
    (out / "part-000002.parquet").write_bytes(b"renamed but not in the ledger")
    with (out / LEDGER).open("a") as f:
        f.write('{"chunk": 2, "file": "part-0')  # torn append
    run_once(job(corpus, out), shuffled())
    assert not list(out.glob(".tmp-*"))
    assert read_output(out).column("id").to_pylist() == list(range(250))
    lines = (out / LEDGER).read_text().splitlines()
    assert sorted(json.loads(x)["chunk"] for x in lines) == [0, 1, 2]


class FullDisk:
    """The disk fills up while the ``nth`` file whose name contains ``target`` is written: its
    first write stores a few bytes, then it and every later write to it fail with ENOSPC. Hooks
    the real write path: pyarrow's ``OSFile`` (shards) and ``open`` in the sink (ledger) and in
    ``outputs.files`` (the atomic JSON writes: ``metrics.json``)."""

    def __init__(self, monkeypatch, target: str, nth: int = 1) -> None:
        import builtins

        import pyarrow as pa

        from sage_vllm_batch.outputs import files
        from sage_vllm_batch.outputs import shards as sink

        self.target, self.nth, self.opened, self.failed = target, nth, 0, False
        real_open, real_osfile = builtins.open, pa.OSFile

        def wrap(path, mode, fh):
            if self.target not in os.path.basename(str(path)) or not set(mode) & set("wa"):
                return fh
            self.opened += 1
            return _Filling(fh, self) if self.opened >= self.nth else fh

        def osfile(path, mode="r", **kw):
            return wrap(path, mode, real_osfile(path, mode, **kw))

        def open_(path, mode="r", *a, **kw):
            return wrap(path, mode, real_open(path, mode, *a, **kw))

        monkeypatch.setattr(pa, "OSFile", osfile)
        for mod in (sink, files):
            monkeypatch.setattr(mod, "open", open_, raising=False)


class _Filling:
    def __init__(self, fh, disk) -> None:
        self._fh, self._disk, self._room = fh, disk, 10

    def write(self, data):
        if len(data) > self._room:
            self._fh.write(data[: self._room])
            self._fh.flush()
            self._room = 0
            self._disk.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize(
    ("target", "nth", "partial"),
    [
        (".tmp-part-", 2, ".tmp-part-000001.parquet"),  # the second shard's write
        ("_ledger", 2, "part-000001.parquet"),  # renamed into place, then its ledger line fails
        (".metrics.json.tmp", 1, ".metrics.json.tmp"),  # finalize
    ],
)
def test_disk_full_stops_cleanly_and_the_rerun_completes(corpus, tmp_path, monkeypatch, target, nth, partial):
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_once(job(corpus, clean), shuffled())
    with monkeypatch.context() as m:
        disk = FullDisk(m, target, nth)
        with pytest.raises(SageBatchError, match="No space left on device.*rerun the same command"):
            run_once(job(corpus, out), shuffled())
    assert disk.failed and (out / partial).exists() and not (out / "_SUCCESS").exists()
    assert pq.read_table(out / "part-000000.parquet").num_rows == 100  # committed before: intact
    if target == "_ledger":
        assert not (out / LEDGER).read_bytes().endswith(b"\n")  # a torn line
    run_once(job(corpus, out), shuffled())
    assert (out / "_SUCCESS").exists() and read_output(out).equals(read_output(clean))
    assert (
        sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".sage-run.lock") == []
    )
    lines = (out / LEDGER).read_text().splitlines()
    assert sorted(json.loads(x)["chunk"] for x in lines) == [0, 1, 2]


def test_sharding_splits_rows_between_machines(corpus, tmp_path):
    ids = []
    for k in range(3):
        out = tmp_path / f"s{k}"
        run_once(job(corpus, out, "data.num_shards=3", f"data.shard_index={k}"), shuffled())
        ids += read_output(out).column("id").to_pylist()
    assert sorted(ids) == list(range(250))


def test_misordered_rows_are_not_hidden_by_the_reader(corpus, tmp_path):
    import pyarrow as pa

    from sage_vllm_batch.outputs import shards as sink

    out = tmp_path / "out"
    run_once(job(corpus, out), shuffled())
    shard = out / "part-000001.parquet"
    t = pq.read_table(shard)
    pq.write_table(t.take(pa.array(list(reversed(range(t.num_rows))))), shard)  # a runner bug's output
    assert sink.read_output(out).column("id").to_pylist()[100:102] == [199, 198]  # read as written
    with pytest.raises(AssertionError, match="part-000001.parquet: ids out of order"):
        read_output(out)


def test_engine_loads_counts_the_engines_own_loads(corpus, tmp_path):
    run_once(job(corpus, tmp_path / "a"), shuffled())
    # the first load and two restarts (the supervisor keeps this count)
    run_once(job(corpus, tmp_path / "b"), shuffled(loads=3))
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["engine_loads"] == 1
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["engine_loads"] == 3


def test_a_chat_from_a_prompt_column_passes_that_column_through(tmp_path):
    """task=chat on rows with a prompt column and no messages column: the request builder asks
    the prompt as one user message, and the default pass-through keeps the prompt (it used to
    demand the missing messages column)."""
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(5)))
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={src}", out_dir=tmp_path / "out"
    )
    engine = shuffled("generate")  # answers a prompt with its token ids
    run_once(cfg, engine)
    table = read_output(tmp_path / "out")
    assert table.column("prompt").to_pylist() == [f"question {i}" for i in range(5)]
    asked = [engine.render_chat([{"role": "user", "content": f"question {i}"}]) for i in range(5)]
    assert table.column("text").to_pylist() == ["-".join(map(str, ids)) for ids in asked]
    assert table.column("error").null_count == 5
