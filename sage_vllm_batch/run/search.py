"""``mode=search``: ask a job's vector store, with the job's own model and query prompt.

The job's command plus ``mode=search search.query="..."`` (or ``search.queries_path=FILE``, one
query per line) finds that job's output dir (``search.*`` and ``mode`` do not name it), embeds the
queries with the model that embedded the documents, the query prefix of
:func:`~sage_vllm_batch.requests.instructions.instructions` before each, and answers the top
``search.k`` rows of its store (LanceDB, FAISS or pgvector) by cosine similarity: one record per
hit, :data:`RECORD_KEYS`.

Searching writes nothing into the output dir: no log, no metrics, no lock (the CLI skips
``run.log`` and Hydra's ``.hydra/`` files for ``mode=search``). The service answers the same
records on ``POST /v1/search`` (:mod:`sage_vllm_batch.service.search`), with the same
:func:`search_store`, :func:`query_prefix` and :func:`records`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sage_vllm_batch.config.stages import PIPELINE, vector_column_of
from sage_vllm_batch.errors import ConfigError, DataError, UsageError
from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.outputs.outdir import output_dir_of
from sage_vllm_batch.outputs.vector_search import SCORE_KEY, search_many, store_location
from sage_vllm_batch.requests.builder import DATA_KEYS, RequestBuilder
from sage_vllm_batch.requests.instructions import instructions
from sage_vllm_batch.storage import as_dir

if TYPE_CHECKING:
    from sage_vllm_batch.engine.engine import EngineVerbs

log = logging.getLogger(__name__)

__all__ = [
    "HIT_KEYS",
    "RECORD_KEYS",
    "STORE_TYPES",
    "embed_queries",
    "query_prefix",
    "read_queries",
    "records",
    "drop_new_empty_dir",
    "search_job",
    "search_store",
]

STORE_TYPES = ("lancedb", "faiss", "pgvector")
HIT_KEYS = ("id", "doc_id", "chunk_index", "score", "text")
RECORD_KEYS = ("query", "rank", "doc_id", "chunk_index", "score", "text")
MAX_K = 1000


def _run_first(what: str) -> str:
    return (
        f"{what}: run the job first with a vector store (output=lancedb|faiss|pgvector), then add "
        "mode=search to the same command"
    )


# ---------------------------------------------------------------------------------------- stores
def _hit(row: dict[str, Any], score: float) -> dict[str, Any]:
    """A store's row as a hit. A store built before stores carried the row keys: ``doc_id`` is the
    id, ``chunk_index`` 0."""
    rid = row.get("id")
    doc_id = row.get("doc_id")
    return {
        "id": None if rid is None else int(rid),
        "doc_id": str(rid) if doc_id is None and rid is not None else doc_id,
        "chunk_index": int(row.get("chunk_index") or 0),
        "score": min(1.0, max(-1.0, float(score))),  # float32 rounding may pass 1
        "text": row.get("text"),
    }


def check_store(cfg: DictConfig, out_dir: Any) -> str:
    """The store type of the job, after checking that its store is there to search (pgvector:
    that it is configured; its rows are the server's to say).

    Raises:
        ConfigError: The job has no vector store, or it was not built yet.
    """
    vs = cfg.output.vector_store
    kind = vs.type
    if not kind:
        raise ConfigError(_run_first("this job has no vector store (output.vector_store.type is null)"))
    kind = str(getattr(kind, "value", kind))
    if kind not in STORE_TYPES:
        raise ConfigError(f"output.vector_store.type: must be {', '.join(STORE_TYPES)}, got {kind!r}")
    if kind == "pgvector":
        if not vs.get("url"):
            raise ConfigError("output.vector_store.url: pgvector needs postgresql://user@host:port/db")
        if not (as_dir(str(out_dir)) / MANIFEST).exists():  # its rows are keyed by the output dir
            raise ConfigError(_run_first(f"no run of this job at {out_dir}, so no pgvector rows of it"))
        return kind
    path, _, exists = store_location(out_dir, vs)
    if not exists:
        raise ConfigError(_run_first(f"no {kind} vector store at {path}"))
    return kind


def search_store(cfg: DictConfig, out_dir: str | Path, queries: np.ndarray, k: int) -> list[list[dict]]:
    """The ``k`` nearest rows of the job's vector store to each query vector, by cosine similarity.

    Args:
        cfg: The job's config (``output.vector_store``: ``type`` lancedb, faiss or pgvector).
        out_dir: The job's output dir (where a LanceDB/FAISS store lives unless ``vs.path`` is
            set; pgvector's rows are keyed by it).
        queries: ``(q, dim)`` query vectors (normalised here; any length).
        k: Hits per query (fewer when the store holds fewer rows).

    Returns:
        Per query, its hits best first: ``{"id", "doc_id", "chunk_index", "score", "text"}``, the
        score the cosine similarity.

    Raises:
        ConfigError: No vector store configured, or none built yet (the message says to run the
            job with ``output=lancedb|faiss|pgvector``), or its package is missing.
    """
    q = np.asarray(queries, dtype=np.float32)
    q = q.reshape(1, -1) if q.ndim == 1 else q
    kind = check_store(cfg, out_dir)
    vs = cfg.output.vector_store
    if kind == "pgvector":
        try:
            from sage_vllm_batch.outputs.pgvector import job_key, search_pgvector
        except ImportError as e:
            raise ConfigError(f"output.vector_store.type=pgvector cannot be searched here: {e}") from e
        found = search_pgvector(vs, job_key(out_dir), q, int(k))
        return [[_hit(h, h["score"]) for h in hits] for hits in found]
    found = search_many(out_dir, vs, q, int(k))
    return [[_hit(h, h[SCORE_KEY]) for h in hits] for hits in found]


def records(queries: Sequence[str], hits: Sequence[Sequence[dict]]) -> list[dict[str, Any]]:
    """The answer's records: per query, per hit, :data:`RECORD_KEYS` (``rank`` from 1)."""
    return [
        {"query": q, "rank": rank, **{key: h[key] for key in RECORD_KEYS[2:]}}
        for q, found in zip(queries, hits, strict=True)
        for rank, h in enumerate(found, start=1)
    ]


# --------------------------------------------------------------------------------------- queries
def read_queries(search: Any) -> list[str]:
    """The queries of ``search.query`` or ``search.queries_path`` (one per line, blank lines
    skipped).

    Raises:
        UsageError: Neither or both are given, or they hold no query.
        DataError: The queries file cannot be read.
    """
    query, path = search.get("query"), search.get("queries_path")
    if query is None and not path:
        raise UsageError(
            'mode=search needs a query: search.query="..." or search.queries_path=FILE (one query per line)'
        )
    if query is not None and path:
        raise UsageError("mode=search: give search.query or search.queries_path, not both")
    if query is not None:
        if not str(query).strip():
            raise UsageError("search.query: must not be empty")
        return [str(query).strip()]
    where = as_dir(str(path))
    where = where.expanduser() if isinstance(where, Path) else where
    try:
        text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"search.queries_path: cannot read {where}: {e}") from e
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UsageError(f"search.queries_path: {where} holds no query (one per line)")
    return queries


