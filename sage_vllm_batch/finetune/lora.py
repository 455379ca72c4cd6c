"""The ``lora`` strategy: a LoRA adapter trained on the CPU with ``peft`` + ``transformers``' Trainer.

The Trainer brings the progress bar, per-step loss logging and checkpoints (adapter weights,
optimizer, scheduler and RNG state under ``<output_dir>/checkpoints/checkpoint-<step>``); a killed
job rerun with the same settings resumes from the last complete checkpoint, skipping the batches
already seen. The loss of every step is written to ``metrics.json`` as it is logged (so a killed
run leaves its record) and plotted to ``loss.png`` at the end. The adapter is saved to
``<output_dir>/adapter`` and registered by :mod:`sage_vllm_batch.finetune.register`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from sage_vllm_batch.errors import SageBatchError
from sage_vllm_batch.finetune.contract import PLAN_FILE, FinetunePlan
from sage_vllm_batch.outputs.files import METRICS, SUCCESS, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
PLOT = "loss.png"
# A checkpoint is usable only once all of these are written (a kill can land mid-save).
_CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise SageBatchError(
            f"strategy=lora needs peft ({e}). Install it: pip install 'sage-vllm-batch[finetune]'"
        ) from e


def prepare_training_dir(plan: FinetunePlan) -> None:
    """Start over on ``overwrite`` (or in a dir without a plan); record the plan."""
    out = plan.output_dir
    if plan.state == "new":
        for name in (CHECKPOINTS, ADAPTER, f".{ADAPTER}.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS, PLOT, SUCCESS, PLAN_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PLAN_FILE, {"manifest": plan.manifest, "plan": plan.to_dict()})


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>``; newer incomplete ones (a kill mid-save) are removed."""
    if not folder.is_dir():
        return None
    found = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()
        ),
        key=lambda p: int(p.name[11:]),
        reverse=True,
    )
    for p in found:
        if all((p / f).is_file() for f in _CHECKPOINT_FILES):
            return p
        log.warning("removing incomplete checkpoint %s (the job was stopped while saving it)", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def _progress_mode(mode: str) -> str:
    return ("bar" if sys.stderr.isatty() else "json") if mode == "auto" else mode


def train_lora(plan: FinetunePlan) -> dict[str, Any]:
    """Train, save and return the metrics record (the caller registers the adapter)."""
    _require_peft()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from sage_vllm_batch.finetune.examples import build_examples

    t0 = time.perf_counter()
    hp, out = plan.hparams, plan.output_dir
    prepare_training_dir(plan)
    torch.manual_seed(int(hp.seed))
    tok = AutoTokenizer.from_pretrained(str(plan.base_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = build_examples(plan, tok)
    log.info(
        "fine-tune %s -> %s: %d examples (%d truncated, skipped %s)",
        plan.base_id,
        plan.output_model,
        len(examples.rows),
        examples.truncated,
        examples.skipped or "none",
    )
    # float32: CPU autograd in bf16 loses the small LoRA updates.
    model = AutoModelForCausalLM.from_pretrained(str(plan.base_path), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=int(hp.lora_rank),
            lora_alpha=int(hp.lora_alpha),
            lora_dropout=float(hp.lora_dropout),
            target_modules=list(hp.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    trainable, total = model.get_nb_trainable_parameters()
    # Before any checkpoint is loaded the adapter is the identity (LoRA's B starts at zero).
    probe_before = _probe(model, tok, plan) if hp.probe_prompt else None

    ckpt_dir = out / CHECKPOINTS
    resume = last_checkpoint(ckpt_dir)
    mode = _progress_mode(plan.request.progress)
    record: dict[str, Any] = {
        "task": "finetune",
        "strategy": plan.request.strategy,
        "status": "training",
        "base_model": {"id": plan.base_id, "revision": plan.base_revision},
        "output_model": plan.output_model,
        "output_dir": str(out),
        "examples": len(examples.rows),
        "examples_truncated": examples.truncated,
        "examples_skipped": examples.skipped,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "resumed_from_step": int(resume.name[11:]) if resume else None,
        "hparams": plan.to_dict()["hparams"],
        "losses": [],
    }
    if probe_before is not None:
        record["probe"] = {"prompt": hp.probe_prompt, "before": probe_before}

    class _Recorder(TrainerCallback):
        """Loss per step into metrics.json as it is logged (restored history included on resume)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            record["losses"] = [
                {k: h[k] for k in ("step", "loss", "learning_rate", "grad_norm", "epoch") if k in h}
                for h in state.log_history
                if "loss" in h
            ]
            record["step"] = state.global_step
            record["max_steps"] = state.max_steps
            write_json_atomic(out / METRICS, record)
            if mode == "json" and logs and "loss" in logs:
                print(
                    json.dumps(
                        {
                            "event": "step",
                            "step": state.global_step,
                            "of": state.max_steps,
                            "loss": round(float(logs["loss"]), 5),
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=int(hp.batch_size),
        num_train_epochs=int(hp.epochs),
        max_steps=int(hp.max_steps) or -1,
        learning_rate=float(hp.learning_rate),
        logging_steps=1,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(hp.save_steps),
        save_total_limit=2,
        seed=int(hp.seed),
        data_seed=int(hp.seed),
        use_cpu=True,
        report_to=[],
        disable_tqdm=mode != "bar",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples.rows,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True),
        callbacks=[_Recorder()],
    )
    if mode != "bar":  # our JSON lines (or nothing) instead of the Trainer's printed dicts
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if resume:
        log.info("resuming from %s", resume)
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    record["train_seconds"] = round(time.perf_counter() - t_train, 3)
    record["train_loss"] = float(result.training_loss)
    record["step"] = trainer.state.global_step

    if probe_before is not None:
        record["probe"]["after"] = _probe(model, tok, plan)
    save_adapter(model, plan, out / ADAPTER)
    plot_losses(record["losses"], out / PLOT, title=f"{plan.output_model} ({plan.request.strategy})")
    record["adapter_path"] = str(out / ADAPTER)
    record["loss_plot"] = str(out / PLOT)
    record["wall_seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / METRICS, record)
    return record


def save_adapter(model: Any, plan: FinetunePlan, dest: Path) -> None:
    """Save the adapter through a temp dir and a rename, naming the base model by its registry id."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = plan.base_id  # not the registry's local path
    cfg["revision"] = plan.base_revision
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _probe(model: Any, tok: Any, plan: FinetunePlan) -> str:
    """Greedy answer to the probe prompt, asked as the training rows were (same system prompt)."""
    import torch

    msgs = [{"role": "user", "content": plan.hparams.probe_prompt}]
    if plan.request.data.system_prompt:
        msgs.insert(0, {"role": "system", "content": plan.request.data.system_prompt})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    was_training = model.training
    model.eval()
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=int(plan.hparams.probe_max_tokens),
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    if was_training:
        model.train()
    return tok.decode(gen[0][ids.shape[1] :], skip_special_tokens=True)


def plot_losses(losses: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
