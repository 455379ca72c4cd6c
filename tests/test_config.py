"""Config composition and validation (no engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.config import run_dirname, validate
from sage_vllm_batch.errors import ConfigError

CONF = ROOT / "conf"
# Every option of every config group, found in conf/ (conf/job is the presets of jobs/: below).
OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF.iterdir()
    if group.is_dir() and group.name != "job"
    for option in group.glob("*.yaml")
)
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml"))


def _mandatory(node: object, prefix: str) -> list[str]:
    """The keys of an option file left ``???`` (the user must set them, e.g. ``data.path``)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() if key != "defaults" for k in _mandatory(v, f"{prefix}.{key}")]
    return [prefix] if node == "???" else []


def test_the_conf_directory_is_found():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "engine", "sampling", "task", "data", "output", "executor"} <= groups
    assert len(OPTIONS) > 20 and JOBS


def test_default_job_composes_and_validates(tmp_path):
    cfg = compose_job(out_dir=tmp_path)
    validate(cfg)
    assert cfg.task.type == "embed"
    assert cfg.model.type == "embedding"
    assert cfg.data.path == "pkg://bible/data/kjv.jsonl"
    assert cfg.engine.gpu_memory_utilization == pytest.approx(0.3)
    assert cfg.engine.compile == "auto" and cfg.engine.enforce_eager is None  # engine.compile decides


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option, tmp_path):
    path: Path = CONF / group / f"{option}.yaml"
    required = _mandatory(yaml.safe_load(path.read_text()) or {}, group)
    cfg = compose_job(f"{group}={option}", *(f"{key}=x" for key in required), out_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert OmegaConf.select(cfg, group) is not None


@pytest.mark.parametrize("job", JOBS, ids=[f"job={j}" for j in JOBS])
def test_every_job_preset_composes_and_validates(job, tmp_path):
    cfg = compose_job(f"job={job}", out_dir=tmp_path)
    validate(cfg)


def test_chat_task_picks_its_example_data(tmp_path):
    cfg = compose_job("task=chat", "model=smollm2-135m-instruct", out_dir=tmp_path)
    validate(cfg)
    assert cfg.data.path.endswith("HumanEval.jsonl.gz")
    assert "{prompt}" in cfg.data.prompt_template


def test_embed_with_a_text_model_is_refused_naming_the_fix(tmp_path):
    cfg = compose_job("model=smollm2-135m-instruct", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="model=minilm-l6-v2"):
        validate(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampling.top_p=0", "sampling.top_p"),
        ("data.shard_index=3", "data.shard_index"),
    ],
)
def test_cross_field_rules_name_the_key(override, key, tmp_path):
    cfg = compose_job("task=chat", "model=smollm2-135m-instruct", override, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


# Keys that take one of a fixed set of strings (StrEnum fields of the schema).
FIXED_SETS = [
    ("task.overlong_prompt=cut", "error_row, truncate"),
    ("task.type=rerank", "embed, generate, chat, classify, finetune"),
    ("data.format=xml", "auto, parquet, jsonl, csv, hf, openai_batch, documents"),
    ("model.type=vision", "text, embedding"),
    ("output.vector_store.type=milvus", "lancedb, faiss, pgvector"),
    ("executor.type=k8s", "local, ray"),
    ("mode=go", "run, plan, serve, search"),
    ("progress=loud", "auto, bar, json, none"),
    ("task.finetune.strategy=adapter", "lora, qlora, full"),
]


@pytest.mark.parametrize("override,choices", FIXED_SETS, ids=[o for o, _ in FIXED_SETS])
def test_a_value_outside_a_fixed_set_fails_when_the_override_is_applied(override, choices, tmp_path):
    task = ("task=finetune",) if override.startswith("task.finetune.") else ()
    with pytest.raises(Exception) as e:
        compose_job(*task, override, out_dir=tmp_path)
    key, _, value = override.partition("=")
    text = f"{e.value} {e.value.__cause__}"
    assert key in text and f"Invalid value '{value}', expected one of [{choices}]" in text


def test_a_fixed_set_key_compares_prints_and_is_written_as_its_string(tmp_path):
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "task.overlong_prompt=truncate", out_dir=tmp_path
    )
    validate(cfg)
    t = cfg.task
    assert t.type == "chat" and t.type != "embed" and t.type in ("generate", "chat")
    assert (f"{t.type}", str(t.overlong_prompt), cfg.job_name) == ("chat", "truncate", "test")
    assert {"chat": 1}[t.type] == 1 and isinstance(cfg.data.format, str)
    plain = yaml.safe_load(OmegaConf.to_yaml(cfg))  # config.yaml: no Python tags
    assert (plain["task"]["type"], plain["mode"], plain["model"]["type"]) == ("chat", "run", "text")
    assert json.loads(json.dumps(OmegaConf.to_container(cfg.task)))["overlong_prompt"] == "truncate"


