"""Task specs: one small declarative object per task, the one place a task's decisions live.

A :class:`TaskSpec` says which engine runner a task needs, which kind of model, which input
columns it reads by default, which OpenAI endpoint (and vLLM request model) it answers, which
output columns it writes with their Arrow types (its *layout*), and what the commit does to a
vector (``normalize``). The rest of the package asks the spec of a job's ``task.type``
(:func:`task_spec`) instead of comparing task names.

This module is declarative and sits low in the layout (config validation reads it). How a task
turns a row into engine requests is behaviour, and lives where requests are built:
:mod:`sage_vllm_batch.requests.prompts` (a hook per spec, which may yield several requests for
one row). A new task is a spec here, a hook there, and their tests.

Specs are values: nothing here assumes one task per job, so the stages of a pipeline can each
hold their own spec, layout and request builder.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa

from sage_vllm_batch.errors import ConfigError

__all__ = [
    "CHAT",
    "CLASSIFY",
    "EMBED",
    "FINETUNE",
    "GENERATE",
    "SPECS",
    "ClassifyLayout",
    "EmbeddingLayout",
    "Endpoint",
    "GenerationLayout",
    "ModelType",
    "Runner",
    "TaskName",
    "TaskSpec",
    "CHUNK_FIELDS",
    "chunk_id",
    "chunks_documents",
    "embedding_column",
    "endpoint_specs",
    "l2_normalize",
    "spec_for_model_type",
    "spec_for_route",
    "task_spec",
]


class Runner(StrEnum):
    """vLLM's runner: the engine a model is loaded as (one engine serves one runner)."""

    generate = "generate"
    pooling = "pooling"


class ModelType(StrEnum):
    """The kind of model (``model.type``, also a registry tag)."""

    text = "text"
    embedding = "embedding"


# ---------------------------------------------------------------------------- output layouts
# One logprob entry: a token and its logprob (rank 1 = the most likely token).
LOGPROB_ENTRY = pa.struct(
    [
        pa.field("token_id", pa.int32()),
        pa.field("token", pa.string()),
        pa.field("logprob", pa.float32()),
        pa.field("rank", pa.int32()),
    ]
)
# Per position (token), its entries.
LOGPROBS = pa.list_(pa.list_(LOGPROB_ENTRY))


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length (a zero vector stays zero): what ``task.normalize`` and the
    service's ``normalize`` option do to an embedding before it is written or returned."""
    return v / max(float((v * v).sum()) ** 0.5, 1e-12)


