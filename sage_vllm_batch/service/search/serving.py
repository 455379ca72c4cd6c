"""The handler of ``/v1/search`` and of :meth:`VLLMService.search`-style in-process calls: the
queries embedded with the service's embedding model (its query prefix before each, as
``mode=search`` does), then the serve config's job store searched (:mod:`sage_vllm_batch.run.search`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from sage_vllm_batch.errors import ConfigError, SageBatchError
from sage_vllm_batch.outputs.files import MANIFEST
from sage_vllm_batch.outputs.outdir import output_dir_of
from sage_vllm_batch.run.search import query_prefix, records, search_store
from sage_vllm_batch.service.errors import Conflict, NotFound
from sage_vllm_batch.service.search.protocol import SearchRequest, SearchResponse
from sage_vllm_batch.service.slots import EMBED

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sage_vllm_batch.service.service import VLLMService


class SearchServing:
    """Answers :class:`SearchRequest` s from the store of ``cfg``'s job (the config the server was
    started with: its ``output.dir`` and ``output.vector_store``), on ``service``'s embedding model.

    Args:
        service: The set-up service (its embedding model embeds the queries).
        cfg: The server's job config; None: every search is refused (409), naming how to start
            the server with one.
    """

    def __init__(self, service: VLLMService, cfg: DictConfig | None) -> None:
        self.service = service
        self.cfg = cfg
        self.out_dir: Any = None
        self._no_dir: str | None = None
        if cfg is not None:
            try:  # now, while Hydra's run dir (output.dir's default) resolves
                self.out_dir = output_dir_of(cfg)
            except ConfigError as e:
                self._no_dir = str(e)

    def search(self, request: SearchRequest) -> SearchResponse:
        cfg = self._config()
        slot = self.service.slot(EMBED)  # Conflict (409) when no embedding model is loaded
        if self.out_dir is None:
            raise Conflict(f"search: the server's job has no output dir: {self._no_dir}")
        out_dir = self.out_dir
        self._check_model(out_dir, slot.resolved.id)
        k = request.k or int(cfg.search.get("k") or 5)
        texts = request.texts
        prefix = query_prefix(cfg, slot.resolved.id, slot.resolved.path)
        try:
            vectors = self.service.embed([prefix + t for t in texts], normalize=True)["vectors"]
            found = search_store(cfg, out_dir, np.asarray(vectors, dtype=np.float32), k)
        except ConfigError as e:  # no store, or none built yet
            raise NotFound(f"search: {e}") from e
        except ValueError as e:  # the store's vectors and the model's differ in size
            raise Conflict(f"search: {e}; the store was built with another model") from e
        return SearchResponse(data=records(texts, found))

    def _config(self) -> DictConfig:
        if self.cfg is None:
            raise Conflict(
                "search: the server has no job to search; start it with the job's own command plus "
                "mode=serve (e.g. task=embed data.path=DIR output=lancedb mode=serve)"
            )
        if not self.cfg.output.vector_store.type:
            raise NotFound(
                "search: the server's job has no vector store; start it with the job's command, "
                "which names one (output=lancedb|faiss|pgvector), after running that job"
            )
        return self.cfg

    def _check_model(self, out_dir: Any, served: str) -> None:
        """The job's vectors come from the model that embeds the queries (its manifest says which)."""
        try:
            manifest = json.loads((out_dir / MANIFEST).read_text())
        except (OSError, ValueError, SageBatchError):
            return  # no run yet: search_store says so
        built = (manifest.get("model") or {}).get("id")
        if built and built != served:
            raise Conflict(
                f"search: the job's vectors were made by {built}, but the embedding model served is "
                f"{served}; serve {built} (embedding_model= or model=)"
            )
