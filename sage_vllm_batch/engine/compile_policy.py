"""``engine.compile=auto``: compile the model (torch.compile, vLLM's default) only when the time it
saves over the job exceeds what compiling costs at start-up.

Figures measured on this machine are kept in a small JSON file beside the registry, keyed by model
(id and revision), vLLM version and CPU; without figures yet, the defaults measured in issue 29
hold: about 80 s more start-up against 1.25x on generation, and embedding is never compiled (it
gains 1.03-1.09x for 13-24 s more start-up).

A user's ``engine.enforce_eager`` (true or false) wins over ``engine.compile``
(:func:`resolve_compile`). The run records each decision in ``metrics.json`` and, after a local
generation run, what it measured (:meth:`FiguresFile.observe`): start-up and completion tokens/s,
eager or compiled; the figures are derived once both sides are known
(docs/performance.md#compile-when-it-pays-enginecompile).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sage_vllm_batch.cpu_isa import cpu_isa

__all__ = [
    "CompileDecision",
    "CompileFigures",
    "FiguresFile",
    "figures_key",
    "resolve_compile",
    "should_compile",
]

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
    mode: str = "auto"  # engine.compile as set (auto, true, false)

    def as_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` records under ``compile``."""
        saved = None if self.saved_s is None else round(self.saved_s, 1)
        return {"mode": self.mode, "compiled": self.compile, "why": self.why, "saved_s": saved}

    def line(self) -> str:
        """The console's one line, e.g. ``compile: off (auto: 48 rows x 64 tokens saves ...)``."""
        return f"compile: {'on' if self.compile else 'off'} ({self.why})"


def should_compile(
    mode: str, *, generates: bool, rows: int | None, max_tokens: int | None, figures: CompileFigures
) -> CompileDecision:
    """Whether to compile: ``mode`` is ``engine.compile`` (``auto``, ``true``, ``false``)."""
    mode = str(mode).lower()
    if mode in ("true", "false"):
        return CompileDecision(mode == "true", f"engine.compile={mode}", mode=mode)
    if not generates:
        return CompileDecision(False, "auto: embedding gains too little to pay for compiling")
    if not rows or not max_tokens:
        return CompileDecision(False, "auto: the job's size is unknown, so compiling cannot be shown to pay")
    eager_s = rows * max_tokens / figures.eager_tokens_per_s
    saved = eager_s * (1 - 1 / figures.speedup) if figures.speedup > 0 else 0.0
    source = "measured here" if figures.measured else "default figures"
    ok = saved > figures.startup_s
    why = (
        f"auto: {rows:,} rows x {max_tokens} tokens saves ~{saved:.0f} s {'>' if ok else '<'} "
        f"{figures.startup_s:.0f} s start-up, {figures.speedup:.2f}x ({source})"
    )
    return CompileDecision(ok, why, saved)


def resolve_compile(
    engine_cfg: Any, *, generates: bool, rows: int | None, max_tokens: int | None, figures: CompileFigures
) -> CompileDecision:
    """The job's decision from its ``engine`` section (a mapping): ``engine.enforce_eager`` when
    the user set it (true or false: it wins), else :func:`should_compile` on ``engine.compile``."""
    mode = str(engine_cfg.get("compile") or "auto").lower()
    eager = engine_cfg.get("enforce_eager")
    if eager is not None:
        return CompileDecision(not eager, f"engine.enforce_eager={str(bool(eager)).lower()} wins", mode=mode)
    decision = should_compile(mode, generates=generates, rows=rows, max_tokens=max_tokens, figures=figures)
    return CompileDecision(decision.compile, decision.why, decision.saved_s, mode)


def figures_key(model_id: str, revision: str | None, vllm: str, cpu: str | None = None) -> str:
    """The figures' key: a model on a vLLM version on a CPU model."""
    return f"{model_id}@{revision or '-'}|vllm={vllm}|cpu={cpu or _cpu_model()}"


def _cpu_model() -> str:
    return cpu_isa().get("model") or platform.processor() or platform.machine()


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
        fields = {k: float(rec[k]) for k in ("startup_s", "speedup", "eager_tokens_per_s") if k in rec}
        return CompileFigures(**fields, measured=bool(fields))

    def put(self, key: str, figures: CompileFigures) -> None:
        rec = asdict(figures)
        rec.pop("measured")
        self._update(key, rec)

    def observe(
        self, key: str, *, compiled: bool, load_s: float, tokens_per_s: float | None
    ) -> dict[str, Any]:
        """Record one run's load time and completion tokens/s on its side (eager or compiled),
        keeping the best seen (the shortest load, the highest rate: a run on a busy machine does
        not stand for the machine); derive ``startup_s`` (compiled load - eager load) and
        ``speedup`` (compiled tokens/s over eager) once both sides are known. Returns the key's
        record."""
        side = "compiled" if compiled else "eager"
        rec = self._read().get(key)
        old = rec if isinstance(rec, dict) else {}
        load_key, rate_key = f"{side}_load_s", f"{side}_tokens_per_s"
        new: dict[str, Any] = {load_key: round(min(load_s, old.get(load_key, load_s)), 2)}
        if tokens_per_s:
            new[rate_key] = round(max(tokens_per_s, old.get(rate_key, tokens_per_s)), 2)
        return self._update(key, new, derive=True)

    def _update(self, key: str, new: dict[str, Any], *, derive: bool = False) -> dict[str, Any]:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            rec = data.get(key) if isinstance(data.get(key), dict) else {}
            rec.update(new)
            if derive:
                if "eager_load_s" in rec and "compiled_load_s" in rec:
                    rec["startup_s"] = round(max(0.0, rec["compiled_load_s"] - rec["eager_load_s"]), 2)
                if rec.get("eager_tokens_per_s") and "compiled_tokens_per_s" in rec:
                    rec["speedup"] = round(rec["compiled_tokens_per_s"] / rec["eager_tokens_per_s"], 3)
            data[key] = rec
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            tmp.replace(self.path)
            return dict(rec)
