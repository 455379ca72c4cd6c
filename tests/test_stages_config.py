"""task=pipeline's config layer (no engine): the typed ``stages:`` mapping composed by Hydra, its
checks naming the stage and the key, the output columns and fingerprints of a stage, and the
condition language of ``when``, including what it must refuse."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from helpers import compose_job
from hydra.errors import ConfigCompositionException

from sage_vllm_batch.config.conditions import FUNCTIONS, ConditionError, compile_condition
from sage_vllm_batch.config.pipeline import stage_fingerprints
from sage_vllm_batch.config.schema import SamplingConfig, StructuredOutputsConfig, run_dirname
from sage_vllm_batch.config.stages import StageSamplingConfig, StageStructuredOutputsConfig, stage_columns
from sage_vllm_batch.config.validate import validate
from sage_vllm_batch.config.validate_stages import validate_stages
from sage_vllm_batch.errors import ConfigError

PRESET = """\
# @package _global_
defaults:
  - override /task: pipeline
  - override /model: smollm2-135m-instruct
stages:
  answer:
    task: generate
    prompt_template: "Question: {prompt}\\nAnswer:"
  judge:
    task: classify
    prompt_template: "Q: {prompt}\\nA: {answer}\\nIs the answer right?"
    labels: ["yes", "no"]
    when: "len(answer) > 3"
  keep:
    task: embed
    model: minilm-l6-v2
    prompt_template: "{prompt} {answer}"
    when: "judge == 'yes'"
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A user's config dir holding job/qa.yaml (as with --config-dir DIR job=qa)."""
    (tmp_path / "conf" / "job").mkdir(parents=True)
    (tmp_path / "conf" / "job" / "qa.yaml").write_text(PRESET)
    return tmp_path / "conf"


def pipeline(job_dir: Path, *overrides: str, out: Path | None = None):
    return compose_job(f"hydra.searchpath=[file://{job_dir}]", "job=qa", *overrides, out_dir=out or job_dir)


# ---------------------------------------------------------------------------- the schema
@pytest.mark.timeout(120)
def test_a_stage_key_is_overridable_on_the_command_line(job_dir):
    cfg = pipeline(job_dir, "stages.answer.sampling.max_tokens=64", "stages.judge.labels=[good,bad]")
    assert list(cfg.stages) == ["answer", "judge", "keep"]  # the order written
    assert cfg.stages.answer.sampling.max_tokens == 64
    assert cfg.stages.answer.sampling.temperature is None  # unset: the job's
    assert cfg.stages.answer.task == "generate" and cfg.task.type == "pipeline"
    assert list(cfg.stages.judge.labels) == ["good", "bad"]
    conditions = validate_stages(cfg, ["prompt", "task_id"])
    assert conditions["answer"] is None and conditions["keep"]({"judge": "yes"})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "override,needle",
    [
        ("stages.answer.promt_template=x", "stages.answer.promt_template"),
        ("stages.answer.sampling.max_tokns=1", "stages.answer.sampling.max_tokns"),
        ("stages.judge.task=summarize", "expected one of [generate, chat, embed, classify]"),
        ("stages.answer.sampling.max_tokens=lots", "stages.answer.sampling.max_tokens"),
    ],
)
def test_a_typod_stage_key_or_bad_value_fails_at_composition_naming_it(job_dir, override, needle):
    with pytest.raises(ConfigCompositionException) as e:
        pipeline(job_dir, override)
    assert needle in f"{e.value} {e.value.__cause__}"


@pytest.mark.timeout(120)
def test_a_typod_key_in_the_yaml_fails_naming_it(job_dir):
    (job_dir / "job" / "qa.yaml").write_text(PRESET.replace("    labels:", "    lables:"))
    with pytest.raises(Exception, match="lables"):
        pipeline(job_dir)


@pytest.mark.timeout(120)
def test_the_stage_sampling_schema_has_the_job_sampling_keys_all_optional():
    for stage_cls, job_cls in (
        (StageSamplingConfig, SamplingConfig),
        (StageStructuredOutputsConfig, StructuredOutputsConfig),
    ):
        assert [f.name for f in dataclasses.fields(stage_cls)] == [
            f.name for f in dataclasses.fields(job_cls)
        ]
        for f in dataclasses.fields(stage_cls):
            if not dataclasses.is_dataclass(typing.get_type_hints(stage_cls)[f.name]):
                assert f.default is None, f.name