@pytest.mark.parametrize("value", ["auto", "true", "false", "True"])
def test_engine_in_process_keeps_taking_booleans(value, tmp_path):
    cfg = compose_job(f"engine.in_process={value}", out_dir=tmp_path)
    validate(cfg)
    assert str(cfg.engine.in_process).lower() == value.lower()


def test_a_config_made_by_hand_is_checked_by_validate_naming_the_choices(tmp_path):
    """Configs built without the schema (the service's, a notebook's) hold plain strings."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose_job(out_dir=tmp_path), resolve=True))
    cfg.task.overlong_prompt = "cut"
    with pytest.raises(
        ConfigError, match=r"task\.overlong_prompt: must be one of error_row, truncate, got 'cut'"
    ):
        validate(cfg)
    cfg.task.overlong_prompt, cfg.task.type = "truncate", "rerank"
    with pytest.raises(
        ConfigError, match=r"task\.type: must be one of embed, generate, chat, classify, finetune"
    ):
        validate(cfg)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sage_vllm_batch", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.limt=5", "Key 'limt' not in 'DataConfig'"),
        ("sampling.temperature=hot", "sampling.temperature"),
        ("task=nope", "task"),
    ],
)
def test_cli_rejects_bad_keys_and_types_in_one_paragraph(override, needle):
    r = _cli(override, "--cfg", "job")
    assert r.returncode == 1
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help_lists_groups_and_examples():
    r = _cli("--help")
    assert r.returncode == 0
    for g in ("model:", "engine:", "sampling:", "task:", "data:", "output:"):
        assert g in r.stdout
    assert "smollm2-135m-instruct" in r.stdout and "Examples:" in r.stdout


def test_cli_cfg_job_prints_the_composed_job():
    r = _cli("task=chat", "model=smollm2-135m-instruct", "sampling.temperature=0.5", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.sampling.temperature == 0.5 and cfg.task.type == "chat"


def test_run_dirname_is_safe_and_bounded():
    assert run_dirname("") == "default"
    assert "/" not in run_dirname("data.path=/a/b,sampling.temperature=0.7")
    assert len(run_dirname("x=" + "y" * 500)) <= 100
    assert run_dirname("a=1") != run_dirname("a=2")


def test_sweep_points_share_an_engine_unless_model_or_engine_differ(tmp_path):
    from sage_vllm_batch.run.model import engine_group_key

    base = ("task=chat", "model=smollm2-135m-instruct")
    a = engine_group_key(compose_job(*base, "sampling.temperature=0", out_dir=tmp_path))
    b = engine_group_key(
        compose_job(*base, "sampling.temperature=1.0", "sampling.top_p=0.9", out_dir=tmp_path)
    )
    c = engine_group_key(compose_job(*base, "engine.max_num_seqs=8", out_dir=tmp_path))
    d = engine_group_key(compose_job("task=chat", "model=hub", "model.id=org/other", out_dir=tmp_path))
    assert a == b
    assert len({a, c, d}) == 3


def test_help_lists_only_real_options():
    r = _cli("--help")
    assert r.returncode == 0
    groups = r.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "base_" not in groups
    assert (
        "data: csv, documents, example_chat," in groups
        and "task: chat, classify, embed, finetune, generate" in groups
    )
    assert "mode=plan" in r.stdout
