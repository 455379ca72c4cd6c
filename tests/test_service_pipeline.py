"""``task=pipeline`` as a ``/v1/jobs`` job: its stage keys on the allowlist, its conditions checked
before any work (the escape corpus of tests/test_stages_config.py, none of which may run), each
stage on the served model of its kind, and a pipeline that runs to completion on the shared
server (tests/conftest.py ``served``) with its stage columns."""

from __future__ import annotations

import json
import types
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from helpers import http_jobs, listing, wait_job
from test_stages_config import ESCAPES

from sage_vllm_batch.config.options import load_option
from sage_vllm_batch.service.errors import ServiceError
from sage_vllm_batch.service.security import check_overrides

# Every escape attempt but a bare name (a column named "lower" is a legitimate condition).
CONDITIONS = [s for s in ESCAPES if s != "lower"]
STAGES = (
    "+stages={answer:{task:generate,prompt_template:'Q: {prompt} A:',sampling:{max_tokens:4}},"
    "judge:{task:classify,labels:[yes,no],prompt_template:'{prompt} {answer} Right?',when:'len(answer) >= 0'},"
    "keep:{task:embed,model:minilm-l6-v2,prompt_template:'{prompt} {answer}',when:\"judge in ('yes','no')\"}}"
)


def quoted(source: str) -> str:
    """A condition as a Hydra quoted value (the corpus has no double quote or backslash)."""
    assert '"' not in source and "\\" not in source
    return f'"{source}"'


def refused(overrides: list[str]) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        check_overrides(overrides)
    return e.value


# ---------------------------------------------------------------------------- the allowlist
@pytest.mark.timeout(60)
def test_stage_keys_classify_and_labels_are_allowed():
    ok = [
        "task=pipeline",
        STAGES,
        "stages.answer.sampling.temperature=0",
        "stages.answer.sampling.structured_outputs.regex='[a-z]+'",
        "stages.judge.system_prompt='Be brief.'",
        "stages.judge.labels=[yes,no,maybe]",
        "stages.keep.when=\"lower(judge) == 'yes'\"",
        "stages.answer.model=smollm2-135m-instruct",
    ]
    assert check_overrides(ok) == ok
    assert check_overrides(["task=classify", "task.labels=[good,bad]"]) == [
        "task=classify",
        "task.labels=[good,bad]",
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override, status, needle",
    [
        ("+stages={a:{task:chat,bogus:1}}", 403, "'stages.a.bogus'"),
        ("+stages={a:{task:chat,sampling:{bogus:1}}}", 403, "'stages.a.sampling.bogus'"),
        ("stages.a.engine=x", 403, "'stages.a.engine'"),
        ("stages.a.sampling.structured_outputs.file=x", 403, "'stages.a.sampling.structured_outputs.file'"),
        ("+stages={id:{task:chat}}", 400, "stages.id"),
        ("+stages={import:{task:chat}}", 400, "stages.import"),
        ("+stages={_a:{task:chat}}", 400, "cannot name a stage"),
        ("stages={a:{task:chat}}", 400, "+stages={"),  # must be added
        ("+stages.a.task=chat", 400, "+stages={"),  # cannot compose: the hint says how
        ("+stages=[a]", 400, "mapping"),
        ("stages.a=x", 400, "+stages={"),
        ("+stages={a:{task:chat,when:'${oc.env:HOME}'}}", 403, "interpolation"),
    ],
)
def test_other_stage_keys_are_refused(override, status, needle):
    e = refused(["task=pipeline", override])
    assert e.status == status and needle in str(e), str(e)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", CONDITIONS, ids=[s[:40] for s in CONDITIONS])
def test_every_escape_condition_is_refused_at_the_overrides(source):
    for overrides in (
        ["task=pipeline", "+stages={s:{task:chat}}", f"stages.s.when={quoted(source)}"],
        ["task=pipeline", f"+stages={{s:{{task:chat,when:{quoted(source)}}}}}"],
    ):
        e = refused(overrides)
        assert e.status == 400 and "stages.s.when" in str(e), (overrides, str(e))


# ---------------------------------------------------------------------------- served models
def _slot(kind: str, option: str, model_id: str | None = None):
    m = load_option("model", option)
    rid = model_id or str(m.id)
    return types.SimpleNamespace(
        kind=kind, name=rid, model_cfg=m, resolved=types.SimpleNamespace(id=rid, revision="r1")
    )


