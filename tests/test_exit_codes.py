"""Every status the CLI exits with is one of :class:`~sage_vllm_batch.errors.ExitCode`, the table
the docs list: read from the source (every ``sys.exit``, ``os._exit``, ``SystemExit``,
``typer.Exit`` and error class's ``exit_code``), through :func:`sage_vllm_batch.job.main`'s
dispatch (no engine), and from the real command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT, compose_job, run_cli

from sage_vllm_batch import job
from sage_vllm_batch.errors import ExitCode, NotBuiltError, ResumeError, SageBatchError

PACKAGES = ("sage_vllm_batch", "hydra_plugins")
EXIT_CALLS = {"exit", "_exit", "SystemExit", "Exit"}  # sys.exit, os._exit, SystemExit, typer.Exit


def test_the_table_has_one_meaning_per_code():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    for code in ExitCode:
        assert code.meaning and "\n" not in code.meaning, code.name
        assert 0 <= code <= 255, code.name  # what a process can exit with
    assert ExitCode.OK == 0 and ExitCode.ERROR == 1  # the conventions scripts rely on


def exit_sites(root: Path = ROOT) -> list[tuple[str, ast.expr | None]]:
    """``(file:line, argument)`` of every exit in the packages' source: calls of ``sys.exit``,
    ``os._exit``, ``exit``, ``SystemExit`` and ``typer.Exit``, and ``exit_code = ...`` in a class."""
    sites = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            where = lambda node, p=path: f"{p.relative_to(root)}:{node.lineno}"  # noqa: E731
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                    if name in EXIT_CALLS:
                        sites.append((where(node), node.args[0] if node.args else None))
                elif isinstance(node, ast.ClassDef):
                    for stmt in node.body:
                        target = stmt.target if isinstance(stmt, ast.AnnAssign) else None
                        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                            target = stmt.targets[0]
                        if isinstance(target, ast.Name) and target.id == "exit_code":
                            sites.append((where(stmt), stmt.value))
    return sites


def _literal_code(arg: ast.expr | None) -> int | str | None:
    """The code an exit argument names, if it names one in the source: an int, or ``ExitCode.X``."""
    if arg is None:
        return 0
    if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
        return arg.value
    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "ExitCode":
        return arg.attr
    return (
        None  # a variable: its value comes from one of the sites checked here, or a function typed ExitCode
    )


def test_every_exit_in_the_source_is_in_the_table():
    sites = exit_sites()
    outside = []
    named = set()
    for where, arg in sites:
        code = _literal_code(arg)
        if isinstance(code, str):
            named.add(code)
            if code not in ExitCode.__members__:
                outside.append(f"{where}: ExitCode.{code} does not exist")
        elif isinstance(code, int) and code not in set(ExitCode):
            outside.append(f"{where}: exits with {code}, which is not in errors.ExitCode")
    assert outside == [], "exit codes missing from the table:\n" + "\n".join(outside)
    # The scan sees the CLI's own exits (a broken scanner must not pass): the command-line hint,
    # the stalled engine's exit and the not-built error's code.
    assert {"USAGE", "ENGINE_STALLED", "NOT_BUILT", "ERROR"} <= named, sorted(named)


def test_the_main_cli_names_its_codes_instead_of_writing_numbers():
    """The modules the CLI's exits go through say ``ExitCode.X``: the table is the one place a
    number is written (other console scripts and Ray's worker processes may use 0 and 1)."""
    cli = ("sage_vllm_batch/__main__.py", "sage_vllm_batch/job.py", "sage_vllm_batch/errors.py")
    cli += ("sage_vllm_batch/engine/supervisor.py",)
    numbers = [
        where for where, arg in exit_sites() if where.startswith(cli) and isinstance(_literal_code(arg), int)
    ]
    assert numbers == []


def test_the_scanner_finds_each_kind_of_exit(tmp_path):
    pkg = tmp_path / "sage_vllm_batch"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os, sys\nimport typer\n\n"
        "class E(Exception):\n    exit_code = 9\n\n"
        "def f():\n    sys.exit(4)\n    os._exit(ExitCode.OK)\n    raise SystemExit(code)\n    raise typer.Exit(1)\n"
    )
    found = [(where, _literal_code(arg)) for where, arg in exit_sites(tmp_path)]
    assert found == [
        ("sage_vllm_batch/m.py:5", 9),
        ("sage_vllm_batch/m.py:8", 4),
        ("sage_vllm_batch/m.py:9", "OK"),
        ("sage_vllm_batch/m.py:10", None),
        ("sage_vllm_batch/m.py:11", 1),
    ]


