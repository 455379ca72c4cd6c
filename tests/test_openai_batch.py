"""`vllm run-batch` files in and out: bodies read through vLLM's own OpenAI request models, and
the OpenAI batch output file written from the committed shards."""

from __future__ import annotations

import json

import pytest
from helpers import compose_job
from test_requests import FakeTok

from sage_vllm_batch.requests.builder import request_builder
from sage_vllm_batch.sources import open_source

# vLLM's examples/offline_inference/openai_batch/openai_example_batch.jsonl
VLLM_EXAMPLE = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_completion_tokens": 1000}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_completion_tokens": 1000}}
"""
CHAT = ("task=chat", "model=smollm2-135m-instruct", "data=openai_batch")
EMBED = ("task=embed", "model=minilm-l6-v2", "data=openai_batch")
CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _chat_line(cid, model=CHAT_MODEL, **body):
    return json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "Hi"}], **body},
        }
    )


def _embed_line(cid, text, model=EMBED_MODEL, **body):
    return json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": text, **body},
        }
    )


def _requests(tmp_path, lines, *overrides, job=CHAT):
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_job(*job, f"data.path={path}", *overrides, out_dir=tmp_path / "o")
    tok = FakeTok()
    tok.max_model_len = 2048
    builder = request_builder(cfg, tok)
    rows = [r for b in open_source(cfg.data).batches() for r in b.to_pylist()]
    return [builder.build(i, r) for i, r in enumerate(rows)]


def test_bodies_mean_what_they_mean_in_vllm(tmp_path):
    a, b, c, d = _requests(
        tmp_path,
        [
            _chat_line("a", max_completion_tokens=7),
            _chat_line("b", max_tokens=5, temperature=0.5, stop=["x"], seed=3),
            _chat_line("c", response_format={"type": "json_object"}),
            _chat_line("d"),
        ],
    )
    assert [r.error for r in (a, b, c, d)] == [None] * 4
    assert a.params.max_tokens == 7
    assert (b.params.max_tokens, b.params.temperature, b.params.stop, b.params.seed) == (5, 0.5, ["x"], 3)
    assert c.params.structured_outputs is not None and c.params.structured_outputs.json_object
    # Unset fields take the job's sampling config, as a server's default sampling parameters.
    assert (d.params.max_tokens, d.params.temperature) == (128, 0.0)


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"best_of_all": 3}, "unknown option(s) best_of_all"),
        ({"temperature": "hot"}, "bad request: 1 validation error"),
        ({"n": 2}, "n=2 is not supported"),
        ({"stream": True}, "stream=True is not supported"),
        ({"logprobs": True}, "logprobs=True is not supported"),
    ],
)
def test_bad_or_unsupported_fields_become_error_rows(tmp_path, body, needle):
    (req,) = _requests(tmp_path, [_chat_line("x", **body)])
    assert req.params is None and needle in req.error


def test_a_model_that_is_not_served_is_an_error_row_unless_any_model(tmp_path):
    lines = [_chat_line("a"), _chat_line("b", model="NonExistModel"), _chat_line("c", model=None)]
    a, b, c = _requests(tmp_path, lines)
    assert a.error is None and c.error is None  # the served id, or no model: the served one
    assert "the model `NonExistModel` does not exist here" in b.error and "data.any_model=true" in b.error
    assert [r.error for r in _requests(tmp_path, lines, "data.any_model=true")] == [None] * 3


def test_embeddings_lines_are_validated_by_vllms_embedding_request(tmp_path):
    lines = [
        _embed_line("a", "a cat"),
        _embed_line("b", "a dog", model="NonExistModel"),
        _embed_line("c", "x", dimensions=8),
        _embed_line("d", "x", encoding_format="base64"),
        _embed_line("e", "x", colour="red"),
        _chat_line("f", model=EMBED_MODEL),
        _embed_line("g", ["two", "inputs"]),
    ]
    a, b, c, d, e, f, g = _requests(tmp_path, lines, job=EMBED)
    assert a.error is None and a.prompt_token_ids
    assert "`NonExistModel` does not exist" in b.error
    assert "dimensions is not supported" in c.error
    assert "encoding_format='base64' is not supported" in d.error
    assert "unknown option(s) colour" in e.error
    assert "not an embeddings request" in f.error
    assert "body.input is a list" in g.error


def test_output_file_needs_an_openai_batch_input(tmp_path):
    from sage_vllm_batch.config import validate
    from sage_vllm_batch.errors import ConfigError

    cfg = compose_job("task=chat", "model=smollm2-135m-instruct", "output=openai_batch", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="output.openai_batch"):
        validate(cfg)


@pytest.mark.engine
def test_vllm_example_batch_file_answered_in_full_and_resumable(chat_engine, registry_root, tmp_path):
    from openai.types.chat import ChatCompletion
    from test_engine_chat import run_points

    from sage_vllm_batch.outputs.shards import LEDGER, read_output

    src = tmp_path / "openai_example_batch.jsonl"
    src.write_text(VLLM_EXAMPLE)
    out = tmp_path / "out"
    cfg = compose_job(
        *CHAT,
        f"data.path={src}",
        "output=openai_batch",
        "output.shard_rows=1",
        "data.any_model=true",  # the example names Llama 3
        out_dir=out,
        registry_root=registry_root,
    )
    run_points([cfg], chat_engine)
    t = read_output(out)
    assert t.column("error").to_pylist() == [None, None]
    assert t.column("finish_reason").to_pylist() == ["stop", "stop"]  # answered in full

    first = (out / "openai_batch_output.jsonl").read_text()
    lines = [json.loads(x) for x in first.splitlines()]
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2"]
    for x, text in zip(lines, t.column("text").to_pylist(), strict=True):
        assert set(x) == {"id", "custom_id", "response", "error"} and x["error"] is None
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"]
        body = ChatCompletion.model_validate(x["response"]["body"])
        assert body.choices[0].message.content == text and body.choices[0].finish_reason == "stop"
        assert body.usage.completion_tokens > 0

    # A crash after the first shard: the rerun redoes only the second and writes the same file.
    ledger = [x for x in (out / LEDGER).read_text().splitlines() if json.loads(x)["chunk"] == 0]
    (out / LEDGER).write_text(ledger[0] + "\n")
    for name in ("_SUCCESS", "openai_batch_output.jsonl"):
        (out / name).unlink()
    (point,) = run_points([cfg], chat_engine)
    assert point.state == "resume" and point.metrics.rows_in == 1
    again = (out / "openai_batch_output.jsonl").read_text().splitlines()
    assert again[0] == first.splitlines()[0]  # the first shard's line is not rebuilt differently
    redone = json.loads(again[1])
    assert (redone["id"], redone["custom_id"]) == (lines[1]["id"], "request-2")  # ids derive from the run
    assert ChatCompletion.model_validate(redone["response"]["body"]).choices[0].finish_reason == "stop"


@pytest.mark.engine
def test_embeddings_batch_file_gives_vllms_embedding_responses(embed_engine, registry_root, tmp_path):
    from test_engine_chat import run_points
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse

    from sage_vllm_batch.outputs.shards import read_output

    src = tmp_path / "embed.jsonl"
    src.write_text(
        "\n".join([_embed_line("a", "a cat"), _embed_line("b", "a dog", model="NonExistModel")]) + "\n"
    )
    out = tmp_path / "out"
    cfg = compose_job(
        *EMBED, f"data.path={src}", "output=openai_batch", out_dir=out, registry_root=registry_root
    )
    run_points([cfg], embed_engine)
    vectors = read_output(out).column("embedding").to_pylist()
    a, b = [
        BatchRequestOutput.model_validate_json(x)
        for x in (out / "openai_batch_output.jsonl").read_text().splitlines()
    ]
    assert (a.custom_id, a.error, a.response.status_code) == ("a", None, 200)
    body = EmbeddingResponse.model_validate(a.response.body.model_dump())
    assert body.model == EMBED_MODEL and body.usage.prompt_tokens > 0
    assert (
        body.data[0].embedding == pytest.approx(vectors[0], abs=1e-6) and len(body.data[0].embedding) == 384
    )
    assert (
        b.custom_id == "b" and b.response.status_code == 400 and "`NonExistModel` does not exist" in b.error
    )


@pytest.mark.engine
def test_empty_batch_file_gives_an_empty_output_and_exit_0(registry_root, tmp_path):
    from helpers import run_cli

    src = tmp_path / "empty.jsonl"
    src.write_text("")
    out = tmp_path / "out"
    proc = run_cli(
        "task=chat", "model=smollm2-135m-instruct", "data=openai_batch", f"data.path={src}", "output=openai_batch",
        f"output.dir={out}", f"registry.root={registry_root}", "engine.kv_cache_memory_bytes=268435456",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "openai_batch_output.jsonl").read_text() == "" and (out / "_SUCCESS").exists()