@pytest.mark.timeout(120)
def test_a_pipeline_validates_and_its_output_rules_name_the_key(job_dir):
    validate(pipeline(job_dir))
    with pytest.raises(ConfigError, match="executor.type: a pipeline runs on executor=local"):
        validate(pipeline(job_dir, "executor=ray"))
    with pytest.raises(ConfigError, match="output.vector_store.type: .*exactly one"):
        validate(pipeline(job_dir, "output=faiss", "stages.keep.task=generate", "stages.keep.model=null"))
    with pytest.raises(ConfigError, match="stages.judge.when"):  # the stages are checked first
        validate(pipeline(job_dir, "stages.judge.when='keep is None'"))


@pytest.mark.timeout(120)
def test_stages_belong_to_task_pipeline_only(job_dir):
    with pytest.raises(ConfigError, match="^stages: only task=pipeline"):
        validate(pipeline(job_dir, "task=generate"))


@pytest.mark.timeout(120)
def test_stage_keys_do_not_name_the_run_dir():
    assert run_dirname("stages.answer.sampling.max_tokens=64") == "default"
    assert run_dirname("data.limit=5,stages.judge.when=len(answer) > 3") == "data.limit=5"
    assert run_dirname("stages.a.prompt_template=x\\, y,data.limit=5") == "data.limit=5"


