"""Our own logic around samples, structured outputs and logprobs, without an engine: config
checks at start, the answer checks, the output layout and the sweep summary over samples."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from helpers import compose_job

from sage_vllm_batch.config import validate
from sage_vllm_batch.config.structured import Constraint, StructuredOutputError, constraint_of, resolve_config
from sage_vllm_batch.engine.io import EngineResult, Sample, check_structured, to_vllm
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.shards import GenerationLayout, ParquetShardSink, output_schema
from sage_vllm_batch.requests.builder import sampling_dict
from sage_vllm_batch.sweep.summary import output_quality

CHAT = ("task=chat", "model=smollm2-135m-instruct")
SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string", "enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0}},
    "required": ["topic"],
}


def refused(*overrides: str, tmp_path) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose_job(*CHAT, *overrides, out_dir=tmp_path))
    return str(e.value)


def test_values_the_engine_cannot_honour_are_refused_naming_the_key(tmp_path):
    assert refused("sampling.n=3", "sampling.temperature=0", tmp_path=tmp_path).startswith(
        "sampling.n: n=3 needs"
    )
    assert refused("sampling.logprobs=50", tmp_path=tmp_path).startswith("sampling.logprobs: 50 is more than")
    assert "engine.extra.max_logprobs=25" in refused("sampling.prompt_logprobs=25", tmp_path=tmp_path)
    assert refused("sampling.logprobs=-2", tmp_path=tmp_path).startswith("sampling.logprobs: must be >= 0")
    validate(compose_job(*CHAT, "sampling.n=3", "sampling.temperature=1", out_dir=tmp_path))
    validate(compose_job(*CHAT, "sampling.logprobs=30", "+engine.extra.max_logprobs=30", out_dir=tmp_path))


def test_structured_outputs_config_is_checked_at_start_with_the_compilers_message(tmp_path):
    both = refused(
        "sampling.structured_outputs.choice=[a,b]", "sampling.structured_outputs.regex=x", tmp_path=tmp_path
    )
    assert both.startswith("sampling.structured_outputs: set exactly one of") and "choice, regex" in both
    missing = refused(f"sampling.structured_outputs.json={tmp_path}/nope.json", tmp_path=tmp_path)
    assert "no schema file" in missing
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert "is not valid JSON" in refused(f"sampling.structured_outputs.json={bad_json}", tmp_path=tmp_path)
    # jsonschema's own message for a schema that is not one
    msg = refused("sampling.structured_outputs.json={type:objekt}", tmp_path=tmp_path)
    assert "not a valid JSON schema" in msg and "objekt" in msg
    # the grammar compilers' messages (xgrammar, then guidance, as vLLM's auto backend tries them)
    msg = refused("sampling.structured_outputs.grammar='root ::= ('", tmp_path=tmp_path)
    assert "does not compile: xgrammar:" in msg and "guidance:" in msg
    msg = refused("sampling.structured_outputs.regex='a(b'", tmp_path=tmp_path)
    assert "does not compile" in msg
    good = tmp_path / "schema.json"
    good.write_text(json.dumps(SCHEMA))
    cfg = compose_job(*CHAT, f"sampling.structured_outputs.json={good}", out_dir=tmp_path)
    validate(cfg)
    from omegaconf import OmegaConf

    assert sampling_dict(OmegaConf.to_container(cfg.sampling))["structured_outputs"] == {"json": SCHEMA}


def test_resolve_config_and_answer_checks():
    assert resolve_config({"json": None, "choice": None}) is None
    assert resolve_config({"json": '{"type": "string"}'}) == {"json": {"type": "string"}}
    with pytest.raises(StructuredOutputError, match="non-empty list"):
        resolve_config({"choice": []})
    js = Constraint("json", SCHEMA)
    assert js.check('{ "topic": "a", "n": 2 }', "stop") == ('{"topic":"a","n":2}', None)
    assert js.check('{"topic": "a"', "length")[1].startswith("cut by max_tokens")
    assert js.check('{"topic": "a"', "stop")[1].startswith("not valid JSON")
    assert "at n: -1 is less than the minimum" in js.check('{"topic": "a", "n": -1}', "stop")[1]
    ch = constraint_of({"structured_outputs": {"choice": ["yes", "no"]}})
    assert (
        ch.check("yes", "stop") == ("yes", None) and "not one of the choices" in ch.check("maybe", "stop")[1]
    )
    rx = constraint_of({"structured_outputs": {"regex": r"\d+"}})
    assert rx.check("42", "stop") == ("42", None) and rx.check("4x", "stop")[0] is None
    assert constraint_of({"temperature": 0}) is None


def test_check_structured_error_row_keeps_the_text_and_names_the_sample():
    samples = [Sample('{"topic":"a"}', "stop", 5), Sample('{"topic":"a', "length", 8)]
    res = EngineResult(key=0, text=samples[0].text, samples=samples)
    check_structured(res, {"structured_outputs": {"json": SCHEMA}})
    assert res.error.startswith("structured output invalid (json): sample 1: cut by max_tokens")
    assert [s.parsed for s in res.samples] == ['{"topic":"a"}', None] and res.samples[1].text == '{"topic":"a'


def test_to_vllm_gives_each_request_its_own_structured_outputs_params():
    from vllm.sampling_params import StructuredOutputsParams

    shared = StructuredOutputsParams(choice=["x", "y"])
    from sage_vllm_batch.engine.io import EngineRequest

    _, p1, _ = to_vllm(
        EngineRequest(key=0, prompt_token_ids=[1], sampling={"structured_outputs": shared}), "generate"
    )
    _, p2, _ = to_vllm(
        EngineRequest(key=1, prompt_token_ids=[1], sampling={"structured_outputs": {"json": SCHEMA}}),
        "generate",
    )
    assert p1.structured_outputs is not shared and p1.structured_outputs.choice == ["x", "y"]
    assert p2.structured_outputs.json == SCHEMA
    # vLLM's own objects are understood when checking answers (OpenAI response_format maps to them)
    assert constraint_of({"structured_outputs": shared}).kind == "choice"
    assert (
        constraint_of({"structured_outputs": StructuredOutputsParams(json_object=True)}).kind == "json_object"
    )


def _write(tmp_path, layout: GenerationLayout, results: list[EngineResult]):
    schema = output_schema("chat", [], None, layout)
    sink = ParquetShardSink(tmp_path, schema)
    cols = {"id": list(range(len(results))), **layout.columns(results), "error": [r.error for r in results]}
    sink.commit(0, cols)
    return pa.parquet.read_table(tmp_path / "part-000000.parquet")


def test_n1_layout_is_unchanged_and_n3_layout_keeps_every_sample(tmp_path):
    n1 = output_schema("chat", [], None)
    assert [f.name for f in n1] == [
        "id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error",
    ]
    assert n1.field("text").type == pa.string()
    lp = [[{"token_id": 5, "token": "a", "logprob": -0.5, "rank": 1}]]
    good = EngineResult(
        key=0,
        prompt_tokens=3,
        completion_tokens=3,
        samples=[
            Sample("a", "stop", 1, -0.5, lp, "a"),
            Sample("b", "stop", 1, -0.1, lp, "b"),
            Sample("a", "length", 1),
        ],
    )
    bad = EngineResult(key=1, error="null input: column 'prompt' is null")
    layout = GenerationLayout(samples=True, parsed=True, logprobs=True)
    t = _write(tmp_path / "o", layout, [good, bad])
    assert t.schema.field("text").type == pa.list_(pa.string())
    assert t.column("text").to_pylist() == [["a", "b", "a"], None]
    assert t.column("completion_tokens").to_pylist() == [[1, 1, 1], None]
    assert t.column("parsed").to_pylist() == [["a", "b", None], None]
    assert t.column("cumulative_logprob").to_pylist()[0] == [-0.5, -0.1, None]
    assert t.column("logprobs").to_pylist()[0][0] == lp
    # the sweep summary counts every sample of every good row
    q = output_quality(tmp_path / "o")
    assert q == {"mean_completion_tokens": 1.0, "distinct_output_ratio": round(2 / 3, 4)}


def test_editing_the_schema_file_refuses_to_resume_into_mixed_rows(tmp_path):
    from sage_vllm_batch.errors import ResumeError
    from sage_vllm_batch.run.model import ResolvedModel
    from sage_vllm_batch.run.point import prepare_point

    model = ResolvedModel(id="fake/model", revision="1", path="/nowhere")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    args = (*CHAT, "data.limit=2", f"sampling.structured_outputs.json={schema}")
    for want in ("new", "resume"):
        point = prepare_point(compose_job(*args, out_dir=tmp_path / "o"), model=model)
        assert point.state == want
        point.release()  # one writer per directory: the next prepare_point takes over
    schema.write_text(json.dumps({**SCHEMA, "required": ["topic", "n"]}))
    with pytest.raises(ResumeError, match="sampling.structured_outputs.json.required"):
        prepare_point(compose_job(*args, out_dir=tmp_path / "o"), model=model)