def embedding_column(vectors: Sequence[np.ndarray | None], dim: int) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<float32>[dim]`` array with nulls where a row failed."""
    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    mask = np.zeros(len(vectors), dtype=bool)
    for i, v in enumerate(vectors):
        if v is None:
            mask[i] = True
        else:
            flat[i] = v
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))


@dataclass(frozen=True)
class GenerationLayout:
    """Which generation columns a job writes, and their shape.

    With ``samples`` (sampling.n > 1) every per-sample column is a list of length n:
    ``text``, ``finish_reason``, ``completion_tokens``, ``parsed``, ``logprobs`` and
    ``cumulative_logprob``. ``prompt_tokens``/``prompt_logprobs`` are per row. With n = 1 the
    columns are scalars, as they always were. The optional columns exist when the job asks for
    them (or may, per row, through a sampling column) and are null where a row did not.
    """

    samples: bool = False
    parsed: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False

    @classmethod
    def for_job(cls, spec: TaskSpec, cfg: Any = None, embedding_dim: int | None = None) -> GenerationLayout:
        """The layout of a job's config (None: the plain one); a sampling column may ask per row
        for a constraint or logprobs, so it brings their columns."""
        if cfg is None:
            return cls()
        s, per_row = cfg.sampling, bool(cfg.data.sampling_column)
        so = s.get("structured_outputs")
        return cls(
            samples=int(s.n) > 1,
            parsed=per_row or (so is not None and any(v is not None for v in so.values())),
            logprobs=per_row or s.get("logprobs") is not None,
            prompt_logprobs=per_row or s.get("prompt_logprobs") is not None,
        )

    def fields(self) -> list[pa.Field]:
        def per_sample(name: str, t: pa.DataType) -> pa.Field:
            return pa.field(name, pa.list_(t) if self.samples else t)

        fields = [
            per_sample("text", pa.string()),
            per_sample("finish_reason", pa.string()),
            pa.field("prompt_tokens", pa.int32()),
            per_sample("completion_tokens", pa.int32()),
        ]
        if self.parsed:
            fields.append(per_sample("parsed", pa.string()))
        if self.logprobs:
            fields += [per_sample("logprobs", LOGPROBS), per_sample("cumulative_logprob", pa.float64())]
        if self.prompt_logprobs:
            fields.append(pa.field("prompt_logprobs", LOGPROBS))
        return fields

    def columns(self, results: Sequence[Any]) -> dict[str, list[Any]]:
        """Column values for :class:`~sage_vllm_batch.engine.io.EngineResult` rows."""

        def col(attr: str) -> list[Any]:
            if self.samples:
                return [[getattr(s, attr) for s in r.samples] if r.samples else None for r in results]
            return [getattr(r.samples[0], attr) if r.samples else None for r in results]

        cols: dict[str, list[Any]] = {
            "text": col("text"),
            "finish_reason": col("finish_reason"),
            "prompt_tokens": [r.prompt_tokens for r in results],
            "completion_tokens": col("completion_tokens"),
        }
        if not self.samples:  # rows that never reached the engine count 0 tokens, as before
            cols["completion_tokens"] = [r.completion_tokens for r in results]
        if self.parsed:
            cols["parsed"] = col("parsed")
        if self.logprobs:
            cols["logprobs"] = col("logprobs")
            cols["cumulative_logprob"] = col("cumulative_logprob")
        if self.prompt_logprobs:
            cols["prompt_logprobs"] = [r.prompt_logprobs for r in results]
        return cols


# The columns of a chunked document's rows (one row per chunk), before the vector.
CHUNK_FIELDS = (
    pa.field("doc_id", pa.string()),
    pa.field("chunk_index", pa.int32()),
    pa.field("char_start", pa.int64()),
    pa.field("char_end", pa.int64()),
    pa.field("text", pa.string()),
)


def chunk_id(doc_id: str, chunk_index: int) -> int:
    """A chunk's row ``id``: stable across runs (derived from its document and place, not from
    row ordinals, which shift when a file is added), non-negative int64 (FAISS ids, upserts)."""
    digest = hashlib.blake2b(f"{doc_id}\x00{chunk_index}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


def chunks_documents(task: Any, data: Any) -> bool:
    """Whether a job (its ``task`` and ``data`` config) splits each row's text into chunks, one
    output row each: ``task.chunking.size`` None is on for ``data=documents`` and off for tables,
    a size turns it on, 0 off."""
    chunking = task.get("chunking") if task is not None else None
    if chunking is None:
        return False
    size = chunking.get("size")
    return data.get("format") == "documents" if size is None else int(size) > 0


@dataclass(frozen=True)
class EmbeddingLayout:
    """An embedding per row (``fixed_size_list<float32>[dim]``) and its prompt's token count.

    ``normalize`` is the commit transform applied to each vector (None: written as computed).
    ``chunks``: a row per chunk of a document, with ``doc_id``, ``chunk_index``, ``char_start``,
    ``char_end`` and ``text`` (exactly ``source[char_start:char_end]``) before the vector, and
    ``doc_hash`` (the document's content hash: what an incremental run compares) after it.
    """

    dim: int
    normalize: Callable[[np.ndarray], np.ndarray] | None = None
    chunks: bool = False

    @classmethod
    def for_job(cls, spec: TaskSpec, cfg: Any = None, embedding_dim: int | None = None) -> EmbeddingLayout:
        if embedding_dim is None:
            raise ValueError(f"embedding_dim is required for task={spec.name}")
        wanted = cfg is not None and bool(cfg.task.get("normalize", False))
        chunks = cfg is not None and chunks_documents(cfg.task, cfg.data)
        return cls(embedding_dim, spec.normalize if wanted else None, chunks)

    def fields(self) -> list[pa.Field]:
        fields = list(CHUNK_FIELDS) if self.chunks else []
        fields += [
            pa.field("embedding", pa.list_(pa.float32(), self.dim)),
            pa.field("prompt_tokens", pa.int32()),
        ]
        if self.chunks:
            fields.append(pa.field("doc_hash", pa.string()))
        return fields

    def columns(
        self, results: Sequence[Any], chunks: Sequence[Mapping[str, Any]] | None = None
    ) -> dict[str, list[Any]]:
        """Column values for results; ``chunks`` (a chunked layout): each row's chunk record
        (``doc_id``, ``chunk_index``, ``char_start``, ``char_end``, ``text``, ``doc_hash``)."""
        vecs = [r.embedding if r.error is None else None for r in results]
        if self.normalize is not None:
            vecs = [None if v is None else self.normalize(v) for v in vecs]
        cols: dict[str, Any] = {}
        if self.chunks:
            records = chunks or [{} for _ in results]
            for f in CHUNK_FIELDS:
                cols[f.name] = [c.get(f.name) for c in records]
        cols["embedding"] = embedding_column(vecs, self.dim)
        cols["prompt_tokens"] = [r.prompt_tokens for r in results]
        if self.chunks:
            cols["doc_hash"] = [c.get("doc_hash") for c in records]
        return cols


@dataclass(frozen=True)
class ClassifyLayout:
    """The top ``label`` (a string), ``label_scores`` (``map<string, double>``: label ->
    probability, summing to 1) and the prompt's token count. ``scorer`` turns an engine result
    into the label probabilities (:class:`~sage_vllm_batch.requests.classify.LabelScorer`, built
    on the loaded model's tokenizer); a failed row has nulls."""

    scorer: Callable[[Any], Mapping[str, float] | None] | None = None

    @classmethod
    def for_job(cls, spec: TaskSpec, cfg: Any = None, embedding_dim: int | None = None, scorer: Any = None):
        return cls(scorer)

    def fields(self) -> list[pa.Field]:
        return [
            pa.field("label", pa.string()),
            pa.field("label_scores", pa.map_(pa.string(), pa.float64())),
            pa.field("prompt_tokens", pa.int32()),
        ]

    def columns(self, results: Sequence[Any]) -> dict[str, list[Any]]:
        if self.scorer is None:
            raise ValueError("ClassifyLayout.columns needs the scorer of the loaded model")
        scores = [self.scorer(r) for r in results]
        return {
            "label": [None if s is None else max(s, key=s.__getitem__) for s in scores],
            "label_scores": [None if s is None else list(s.items()) for s in scores],
            "prompt_tokens": [r.prompt_tokens for r in results],
        }


Layout = GenerationLayout | EmbeddingLayout | ClassifyLayout


# ---------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Endpoint:
    """The OpenAI route a task answers, as vLLM's server and ``vllm run-batch`` serve it."""

    route: str  # "/v1/chat/completions"
    request_model: str  # vLLM's pydantic request model of the route, "module:Class" (imported when used)
    body_field: str  # the body field holding a request's input ("messages", "prompt", "input")
    column: str  # the row column an OpenAI batch source puts that field in
    json: bool  # the column holds the field as JSON text (a list of messages)
    what: str  # what error messages call one: "a chat request"

    def request_class(self) -> type:
        module, _, name = self.request_model.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, declared once.

    Args:
        name: The ``task.type`` value.
        summary: One line for messages and docs.
        model_type: The kind of model the task needs (``model.type``).
        runner: The vLLM runner of its engine; None: the task runs no inference engine over rows
            (``finetune`` trains a model with its own loop, see :mod:`sage_vllm_batch.finetune`).
        input_columns: The ``data`` keys naming its input column, in order of preference (the
            first one present in the input is read and passed through by default).
        templated: ``data.prompt_template`` builds its input from the row's columns.
        endpoint: The OpenAI route it answers (``data=openai_batch``, ``output.openai_batch``).
        output: Its output layout class (columns and Arrow types); None: it writes no rows.
        normalize: What ``task.normalize=true`` does to each vector at commit (the service's
            ``normalize`` option does the same).
    """

    name: str
    summary: str
    model_type: ModelType
    runner: Runner | None = None
    input_columns: tuple[str, ...] = ()
    templated: bool = False
    endpoint: Endpoint | None = None
    output: type[GenerationLayout] | type[EmbeddingLayout] | type[ClassifyLayout] | None = None
    normalize: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def generates(self) -> bool:
        """It samples new tokens: ``sampling`` applies, and so do LoRA adapters."""
        return self.runner == Runner.generate

    @property
    def vectors(self) -> bool:
        """Its rows carry an embedding: a vector store (``output.vector_store``) can index them."""
        return self.output is not None and issubclass(self.output, EmbeddingLayout)

    @property
    def classifies(self) -> bool:
        """It scores fixed labels in one forward pass (``task.labels``), sampling no text."""
        return self.output is ClassifyLayout

    def layout(self, cfg: Any = None, embedding_dim: int | None = None, scorer: Any = None) -> Layout:
        """Its output columns for a job's config (None: the defaults); ``embedding_dim`` for a
        vector task (the loaded model's); ``scorer`` for a label task (its builder's)."""
        if self.output is None:
            raise ConfigError(f"task={self.name} writes no output rows ({self.summary})")
        if scorer is not None:
            return self.output.for_job(self, cfg, embedding_dim, scorer=scorer)  # type: ignore[call-arg]
        return self.output.for_job(self, cfg, embedding_dim)

    def input_names(self, data: Any, columns: Sequence[str] | None = None) -> list[str]:
        """The input column(s) its rows are read from: none when a prompt template builds the
        input, else the first of its input columns the input has (``columns``, when known)."""
        if self.templated and data.get("prompt_template"):
            return []
        names = [data[k] for k in self.input_columns]
        if columns is not None:
            names = [n for n in names if n in columns] or names
        return names[:1]


EMBED = TaskSpec(
    name="embed",
    summary="one embedding vector per row",
    model_type=ModelType.embedding,
    runner=Runner.pooling,
    input_columns=("text_column",),
    templated=True,
    endpoint=Endpoint(
        route="/v1/embeddings",
        request_model="vllm.entrypoints.pooling.embed.protocol:EmbeddingCompletionRequest",
        body_field="input",
        column="text",
        json=False,
        what="an embeddings request",
    ),
    output=EmbeddingLayout,
    normalize=l2_normalize,
)
GENERATE = TaskSpec(
    name="generate",
    summary="a completion of each row's prompt",
    model_type=ModelType.text,
    runner=Runner.generate,
    input_columns=("prompt_column",),
    templated=True,
    endpoint=Endpoint(
        route="/v1/completions",
        request_model="vllm.entrypoints.openai.completion.protocol:CompletionRequest",
        body_field="prompt",
        column="prompt",
        json=False,
        what="a completion request",
    ),
    output=GenerationLayout,
)
CHAT = TaskSpec(
    name="chat",
    summary="the assistant's answer to each row's conversation",
    model_type=ModelType.text,
    runner=Runner.generate,
    # A conversation, or a plain prompt column asked as one user message.
    input_columns=("messages_column", "prompt_column"),
    templated=True,
    endpoint=Endpoint(
        route="/v1/chat/completions",
        request_model="vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
        body_field="messages",
        column="messages",
        json=True,
        what="a chat request",
    ),
    output=GenerationLayout,
)
# One forward pass per row: the labels' first-token logprobs (requests/classify.py), no text.
CLASSIFY = TaskSpec(
    name="classify",
    summary="the most likely of fixed labels for each row's conversation, with each label's probability",
    model_type=ModelType.text,
    runner=Runner.generate,
    input_columns=("messages_column", "prompt_column"),
    templated=True,
    output=ClassifyLayout,
)
# No row becomes a request: the rows are training examples, the result a registered model.
FINETUNE = TaskSpec(
    name="finetune",
    summary="train a LoRA adapter on the rows (no inference engine)",
    model_type=ModelType.text,
    input_columns=("messages_column", "prompt_column"),
    templated=True,
)

SPECS: Mapping[str, TaskSpec] = {s.name: s for s in (EMBED, GENERATE, CHAT, CLASSIFY, FINETUNE)}
# The values of task.type (the schema's enum): one per spec.
TaskName = StrEnum("TaskName", [(name, name) for name in SPECS])  # type: ignore[misc]


def task_spec(task: str | TaskSpec) -> TaskSpec:
    """The spec of a ``task.type`` value (a spec is returned as it is).

    Raises:
        ConfigError: no task of that name, naming the choices.
    """
    if isinstance(task, TaskSpec):
        return task
    spec = SPECS.get(str(task)) if isinstance(task, str) else None
    if spec is None:
        raise ConfigError(f"task.type: must be one of {', '.join(SPECS)}, got {task!r}")
    return spec


def spec_for_model_type(model_type: str) -> TaskSpec:
    """The first task (in registry order) that runs a model of this kind on an engine: what a
    server loads a model as (embedding -> embed, text -> generate, whose engine chat shares).

    Raises:
        ConfigError: no task runs a model of that kind.
    """
    spec = next((s for s in SPECS.values() if s.runner is not None and s.model_type == model_type), None)
    if spec is None:
        raise ConfigError(f"model.type: must be one of {', '.join(ModelType)}, got {model_type!r}")
    return spec


def endpoint_specs() -> list[TaskSpec]:
    """The tasks that answer an OpenAI route, ordered by route (how the routes are listed)."""
    return sorted((s for s in SPECS.values() if s.endpoint is not None), key=lambda s: s.endpoint.route)


def spec_for_route(route: str | None) -> TaskSpec | None:
    """The task that answers an OpenAI route (``/v1/embeddings`` -> embed), or None."""
    return next((s for s in SPECS.values() if s.endpoint is not None and s.endpoint.route == route), None)