def _composer(tmp_path: Path, slots: dict):
    from sage_vllm_batch.service.job_store import JobStore
    from sage_vllm_batch.service.jobs.compose import JobComposer

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "q.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    service = types.SimpleNamespace(has=lambda k: k in slots, slot=lambda k: slots[k])
    base = {"text": ["model=smollm2-135m-instruct"], "embedding": ["model=minilm-l6-v2"]}
    composer = JobComposer(
        service, base_overrides=base, data_roots=[str(data)], output_root=out, store=JobStore(out)
    )
    job = ["task=pipeline", "data=jsonl", f"data.path={data / 'q.jsonl'}", "data.limit=4"]
    return composer, job, data


@pytest.mark.timeout(120)
def test_each_stage_runs_on_the_served_model_of_its_kind(tmp_path):
    slots = {"text": _slot("text", "smollm2-135m-instruct"), "embedding": _slot("embedding", "minilm-l6-v2")}
    composer, job, _ = _composer(tmp_path, slots)
    cfg, kind, _, out, point = composer.prepare(check_overrides([*job, STAGES]), "job-1")
    assert (kind, point, out) == ("text", None, tmp_path / "out" / "jobs" / "job-1")
    assert {n: s.kind for n, s in composer.stage_slots(cfg).items()} == {
        "answer": "text",
        "judge": "text",
        "keep": "embedding",
    }


@pytest.mark.timeout(120)
def test_a_stage_on_a_model_not_served_is_refused_naming_it(tmp_path):
    slots = {
        "text": _slot("text", "smollm2-135m-instruct"),
        "embedding": _slot("embedding", "minilm-l6-v2", model_id="org/another-embedder"),
    }
    composer, job, data = _composer(tmp_path, slots)
    with pytest.raises(ServiceError) as e:
        composer.prepare(check_overrides([*job, STAGES]), "job-2")
    msg = str(e.value)
    assert e.value.status == 400 and msg.startswith("stages.keep.model:"), msg
    assert "org/another-embedder" in msg and "HuggingFaceTB/SmolLM2-135M-Instruct" in msg
    # Nothing was written for it; a stage's schema file is confined like the job's.
    assert not (tmp_path / "out" / "jobs").exists()
    schema = "stages.answer.sampling.structured_outputs.json"
    with pytest.raises(ServiceError) as e:
        composer.prepare(check_overrides([*job, STAGES, f"{schema}=/etc/passwd"]), "job-3")
    assert e.value.status == 403 and schema in str(e.value)
    with pytest.raises(ServiceError) as e:  # an embed stage on the job's (text) model
        composer.prepare(check_overrides([*job, "+stages={v:{task:embed}}"]), "job-4")
    assert e.value.status == 400 and "stages.v.model" in str(e.value) and "minilm-l6-v2" in str(e.value)


@pytest.mark.timeout(120)
def test_a_restarted_server_resumes_a_pipeline_job_only_on_its_models(tmp_path, monkeypatch):
    """The record names every model the job runs on; a new server on the same root puts it back in
    the queue as a pipeline (run_pipeline resumes from its output dir), or fails it naming the model
    it no longer serves."""
    from sage_vllm_batch.service.job_store import JobStore
    from sage_vllm_batch.service.jobs import JobManager
    from sage_vllm_batch.service.jobs.record import Job, job_id_of

    slots = {"text": _slot("text", "smollm2-135m-instruct"), "embedding": _slot("embedding", "minilm-l6-v2")}
    composer, job, data = _composer(tmp_path, slots)
    out_root = tmp_path / "out"
    models = {k: {"id": s.resolved.id, "revision": "r1", "adapter": None} for k, s in slots.items()}
    same = check_overrides([*job, STAGES])
    moved = check_overrides([*job, STAGES, "stages.answer.sampling.max_tokens=3"])
    store = JobStore(out_root)
    for overrides, embedder in ((same, models["embedding"]["id"]), (moved, "org/old-embedder")):
        jid = job_id_of(overrides)
        rec = Job(jid, overrides, out_root / "jobs" / jid, "pipeline", models["text"]["id"],
                  model_revision="r1", status="running",
                  models={**models, "embedding": {**models["embedding"], "id": embedder}}).record()  # fmt: skip
        store.save(rec)
    monkeypatch.setattr(JobManager, "_dispatch", lambda self: None)  # queued, not run: no engine here
    manager = JobManager(
        composer.service, base_overrides=composer.base, data_roots=[str(data)], output_root=out_root
    )
    try:
        resumed, failed = manager._jobs[job_id_of(same)], manager._jobs[job_id_of(moved)]
        assert resumed.status == "queued" and resumed.point is None, resumed.error
        assert list(resumed.pipeline.stages) == ["answer", "judge", "keep"]
        assert manager.get(resumed.id)["models"] == {k: m["id"] for k, m in models.items()}
        assert failed.status == "failed" and "org/old-embedder" in failed.error, failed.error
        assert manager.cancel(resumed.id)["status"] == "cancelled"
    finally:
        manager.shutdown(timeout=1)


