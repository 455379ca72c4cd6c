"""A quiet console: the runner's lines, progress and errors; libraries log to <output.dir>/run.log."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import run_cli

from sage_vllm_batch import logs


def _console_lines(text):
    lines = [x for x in text.splitlines() if x.strip()]
    progress = [x for x in lines if x.startswith("{") and json.loads(x)["event"] in ("progress", "done")]
    return [x for x in lines if x not in progress], progress


@pytest.mark.engine
def test_default_job_console_is_quiet(registry_root, tmp_path):
    out = tmp_path / "out"
    r = run_cli(f"registry.root={registry_root}", f"output.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stderr)  # shown with -s: the whole console of the default job
    assert r.stdout == ""
    lines, progress = _console_lines(r.stderr)
    assert progress and json.loads(progress[-1])["rows"] == 3000
    assert len(lines) == 4, lines  # loading, engine ready, rows written, done
    assert all("][sage_vllm_batch" in x for x in lines), lines
    assert "WARNING" not in r.stderr and "Warning" not in r.stderr
    log = (out / "run.log").read_text()
    assert "[vllm." in log and "Engine ready" in log  # vLLM's own lines are kept in the log file
    assert "Passing raw prompts to InputProcessor is deprecated" not in log


def test_library_logs_go_to_the_file_unless_verbose(tmp_path):
    root = logging.getLogger()
    seen: list[str] = []

    class Console(logging.StreamHandler):
        def emit(self, record):
            if self.filter(record):
                seen.append(record.name)

    console = Console()
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    # As under the CLI (VLLM_CONFIGURE_LOGGING=0): vLLM's loggers propagate to the root logger; an
    # engine loaded earlier in this session may have configured them otherwise.
    vllm_logger = logging.getLogger("vllm")
    propagate = vllm_logger.propagate
    vllm_logger.propagate = True
    try:
        path = logs.configure(verbose=False, log_dir=tmp_path)
        for name in ("vllm.model_executor", "transformers.modeling_utils", "py.warnings"):
            logging.getLogger(name).warning("library noise")
        logging.getLogger("vllm.engine").error("a real failure")
        logging.getLogger("sage_vllm_batch.job").info("ours")
        assert seen == ["vllm.engine", "sage_vllm_batch.job"]
        for h in root.handlers:
            h.flush()
        assert path.read_text().count("library noise") == 3
        seen.clear()
        logs.configure(verbose=True, log_dir=None)
        logging.getLogger("vllm.model_executor").warning("library noise")
        assert seen == ["vllm.model_executor"]
    finally:
        vllm_logger.propagate = propagate
        root.setLevel(level)
        root.removeHandler(console)
        fh = logs._state.get("file")
        if isinstance(fh, logging.Handler):
            root.removeHandler(fh)
            fh.close()
        logs._state.update(file=None, verbose=True)
