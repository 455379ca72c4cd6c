"""Unit tests of the job checks of the service (no engine)."""

from __future__ import annotations

import pytest

from sage_vllm_batch.service.security import api_key_ok, check_data_path, check_output_dir, check_overrides
from sage_vllm_batch.service.service import ServiceError


@pytest.mark.parametrize(
    "override, key",
    [
        ("model=minilm-l6-v2", "model"),
        ("model.id=org/x", "model.id"),
        ("+engine.extra.x=1", "engine.extra.x"),
        ("registry.root=/tmp", "registry.root"),
        ("hydra.run.dir=/tmp", "hydra.run.dir"),
        ("serve.data_roots=[/]", "serve.data_roots"),
        ("~engine", "engine"),
    ],
)
def test_fixed_sections_are_refused_naming_the_key(override, key):
    with pytest.raises(ServiceError) as e:
        check_overrides(["task=chat", override])
    assert e.value.status == 403 and repr(key) in str(e.value)


def test_job_overrides_shape():
    assert check_overrides(["task=chat", "data.path=/x"]) == ["task=chat", "data.path=/x"]
    for bad in ("task=chat", [1], ["novalue"]):
        with pytest.raises(ServiceError):
            check_overrides(bad)


def test_data_paths_must_stay_inside_the_roots(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "ok.jsonl").write_text("{}\n")
    (outside / "s.jsonl").write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside / "s.jsonl")
    (root / "sub").mkdir()
    (root / "sub" / "dirlink").symlink_to(outside)
    check_data_path(str(root / "ok.jsonl"), [str(root)])
    check_data_path(str(root / "*.jsonl").replace("*.jsonl", "ok*.jsonl"), [str(root)])
    for bad in (
        root / "link.jsonl",  # a symlink out
        f"{root}/../outside/s.jsonl",  # ../
        outside / "s.jsonl",  # absolute, elsewhere
        root / "*.jsonl",  # a glob matching the symlink
        root / "sub",  # a directory holding a link out
    ):
        with pytest.raises(ServiceError, match="data.path"):
            check_data_path(str(bad), [str(root)])
    with pytest.raises(ServiceError, match="serve.data_roots"):
        check_data_path(str(root / "ok.jsonl"), [])


def test_output_dir_inside_the_root(tmp_path):
    assert (
        check_output_dir(str(tmp_path / "o" / "job"), str(tmp_path / "o"))
        == (tmp_path / "o" / "job").resolve()
    )
    with pytest.raises(ServiceError, match="output.dir"):
        check_output_dir(str(tmp_path / "o" / ".." / "x"), str(tmp_path / "o"))


def test_api_key_check():
    assert api_key_ok("Bearer k1", "k1") and api_key_ok("bearer k1", "k1")
    assert not api_key_ok("Bearer k2", "k1") and not api_key_ok(None, "k1") and not api_key_ok("k1", "k1")


def test_a_reader_choice_cannot_open_files_outside_the_roots(tmp_path):
    """``data.format=hf data.hf_loader=text`` reads ``.txt`` files, which a check of data files
    alone would skip: every file the reader opens, and every entry the path names, is checked."""
    from omegaconf import OmegaConf

    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "a.jsonl").write_text("{}\n")
    (outside / "secret.txt").write_text("secret\n")
    (root / "b.txt").symlink_to(outside / "secret.txt")
    for path in (root, root / "*.txt"):
        data = OmegaConf.create({"path": str(path), "format": "hf", "hf_loader": "text"})
        with pytest.raises(ServiceError, match="outside the server's data roots"):
            check_data_path(str(path), [str(root)], data=data)
    (root / "b.txt").unlink()
    (root / "b.txt").write_text("fine\n")
    check_data_path(str(root), [str(root)], data=OmegaConf.create({"path": str(root), "format": "hf", "hf_loader": "text"}))
