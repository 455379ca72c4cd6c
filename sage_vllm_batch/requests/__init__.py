"""Rows -> engine requests: prompt templates, chat rendering, per-row sampling, OpenAI batch bodies."""

from sage_vllm_batch.requests.builder import RequestBuilder, RowError, request_builder, sampling_dict

__all__ = ["RequestBuilder", "RowError", "request_builder", "sampling_dict"]