# ---------------------------------------------------------------------------- on the shared server
@pytest.fixture(scope="module")
def world(served):
    data = served["roots"]["pipeline"]
    rows = "".join(json.dumps({"prompt": f"Name the colour number {i}."}) + "\n" for i in range(200))
    (data / "q.jsonl").write_text(rows)
    with httpx.Client(
        base_url=served["url"], headers={"Authorization": f"Bearer {served['key']}"}, timeout=120
    ) as c:
        yield {"http": c, "data": data, "outputs": served["outputs"]}


def _job(world, *extra: str) -> list[str]:
    return ["task=pipeline", "data=jsonl", f"data.path={world['data'] / 'q.jsonl'}", *extra]


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_escape_conditions_are_400_before_any_work(world):
    http = world["http"]
    jobs_before = {j["id"] for j in http.get("/v1/jobs").json()["data"]}
    outputs_before = listing(world["outputs"])
    for source in CONDITIONS:
        overrides = _job(world, "data.limit=4", STAGES, f"stages.judge.when={quoted(source)}")
        r = http.post("/v1/jobs", json={"overrides": overrides})
        assert r.status_code == 400, (source, r.status_code, r.text)
        assert "stages.judge.when" in r.json()["error"]["message"], (source, r.text)
    # A stage on a model of the wrong kind, and a name no stage or column has: 400 too.
    for extra, needle in (
        ("stages.keep.model=smollm2-135m-instruct", "stages.keep.model"),
        ("stages.keep.when=\"nope == 'yes'\"", "stages.keep.when"),
    ):
        r = http.post("/v1/jobs", json={"overrides": _job(world, "data.limit=4", STAGES, extra)})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert {j["id"] for j in http.get("/v1/jobs").json()["data"]} == jobs_before
    assert listing(world["outputs"]) == outputs_before


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_a_pipeline_job_runs_on_the_served_engines(world):
    http, out = world["http"], world["outputs"] / "pipeline-ok"
    r = http.post("/v1/jobs", json={"overrides": _job(world, "data.limit=4", STAGES, f"output.dir={out}")})
    assert r.status_code == 201, r.text
    done = wait_job(http_jobs(http), r.json()["id"], timeout=240)
    assert done["status"] == "complete", done
    assert done["task"] == "pipeline" and done["rows_done"] == 4, done
    assert done["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert done["models"] == {
        "text": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "embedding": "sentence-transformers/all-MiniLM-L6-v2",
    }
    table = pq.read_table(sorted(out.glob("*.parquet")) or out)
    assert table.num_rows == 4
    for col in ("prompt", "answer", "answer_finish_reason", "answer_tokens", "judge", "judge_scores", "keep"):
        assert col in table.column_names, table.column_names
    assert all(e is None for e in table.column("error").to_pylist()), table.column("error")
    assert set(table.column("judge").to_pylist()) <= {"yes", "no"}
    assert all(v is not None and len(v) == 384 for v in table.column("keep").to_pylist())


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_a_running_pipeline_job_can_be_cancelled(world):
    http, out = world["http"], world["outputs"] / "pipeline-cancel"
    extra = ("stages.answer.sampling.max_tokens=32", f"output.dir={out}")
    r = http.post("/v1/jobs", json={"overrides": _job(world, STAGES, *extra)})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_job(http_jobs(http), job_id, until=lambda j: j["status"] != "queued", timeout=120)
    r = http.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    done = wait_job(http_jobs(http), job_id, timeout=120)
    assert done["status"] == "cancelled" and (done["rows_done"] or 0) < 200, done
