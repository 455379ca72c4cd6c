"""Request building: every bad row becomes an error row with a readable reason (no engine: a fake
tokenizer stands in, since this tests our own logic)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sage_vllm_batch.requests.builder import RequestBuilder


class FakeTok:
    max_model_len = 32

    def encode(self, text):
        return [1] + [ord(c) % 50 + 3 for c in text] + [2]

    def render_chat(self, messages, *, add_generation_prompt=True, chat_template_kwargs=None):
        if messages[-1]["role"] == "assistant" and add_generation_prompt:
            raise ValueError("cannot add a generation prompt after an assistant turn")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text)[:-1]


def builder(task="embed", overlong="error_row", **data):
    t = OmegaConf.create(
        {"type": task, "overlong_prompt": overlong, "add_generation_prompt": True, "chat_template_kwargs": {}}
    )
    d = OmegaConf.create(
        {
            "text_column": "text",
            "prompt_column": "prompt",
            "messages_column": "messages",
            "prompt_template": None,
            "system_prompt": None,
            "sampling_column": None,
            **data,
        }
    )
    return RequestBuilder(t, d, {"temperature": 0.0, "max_tokens": 4}, FakeTok())


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"text": None}, "null input"),
        ({"text": "   "}, "empty input"),
        ({"text": 5}, "non-string input"),
        ({"other": "x"}, "missing column"),
        ({"text": "x" * 60}, "prompt too long"),
        ({"text": "fine", "__bad": "column 'text': expected string, got int 5"}, "bad input"),
    ],
)
def test_embed_bad_rows_become_error_rows(row, reason):
    req = builder().build("k", row)
    assert req.prompt_token_ids is None
    assert req.error.startswith(reason)


def test_embed_good_row_and_truncation_keeps_closing_token():
    assert builder().build(0, {"text": "hi"}).prompt_token_ids == FakeTok().encode("hi")
    ids = builder(overlong="truncate").build(0, {"text": "x" * 60}).prompt_token_ids
    assert len(ids) == FakeTok.max_model_len and ids[-1] == 2 and ids[0] == 1


def test_generate_template_and_missing_template_column():
    b = builder("generate", prompt_template="Q: {question}")
    assert b.build(0, {"question": "why"}).prompt_token_ids == FakeTok().encode("Q: why")
    assert "prompt_template names column 'question'" in b.build(0, {"q": "why"}).error


def test_generate_truncate_leaves_room_for_max_tokens():
    ids = builder("generate", overlong="truncate").build(0, {"prompt": "y" * 60}).prompt_token_ids
    assert len(ids) == FakeTok.max_model_len - 4


@pytest.mark.parametrize(
    "messages,reason",
    [
        ("not json", "bad messages"),
        ([], "bad messages"),
        ([{"role": "user"}], "bad messages"),
        ([{"role": "user", "content": 3}], "bad messages"),
        ([{"role": "assistant", "content": "x"}], "chat template failed"),
    ],
)
def test_chat_bad_messages(messages, reason):
    assert builder("chat").build(0, {"messages": messages}).error.startswith(reason)


def test_chat_from_json_string_and_system_prompt():
    b = builder("chat", system_prompt="be brief")
    ok = b.build(0, {"messages": '[{"role": "user", "content": "hi"}]'})
    assert ok.error is None
    assert ok.prompt_token_ids == FakeTok().render_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )


def test_chat_long_prompt_truncation_keeps_the_tail():
    b = builder("chat", overlong="truncate")
    msgs = [{"role": "user", "content": "z" * 60}]
    full = FakeTok().render_chat(msgs)
    assert b.build(0, {"messages": msgs}).prompt_token_ids == full[-(FakeTok.max_model_len - 4) :]


def test_per_row_sampling_overrides_and_errors():
    b = builder("generate", sampling_column="s")
    assert b.build(0, {"prompt": "a", "s": '{"temperature": 0.5}'}).sampling == {
        "temperature": 0.5,
        "max_tokens": 4,
    }
    assert b.build(0, {"prompt": "a", "s": None}).sampling == {"temperature": 0.0, "max_tokens": 4}
    assert "unknown option(s) temprature" in b.build(0, {"prompt": "a", "s": {"temprature": 1}}).error
    assert b.build(0, {"prompt": "a", "s": "[1]"}).error.startswith("bad sampling options")
    # n > 1 per row needs the job's list layout (sampling.n > 1); then any row may ask for its own n
    assert "needs sampling.n > 1 in the job config" in b.build(0, {"prompt": "a", "s": {"n": 3}}).error
    so = b.build(0, {"prompt": "a", "s": {"structured_outputs": {"choice": ["x"], "regex": "y"}}}).error
    assert so.startswith("bad sampling options: structured_outputs: set exactly one of")
    assert "unknown key(s) jsn" in b.build(0, {"prompt": "a", "s": {"structured_outputs": {"jsn": {}}}}).error
    ok = b.build(0, {"prompt": "a", "s": {"structured_outputs": {"choice": ["x", "y"]}}})
    assert ok.error is None and ok.sampling["structured_outputs"] == {"choice": ["x", "y"]}


def test_per_row_n_with_a_multi_sample_job():
    t = OmegaConf.create(
        {
            "type": "generate",
            "overlong_prompt": "error_row",
            "add_generation_prompt": True,
            "chat_template_kwargs": {},
        }
    )
    d = OmegaConf.create(
        {
            "text_column": "text",
            "prompt_column": "prompt",
            "messages_column": "messages",
            "prompt_template": None,
            "system_prompt": None,
            "sampling_column": "s",
        }
    )
    b = RequestBuilder(t, d, {"temperature": 1.0, "max_tokens": 4, "n": 3}, FakeTok())
    assert b.build(0, {"prompt": "a", "s": {"n": 5}}).sampling["n"] == 5
    assert b.build(0, {"prompt": "a", "s": None}).sampling["n"] == 3


def test_a_row_is_built_by_its_tasks_spec_and_hook():
    from sage_vllm_batch.errors import ConfigError
    from sage_vllm_batch.tasks import SPECS

    for name in ("embed", "generate", "chat"):
        assert builder(name).spec is SPECS[name]
    with pytest.raises(ConfigError, match="task=finetune turns no rows into engine requests"):
        builder("finetune")


def test_a_hook_may_yield_several_requests_of_a_row_which_build_refuses(monkeypatch):
    """A task whose rows make several requests (a document's chunks) has a hook that yields them;
    ``build`` makes one request of one row, and says so rather than dropping any."""
    from sage_vllm_batch.requests import prompts

    def halves(b, row, options):
        text = b.text(row, b.data.text_column)
        yield b.fit(b.engine.encode(text[:2]), keep="ends")
        yield b.fit(b.engine.encode(text[2:]), keep="ends")

    monkeypatch.setitem(prompts.HOOKS, "embed", halves)
    with pytest.raises(ValueError, match="task=embed made 2 requests of one row"):
        builder().build(0, {"text": "abcd"})
    assert builder().build(0, {"text": None}).error.startswith("null input")  # still an error row


@pytest.mark.parametrize("url,body", [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")])
def test_an_openai_batch_body_is_the_request_whatever_the_prompt_template(tmp_path, url, body):
    """The bodies mean what they mean in vLLM: ``data.prompt_template`` does not rewrite them."""
    import json

    from helpers import compose_job

    from sage_vllm_batch.requests.builder import request_builder
    from sage_vllm_batch.sources import open_source

    value = [{"role": "user", "content": "Hi"}] if body == "messages" else "Hi"
    line = {"custom_id": "a", "method": "POST", "url": url, "body": {body: value}}
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n")
    task = "chat" if body == "messages" else "generate"
    cfg = compose_job(
        f"task={task}", "model=smollm2-135m-instruct", "data=openai_batch", f"data.path={tmp_path / 'b.jsonl'}",
        "data.prompt_template='Summarize: {custom_id}'", out_dir=tmp_path / "o",
    )  # fmt: skip
    tok = FakeTok()
    tok.max_model_len = 2048
    (row,) = [r for b in open_source(cfg.data).batches() for r in b.to_pylist()]
    req = request_builder(cfg, tok).build(0, row)
    want = tok.render_chat(value) if body == "messages" else tok.encode("Hi")
    assert req.error is None and req.prompt_token_ids == want