def search_k(search: Any, limit: int = MAX_K) -> int:
    k = search.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
        raise ConfigError(f"search.k: must be an integer in [1, {limit}], got {k!r}")
    return k


def query_prefix(cfg: DictConfig, model_id: str, model_dir: str | None) -> str:
    """What goes before each query: the job's ``search.query_prompt``, else the model folder's or
    a known family's query prompt (:func:`~sage_vllm_batch.requests.instructions.instructions`)."""
    search = cfg.get("search") or {}
    return instructions(
        model_id,
        model_dir,
        embed_prompt=cfg.task.get("embed_prompt"),
        query_prompt=search.get("query_prompt"),
    ).query


def embed_queries(engine: EngineVerbs, queries: Sequence[str], prefix: str = "") -> np.ndarray:
    """The ``(q, dim)`` embeddings of ``prefix + query`` on ``engine`` (an over-long query is cut,
    keeping its closing special token, as a row is).

    Raises:
        DataError: A query could not be embedded (the engine's reason, the query's number).
    """
    task = OmegaConf.create({"type": "embed", "overlong_prompt": "truncate"})
    data = OmegaConf.create({**dict.fromkeys(DATA_KEYS), "text_column": "text"})
    builder = RequestBuilder(task, data, {}, engine)
    results = engine.run_all(builder.build(i, {"text": prefix + q}) for i, q in enumerate(queries))
    for i, r in enumerate(results):
        if r.error is not None or r.embedding is None:
            raise DataError(f"query {i + 1} ({queries[i][:60]!r}) could not be embedded: {r.error}")
    return np.stack([np.asarray(r.embedding, dtype=np.float32) for r in results])


