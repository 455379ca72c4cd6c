"""``/v1/jobs``: batch jobs of the streaming runner on the service's loaded engines."""

from sage_vllm_batch.service.jobs.record import Job, job_id_of
from sage_vllm_batch.service.jobs.serving import JobManager

__all__ = ["Job", "JobManager", "job_id_of"]
