"""`TrainerJobManager`: create, wait for, resume, reconnect to and delete service-mode trainers.

Built on the control plane's trainer-job calls and the trainer gateway's health probe; what the
job states mean and how readiness, resume and reconnect use them: docs/platform-contract.md,
'Trainer job states'. Every wait has a deadline and ends in a typed error; every poll interval and
timeout is a parameter with the reference SDK's default.
"""

from __future__ import annotations

import logging

from sdk._account import FireworksClient
from sdk._http import response_json
from sdk._ids import check_id
from sdk._polling import Clock, Deadline, check_interval
from sdk.errors import FireworksError, NotFoundError, TrainerJobError, WaitTimeoutError
from sdk.resources import (
    CheckpointInfo,
    CreatedTrainerJob,
    TrainerJob,
    TrainerServiceEndpoint,
    TrainingShapeProfile,
)
from sdk.states import JOB_PENDING, JOB_RUNNING, is_failed, is_resumable, is_tombstone
from sdk.trainer_config import TrainerJobConfig, build_create_request, new_job_id

__all__ = [
    "CheckpointInfo",
    "CreatedTrainerJob",
    "TrainerJob",
    "TrainerJobConfig",
    "TrainerJobManager",
    "TrainerServiceEndpoint",
    "TrainingShapeProfile",
]

logger = logging.getLogger(__name__)

HEALTHZ_TIMEOUT_S = 5.0
_PROGRESS_LOG_EVERY_S = 60.0


class _ProgressLog:
    """Logs a readiness wait on every change of state, message or health, else once a minute."""

    def __init__(self, job_id: str, deadline: Deadline) -> None:
        self._job_id = job_id
        self._deadline = deadline
        self._last: tuple[str, str | None, bool] | None = None
        self._last_logged_at = 0.0

    def observe(self, job: TrainerJob, healthy: bool) -> None:
        seen = (job.state, job.status_message, healthy)
        elapsed = self._deadline.elapsed
        if seen != self._last or elapsed - self._last_logged_at >= _PROGRESS_LOG_EVERY_S:
            logger.info(
                "trainer job %s: %s%s (healthy=%s, %.0fs)",
                self._job_id,
                job.state or "<no state>",
                f" - {job.status_message}" if job.status_message else "",
                healthy,
                elapsed,
            )
            self._last, self._last_logged_at = seen, elapsed


class _ReadinessDeadlines:
    """The two deadlines of the readiness loop.

    PENDING (waiting for capacity) is bounded by `pending_timeout_s` from the start. The first
    other state fixes a second deadline `timeout_s` later, which then applies in every state,
    PENDING included: a job that bounces back to PENDING does not get a fresh budget.
    """

    def __init__(
        self, job_id: str, timeout_s: float, pending_timeout_s: float, clock: Clock
    ) -> None:
        self._job_id = job_id
        self._timeout_s = timeout_s
        self._clock = clock
        self.started = Deadline(pending_timeout_s, clock)
        self._placed: Deadline | None = None

    def next_sleep(self, state: str, poll_interval_s: float) -> float:
        """The sleep before the next poll; `WaitTimeoutError` if a deadline has passed."""
        if self._placed is None and state != JOB_PENDING:
            self._placed = Deadline(self._timeout_s, self._clock)
        capacity = self.started if state == JOB_PENDING else None
        active = [d for d in (self._placed, capacity) if d is not None]
        if any(d.expired for d in active):
            raise WaitTimeoutError(
                waited_for=f"trainer job {self._job_id} to become ready",
                last_state=state,
                waited_s=self.started.elapsed,
            )
        return min([poll_interval_s] + [d.remaining for d in active])


