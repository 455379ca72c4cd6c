"""The handler of ``/v1/process`` and of :meth:`VLLMService.process`: one request, checked, run on
the service's ``generate`` or ``embed`` verb."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_vllm_batch.service.errors import BadRequest, NotFound
from sage_vllm_batch.service.process.protocol import (
    PROCESS_TASKS,
    EmbedResponse,
    GenerateResponse,
    ProcessRequest,
    ProcessResponse,
)
from sage_vllm_batch.service.slots import EMBED, TEXT

if TYPE_CHECKING:
    from sage_vllm_batch.service.service import VLLMService


class ProcessServing:
    """Runs :class:`ProcessRequest`s on ``service``."""

    def __init__(self, service: VLLMService) -> None:
        self.service = service

    def process(self, request: ProcessRequest) -> ProcessResponse:
        task, options = request.task, request.options or {}
        if PROCESS_TASKS[task].generates:
            self._check_model(TEXT, request.model)
            return GenerateResponse(
                task=task,
                model_id=self.service.slot(TEXT).name,
                outputs=self.service.generate(request.inputs, **options),
            )
        self._check_model(EMBED, request.model)
        opts = dict(options)
        normalize = opts.pop("normalize", True)
        if opts:
            raise BadRequest(f"payload.options: embed takes only 'normalize', got {', '.join(sorted(opts))}")
        if not isinstance(normalize, bool):
            raise BadRequest("payload.options.normalize: must be true or false")
        return EmbedResponse(task=task, **self.service.embed(request.inputs, normalize=normalize))

    def _check_model(self, kind: str, model: Any) -> None:
        if model is not None and model != self.service.slot(kind).name:
            raise NotFound(
                f"payload.model: {model!r} is not served for this task; served: {self.service.model_names}"
            )
