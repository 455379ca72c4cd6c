"""task=finetune: validated and planned end to end (the training step is a later milestone)."""

from __future__ import annotations

import json

import pytest
from conftest import compose_job

from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.runner import run


def test_finetune_job_is_validated_and_planned(registry_root, tmp_path):
    cfg = compose_job("task=finetune", "model=smollm2-135m-instruct", out_dir=tmp_path, registry_root=registry_root)
    with pytest.raises(SageBatchError, match="training step is not built yet"):
        run(cfg)
    plan = json.loads((tmp_path / "finetune_plan.json").read_text())
    assert plan["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "HumanEval.jsonl.gz" in json.dumps(plan["data"])
    assert plan["finetune"]["method"] == "lora"


@pytest.mark.parametrize(
    "override,key",
    [("task.finetune.method=qlora2", "task.finetune.method"), ("task.finetune.learning_rate=3", "learning_rate")],
)
def test_finetune_bad_settings_name_the_key(override, key, registry_root, tmp_path):
    cfg = compose_job("task=finetune", "model=smollm2-135m-instruct", override, out_dir=tmp_path, registry_root=registry_root)
    with pytest.raises(ConfigError, match=key):
        run(cfg)
