"""``/v1/search``'s request and response bodies (also :meth:`SearchServing.search`'s)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sage_vllm_batch.service.bodies import validated

MAX_K = 100
MAX_QUERIES = 100


class SearchRequest(BaseModel):
    """One search: ``query`` or ``queries`` (not both), and how many hits each."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, min_length=1, description="one query")
    queries: list[str] | None = Field(
        None, min_length=1, max_length=MAX_QUERIES, description=f"up to {MAX_QUERIES} queries"
    )
    k: int | None = Field(None, ge=1, le=MAX_K, description="hits per query (default: the config's search.k)")

    @model_validator(mode="after")
    def _one(self) -> SearchRequest:
        if (self.query is None) == (self.queries is None):
            raise ValueError("give 'query' (a string) or 'queries' (a list of strings), not both")
        if any(not q.strip() for q in self.texts):
            raise ValueError("a query must not be empty")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.query] if self.query is not None else list(self.queries or [])

    @classmethod
    def of(cls, payload: Any) -> SearchRequest:
        """``payload`` checked, or a BadRequest naming what is wrong (``payload.<field>``)."""
        return validated(cls, payload, "payload")


class SearchHit(BaseModel):
    """One hit of one query: the row's document, chunk, text and cosine similarity."""

    query: str
    rank: int = Field(description="1 = the best hit of its query")
    doc_id: str | None
    chunk_index: int
    score: float = Field(description="cosine similarity of the query and the row's vector")
    text: str | None


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
