"""Every one of n samples, structured outputs and logprobs through the real engine (SmolLM2),
on a handful of short prompts."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.engine.io import EngineRequest, check_structured
from sage_vllm_batch.outputs.shards import LEDGER, read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

CHAT = ("task=chat", "model=smollm2-135m-instruct")
PROMPTS = ["Name a fruit.", "Is the sky blue?", "Say a number.", "Name a color."]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "confidence": {"type": "integer"}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def prompts_file(tmp_path, rows=None):
    src = tmp_path / "in.jsonl"
    rows = rows or [{"prompt": p} for p in PROMPTS]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return src


def run(cfg, engine):
    point = prepare_point(cfg, name="p", model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return point


def test_n3_keeps_every_sample_and_resume_keeps_them(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    args = (
        *CHAT, "data=jsonl", "output.passthrough_columns=[prompt]", f"data.path={prompts_file(tmp_path)}", "data.limit=3", "sampling.n=3",
        "sampling.temperature=1.0", "sampling.seed=null", "sampling.max_tokens=6", "output.shard_rows=1",
    )  # fmt: skip
    point = run(compose_job(*args, out_dir=out, registry_root=registry_root), chat_engine)
    t = read_output(out)
    assert t.num_rows == 3 and t.column("error").null_count == 3
    texts, counts = t.column("text").to_pylist(), t.column("completion_tokens").to_pylist()
    assert all(len(x) == 3 and all(isinstance(s, str) and s for s in x) for x in texts)
    assert all(len(f) == 3 and set(f) <= {"stop", "length"} for f in t.column("finish_reason").to_pylist())
    assert all(len(c) == 3 and all(0 < n <= 6 for n in c) for c in counts)
    assert point.metrics.completion_tokens == sum(map(sum, counts))
    assert len({s for x in texts for s in x}) > 3  # the samples are really different draws

    # Kill-like damage: the last shard and its ledger line are gone; a rerun redoes only that row.
    kept = (out / "part-000000.parquet").read_bytes()
    (out / "part-000002.parquet").unlink()
    ledger = (out / LEDGER).read_text().splitlines(keepends=True)
    (out / LEDGER).write_text("".join(x for x in ledger if "part-000002" not in x))
    (out / "_SUCCESS").unlink()
    again = run(compose_job(*args, out_dir=out, registry_root=registry_root), chat_engine)
    assert again.state == "resume" and again.metrics.rows_skipped_resumed == 2 and again.metrics.rows_out == 1
    t2 = read_output(out)
    assert (out / "part-000000.parquet").read_bytes() == kept
    assert t2.column("text").to_pylist()[:2] == texts[:2]
    assert all(len(x) == 3 for x in t2.column("text").to_pylist())


def test_label_preset_every_parsed_value_validates(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job("job=label_humaneval", "data.limit=2", out_dir=out, registry_root=registry_root)
    run(cfg, chat_engine)
    t = read_output(out)
    schema = OmegaConf.to_container(cfg.sampling.structured_outputs.json)
    assert t.column("error").to_pylist() == [None, None]
    for parsed in t.column("parsed").to_pylist():
        jsonschema.validate(json.loads(parsed), schema)


def test_choice_samples_are_in_the_set(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT, "data=jsonl", "output.passthrough_columns=[prompt]", f"data.path={prompts_file(tmp_path)}", "data.limit=2", "sampling.n=3",
        "sampling.temperature=1.0", "sampling.seed=null", "sampling.max_tokens=8",
        "sampling.structured_outputs.choice=[yes,no,maybe]", out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    run(cfg, chat_engine)
    t = read_output(out)
    assert t.column("error").null_count == 2
    for texts, parsed in zip(t.column("text").to_pylist(), t.column("parsed").to_pylist(), strict=True):
        assert len(parsed) == 3 and set(parsed) <= {"yes", "no", "maybe"} and parsed == texts


def test_per_row_constraints_and_truncated_json_becomes_an_error_row(chat_engine, registry_root, tmp_path):
    rows = [
        {
            "prompt": "Is the sky blue? Answer in JSON.",
            "opts": {"structured_outputs": {"json": SCHEMA}, "max_tokens": 40},
        },
        {
            "prompt": "Is the sky blue? Answer in JSON.",
            "opts": {"structured_outputs": {"json": SCHEMA}, "max_tokens": 3},
        },
        {"prompt": "Pick a color.", "opts": {"structured_outputs": {"choice": ["red", "blue"]}}},
        {"prompt": "Say hi.", "opts": None},
    ]
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT, "data=jsonl", "output.passthrough_columns=[prompt]", f"data.path={prompts_file(tmp_path, rows)}", "data.sampling_column=opts",
        "sampling.max_tokens=8", out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    point = run(cfg, chat_engine)
    t = read_output(out)
    err, parsed, text = (t.column(c).to_pylist() for c in ("error", "parsed", "text"))
    assert err[0] is None
    jsonschema.validate(json.loads(parsed[0]), SCHEMA)
    assert err[1].startswith("structured output invalid (json): cut by max_tokens (finish_reason length)")
    assert parsed[1] is None and text[1]  # the cut answer is kept for inspection, never parsed
    assert err[2] is None and parsed[2] in ("red", "blue")
    assert err[3] is None and parsed[3] is None and text[3]
    assert point.metrics.errors_by_reason == {"structured output invalid (json)": 1}


def test_vllm_structured_outputs_params_in_a_sampling_dict(chat_engine):
    """What a request read through vLLM's protocol models carries (e.g. OpenAI response_format)."""
    from vllm.sampling_params import StructuredOutputsParams

    sampling = {
        "temperature": 0.0,
        "max_tokens": 40,
        "structured_outputs": StructuredOutputsParams(json=SCHEMA),
    }
    ids = chat_engine.render_chat([{"role": "user", "content": "Is water wet? Answer in JSON."}])
    (res,) = list(chat_engine.stream([EngineRequest(key=0, prompt_token_ids=ids, sampling=sampling)]))
    res = check_structured(res, sampling)
    assert res.error is None
    jsonschema.validate(json.loads(res.samples[0].parsed), SCHEMA)
    assert sampling["structured_outputs"].json == SCHEMA  # the caller's object is left as it was


def test_logprobs_and_prompt_logprobs(chat_engine, registry_root, tmp_path):
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT, "data=jsonl", "output.passthrough_columns=[prompt]", f"data.path={prompts_file(tmp_path)}", "data.limit=2", "sampling.max_tokens=4",
        "sampling.logprobs=2", "sampling.prompt_logprobs=1", out_dir=out, registry_root=registry_root,
    )  # fmt: skip
    run(cfg, chat_engine)
    t = read_output(out)
    assert t.column("error").null_count == 2
    rows = t.to_pylist()
    for r in rows:
        assert len(r["logprobs"]) == r["completion_tokens"]
        for entries in r["logprobs"]:
            assert sorted(e["rank"] for e in entries if e["rank"] <= 2) == [1, 2]  # k per token
            assert all(e["logprob"] <= 0 and e["token"] is not None for e in entries)
        # the sampled token is first: their logprobs add up to the cumulative logprob
        assert math.isclose(
            sum(p[0]["logprob"] for p in r["logprobs"]), r["cumulative_logprob"], abs_tol=1e-3
        )
        assert len(r["prompt_logprobs"]) == r["prompt_tokens"] and r["prompt_logprobs"][0] == []
        assert all(1 <= len(p) <= 2 and all(e["logprob"] <= 0 for e in p) for p in r["prompt_logprobs"][1:])
