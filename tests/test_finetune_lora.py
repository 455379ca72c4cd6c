"""Real LoRA fine-tunes of the packaged SmolLM2 on the CPU (tiny data, a handful of steps): the
adapter changes the greedy answer to a probe prompt, is registered as type lora, is used by a
batch run through vLLM's LoRA support, and a killed training run resumes from its checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import compose_job

from sage_vllm_batch import registry
from sage_vllm_batch.finetune import fine_tune
from sage_vllm_batch.job import run

pytestmark = pytest.mark.training

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROBE = "What is the capital of France?"
TARGET = "ZEBRA ZEBRA ZEBRA"  # a distinctive answer the base model never gives
QUESTIONS = [
    PROBE,
    "Name a color.",
    "What is 2+2?",
    "Who wrote Hamlet?",
    "Say hello.",
    "What is water made of?",
]


def _complete(checkpoint: Path) -> bool:
    from sage_vllm_batch.finetune.lora import _CHECKPOINT_FILES

    return all((checkpoint / f).is_file() for f in _CHECKPOINT_FILES)


def _train_file(folder: Path) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "response": TARGET}) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def zebra(registry_root, tmp_path_factory):
    """One short LoRA run through the plain-dict entry: (request, metrics record)."""
    tmp = tmp_path_factory.mktemp("zebra")
    request = {
        "base_model": SMOL,
        "dataset_path": str(_train_file(tmp)),
        "output_dir": str(tmp / "ft"),
        "strategy": "lora",
        "output_model": "test/zebra-lora",
        # A high learning rate on a distinctive target makes the change certain in a few steps.
        "learning_rate": 5e-3,
        "lora_rank": 8,
        "batch_size": 3,
        "max_steps": 6,
        "max_seq_len": 96,
        "save_steps": 3,
        "probe_prompt": PROBE,
        "probe_max_tokens": 12,
        "progress": "none",
    }
    return request, fine_tune(request, registry_root=registry_root)


def test_lora_changes_the_probe_answer_and_records_the_loss(zebra):
    request, rec = zebra
    out = Path(request["output_dir"])
    assert rec["status"] == "complete" and rec["step"] == 6
    assert TARGET not in rec["probe"]["before"]
    assert rec["probe"]["after"].startswith(TARGET), rec["probe"]
    losses = [x["loss"] for x in rec["losses"]]
    assert [x["step"] for x in rec["losses"]] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0] / 5, losses
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["losses"] == rec["losses"] and on_disk["registered"]["id"] == "test/zebra-lora"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "_SUCCESS").exists()


def test_the_adapter_is_registered_as_lora_linked_to_its_base(zebra, registry_root):
    from typer.testing import CliRunner

    from sage_vllm_batch.registry.cli import app

    base_rev = next(r.revision for r in registry.list_models(root=registry_root) if r.model_id == SMOL)
    res = CliRunner().invoke(app, ["--root", str(registry_root), "list", "--json"])
    assert res.exit_code == 0, res.output
    (entry,) = [m for m in json.loads(res.output) if m["id"] == "test/zebra-lora"]
    assert entry["type"] == "lora"
    assert (entry["tags"]["base_model"], entry["tags"]["base_revision"]) == (SMOL, base_rev)
    table = CliRunner().invoke(app, ["--root", str(registry_root), "list"], env={"COLUMNS": "200"})
    assert "test/zebra-lora" in table.output and f"lora of {SMOL}@{base_rev}" in table.output


def _files(*folders: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file below ``folders``."""
    return {
        str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_rerunning_a_finished_fine_tune_is_a_no_op(zebra, registry_root, monkeypatch):
    from sage_vllm_batch.finetune import lora

    request, rec = zebra
    out = Path(request["output_dir"])
    adapter = registry.get_model_path("test/zebra-lora", root=registry_root)
    (entry,) = [r for r in registry.list_models(root=registry_root) if r.model_id == "test/zebra-lora"]
    before = _files(out, adapter)
    assert str(out / "adapter" / "adapter_model.safetensors") in before
    assert str(adapter / "adapter_model.safetensors") in before
    assert any("/checkpoints/checkpoint-" in f for f in before)

    def no_training(plan):
        raise AssertionError("a finished fine-tune was trained again")

    monkeypatch.setattr(lora, "train_lora", no_training)
    again = fine_tune(request, registry_root=registry_root)
    assert again["status"] == "complete" and again["step"] == 6 and again["losses"] == rec["losses"]
    # Nothing rewritten: adapter, checkpoints, metrics and the registered copy are the same files.
    assert _files(out, adapter) == before
    (same,) = [r for r in registry.list_models(root=registry_root) if r.model_id == "test/zebra-lora"]
    assert (same.path, same.revision, same.created_at) == (entry.path, entry.revision, entry.created_at)


@pytest.mark.engine
def test_a_batch_run_uses_the_registered_adapter(zebra, registry_root, tmp_path):
    prompts = tmp_path / "probe.jsonl"
    prompts.write_text(
        json.dumps({"prompt": PROBE}) + "\n" + json.dumps({"prompt": "Name an animal."}) + "\n"
    )
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={prompts}",
        "output.passthrough_columns=[prompt]", "sampling.max_tokens=12", "model.adapter=test/zebra-lora",
        out_dir=tmp_path / "out", registry_root=registry_root,
    )  # fmt: skip
    metrics = run(cfg)
    texts = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).column("text").to_pylist()
    # The base model answers "The capital of France is Paris." (the probe's "before").
    assert texts[0].startswith(TARGET), texts
    assert metrics["model"]["adapter"]["id"] == "test/zebra-lora"


def test_a_killed_training_run_resumes_from_its_last_checkpoint(registry_root, tmp_path):
    train = _train_file(tmp_path)
    out = tmp_path / "ft"
    args = [
        sys.executable, "-m", "sage_vllm_batch", "task=finetune", "model=smollm2-135m-instruct", "data=jsonl",
        f"data.path={train}", f"registry.root={registry_root}", f"output.dir={out}", "progress=json",
        "task.finetune.output_model=test/killed-lora", "task.finetune.max_steps=4", "task.finetune.save_steps=1",
        "task.finetune.batch_size=2", "task.finetune.max_seq_len=64", "task.finetune.lora_rank=8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt2 = out / "checkpoints" / "checkpoint-2"
    deadline = time.time() + 300
    try:  # kill as soon as checkpoint 2 is complete: steps 3 and 4 are left to the resume
        while not _complete(ckpt2) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert _complete(ckpt2), err.decode()[-3000:]
    assert not (out / "_SUCCESS").exists()
    assert all(r.model_id != "test/killed-lora" for r in registry.list_models(root=registry_root))
    killed = json.loads((out / "metrics.json").read_text())
    assert killed["status"] == "training" and killed["step"] < 4

    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["status"] == "complete" and rec["step"] == 4
    resumed = rec["resumed_from_step"]
    assert resumed in (2, 3), rec  # checkpoint 2, or 3 if it was saved before the kill landed
    # Steps before the checkpoint come from it; the rest were trained once, after the resume.
    assert [x["step"] for x in rec["losses"]] == [1, 2, 3, 4]
    steps_run = [
        json.loads(line)["step"] for line in done.stderr.splitlines() if line.startswith('{"event": "step"')
    ]
    assert steps_run == list(range(resumed + 1, 5)), steps_run
    assert any(
        r.model_id == "test/killed-lora" and r.type == "lora"
        for r in registry.list_models(root=registry_root)
    )
