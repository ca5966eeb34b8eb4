"""The trainer gateway: `/training/v1/rlorTrainerJobs/{account}/{job_id}/api/v1/*`.

On the real platform this prefix routes to the job's trainer pod. Locally every route under it
resolves the job first: unknown → 404, not RUNNING → 503 (the trainer is not up), RUNNING → the
route runs. Trainer routes (the tinker protocol) depend on `active_job`, which also records
activity for the inactivity timeout, and are mounted with `gateway_router`.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request

from backend.control import AccountCheck, ResponseModel
from backend.control.jobs import RUNNING, JobRecord, TrainerJobService
from backend.errors import ApiError

GATEWAY_PREFIX = "/training/v1/rlorTrainerJobs/{account}/{job_id}/api/v1"


class Health(ResponseModel):
    status: Literal["ok"] = "ok"


class TrainerGateway:
    """Resolves the `{account}/{job_id}` of a gateway path to a running trainer job."""

    def __init__(self, jobs: TrainerJobService, check_account: AccountCheck) -> None:
        self._jobs = jobs
        self._check_account = check_account

    def running_job(self, account: str, job_id: str) -> JobRecord:
        """FastAPI dependency: the job, if it is RUNNING (404 unknown, 503 otherwise)."""
        self._check_account(account)
        record = self._jobs.find(job_id)
        if record is None:
            raise ApiError.not_found(
                f"trainer job {self._jobs.job_name(job_id)!r} not found",
                reason="TRAINER_JOB_NOT_FOUND",
            )
        if record.state != RUNNING:
            raise ApiError.unavailable(
                f"trainer of job {self._jobs.job_name(job_id)!r} is not up: "
                f"the job is {record.state} ({record.status_message})",
                reason="TRAINER_NOT_RUNNING",
            )
        return record

    def active_job(self, account: str, job_id: str) -> JobRecord:
        """FastAPI dependency for trainer routes: `running_job`, and the job counts as used."""
        record = self.running_job(account, job_id)
        self._jobs.touch(job_id)
        return record


def _gateway(request: Request) -> TrainerGateway:
    gateway: TrainerGateway = request.app.state.trainer_gateway
    return gateway


def running_job(request: Request, account: str, job_id: str) -> JobRecord:
    """Dependency for gateway routes: the RUNNING job of the path (404 unknown, 503 not up)."""
    return _gateway(request).running_job(account, job_id)


def active_job(request: Request, account: str, job_id: str) -> JobRecord:
    """Dependency for trainer routes: `running_job`, and the request counts as activity."""
    return _gateway(request).active_job(account, job_id)


def gateway_router(*trainer_routers: APIRouter) -> APIRouter:
    """The gateway: healthz plus `trainer_routers`, whose paths are relative to `/api/v1`.

    Trainer routes declare `job: Annotated[JobRecord, Depends(active_job)]`; the app must
    have `app.state.trainer_gateway` set (`create_app` does).
    """
    router = APIRouter(prefix=GATEWAY_PREFIX)

    # healthz uses `running_job`, not `active_job`: a readiness probe is not use, so polling it
    # must not keep an idle trainer alive.
    @router.get("/healthz", dependencies=[Depends(running_job)])
    def healthz() -> Health:
        return Health()

    for trainer_router in trainer_routers:
        router.include_router(trainer_router)
    return router
