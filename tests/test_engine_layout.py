"""The CPU engine runs vLLM's engine core in this process: no engine processes, two engines side
by side, early stop leaves the engine clean, and close() gives the memory back."""

from __future__ import annotations

import psutil
import pytest

from sage_vllm_batch.engine.io import EngineRequest

pytestmark = pytest.mark.engine


def _engine_processes():
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "VLLM" in " ".join(p.cmdline()) or "EngineCore" in p.name()
    ]


def test_cpu_engines_run_in_process_side_by_side(embed_engine, chat_engine):
    assert embed_engine.in_process and chat_engine.in_process
    assert _engine_processes() == []
    (vec,) = embed_engine.embed(["In the beginning God created the heaven and the earth."])
    (ans,) = chat_engine.chat(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        {"temperature": 0.0, "max_tokens": 16},
    )
    assert vec.embedding.shape == (384,) and "Paris" in ans.text
    # The second engine's construction did not change the first's layout (vLLM caches its env).
    (vec2,) = embed_engine.embed(["In the beginning God created the heaven and the earth."])
    assert float(abs(vec.embedding - vec2.embedding).max()) < 1e-3


def test_early_stop_aborts_the_rest_and_the_engine_is_reusable(chat_engine):
    prompt = chat_engine.render_chat([{"role": "user", "content": "Count from one to fifty."}])
    reqs = (EngineRequest(key=i, prompt_token_ids=prompt, sampling={"max_tokens": 64}) for i in range(24))
    stream = chat_engine.stream(reqs)
    first = next(stream)
    assert first.error is None
    stream.close()  # the consumer stops early: the other requests are aborted
    assert not chat_engine.vllm_engine.has_unfinished_requests()
    (again,) = chat_engine.chat([[{"role": "user", "content": "Say hi."}]], {"max_tokens": 8})
    assert again.error is None and again.text


# Measured in a process of its own: in the test session, earlier engines leave freed heap that a
# new load reuses, so RSS growth there says nothing. One warm-up load takes the one-time costs
# (torch and vLLM initialisation, kernels) out of the measured load.
_MEASURE_CLOSE = """
import gc, json, sys
from pathlib import Path
import psutil
sys.path.insert(0, sys.argv[3])
from helpers import compose_job
from sage_vllm_batch.run.model import load_engine, resolve_model

cfg = compose_job("task=embed", out_dir=Path(sys.argv[1]), registry_root=Path(sys.argv[2]))
proc = psutil.Process()
rss = []
for _ in range(2):
    gc.collect()
    before = proc.memory_info().rss
    engine = load_engine(cfg, resolve_model(cfg))
    engine.embed([f"verse number {i}" for i in range(256)])
    loaded = proc.memory_info().rss
    engine.close()
    gc.collect()
    rss.append({"before": before, "loaded": loaded, "after": proc.memory_info().rss, "llm_gone": engine.llm is None})
print(json.dumps(rss[-1]))
"""


def test_close_frees_the_engine_memory(registry_root, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_CLOSE, str(tmp_path), str(registry_root), tests_dir],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["loaded"] - m["before"]
    kept = m["after"] - m["before"]
    assert grew > 50 * 2**20, f"loading grew RSS by only {grew / 2**20:.0f} MiB"
    assert kept < grew / 2, f"close() kept {kept / 2**20:.0f} of {grew / 2**20:.0f} MiB"
    assert m["llm_gone"]