# -------------------------------------------------------------------------------------- the mode
def embedding_job(cfg: DictConfig, out_dir: Any) -> DictConfig:
    """The job whose model embeds the queries: ``cfg`` itself, or for task=pipeline its embed
    stage as a job (that stage's model and template, task=embed) with the pipeline's output.

    A pipeline's store holds its rows' ``id`` and scalar columns: a hit's ``doc_id`` is the id,
    its ``chunk_index`` 0, its ``text`` the row's ``text`` column if it has one (else null).
    """
    if str(cfg.task.type) != PIPELINE:
        return cfg
    from sage_vllm_batch.run.stage import stage_job

    name = vector_column_of(cfg)
    job = stage_job(cfg, name, cfg.stages[name], out_dir)
    job.output = cfg.output
    job.job_name = cfg.get("job_name", name)
    return job


def search_job(cfg: DictConfig, *, process_exiting: bool = False) -> list[dict[str, Any]]:
    """``mode=search``'s core: the records (:data:`RECORD_KEYS`) of the job's queries.

    The store is checked before the model loads; the model is held (registry lease) and loaded
    once, in this process as the job's ``engine`` says, and closed before the store is read.

    Raises:
        UsageError: No query given (see :func:`read_queries`).
        ConfigError: A bad config, no vector store, or none built yet.
    """
    from sage_vllm_batch.config import validate
    from sage_vllm_batch.run.model import hold_model, load_engine
    from sage_vllm_batch.tasks import task_spec

    queries = read_queries(cfg.search)
    k = search_k(cfg.search)
    validate(cfg)
    out_dir = output_dir_of(cfg)
    cfg = embedding_job(cfg, out_dir)
    if not task_spec(cfg.task.type).vectors:
        raise ConfigError(
            f"mode=search searches the vector store of an embedding job, not task={cfg.task.type}"
        )
    check_store(cfg, out_dir)
    with hold_model(cfg, purpose=f"search {cfg.get('job_name', '?')}") as model:
        prefix = query_prefix(cfg, model.id, model.path)
        log.info("embedding %d quer%s with %s", len(queries), "y" if len(queries) == 1 else "ies", model.id)
        engine = load_engine(cfg, model)
        try:
            vectors = embed_queries(engine, queries, prefix)
        finally:
            if process_exiting:
                engine.leave_to_exit()
            else:
                engine.close()
    return records(queries, search_store(cfg, out_dir, vectors, k))


def drop_new_empty_dir(path: Any, since: float) -> None:
    """Remove ``path`` if it is an empty local directory made after ``since`` (a timestamp):
    Hydra makes the run dir before ``mode=search`` runs, so searching a job that never ran would
    leave an empty directory behind (and its parents, made for it). Anything older, or not empty,
    stays."""
    if not isinstance(path, Path):
        return
    path, top = path.absolute(), Path.cwd().absolute()
    try:
        # Hydra's run dirs are below the working directory: never above it, nor it.
        while top in path.parents and path.stat().st_mtime >= since and not any(path.iterdir()):
            path.rmdir()
            path = path.parent
    except OSError:
        return