# ---------------------------------------------------------------------------- the checks
BAD = [
    ("stages.judge.when='len(answr) > 3'", "stages.judge.when: no column 'answr'"),
    ("stages.judge.when='answer.__class__'", "stages.judge.when: 'answer.__class__': attribute access"),
    ("stages.judge.when='keep_x == 1'", "stages.judge.when: no column 'keep_x'"),
    (
        "stages.judge.when='keep is None'",
        "stages.judge.when: 'keep' is written by stage 'keep', which runs later",
    ),
    ("stages.judge.when='judge == 1'", "stages.judge.when: 'judge' is this stage's own output"),
    ("stages.answer.prompt_template='{judge}'", "stages.answer.prompt_template: 'judge' is written by stage"),
    (
        "stages.answer.prompt_template='{prompt.x}'",
        "stages.answer.prompt_template: {prompt.x} is not a plain",
    ),
    ("stages.answer.model=gpt5", "stages.answer.model: model=gpt5: no such option; choose one of"),
    (
        "stages.answer.model=minilm-l6-v2",
        "stages.answer.model: a generate stage needs a text-generation model",
    ),
    ("stages.keep.model=null", "stages.keep.model: an embed stage needs an embedding model"),
    ("stages.judge.labels=[yes]", "stages.judge.labels: a classify stage needs at least two labels"),
    ("stages.judge.labels=null", "stages.judge.labels: a classify stage needs at least two labels"),
    ("stages.judge.labels=[a,a]", "stages.judge.labels: labels repeat"),
    ("stages.answer.labels=[a,b]", "stages.answer.labels: labels are for classify stages"),
    (
        "stages.keep.sampling.max_tokens=5",
        "stages.keep.sampling: an embed stage embeds the text and samples nothing",
    ),
    ("stages.judge.sampling.temperature=1", "stages.judge.sampling: a classify stage scores the labels"),
    ("stages.answer.sampling.top_p=2", "stages.answer.sampling.top_p: must be in (0, 1]"),
    ("stages.answer.sampling.n=2", "stages.answer.sampling.n: n=2 needs sampling.temperature > 0"),
    (
        "stages.answer.system_prompt=hi",
        "stages.answer.system_prompt: a system prompt is for chat and classify",
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_stage_fails_naming_the_stage_and_the_key(job_dir, override, message):
    cfg = pipeline(job_dir, override)
    with pytest.raises(ConfigError) as e:
        validate_stages(cfg, ["prompt", "task_id"])
    assert message in str(e.value)


@pytest.mark.timeout(120)
def test_yaml_booleans_as_labels_are_refused_with_the_fix(job_dir):
    (job_dir / "job" / "qa.yaml").write_text(PRESET.replace('["yes", "no"]', "[yes, no]"))
    with pytest.raises(ConfigError, match="quote the labels"):
        validate_stages(pipeline(job_dir))


@pytest.mark.timeout(120)
def test_input_columns_are_checked_when_known(job_dir):
    cfg = pipeline(job_dir)
    validate_stages(cfg)  # the input unknown: {prompt} is taken for an input column
    with pytest.raises(
        ConfigError, match=r"stages.answer.prompt_template: no column 'prompt'.*names here: question"
    ):
        validate_stages(cfg, ["question"])
    with pytest.raises(
        ConfigError, match="stages.answer: its output column 'answer' is also an input column"
    ):
        validate_stages(cfg, ["prompt", "answer"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name,why", [("id", "columns of every output row"), ("if", "keyword"), ("9a", "a letter")]
)
def test_a_stage_name_must_fit_a_column_and_a_condition(job_dir, name, why):
    (job_dir / "job" / "qa.yaml").write_text(PRESET.replace("  keep:", f"  {name!r}:"))
    with pytest.raises(ConfigError, match=f"stages.{name}: .*{why}"):
        validate_stages(pipeline(job_dir))


@pytest.mark.timeout(60)
def test_stage_columns():
    assert stage_columns("answer", "generate") == ["answer", "answer_finish_reason", "answer_tokens"]
    assert stage_columns("reply", "chat") == ["reply", "reply_finish_reason", "reply_tokens"]
    assert stage_columns("judge", "classify") == ["judge", "judge_scores"]
    assert stage_columns("vec", "embed") == ["vec"]


@pytest.mark.timeout(120)
def test_a_stage_fingerprint_changes_with_that_stage_only(job_dir):
    base = stage_fingerprints(pipeline(job_dir))
    assert set(base) == {"answer", "judge", "keep"}
    assert stage_fingerprints(pipeline(job_dir)) == base  # deterministic
    changed = {
        "stages.judge.labels=[good,bad]": {"judge"},
        "stages.judge.when='len(answer) > 5'": {"judge"},
        "stages.judge.system_prompt=strict": {"judge"},
        "stages.answer.prompt_template='Q: {prompt}'": {"answer"},
        "stages.answer.sampling.max_tokens=9": {"answer"},
        "sampling.max_tokens=9": {"answer"},  # the job's sampling under generate (not embed, classify)
        "stages.keep.model=minilm-l6-v2": set(),  # the same model, named
        "model=hub": {"answer", "judge"},  # the job's model: the stages that use it
        "engine.max_in_flight=7": set(),
    }
    for override, stages in changed.items():
        fp = stage_fingerprints(
            pipeline(job_dir, override, "model.id=org/x" if override == "model=hub" else "job_name=x")
        )
        assert {s for s in base if fp[s] != base[s]} == stages, override


# ---------------------------------------------------------------------------- conditions
ROW = {
    "verdict": "yes",
    "label": "maybe",
    "score": 0.7,
    "answer": "A long enough answer, surely.",
    "question": "how do I write sql joins?",
    "flagged": False,
    "n": 3,
    "empty": "",
    "missing": None,
    "tags": ["a", "b"],
}
TRUE = [
    "verdict == 'yes'",
    "label != 'no' and score > 0.5",
    "len(answer) > 20",
    "'sql' in question",
    "not flagged",
    "0.5 < score <= 0.7",
    "verdict == 'no' or n >= 3",
    "lower(upper(verdict)) == 'yes'",
    "label in ('maybe', 'yes')",
    "label in ['maybe']",
    "label not in ('no',)",
    "missing is None",
    "verdict is not None",
    "not empty",
    "not missing",
    "'a' in tags",
    "-n < 0",
    "abs(-2) == 2",
    "int('3') == n",
    "float(score) == 0.7",
    "str(n) == '3'",
    "strip('  x ') == 'x'",
    "startswith(question, 'how') and endswith(question, '?')",
    "True",
    "flagged == False",
    "not (missing > 1)",  # an order comparison with null is false
    "missing not in question",
    "len(missing) is None",  # a function of null is null
]
FALSE = [
    "verdict == 'no'",
    "score > 0.9",
    "len(answer) < 5",
    "'rust' in question",
    "flagged",
    "missing > 1",
    "missing < 1",
    "missing in question",
    "'x' in missing",
    "len(missing) > 0",
    "None",
    "verdict == 'yes' and flagged",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", TRUE)
def test_a_condition_holds(source):
    assert compile_condition(source)(ROW) is True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", FALSE)
def test_a_condition_does_not_hold(source):
    assert compile_condition(source)(ROW) is False


@pytest.mark.timeout(60)
def test_a_condition_names_the_columns_it_reads():
    assert compile_condition("label != 'no' and len(answer) > score").names == {"label", "answer", "score"}
    assert compile_condition("len('x') > 0").names == set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["len(n) > 1", "verdict < 1", "int(verdict) > 0", "-verdict"])
def test_a_row_that_does_not_fit_the_condition_raises_condition_error(source):
    with pytest.raises(ConditionError):
        compile_condition(source)(ROW)


@pytest.mark.timeout(60)
def test_a_missing_column_at_evaluation_raises_condition_error():
    with pytest.raises(ConditionError, match="no column 'nope'"):
        compile_condition("nope == 1")(ROW)


@pytest.mark.timeout(60)
def test_evaluation_neither_parses_nor_evals(monkeypatch):
    """Parsed once, at compile time: a row's evaluation is the tree of closures alone (no
    ``ast.parse``, ``compile`` or ``eval`` per row), so its cost does not grow with the source."""
    import ast
    import builtins

    cond = compile_condition("label != 'no' and score > 0.5 and len(answer) > 20")

    def refuse(*_a, **_k):
        raise AssertionError("a condition parsed or evaluated source at evaluation time")

    monkeypatch.setattr(ast, "parse", refuse)
    monkeypatch.setattr(builtins, "compile", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    assert [cond(ROW) for _ in range(3)] == [cond(ROW)] * 3


ESCAPES = [
    "__import__('os')",
    "__import__('os').system('true')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "open('x')",
    "open('/etc/passwd').read()",
    "eval('1')",
    "exec('import os')",
    "getattr(answer, 'upper')",
    "globals()",
    "vars()",
    "type(answer)",
    "answer.upper()",
    "answer.__len__",
    "len.__self__",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[c for c in answer]",
    "any(c for c in answer)",
    "{c: 1 for c in answer}",
    "{c for c in answer}",
    "f'{answer}'",
    "f'{answer.__class__}'",
    "(x := 1)",
    "answer['__class__']",
    "tags[0]",
    "answer[1:2]",
    "__builtins__",
    "__class__ == 1",
    "'a' * 10**10",
    "2 ** 100000",
    "answer + answer",
    "answer if flagged else verdict",
    "{'a': 1}",
    "{1, 2}",
    "[answer]",
    "(answer,)",
    "len(*tags)",
    "len(x=answer)",
    "len(answer, answer)",
    "b'bytes' == answer",
    "... == 1",
    "1j == 1",
    "~n",
    "import os",
    "x = 1",
    "1; 2",
    "yield 1",
    "await answer",
    "lower",
    "lower(answer).__class__",
    "verdict is 'yes'",
    "",
    "   ",
    "(" * 300 + "1" + ")" * 300,
    "not " * 2000 + "flagged",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ESCAPES, ids=[s[:40] for s in ESCAPES])
def test_escape_attempts_are_refused_when_the_condition_is_checked(source):
    if source == "lower":  # a bare name reads a column named lower: no call, nothing to escape
        assert compile_condition(source).names == {"lower"}
        return
    with pytest.raises(ConfigError, match=r"^stages\.s\.when: "):
        compile_condition(source, key="stages.s.when")


@pytest.mark.timeout(60)
def test_the_functions_are_a_closed_list():
    assert set(FUNCTIONS) == {
        "len",
        "lower",
        "upper",
        "strip",
        "startswith",
        "endswith",
        "str",
        "int",
        "float",
        "abs",
        "score",
    }
    score = compile_condition("score(judge_scores, 'yes') >= 0.25")
    assert score({"judge_scores": [("yes", 0.3), ("no", 0.7)]})  # a map as Arrow gives it
    assert not score({"judge_scores": {"yes": 0.1, "no": 0.9}}) and not score({"judge_scores": None})
    with pytest.raises(ConditionError, match="score"):
        score({"judge_scores": 3})


@pytest.mark.timeout(120)
def test_a_stage_sampling_is_the_job_sampling_under_the_stage_keys(job_dir):
    from sage_vllm_batch.config.stages import stage_sampling

    cfg = pipeline(
        job_dir,
        "sampling.temperature=0.5",
        "sampling.structured_outputs.choice=[a,b]",
        "stages.answer.sampling.max_tokens=9",
        "stages.answer.sampling.structured_outputs.regex='[0-9]+'",
    )
    s = stage_sampling(cfg.sampling, cfg.stages.answer)
    assert (s.temperature, s.max_tokens, s.seed) == (0.5, 9, 0)
    # A constraint set on the stage replaces the job's whole (one constraint at a time).
    assert s.structured_outputs.regex == "[0-9]+" and s.structured_outputs.choice is None
    judge = stage_sampling(cfg.sampling, cfg.stages.judge)
    assert judge.max_tokens == 128 and list(judge.structured_outputs.choice) == ["a", "b"]
    assert cfg.sampling.max_tokens == 128  # the job's own is untouched
