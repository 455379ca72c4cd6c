"""What a run's output dir holds besides its shards, on every path that runs or finds a point:
derived outputs (``openai_batch_output.jsonl``) rebuilt when a complete point lacks them, and the
schema's enum values written as the plain strings they always were, so old dirs still resume.
A fake engine stands in for vLLM (test_runner_logic.py's): this is the runner's own logic."""

from __future__ import annotations

import json

import pytest
import yaml
from fake_engine import Crash, FakeEngine
from helpers import compose_job, read_output
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from test_runner_logic import MODEL

from sage_vllm_batch.outputs.files import CONFIG, MANIFEST, OPENAI_BATCH_OUTPUT
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.point import job_manifest, prepare_point
from sage_vllm_batch.sources import open_source
from sage_vllm_batch.sweep.fused import run_sweep


def _embed_batch(tmp_path, n=3):
    path = tmp_path / "batch.jsonl"
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": f"text {i}"}}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_sweep_rebuilds_the_batch_file_a_complete_point_lacks(tmp_path):
    out = tmp_path / "out"
    cfg = compose_job(
        "task=embed", "data=openai_batch", f"data.path={_embed_batch(tmp_path)}", "output=openai_batch",
        "engine.in_process=true", out_dir=out,
    )  # fmt: skip
    run_on_engine([prepare_point(cfg, model=MODEL)], FakeEngine(), progress="none")
    written = (out / OPENAI_BATCH_OUTPUT).read_text()
    assert [json.loads(x)["custom_id"] for x in written.splitlines()] == ["c0", "c1", "c2"]
    (out / OPENAI_BATCH_OUTPUT).unlink()

    # What the fused launcher does for each point (prepare_point inside Hydra's run_job), then the
    # sweep over them: a complete point loads no engine, and gets its file back, the same lines.
    point = prepare_point(cfg, name="p0", model=MODEL)
    assert point.state == "complete"
    ret = JobReturn(overrides=["data.limit=3"], status=JobStatus.COMPLETED)
    run_sweep([(ret, point)], sweep_dir=tmp_path / "sweep", summary=False)
    assert ret.status == JobStatus.COMPLETED and ret.return_value["status"] == "complete"
    assert (out / OPENAI_BATCH_OUTPUT).read_text() == written


def _job(corpus, out, *extra):
    return compose_job(
        "data=jsonl", f"data.path={corpus}", "data.limit=null", "output.shard_rows=10",
        "task.overlong_prompt=truncate", "engine.in_process=true", *extra, out_dir=out,
    )  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"verse {i}"}) + "\n" for i in range(25)))
    return path


def test_enum_values_are_plain_strings_on_disk_and_a_dir_of_the_string_schema_resumes(corpus, tmp_path):
    out = tmp_path / "out"
    cfg = _job(corpus, out)
    with pytest.raises(Crash):
        run_on_engine([prepare_point(cfg, model=MODEL)], FakeEngine(crash_after=20), progress="none")
    manifest = json.loads((out / MANIFEST).read_text())
    assert {
        k: manifest["config"][k] for k in ("task.type", "task.overlong_prompt", "data.format", "model.type")
    } == {
        "task.type": "embed",
        "task.overlong_prompt": "truncate",
        "data.format": "jsonl",
        "model.type": "embedding",
    }
    written = yaml.safe_load((out / CONFIG).read_text())  # safe_load: a Python tag would fail it
    assert (written["task"]["type"], written["mode"], written["progress"], written["executor"]["type"]) == (
        "embed", "run", "none", "local",
    )  # fmt: skip

    # The manifest a string-typed schema wrote: the same job with every value a plain string.
    plain = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))
    assert type(plain.task.type) is str
    old = job_manifest(plain, MODEL, open_source(plain.data), runtime=manifest["runtime"], out_dir=out)
    assert (old["config"], old["config_hash"]) == (manifest["config"], manifest["config_hash"])
    (out / MANIFEST).write_text(json.dumps(old, indent=1))
    (out / CONFIG).write_text(OmegaConf.to_yaml(plain))

    point = prepare_point(_job(corpus, out), model=MODEL)  # not refused
    assert point.state == "resume" and point.committed
    run_on_engine([point], FakeEngine(), progress="none")
    assert read_output(out).column("id").to_pylist() == list(range(25))
    assert json.loads((out / "metrics.json").read_text())["task"] == "embed"
