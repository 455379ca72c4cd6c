"""``engine.compile=auto``: compile the model (torch.compile, vLLM's default) only when the time it
saves over the job exceeds what compiling costs at start-up.

Figures measured on this machine are kept in a small JSON file beside the registry, keyed by model
(id and revision), vLLM version and CPU; without figures yet, the defaults measured in issue 29
hold: about 80 s more start-up against 1.25x on generation, and embedding is never compiled (it
gains 1.03-1.09x for 13-24 s more start-up).

STATUS (work in progress, branch ``compile``): the decision and the figures file are written and
unit-tested; wiring into ``engine=cpu`` (``engine.compile`` replacing ``enforce_eager: true``, a
user's ``engine.enforce_eager`` still winning), recording figures after runs, the compile cache
across runs and the row-neutrality measurement (do greedy texts flip?) are not done yet.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CompileDecision", "CompileFigures", "FiguresFile", "figures_key", "should_compile"]

# A row's eager processing time when nothing was measured yet: SmolLM2-135M generated about 325
# tokens/s eager on two cores (FACTS.md); a row costs its answer's tokens at that rate.
DEFAULT_EAGER_TOKENS_PER_S = 325.0


@dataclass(frozen=True)
class CompileFigures:
    """What compiling a model costs and gains on this machine."""

    startup_s: float = 80.0  # more start-up than eager (issue 29: 75-83 s)
    speedup: float = 1.25  # eager time / compiled time, generation (issue 29: 1.17-1.35x)
    eager_tokens_per_s: float = DEFAULT_EAGER_TOKENS_PER_S
    measured: bool = False  # False: the defaults above


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    why: str
    saved_s: float | None = None


def should_compile(
    mode: str, *, generates: bool, rows: int | None, max_tokens: int | None, figures: CompileFigures
) -> CompileDecision:
    """Whether to compile: ``mode`` is ``engine.compile`` (``auto``, ``true``, ``false``)."""
    mode = str(mode).lower()
    if mode in ("true", "false"):
        return CompileDecision(mode == "true", f"engine.compile={mode}")
    if not generates:
        return CompileDecision(False, "auto: embedding gains too little to pay for compiling")
    if not rows or not max_tokens:
        return CompileDecision(False, "auto: the job's size is unknown, so compiling cannot be shown to pay")
    eager_s = rows * max_tokens / figures.eager_tokens_per_s
    saved = eager_s * (1 - 1 / figures.speedup)
    source = "measured here" if figures.measured else "default figures"
    ok = saved > figures.startup_s
    why = (
        f"auto: about {saved:.0f} s saved over {rows} rows against {figures.startup_s:.0f} s to compile "
        f"({source})"
    )
    return CompileDecision(ok, why, saved)


def figures_key(model_id: str, revision: str | None, vllm: str, cpu: str | None = None) -> str:
    """The figures' key: a model on a vLLM version on a CPU model."""
    return f"{model_id}@{revision or '-'}|vllm={vllm}|cpu={cpu or _cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class FiguresFile:
    """Measured figures by :func:`figures_key`, in one JSON file (written whole, atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> CompileFigures:
        rec = self._read().get(key)
        if not isinstance(rec, dict):
            return CompileFigures()
        fields = {k: rec[k] for k in ("startup_s", "speedup", "eager_tokens_per_s") if k in rec}
        return CompileFigures(**fields, measured=True)

    def put(self, key: str, figures: CompileFigures) -> None:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            rec = asdict(figures)
            rec.pop("measured")
            data[key] = rec
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            tmp.replace(self.path)
