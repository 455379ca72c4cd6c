"""The fine-tune contract: every validation failure names its field and what to do, through the
plain-dict entry (``fine_tune``) and the command line (``task=finetune``) alike; qlora/full are
validated then refused with their own exit code. No training here (see test_finetune_lora.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_job, run_cli

from sage_vllm_batch.errors import ConfigError, NotBuiltError
from sage_vllm_batch.finetune import FinetuneRequest, fine_tune, validate
from sage_vllm_batch.job import run

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def train_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}?", "prompt": f"Say {i}.", "response": f"{i}"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _request(train_file: Path, tmp_path: Path, **changes) -> dict:
    req = {
        "base_model": SMOL,
        "dataset_path": str(train_file),
        "output_dir": str(tmp_path / "ft"),
        "strategy": "lora",
        "output_model": "test/contract-lora",
    }
    req.update(changes)
    return {k: v for k, v in req.items() if v is not None}


def test_a_valid_request_is_planned_without_touching_anything(registry_root, train_file, tmp_path):
    plan = validate(FinetuneRequest.from_dict(_request(train_file, tmp_path), registry_root=registry_root))
    assert (plan.base_id, plan.mode, plan.state) == (SMOL, "prompt_response", "new")
    assert plan.base_revision and (plan.base_path / "config.json").is_file()
    assert not (tmp_path / "ft").exists()  # validation only reads


@pytest.mark.parametrize(
    "changes,field,hint",
    [
        ({"base_model": None}, "base_model", "required"),
        ({"epochs_typo": 2}, "epochs_typo", "unknown field"),
        ({"strategy": "adapter"}, "strategy", "lora"),
        ({"base_model": "nobody/nothing"}, "base_model", "sage-vllm-models"),
        ({"base_model": "sentence-transformers/all-MiniLM-L6-v2"}, "base_model", "text-generation"),
        ({"dataset_path": "/no/such/train.jsonl"}, "dataset_path", "does not exist"),
        ({"response_column": "answer"}, "response_column", "'answer'"),
        ({"prompt_column": "query"}, "prompt_column", "prompt_template"),
        ({"prompt_template": "Q: {nope}"}, "prompt_template", "nope"),
        ({"output_model": SMOL}, "output_model", "must differ"),
        ({"output_model": "sentence-transformers/all-MiniLM-L6-v2"}, "output_model", "overwrite"),
        ({"output_model": "bad id!"}, "output_model", "Invalid model id"),
        ({"learning_rate": 3.0}, "learning_rate", "(0, 1)"),
        ({"lora_rank": 0}, "lora_rank", "in [1, 512]"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"epochs": "many"}, "epochs", "many"),
        ({"max_seq_len": 100000}, "max_seq_len", "context"),
        ({"target_modules": ["qq_proj"]}, "target_modules", "q_proj"),
        ({"limit": 0}, "limit", ">= 1"),
    ],
)
def test_each_bad_field_is_named_with_what_to_do(changes, field, hint, registry_root, train_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        fine_tune(_request(train_file, tmp_path, **changes), registry_root=registry_root)
    msg = str(err.value)
    assert msg.startswith(field) or f"{field}:" in msg, msg
    assert hint in msg, msg
    assert not (tmp_path / "ft").exists()


def test_an_output_dir_of_another_fine_tune_is_refused_unless_overwrite(registry_root, train_file, tmp_path):
    from sage_vllm_batch.finetune.lora import prepare_training_dir

    plan = validate(FinetuneRequest.from_dict(_request(train_file, tmp_path), registry_root=registry_root))
    prepare_training_dir(plan)  # what a started run leaves: its plan
    same = validate(FinetuneRequest.from_dict(_request(train_file, tmp_path), registry_root=registry_root))
    assert same.state == "resume"
    with pytest.raises(ConfigError, match=r"output_dir: .* other settings.*learning_rate.*overwrite=true"):
        fine_tune(_request(train_file, tmp_path, learning_rate=0.01), registry_root=registry_root)
    over = _request(train_file, tmp_path, learning_rate=0.01, overwrite=True)
    assert validate(FinetuneRequest.from_dict(over, registry_root=registry_root)).state == "new"


@pytest.mark.parametrize("strategy", ["qlora", "full"])
def test_qlora_and_full_are_validated_then_refused(strategy, registry_root, train_file, tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):  # validated first ...
        fine_tune(
            _request(train_file, tmp_path, strategy=strategy, learning_rate=2.0), registry_root=registry_root
        )
    with pytest.raises(NotBuiltError, match=rf"strategy={strategy}: .*not built yet.*strategy=lora"):
        fine_tune(_request(train_file, tmp_path, strategy=strategy), registry_root=registry_root)
    assert not (tmp_path / "ft").exists()


def test_the_command_line_goes_through_the_same_validation(registry_root, train_file, tmp_path):
    base = ["task=finetune", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={train_file}"]
    cfg = compose_job(
        *base, "task.finetune.learning_rate=3", out_dir=tmp_path / "o", registry_root=registry_root
    )
    with pytest.raises(ConfigError, match=r"^task\.finetune\.learning_rate: must be in \(0, 1\)"):
        run(cfg)
    cfg = compose_job(
        *base, "data.response_column=answer", out_dir=tmp_path / "o", registry_root=registry_root
    )
    with pytest.raises(ConfigError, match=r"^data\.response_column: no 'answer' column"):
        run(cfg)


def test_cli_exit_codes_tell_not_built_from_bad_config(registry_root, train_file, tmp_path):
    base = [
        "task=finetune", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={train_file}",
        f"registry.root={registry_root}", f"output.dir={tmp_path / 'o'}",
    ]  # fmt: skip
    not_built = run_cli(*base, "task.finetune.strategy=full", cwd=tmp_path, timeout=300)
    assert not_built.returncode == 3, not_built.stderr[-2000:]
    assert "not built yet" in not_built.stderr and "Traceback" not in not_built.stderr
    bad = run_cli(*base, "task.finetune.lora_rank=0", cwd=tmp_path, timeout=300)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "task.finetune.lora_rank: must be" in bad.stderr


def test_adapter_errors_name_model_adapter(registry_root, tmp_path):
    cfg = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        "model.adapter=nobody/none",
        out_dir=tmp_path,
        registry_root=registry_root,
    )
    with pytest.raises(ConfigError, match=r"^model\.adapter: .*not in the registry"):
        run(cfg)
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "model.adapter=sentence-transformers/all-MiniLM-L6-v2",
        out_dir=tmp_path, registry_root=registry_root,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^model\.adapter: .* is a embedding model, not a LoRA adapter"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"^model\.adapter: a LoRA adapter applies to generate/chat"):
        run(compose_job("task=embed", "model.adapter=x/y", out_dir=tmp_path, registry_root=registry_root))
