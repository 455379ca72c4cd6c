"""The engine switches that name no run dir change no rows, checked on the real engine: greedy
chat answers with KV blocks of 32 (what auto gives a sweep) equal those of vLLM's default, token
for token, and a run dir written with one block size is complete for the other (no refusal)."""

from __future__ import annotations

import json

import pytest
from helpers import compose_job, read_output

from sage_vllm_batch.config.schema import ROW_NEUTRAL_KEYS
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import load_engine, resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

CHAT = ("task=chat", "model=smollm2-135m-instruct", "sampling.temperature=0", "sampling.max_tokens=24")
# Prompts longer than one 32-token block, sharing a preamble, so blocks of 32 are reused from
# the prefix cache where vLLM's 128 are not: the cached path is what must give the same tokens.
PREAMBLE = "You answer in one short sentence, plainly, without lists or code, for a curious reader. "
QUESTIONS = ["Why is the sky blue?", "What is a prime number?", "Why do leaves fall?", "What is rain?"]


def _run(tmp_path, registry_root, engine, name: str, *overrides: str):
    src = tmp_path / "rows.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"prompt": PREAMBLE + q}) + "\n" for q in QUESTIONS * 2))
    out = tmp_path / name
    cfg = compose_job(
        *CHAT,
        "data=jsonl",
        f"data.path={src}",
        "data.prompt_template='{prompt}'",
        *overrides,
        out_dir=out,
        registry_root=registry_root,
    )
    point = prepare_point(cfg, model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return cfg, read_output(out)


@pytest.mark.timeout(300)
def test_blocks_of_32_give_the_default_blocks_rows_and_resume_across(chat_engine, registry_root, tmp_path):
    assert "engine.block_size" in ROW_NEUTRAL_KEYS
    _, default = _run(tmp_path, registry_root, chat_engine, "default")
    cfg, _ = _run(tmp_path, registry_root, chat_engine, "probe", "engine.block_size=32")
    small = load_engine(cfg, resolve_model(cfg))
    try:
        assert small.kv_block_size == 32 and chat_engine.kv_block_size != 32
        _, blocks32 = _run(tmp_path, registry_root, small, "b32", "engine.block_size=32")
        # The same output dir, now with blocks of 32: complete already, nothing run again.
        cfg2 = compose_job(
            *CHAT,
            "data=jsonl",
            f"data.path={tmp_path / 'rows.jsonl'}",
            "data.prompt_template='{prompt}'",
            "engine.block_size=32",
            out_dir=tmp_path / "default",
            registry_root=registry_root,
        )
        again = prepare_point(cfg2, model=resolve_model(cfg2))
        again.release()
        assert again.state == "complete" and again.out_dir == tmp_path / "default"
    finally:
        small.close()
    assert default.num_rows == blocks32.num_rows == len(QUESTIONS) * 2
    for col in ("text", "completion_tokens"):
        assert blocks32.column(col).to_pylist() == default.column(col).to_pylist(), col
    assert all(t for t in default.column("text").to_pylist())
