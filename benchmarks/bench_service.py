"""Service mode against batch mode on the same prompts, in one process run.

    python benchmarks/bench_service.py [--rows 128] [--max-tokens 32] [--clients 32]

(a) batch: ``job.run`` of a chat job over the prompts (task=chat, greedy), timed by its own
    metrics (engine load excluded);
(b) service: ``python -m sage_vllm_batch mode=serve`` on a free loopback port, ``--clients``
    concurrent async ``openai`` clients sending the same prompts as chat completions; throughput
    from the first request to the last answer, latency per request;
(c) the same load with a batch job over ``/v1/jobs`` (the same prompts) running alongside.

Prints completion tokens/s, rows/s, p50/p95 latency, the ratio (b)/(a) (target >= 0.8), the
interactive p95 with the job against idle (c)/(b) (target <= 2: interactive requests keep priority,
``serve.busy_job_requests``) and writes ``benchmarks/results/service.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, compose, machine_info, now_utc, registry_root, write_results  # noqa: E402

TARGET = 0.8
P95_TARGET = 2.0  # interactive p95 with a job running / idle p95
CHAT = "HuggingFaceTB/SmolLM2-135M-Instruct"
KV = "+engine.extra.kv_cache_memory_bytes=536870912"  # fixed KV cache: no share-of-free-memory check


def prompts(n: int) -> list[str]:
    topics = ["rivers", "prime numbers", "the moon", "bread", "trains", "owls", "glass", "chess"]
    return [f"Write two sentences about {topics[i % len(topics)]} (variant {i})." for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_batch(data: Path, out: Path, root: Path, max_tokens: int, extra: list[str]) -> dict:
    from sage_vllm_batch.job import run

    cfg = compose(
        "task=chat", "model=smollm2-135m-instruct", "data=jsonl", f"data.path={data}",
        "output.passthrough_columns=[prompt]", f"sampling.max_tokens={max_tokens}", KV, *extra,
        out_dir=out, registry_root=root,
    )  # fmt: skip
    m = run(cfg)
    return {
        "rows_per_s": m["rows_per_s"],
        "completion_tokens_per_s": m["completion_tokens_per_s"],
        "wall_seconds": m["wall_seconds"],
        "completion_tokens": m["completion_tokens"],
    }


async def load(url: str, qs: list[str], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(clients)
    lat: list[float] = []
    tokens = 0

    async def one(q: str) -> None:
        nonlocal tokens
        async with sem:
            t = time.perf_counter()
            r = await client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
            )
            lat.append(time.perf_counter() - t)
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(q) for q in qs))
    wall = time.perf_counter() - t0
    await client.close()
    return {
        "rows_per_s": len(qs) / wall,
        "completion_tokens_per_s": tokens / wall,
        "wall_seconds": wall,
        "completion_tokens": tokens,
        "latency_p50_s": pct(lat, 0.5),
        "latency_p95_s": pct(lat, 0.95),
    }


def start_server(root: Path, data_dir: Path, work: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable, "-m", "sage_vllm_batch", "mode=serve", "model=smollm2-135m-instruct",
        f"registry.root={root}", KV, f"serve.port={port}", f"serve.data_roots=[{data_dir}]",
        f"serve.output_root={work / 'outputs'}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAGE_VLLM_SERVICES_DIR": str(work / "state")}
    proc = subprocess.Popen(
        args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=open(work / "server.log", "w"), text=True
    )
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc, f"http://127.0.0.1:{port}"
    raise RuntimeError(f"server did not start; see {work / 'server.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=32)
    add_common_args(ap)
    a = ap.parse_args()
    import httpx

    qs = prompts(a.rows)
    with registry_root(a.registry_root, ["chat"]) as root, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        data = data_dir / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in qs))

        print(f"(a) batch: {a.rows} chat prompts, max_tokens {a.max_tokens}", flush=True)
        batch = run_batch(data, work / "batch", root, a.max_tokens, a.override)

        print(f"(b) service: {a.clients} concurrent async openai clients", flush=True)
        proc, url = start_server(root, data_dir, work, a.override)
        try:
            asyncio.run(load(url, qs[: min(8, len(qs))], a.clients, 4))  # warm-up
            service = asyncio.run(load(url, qs, a.clients, a.max_tokens))

            print("(c) service with a batch job over /v1/jobs alongside", flush=True)
            h = httpx.Client(base_url=url, timeout=60)
            ov = ["task=chat", "data=jsonl", f"data.path={data}", "output.passthrough_columns=[prompt]",
                  f"sampling.max_tokens={a.max_tokens}"]  # fmt: skip
            job = h.post("/v1/jobs", json={"overrides": ov}).json()
            alongside = asyncio.run(load(url, qs, a.clients, a.max_tokens))
            while (j := h.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
                time.sleep(0.5)
            alongside["job_status"] = j["status"]
            alongside["job_rows_per_s"] = j["metrics"].get("rows_per_s")
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    ratio = service["completion_tokens_per_s"] / batch["completion_tokens_per_s"]
    rows = [
        ("(a) batch (runner)", batch),
        ("(b) service, 32 clients", service),
        ("(c) service + job", alongside),
    ]
    print(f"\n{'variant':<26} {'tok/s':>8} {'rows/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for name, r in rows:
        p50 = f"{r['latency_p50_s']:.2f}" if "latency_p50_s" in r else "-"
        p95 = f"{r['latency_p95_s']:.2f}" if "latency_p95_s" in r else "-"
        print(f"{name:<26} {r['completion_tokens_per_s']:>8.1f} {r['rows_per_s']:>8.2f} {p50:>7} {p95:>7}")
    print(f"\nservice / batch throughput (completion tokens/s): {ratio:.2f} (target >= {TARGET})")
    p95_ratio = alongside["latency_p95_s"] / service["latency_p95_s"]
    print(f"interactive p95 with a job / idle: {p95_ratio:.2f} (target <= {P95_TARGET})")
    print(f"job alongside: {alongside['job_status']}, {alongside['job_rows_per_s']} rows/s")
    path = write_results(
        "service.json",
        {
            "when": now_utc(),
            "machine": machine_info(),
            "rows": a.rows,
            "max_tokens": a.max_tokens,
            "clients": a.clients,
            "batch": batch,
            "service": service,
            "service_with_job": alongside,
            "ratio": ratio,
            "target": TARGET,
            "p95_with_job_over_idle": p95_ratio,
            "p95_target": P95_TARGET,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
