"""A quiet console: the runner's lines, progress and errors; libraries log to <output.dir>/run.log.
The default job's console is checked in test_cli_jobs.test_default_job_end_to_end (one CLI run)."""

from __future__ import annotations

import logging

from sage_vllm_batch import logs


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
