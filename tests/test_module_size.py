"""No module of the package (or of its Hydra plugin) is over 500 lines: past that a module holds
more than one idea, and it is split along its seams (as executors.ray_*, storage/ and
registry.lookup/fetch/maintenance were)."""

from __future__ import annotations

from pathlib import Path

from helpers import ROOT

MAX_LINES = 500
PACKAGES = ("sage_vllm_batch", "hydra_plugins")


def oversized(root: Path = ROOT, limit: int = MAX_LINES) -> list[str]:
    """``path (N lines)`` of every module under the packages with more than ``limit`` lines."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > limit:
                found.append(f"{path.relative_to(root).as_posix()} ({n} lines)")
    return found


def test_no_module_is_over_500_lines():
    offenders = oversized()
    assert offenders == [], f"modules over {MAX_LINES} lines (split them along their seams): " + ", ".join(
        offenders
    )


def test_the_count_sees_the_modules(tmp_path):
    pkg = tmp_path / "sage_vllm_batch" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "big.py").write_text("x = 1\n" * 501)
    (pkg / "ok.py").write_text("x = 1\n" * 500)
    assert oversized(tmp_path) == ["sage_vllm_batch/sub/big.py (501 lines)"]
    assert sum(1 for p in PACKAGES for _ in (ROOT / p).rglob("*.py")) > 50  # the real tree is scanned
