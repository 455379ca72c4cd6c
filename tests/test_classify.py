"""task=classify through the real vLLM engine (SmolLM2-135M-Instruct, the session's chat engine):
one forward pass per row, the labels' first-token logprobs normalised over the labels."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from helpers import compose_job, read_output

from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.requests.classify import LabelScorer, label_variants
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

CLASSIFY = ("task=classify", "model=smollm2-135m-instruct")
PROMPTS = [
    "Is the sky blue? Answer yes or no.",
    "Is fire cold? Answer yes or no.",
    "Do fish live in water? Answer yes or no.",
    "Is two bigger than ten? Answer yes or no.",
]


def write_rows(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def run_job(tmp_path, registry_root, engine, *overrides, prompts=PROMPTS):
    src = write_rows(tmp_path / "rows.jsonl", prompts)
    out = tmp_path / "out"
    cfg = compose_job(
        *CLASSIFY, "data=jsonl", f"data.path={src}", *overrides, out_dir=out, registry_root=registry_root
    )
    point = prepare_point(cfg, model=resolve_model(cfg))
    run_on_engine([point], engine, progress="none")
    return read_output(out)


def reference(engine, prompt, scorer):
    """Label probabilities computed independently: each label token's logprob read as a *prompt*
    logprob of the rendered prompt followed by that token (vLLM's full distribution, no
    logprob_token_ids), then log-sum-exp per label and softmax over the labels."""
    from vllm import SamplingParams
    from vllm.inputs import tokens_input

    ids = engine.render_chat([{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = engine.llm.generate([tokens_input(ids + [t]) for t in scorer.token_ids], params, use_tqdm=False)
    lps = {t: o.prompt_logprobs[-1][t].logprob for t, o in zip(scorer.token_ids, outs, strict=True)}
    return scorer.probabilities(lps)


@pytest.mark.timeout(300)
def test_scores_sum_to_one_top_is_argmax_and_match_vllms_full_logprobs(chat_engine, registry_root, tmp_path):
    t = run_job(tmp_path, registry_root, chat_engine)
    assert t.num_rows == len(PROMPTS) and t.column("error").null_count == len(PROMPTS)
    assert t.schema.field("label_scores").type == pa.map_(pa.string(), pa.float64())
    assert t.schema.field("label").type == pa.string()
    scorer = LabelScorer(["yes", "no"], chat_engine.encode)
    for prompt, label, scores, n in zip(
        PROMPTS,
        t.column("label").to_pylist(),
        t.column("label_scores").to_pylist(),
        t.column("prompt_tokens").to_pylist(),
        strict=True,
    ):
        scores = dict(scores)
        assert list(scores) == ["yes", "no"]
        assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-9)
        assert label == max(scores, key=scores.get)
        assert n == len(chat_engine.render_chat([{"role": "user", "content": prompt}]))
        ref = reference(chat_engine, prompt, scorer)
        for k in scores:
            assert abs(scores[k] - ref[k]) < 1e-3, (prompt, scores, ref)
    # (SmolLM2-135M is too small to be right: it leans to "No" even for the sky; only the
    # arithmetic of the scores is checked here.)


@pytest.mark.timeout(120)
def test_variants_and_collisions(chat_engine):
    assert label_variants("yes") == ["yes", "Yes", " yes", " Yes"]
    s = LabelScorer(["yes", "no", "maybe"], chat_engine.encode)
    assert all(len(set(v)) == len(v) >= 1 for v in s.tokens.values())
    assert s.sampling["max_tokens"] == 1 and s.sampling["logprob_token_ids"] == s.token_ids
    with pytest.raises(ConfigError, match=r"labels 'yes' and 'Yes' start with the same token \(id \d+"):
        LabelScorer(["yes", "Yes"], chat_engine.encode)
    with pytest.raises(ConfigError, match="at least 2 labels"):
        LabelScorer(["yes"], chat_engine.encode)
    with pytest.raises(ConfigError, match="duplicate label"):
        LabelScorer(["no", "yes", "no"], chat_engine.encode)


@pytest.mark.timeout(120)
def test_colliding_labels_are_refused_at_start(chat_engine, registry_root, tmp_path):
    # "Not sure" and "Not at all" both start with the token "Not".
    with pytest.raises(ConfigError, match=r"labels 'Not sure' and 'Not at all' start with the same token"):
        run_job(tmp_path, registry_root, chat_engine, "task.labels=['Not sure','Not at all']")
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.timeout(120)
def test_a_too_long_prompt_is_an_error_row(chat_engine, registry_root, tmp_path):
    long = "yes " * (chat_engine.max_model_len + 10)
    t = run_job(tmp_path, registry_root, chat_engine, prompts=[PROMPTS[0], long, PROMPTS[2]])
    errors = t.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("prompt too long")
    assert t.column("label").to_pylist()[1] is None and t.column("label_scores").to_pylist()[1] is None
    assert t.column("label").to_pylist()[0] in ("yes", "no")


def fake_encode(text: str) -> list[int]:
    """A toy tokenizer: BOS (0), then one token per word, a leading space its own mark."""
    vocab = {"yes": 1, "Yes": 2, " yes": 3, " Yes": 4, "no": 5, "No": 6, " no": 7, " No": 8}
    return [0] + ([vocab.get(text, 100 + len(text))] if text else [])


@pytest.mark.timeout(10)
def test_the_rule_log_sum_exp_over_variants_then_softmax_over_labels():
    s = LabelScorer(["yes", "no"], fake_encode)
    assert s.tokens == {"yes": (1, 2, 3, 4), "no": (5, 6, 7, 8)} and s.token_ids == list(range(1, 9))
    lp = {1: math.log(0.1), 2: math.log(0.2), 3: math.log(0.05), 4: math.log(0.05), 6: math.log(0.3)}
    p = s.probabilities(lp)  # yes: 0.4, no: 0.3 (tokens 5, 7, 8 missing: impossible)
    assert p["yes"] == pytest.approx(0.4 / 0.7) and p["no"] == pytest.approx(0.3 / 0.7)
    assert s.probabilities({}) == {"yes": 0.5, "no": 0.5}  # nothing known: uniform


@pytest.mark.timeout(60)
def test_the_config_check_refuses_bad_labels_before_any_engine(tmp_path):
    from sage_vllm_batch.config.validate import validate

    for labels, msg in (("[a]", "at least 2 labels"), ("[a,b,a]", "duplicate label"), ("[a,' ']", "blank")):
        cfg = compose_job(*CLASSIFY, f"task.labels={labels}", out_dir=tmp_path / "o")
        with pytest.raises(ConfigError, match=msg):
            validate(cfg)
    validate(compose_job(*CLASSIFY, out_dir=tmp_path / "o"))  # the default labels: yes, no
