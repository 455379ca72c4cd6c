"""A pipeline's own logic on stand-in engines (the real engines: tests/test_pipeline.py): memory
stays bounded whatever the input's size, and a failing stage stops the others with its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_engine import Crash, FakeEngine
from helpers import compose_job, read_output

from sage_vllm_batch.config import validate
from sage_vllm_batch.run import pipeline as pipeline_mod
from sage_vllm_batch.run.pipeline import run_pipeline

PRESET = """\
# @package _global_
defaults:
  - override /task: pipeline
  - override /model: smollm2-135m-instruct
  - override /data: jsonl
stages:
  answer:
    task: generate
    prompt_template: "Q: {q}"
  vec:
    task: embed
    model: minilm-l6-v2
    prompt_template: "{answer}"
    when: "len(answer) > 0"
"""


def _job(tmp_path: Path, registry_root: Path, rows: int, *overrides: str):
    conf = tmp_path / "conf" / "job"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "two.yaml").write_text(PRESET)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}"}) + "\n" for i in range(rows)))
    cfg = compose_job(
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "job=two", f"data.path={data}", *overrides,
        out_dir=tmp_path / "out", registry_root=registry_root,
    )  # fmt: skip
    validate(cfg)
    return cfg


@pytest.mark.timeout(300)
def test_memory_stays_bounded_whatever_the_input_size(tmp_path, registry_root, monkeypatch):
    rows, shard, window = 400, 2, 4
    cfg = _job(tmp_path, registry_root, rows, f"output.shard_rows={shard}", f"engine.max_in_flight={window}")
    engines = {
        "generate": FakeEngine("generate", max_in_flight=window),
        "pooling": FakeEngine("pooling", max_in_flight=window),
    }
    live, waiting = [], []
    commit = pipeline_mod.Pipeline._commit_final

    def watched(self, chunk):
        live.append(len(self._live))  # chunks read and not yet written out
        waiting.append(max(len(st.source._waiting) for st in self.stages))
        commit(self, chunk)

    monkeypatch.setattr(pipeline_mod.Pipeline, "_commit_final", watched)
    metrics = run_pipeline(
        cfg, engines=lambda stage: engines["pooling" if stage.task.type == "embed" else "generate"]
    )
    out = read_output(tmp_path / "out")  # each row once, in input order
    assert out.column("id").to_pylist() == list(range(rows))
    assert out.column("answer").null_count == 0 and out.column("vec").null_count == 0
    assert metrics["stages"]["vec"]["rows_out"] == rows
    # The bound: stages x (max_in_flight / shard_rows + 2) chunks, here 8 of the input's 200.
    bound = 2 * (window // shard + 2)
    assert len(live) == rows // shard and max(live) <= bound
    assert max(waiting) <= bound
    assert len(engines["generate"].ran) == rows == len(engines["pooling"].ran)


@pytest.mark.timeout(120)
def test_a_failing_stage_stops_the_others_and_its_error_is_raised(tmp_path, registry_root):
    cfg = _job(tmp_path, registry_root, 40, "output.shard_rows=4")
    engines = {"generate": FakeEngine("generate"), "pooling": FakeEngine("pooling", crash_after=10)}
    with pytest.raises(Crash):
        run_pipeline(
            cfg, engines=lambda stage: engines["pooling" if stage.task.type == "embed" else "generate"]
        )
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    # What was committed stays: the rerun takes the first stage's shards as they are.
    answered = len((tmp_path / "out" / "_stages" / "answer" / "_ledger.jsonl").read_text().splitlines())
    engines = {"generate": FakeEngine("generate"), "pooling": FakeEngine("pooling")}
    run_pipeline(cfg, engines=lambda stage: engines["pooling" if stage.task.type == "embed" else "generate"])
    assert len(engines["generate"].ran) == 40 - 4 * answered
    assert read_output(tmp_path / "out").column("id").to_pylist() == list(range(40))
