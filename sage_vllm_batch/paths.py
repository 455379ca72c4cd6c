"""Where the workspace's config groups, job presets, registry and outputs live."""

from __future__ import annotations

import os
from pathlib import Path

# The package sits in the workspace (editable install): conf/ and jobs/ are its siblings.
WORKSPACE = Path(os.environ.get("SAGE_VLLM_BATCH_HOME", Path(__file__).resolve().parent.parent))
CONF_DIR = WORKSPACE / "conf"
JOBS_DIR = WORKSPACE / "jobs"