class TrainerJobManager(FireworksClient):
    """Manages service-mode trainer jobs of the API key's account.

    `boot_time_s` is the duration of the last successful readiness wait (None before one).
    """

    boot_time_s: float | None = None

    def create(self, config: TrainerJobConfig) -> CreatedTrainerJob:
        """Create the job without waiting. Idempotent per `config.requested_job_id`: the
        generated id is stored there, and a 409 answer returns the job that already exists."""
        config.validate()
        if config.hot_load_deployment_id:
            logger.warning("hot_load_deployment_id is deprecated (PER_DEPLOYMENT hotload link)")
        if config.requested_job_id is None:
            config.requested_job_id = new_job_id()  # stored so a retried create reuses it
        job_id = config.requested_job_id
        params, body = build_create_request(config, job_id)
        path = f"/v1/accounts/{self.account_id}/rlorTrainerJobs"
        response = self._http.request("POST", path, params=params, json=body, ok_statuses=(409,))
        if response.status_code == 409:
            return self._existing_job(job_id)
        job = TrainerJob.from_api(response_json(response, f"create trainer job {job_id}"))
        logger.info("created trainer job %s (%s path)", job_id, config.launch_path)
        if not job.name:  # the id we chose is the job's id; the answer just didn't say
            return CreatedTrainerJob(job_name=self._job_name(job_id), job_id=job_id)
        return CreatedTrainerJob(job_name=job.name, job_id=job.job_id)

    def _existing_job(self, job_id: str) -> CreatedTrainerJob:
        existing = self.get(job_id)
        if is_tombstone(existing.state):
            raise TrainerJobError(
                f"trainer job id {job_id} belongs to a deleted job ({existing.state}); "
                "use a new ID",
                job_id=job_id,
                state=existing.state,
            )
        logger.info("trainer job %s already exists (%s); reusing it", job_id, existing.state)
        return CreatedTrainerJob(job_name=existing.name or self._job_name(job_id), job_id=job_id)

    def create_and_wait(
        self,
        config: TrainerJobConfig,
        poll_interval_s: float = 5,
        timeout_s: float = 900,
        pending_timeout_s: float = 172800,
    ) -> TrainerServiceEndpoint:
        """`create`, then `wait_for_ready`."""
        created = self.create(config)
        return self.wait_for_ready(
            created.job_id,
            job_name=created.job_name,
            poll_interval_s=poll_interval_s,
            timeout_s=timeout_s,
            pending_timeout_s=pending_timeout_s,
        )

    def wait_for_ready(
        self,
        job_id: str,
        job_name: str | None = None,
        poll_interval_s: float = 5,
        timeout_s: float = 900,
        pending_timeout_s: float = 172800,
    ) -> TrainerServiceEndpoint:
        """Poll until the job is RUNNING and its trainer answers healthz.

        PENDING (waiting for capacity) may last `pending_timeout_s`; from the first other state
        seen, the job has `timeout_s` to become healthy. That deadline is fixed once and never
        reset, even if the job drops back to PENDING. FAILED or deleted → `TrainerJobError`.
        """
        check_interval("poll_interval_s", poll_interval_s)
        check_interval("timeout_s", timeout_s)
        check_interval("pending_timeout_s", pending_timeout_s)
        check_id("job_id", job_id)
        job_name = job_name or self._job_name(job_id)
        deadlines = _ReadinessDeadlines(job_id, timeout_s, pending_timeout_s, self._clock)
        progress = _ProgressLog(job_id, deadlines.started)
        while True:
            job = self.get(job_id)
            self._raise_if_dead(job_id, job)
            healthy_url = self._healthy_url(job_id, job) if job.state == JOB_RUNNING else None
            progress.observe(job, healthy_url is not None)
            if healthy_url is not None:
                self.boot_time_s = deadlines.started.elapsed
                return TrainerServiceEndpoint(
                    job_name=job_name,
                    job_id=job_id,
                    base_url=healthy_url,
                    max_context_length=job.max_context_length,
                )
            self._sleep(deadlines.next_sleep(job.state, poll_interval_s))

    def wait_for_existing(
        self,
        job_id: str,
        job_name: str | None = None,
        poll_interval_s: float = 5,
        timeout_s: float = 900,
        pending_timeout_s: float = 172800,
    ) -> TrainerServiceEndpoint:
        """Wait for a job created elsewhere; the same loop as `wait_for_ready`."""
        return self.wait_for_ready(job_id, job_name, poll_interval_s, timeout_s, pending_timeout_s)

    def resume_and_wait(
        self,
        job_id: str,
        poll_interval_s: float = 5,
        timeout_s: float = 900,
        pending_timeout_s: float = 172800,
    ) -> TrainerServiceEndpoint:
        """Resume a FAILED/CANCELLED/PAUSED/COMPLETED job (`:resume`, no body), then wait for it."""
        self._http.request("POST", f"{self._job_path(job_id)}:resume")
        logger.info("resumed trainer job %s", job_id)
        return self.wait_for_existing(
            job_id,
            poll_interval_s=poll_interval_s,
            timeout_s=timeout_s,
            pending_timeout_s=pending_timeout_s,
        )

    def reconnect_and_wait(
        self,
        job_id: str,
        poll_interval_s: float = 5,
        timeout_s: float = 600,
        max_wait_for_resumable_s: float = 120,
        pending_timeout_s: float = 172800,
        transitional_poll_s: float = 10,
    ) -> TrainerServiceEndpoint:
        """Get back a trainer after a preemption or a client restart.

        RUNNING → wait for health; FAILED/CANCELLED/PAUSED/COMPLETED → resume and wait; any
        other state is transitional and is re-checked every `transitional_poll_s` for at most
        `max_wait_for_resumable_s` (also the window in which lookup errors such as a 404 blip
        are retried every `poll_interval_s`). A deleted job fails at once.
        """
        check_interval("max_wait_for_resumable_s", max_wait_for_resumable_s, allow_zero=True)
        check_interval("transitional_poll_s", transitional_poll_s)
        check_interval("poll_interval_s", poll_interval_s)
        check_id("job_id", job_id)
        window = Deadline(max_wait_for_resumable_s, self._clock)
        while True:
            job = self._get_within(job_id, window, retry_every_s=poll_interval_s)
            if job.state == JOB_RUNNING:
                return self.wait_for_existing(
                    job_id,
                    poll_interval_s=poll_interval_s,
                    timeout_s=timeout_s,
                    pending_timeout_s=pending_timeout_s,
                )
            if is_resumable(job.state):
                return self.resume_and_wait(job_id, poll_interval_s, timeout_s, pending_timeout_s)
            # Unlike the published SDK (which waits up to 120 s here): a tombstone never comes back.
            self._raise_if_deleted(job_id, job)
            if window.expired:
                raise WaitTimeoutError(
                    waited_for=f"trainer job {job_id} to leave a transitional state",
                    last_state=job.state,
                    waited_s=window.elapsed,
                )
            logger.info("trainer job %s is %s; re-checking", job_id, job.state or "<no state>")
            self._sleep(min(transitional_poll_s, window.remaining))

    def _get_within(self, job_id: str, window: Deadline, *, retry_every_s: float) -> TrainerJob:
        """`get`, retrying 404s and transient errors until `window` closes (pods reschedule)."""
        while True:
            try:
                return self.get(job_id)
            except FireworksError as exc:
                if not (isinstance(exc, NotFoundError) or exc.retryable) or window.expired:
                    raise
                logger.warning("trainer job %s lookup failed (%s); retrying", job_id, exc)
                self._sleep(min(retry_every_s, window.remaining))

    def try_get(self, job_id: str) -> TrainerJob | None:
        """The job, or None if it does not exist."""
        response = self._http.request("GET", self._job_path(job_id), ok_statuses=(404,))
        if response.status_code == 404:
            return None
        return TrainerJob.from_api(response_json(response, f"get trainer job {job_id}"))

    def get(self, job_id: str) -> TrainerJob:
        """The job; `NotFoundError` if it does not exist."""
        response = self._http.request("GET", self._job_path(job_id))
        return TrainerJob.from_api(response_json(response, f"get trainer job {job_id}"))

    def delete(self, job_id: str) -> None:
        """Delete the job. Best effort, for teardown: failures are logged, never raised."""
        try:
            self._http.request("DELETE", self._job_path(job_id))
        except FireworksError as exc:
            logger.warning("could not delete trainer job %s: %s", job_id, exc)
        else:
            logger.info("deleted trainer job %s", job_id)

    def trainer_url(self, job_id: str) -> str:
        """The trainer gateway base URL of a job; the tinker protocol lives under `/api/v1/`."""
        return f"{self.base_url}/training/v1/rlorTrainerJobs/{self.account_id}/{job_id}"

    def _healthy_url(self, job_id: str, job: TrainerJob) -> str | None:
        """The first trainer base URL whose healthz answers 200: gateway, then direct route."""
        candidates = [self.trainer_url(job_id)]
        if job.direct_route_handle:
            candidates.append(job.direct_route_handle.rstrip("/"))
        for base in candidates:
            if self._http.probe("GET", f"{base}/api/v1/healthz", timeout=HEALTHZ_TIMEOUT_S):
                return base
        return None

    @classmethod
    def _raise_if_dead(cls, job_id: str, job: TrainerJob) -> None:
        """A readiness wait ends on a deleted or FAILED job."""
        cls._raise_if_deleted(job_id, job)
        if is_failed(job.state):
            raise TrainerJobError(
                f"trainer job {job_id} failed: {job.status_message or 'no status message'}",
                job_id=job_id,
                state=job.state,
            )

    @staticmethod
    def _raise_if_deleted(job_id: str, job: TrainerJob) -> None:
        if is_tombstone(job.state):
            raise TrainerJobError(
                f"trainer job {job_id} was deleted ({job.state}); create a new job",
                job_id=job_id,
                state=job.state,
            )