def test_every_error_class_exits_with_a_code_of_the_table():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # The error classes of the modules imported so far (the scan above covers the rest).
    for cls in [SageBatchError, *subclasses(SageBatchError)]:
        assert isinstance(cls.exit_code, ExitCode), cls


# -- job.main: the dispatch on mode, and what each outcome exits with (no engine: the modes' work
# -- is replaced by stand-ins)


@pytest.fixture
def quiet(monkeypatch):
    """job.main configures the process's logging (console filters, run.log): not in the test process."""
    monkeypatch.setattr("sage_vllm_batch.logs.configure", lambda **kw: None)


def _cfg(tmp_path, *overrides):
    return compose_job(*overrides, out_dir=tmp_path / "out")


def test_main_dispatches_on_mode(tmp_path, monkeypatch, quiet):
    calls = []
    monkeypatch.setattr(job, "plan", lambda cfg: calls.append("plan") or ExitCode.OK)
    monkeypatch.setattr(
        job, "serve", lambda cfg, overrides: calls.append(("serve", list(overrides))) or ExitCode.OK
    )
    monkeypatch.setattr(job, "run", lambda cfg, process_exiting: calls.append(("run", process_exiting)) or {})
    assert job.main(_cfg(tmp_path, "mode=plan")) is ExitCode.OK
    assert job.main(_cfg(tmp_path, "mode=serve"), overrides=["mode=serve"]) is ExitCode.OK
    assert job.main(_cfg(tmp_path), process_exiting=True) is ExitCode.OK
    assert calls == ["plan", ("serve", ["mode=serve"]), ("run", True)]


@pytest.mark.parametrize(
    "error, code",
    [
        (ResumeError("the output dir holds another run"), ExitCode.ERROR),
        (NotBuiltError("qlora is not built yet"), ExitCode.NOT_BUILT),
    ],
)
def test_a_user_error_becomes_its_code_and_one_paragraph(tmp_path, monkeypatch, quiet, capsys, error, code):
    def fail(cfg, process_exiting):
        raise error

    monkeypatch.setattr(job, "run", fail)
    assert job.main(_cfg(tmp_path)) is code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_plan_answers_with_a_code_of_the_table(tmp_path, monkeypatch, quiet):
    import sage_vllm_batch.run.plan as plan

    monkeypatch.setattr(plan, "print_plan", lambda cfg: 1)
    assert job.main(_cfg(tmp_path, "mode=plan")) is ExitCode.ERROR
    monkeypatch.setattr(plan, "print_plan", lambda cfg: 7)
    with pytest.raises(ValueError, match="7 is not a valid ExitCode"):
        job.main(_cfg(tmp_path, "mode=plan"))


# -- the real command line: Hydra's and argparse's own exits are in the table too


@pytest.mark.parametrize(
    "args, code",
    [
        (("--help",), ExitCode.OK),
        (("--no-such-flag",), ExitCode.USAGE),  # argparse
        (("no_such_key=1",), ExitCode.ERROR),  # Hydra's composition error
        (("data=corpus/",), ExitCode.USAGE),  # our hint, before Hydra
    ],
)
def test_the_command_line_exits_with_codes_of_the_table(tmp_path, args, code):
    r = run_cli(*args, cwd=tmp_path, timeout=300)
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
