"""``sage-vllm-models`` through typer's CliRunner, plus real subprocess runs of the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import REPO_ROOT, TINY_MAIN, FakeHub, make_model_dir, start_tiny_hub
from typer.testing import CliRunner

from sage_vllm_batch.registry import cli, store

runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(store.ENV_ROOT, raising=False)
    return tmp_path / "reg"


def run(root: Path, *args: str, input: str | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(cli.app, ["--root", str(root), *args], input=input)


def assert_user_error(result, *fragments: str) -> None:
    """Exit 1, one 'Error:' paragraph on stderr naming the fix, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


def test_help() -> None:
    for flag in ("--help", "-h"):
        result = runner.invoke(cli.app, [flag])
        assert result.exit_code == 0
        for command in ("list", "show", "download", "import", "verify", "delete", "gc", "--root"):
            assert command in result.output
    bare = runner.invoke(cli.app, [])
    assert "Usage" in bare.output and "import" in bare.output  # no_args_is_help


def test_import_list_show_verify(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src", arch="BertModel")
    result = run(root, "import", "org/emb", "--path", str(src), "--revision", "v1", "--tag", "team=search")
    assert result.exit_code == 0, result.output
    assert "Imported org/emb@v1 (embedding" in result.stdout

    table = run(root, "list")
    assert table.exit_code == 0 and "org/emb" in table.stdout and "embedding" in table.stdout
    rows = json.loads(run(root, "list", "--json").stdout)
    assert [(r["id"], r["revision"], r["type"]) for r in rows] == [("org/emb", "v1", "embedding")]
    assert rows[0]["tags"] == {"team": "search", "type": "embedding"} and "files" not in rows[0]
    assert rows[0]["source"]["spec"] == f"path:{src}"

    shown = json.loads(run(root, "show", "org/emb").stdout)
    assert shown["id"] == "org/emb" and shown["revisions"][0]["path"] == str(root / "models/org--emb/v1")
    assert "config.json" in shown["revisions"][0]["files"]

    ok = run(root, "verify")
    assert ok.exit_code == 0 and "OK      org/emb@v1" in ok.stdout
    (root / "models/org--emb/v1/config.json").write_text("{}")
    bad = run(root, "verify", "org/emb")
    assert bad.exit_code == 1 and "FAILED  org/emb@v1: config.json: size" in bad.stdout
    assert "sage-vllm-models delete" in bad.stderr


def test_delete_asks_first(root: Path, tmp_path: Path) -> None:
    run(root, "import", "org/m", "--path", str(make_model_dir(tmp_path, "src")))
    declined = run(root, "delete", "org/m", input="n\n")
    assert declined.exit_code == 1 and "Delete org/m@local" in declined.output
    assert (root / "models/org--m/local").is_dir()
    accepted = run(root, "delete", "org/m", input="y\n")
    assert accepted.exit_code == 0 and "Deleted org/m@local" in accepted.stdout
    assert not (root / "models/org--m").exists()
    assert_user_error(run(root, "delete", "org/m", "--yes"), "org/m", "sage-vllm-models list")


def test_gc(root: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        run(root, "import", f"org/{name}", "--path", str(make_model_dir(tmp_path, name)))
    dry = run(root, "gc", "--max-size", "5KB", "--dry-run")
    assert dry.exit_code == 0 and "Would evict" in dry.stdout and "org/a" in dry.stdout
    assert len(json.loads(run(root, "list", "--json").stdout)) == 2
    done = run(root, "gc", "--max-size", "5KB", "--yes")
    assert done.exit_code == 0 and "Deleted org/a@local" in done.stdout
    assert [r["id"] for r in json.loads(run(root, "list", "--json").stdout)] == ["org/b"]
    assert "nothing to evict" in run(root, "gc", "--max-size", "20GB").stdout
    assert run(root, "gc", "--max-size", "lots").exit_code == 2


def test_user_errors_are_one_line_with_a_hint(root: Path, tmp_path: Path) -> None:
    assert_user_error(run(root, "show", "org/absent"), "org/absent", "sage-vllm-models download org/absent")
    assert_user_error(run(root, "import", "../escape", "--path", str(tmp_path)), "Invalid model id")
    assert_user_error(
        run(root, "import", "org/m", "--package", "no_such_pkg_xyz", "--file", "model"), "pip install"
    )
    src = make_model_dir(tmp_path, "src")
    run(root, "import", "org/m", "--path", str(src))
    assert_user_error(run(root, "import", "org/m", "--path", str(src)), "--force")
    assert run(root, "import", "org/m", "--path", str(src), "--force").exit_code == 0


def test_usage_errors_exit_2(root: Path) -> None:
    assert run(root, "import", "org/m").exit_code == 2  # no source
    assert run(root, "import", "org/m", "--file", "x", "--path", "/tmp").exit_code == 2
    assert run(root, "import", "org/m", "--path", "/tmp", "--tag", "novalue").exit_code == 2
    assert run(root, "frobnicate").exit_code == 2


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_root = tmp_path / "from-env"
    monkeypatch.setenv(store.ENV_ROOT, str(env_root))
    result = runner.invoke(cli.app, ["import", "org/m", "--path", str(make_model_dir(tmp_path, "src"))])
    assert result.exit_code == 0, result.output
    assert (env_root / "metadata.json").is_file()


def test_download_command(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub: FakeHub = start_tiny_hub(monkeypatch, tmp_path)
    try:
        result = run(root, "download", "org/tiny", "--quiet")
        assert result.exit_code == 0, result.output
        assert "org/tiny@main" in result.stdout
        shown = json.loads(run(root, "show", "org/tiny", "--revision", "main").stdout)
        assert shown["revisions"][0]["source"]["commit"] == TINY_MAIN
        assert_user_error(run(root, "download", "org/nope", "--quiet"), "'org/nope' was not found")
    finally:
        hub.stop()


def _subprocess(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(store.ENV_ROOT, None)
    return subprocess.run(
        [sys.executable, "-m", "sage_vllm_batch.registry.cli", "--root", str(root), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_module_runs_as_a_real_process(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src")
    imported = _subprocess(root, "import", "org/m", "--path", str(src), "--tag", "type=embedding")
    assert imported.returncode == 0, imported.stderr
    rows = json.loads(_subprocess(root, "list", "--json").stdout)
    assert [(r["id"], r["type"]) for r in rows] == [("org/m", "embedding")]

    missing = _subprocess(root, "show", "org/absent")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("Error: Model 'org/absent'") and "Traceback" not in missing.stderr
    assert "sage-vllm-models import org/absent" in missing.stderr
