"""Config composition and validation (no engine)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.config import run_dirname, validate
from sage_vllm_batch.errors import ConfigError

GROUPS = {
    g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
    for g in ("model", "engine", "sampling", "task", "data", "output")
}
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml"))


def test_default_job_composes_and_validates(tmp_path):
    cfg = compose_job(out_dir=tmp_path)
    validate(cfg)
    assert cfg.task.type == "embed"
    assert cfg.model.type == "embedding"
    assert cfg.data.path == "pkg://bible/data/kjv.jsonl"
    assert cfg.engine.gpu_memory_utilization == pytest.approx(0.3)
    assert cfg.engine.enforce_eager is True


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_group_option_composes(group, tmp_path):
    for option in GROUPS[group]:
        overrides = [f"{group}={option}"]
        if group == "data" and option in ("parquet", "jsonl", "csv", "hf", "openai_batch"):
            overrides.append("data.path=x")
        if group == "model" and option == "hub":
            overrides.append("model.id=org/name")
        cfg = compose_job(*overrides, out_dir=tmp_path)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("job", JOBS)
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
        ("task.overlong_prompt=cut", "task.overlong_prompt"),
    ],
)
def test_cross_field_rules_name_the_key(override, key, tmp_path):
    cfg = compose_job("task=chat", "model=smollm2-135m-instruct", override, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
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
    assert "data: csv, example_chat," in groups and "task: chat, embed, finetune, generate" in groups
    assert "mode=plan" in r.stdout
