"""The escape corpus against a real ``mode=serve``: every path-valued key a job may set, pointed
outside the server's roots every way there is (an absolute path, ``..``, a symlink out, ``pkg://``,
``~``), plus keys and syntax a job may not use. Each answers 4xx at submit, and nothing outside the
roots is read or written: the outside sentinels stay as they were, and no job ran (a schema file
outside is a valid schema, so a job that read it would have run). One server per module, as in
tests/test_service_http.py; jobs inside the roots are the control."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import http_jobs, wait_job

pytestmark = pytest.mark.engine

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``d`` (links not followed) with its size and mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(d):
        for n in (*dirs, *files):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def dirs(served):
    base, data, outputs, cwd = served["base"], served["roots"]["escapes"], served["outputs"], served["cwd"]
    outside = base / "outside"  # the sibling of the data root and of the output root
    for d in (outside, outside / "target"):
        d.mkdir()
    rows = "".join(json.dumps({"text": f"row {i}", "prompt": f"Say {i}."}) + "\n" for i in range(3))
    (data / "q.jsonl").write_text(rows)
    (data / "schema.json").write_text(json.dumps(SCHEMA))
    (outside / "secret.jsonl").write_text(rows)
    (outside / "schema.json").write_text(json.dumps(SCHEMA))  # valid: reading it would let a job run
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (data / "schema_link.json").symlink_to(outside / "schema.json")
    (data / "sub").mkdir()
    (data / "sub" / "ok.jsonl").write_text(rows)
    (data / "sub" / "out").symlink_to(outside)  # a directory holding a link out
    (outputs / "link").symlink_to(outside / "target")  # a link out of the output root
    return {"base": base, "data": data, "outputs": outputs, "outside": outside, "cwd": cwd}


@pytest.fixture
def http(served, dirs):
    with httpx.Client(
        base_url=served["url"], headers={"Authorization": f"Bearer {served['key']}"}, timeout=120
    ) as c:
        yield c


def corpus(dirs, tag: str) -> list[tuple[str, list[str], str]]:
    """(the key refused, the job's overrides, what the value is): each must answer 4xx naming the key."""
    data, out, outside = dirs["data"], dirs["outputs"], dirs["outside"]
    home = f"~/sage-escape-{tag}"  # must not appear in $HOME, nor as a "~" dir where the server runs
    chat = ["task=chat", "data=jsonl", f"data.path={data / 'q.jsonl'}", "sampling.max_tokens=4"]
    embed = ["task=embed", "data=jsonl", f"data.path={data / 'q.jsonl'}"]
    schema = "sampling.structured_outputs.json"
    cases = [
        ("data.path", ["task=embed", "data=jsonl", f"data.path={outside / 'secret.jsonl'}"], "absolute, outside"),
        ("data.path", ["task=embed", "data=jsonl", f"data.path={data}/../outside/secret.jsonl"], ".."),
        ("data.path", ["task=embed", "data=jsonl", f"data.path={data / 'link.jsonl'}"], "symlink out"),
        ("data.path", ["task=embed", "data=jsonl", f"data.path={data / '*.jsonl'}"], "glob matching a symlink out"),
        ("data.path", ["task=embed", "data=jsonl", f"data.path={data / 'sub'}"], "dir holding a link out"),
        ("data.path", ["task=embed", "data=jsonl", f"data.path={data}/../*/secret.jsonl"], "glob over .."),
        ("data.path", ["task=embed", "data=jsonl", "data.path=pkg://bible/data/kjv.jsonl"], "pkg://"),
        ("data.path", ["task=embed", "data=jsonl", f"data.path='{home}/q.jsonl'"], "~"),
        ("data.path", ["task=embed", "data=jsonl", "data.path=pkg://antigravity.x/q.jsonl"], "pkg:// of a submodule"),
        ("data.path", ["task=embed"], "the preset's default (pkg://)"),
        ("data.hf_loader", [*embed, "data.format=hf", f"data.hf_loader={outside}"], "a local loading-script dir"),
        ("data.hf_loader", [*embed, "data.format=hf", "data.hf_loader=someone/dataset"], "a Hub dataset"),
        (schema, [*chat, f"{schema}={outside / 'schema.json'}"], "absolute, outside (a valid schema)"),
        (schema, [*chat, f"{schema}={data}/../outside/schema.json"], ".."),
        (schema, [*chat, f"{schema}={data / 'schema_link.json'}"], "symlink out"),
        (schema, [*chat, f"{schema}=pkg://bible/data/kjv.jsonl"], "pkg://"),
        (schema, [*chat, f"{schema}='{home}/schema.json'"], "~"),
        (schema, [*chat, f"{schema}=/etc/passwd"], "/etc/passwd"),
        ("output.dir", [*embed, f"output.dir={outside / 'target' / 'o'}"], "absolute, outside"),
        ("output.dir", [*embed, f"output.dir={out}/../outside/target/o"], ".."),
        ("output.dir", [*embed, f"output.dir={out / 'link' / 'o'}"], "symlink out"),
        ("output.dir", [*embed, "output.dir=pkg://bible/o"], "pkg://"),
        ("output.dir", [*embed, f"output.dir='{home}/o'"], "~"),
        ("output.dir", [*embed, f"output.dir={out}"], "the output root itself"),
        ("output.vector_store.path", [*embed, "output=lancedb", f"output.vector_store.path={outside / 'target'}"],
         "absolute, outside"),
        ("output.vector_store.path", [*embed, "output=faiss", f"output.vector_store.path={out}/../outside/target"],
         ".."),
        ("output.vector_store.path", [*embed, "output=lancedb", f"output.vector_store.path={out / 'link'}"],
         "symlink out"),
        ("output.vector_store.path", [*embed, "output=faiss", "output.vector_store.path=pkg://bible/v"], "pkg://"),
        ("output.vector_store.path", [*embed, "output=lancedb", f"output.vector_store.path='{home}/v'"], "~"),
        ("output.vector_store.table", [*embed, "output=lancedb", "output.vector_store.table=../../../outside/target/t"],
         ".. in the table name"),
        ("output.vector_store.url", [*embed, "output.vector_store.url=postgresql://u@127.0.0.1:1/db"],
         "a database URL"),
        ("output", [*embed, "output=pgvector"], "output=pgvector (a database)"),
        ("output.vector_store.type", [*embed, "output.vector_store.type=pgvector"], "type=pgvector"),
        ("data.path", [*embed, "data.path=${oc.env:HOME}"], "an interpolation"),
        ("output.dir", [*embed, "output.dir=${hydra:runtime.cwd}/o"], "an interpolation"),
        ("executor", [*embed, "executor=ray"], "executor=ray"),
        ("model", [*embed, "model=smollm2-135m-instruct"], "model="),
        ("engine.max_num_seqs", [*embed, "engine.max_num_seqs=2"], "engine.*"),
        ("registry.root", [*embed, f"registry.root={outside}"], "registry.*"),
        ("hydra.run.dir", [*embed, f"hydra.run.dir={outside}"], "hydra.*"),
        ("output.overwrite", [*embed, "output.overwrite=true"], "overwrite"),
        ("new_key", [*embed, "+new_key=1"], "+new key"),
        ("data.limit", [*embed, "~data.limit"], "~ deletion"),
        ("data", [*embed, "data@output=jsonl"], "@package"),
        ("task", ["task=finetune"], "task=finetune"),
        ("sampling.temperature", [*chat, "sampling.temperature=0,1"], "a sweep"),
        ("data.prompt_template", [*chat, "data.prompt_template='{prompt.__class__}'"], "attribute access"),
    ]  # fmt: skip
    return cases


def _jobs(http) -> dict[str, tuple]:
    """Each job the server knows, and when it was last submitted and started: a new job adds an id,
    a resubmitted one changes its times (a finished job's live metrics may change: left out)."""
    return {
        j["id"]: (j["status"], j["submitted_at"], j["started_at"])
        for j in http.get("/v1/jobs").json()["data"]
    }


def test_escape_corpus_answers_4xx_and_touches_nothing(http, dirs, capsys):
    tag = uuid.uuid4().hex[:8]
    outside_before = _snapshot(dirs["outside"])
    outputs_before = _snapshot(dirs["outputs"])
    jobs_before = _jobs(http)  # other modules' finished jobs, on a shared server
    rows = []
    for key, overrides, what in corpus(dirs, tag):
        r = http.post("/v1/jobs", json={"overrides": overrides})
        msg = r.json().get("error", {}).get("message", r.text) if r.headers.get("content-type", "").startswith(
            "application/json") else r.text  # fmt: skip
        rows.append((key, what, r.status_code, msg))
        assert 400 <= r.status_code < 500, (key, overrides, r.status_code, r.text)
        assert key in msg, (key, overrides, msg)
    with capsys.disabled():
        print("\n| key | value | status | message |\n|---|---|---|---|")
        for key, what, status, msg in rows:
            print(f"| `{key}` | {what} | {status} | {msg[:160].replace('|', '/')} |")
    # Nothing was written or changed outside, nor in the output root; no job was started.
    assert _snapshot(dirs["outside"]) == outside_before
    assert _snapshot(dirs["outputs"]) == outputs_before
    assert _jobs(http) == jobs_before
    assert not (Path.home() / f"sage-escape-{tag}").exists()
    assert sorted(p.name for p in dirs["cwd"].iterdir() if p.name in ("~", "pkg:")) == []


def test_jobs_inside_the_roots_run(http, dirs):
    """The control: the same keys, inside the roots, answer 201 and the jobs complete."""
    data, out = dirs["data"], dirs["outputs"]
    chat = ["task=chat", "data=jsonl", f"data.path={data / 'q.jsonl'}", "sampling.max_tokens=24",
            f"sampling.structured_outputs.json={data / 'schema.json'}", f"output.dir={out / 'chat'}"]  # fmt: skip
    embed = ["task=embed", "data=jsonl", f"data.path={data / 'sub' / 'ok.jsonl'}", "output=faiss",
             f"output.dir={out / 'embed'}", f"output.vector_store.path={out / 'vectors'}"]  # fmt: skip
    for overrides, where in ((chat, out / "chat"), (embed, out / "vectors")):
        r = http.post("/v1/jobs", json={"overrides": overrides})
        assert r.status_code == 201, r.text
        done = wait_job(http_jobs(http), r.json()["id"], timeout=240)
        assert done["status"] == "complete" and done["rows_done"] == 3, done
        assert where.is_dir() and any(where.iterdir())
