"""``/v1/jobs`` over :class:`~.serving.JobManager` (``app.state.sage_jobs``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sage_vllm_batch.service.bodies import parse_json
from sage_vllm_batch.service.jobs.protocol import DeletedJob, JobInfo, JobList, SubmitJobRequest
from sage_vllm_batch.service.jobs.serving import JobManager
from sage_vllm_batch.service.routing import ERRORS, answer, call, family_router, json_body

router = family_router()


def jobs(request: Request) -> JobManager:
    return request.app.state.sage_jobs


@router.post(
    "/v1/jobs",
    response_model=JobInfo,
    status_code=201,
    responses={200: {"model": JobInfo, "description": "the same job, already queued or running"}, **ERRORS},
    openapi_extra=json_body(SubmitJobRequest),
)
async def submit_job(raw_request: Request) -> JSONResponse:
    body = SubmitJobRequest.of(parse_json(await raw_request.body()))
    info, started = await call(jobs(raw_request).submit, body.overrides)
    return answer(JobInfo.model_validate(info), 201 if started else 200)


@router.get("/v1/jobs", response_model=JobList, responses=ERRORS)
async def list_jobs(raw_request: Request) -> JSONResponse:
    return answer(JobList(data=await call(jobs(raw_request).list)))


@router.get("/v1/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def get_job(job_id: str, raw_request: Request) -> JSONResponse:
    return answer(JobInfo.model_validate(await call(jobs(raw_request).get, job_id)))


@router.delete("/v1/jobs/{job_id}", response_model=JobInfo | DeletedJob, responses=ERRORS)
async def delete_job(job_id: str, raw_request: Request) -> JSONResponse:
    # A queued or running job is cancelled; a finished one's record is removed (not its output).
    return answer(JobInfo.model_validate(await call(jobs(raw_request).delete, job_id)))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
