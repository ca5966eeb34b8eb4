"""The inference and hotload routes: `/inference/v1/completions`, `/hot_load/...`.

Completions run on the event loop but never compute: they resolve the deployment's replica,
queue a `Submission` on its generation thread and relay its progress, as SSE chunks or as one
`text_completion` object. Answers when the replica cannot serve: 404 for an unknown, failed or
deleting deployment; 425 while it starts in CREATING/UPDATING or while a hotload is in progress
(the SDK's sampler waits and retries both); a replica that is down for any other reason (scaled
to zero, a restarted platform) is started and the request waits for its base weights, up to
`scale_up_timeout_s`, then 503. Every completion names the hotloaded snapshot it was generated
with (`snapshot_identity` in the final chunk, header `x-fireworks-snapshot-identity`), left out
while the replica serves its base weights.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from backend.control import AccountCheck
from backend.errors import ApiError, GrpcCode
from backend.serving.completions import CompletionRequest
from backend.serving.hotload import (
    MAX_STATUS_HOLD_S,
    HotloadAccepted,
    HotloadRequest,
    HotloadService,
    HotloadStatus,
)
from backend.serving.runtime import (
    Replica,
    ReplicaBusyError,
    ReplicaStoppedError,
    ServingRuntime,
)

HOTLOAD_PATH = "/hot_load/v1/models/hot_load"
# The snapshot a completion was generated with, also sent as `snapshot_identity` in its body.
SNAPSHOT_IDENTITY_HEADER = "x-fireworks-snapshot-identity"
_NOT_SERVING = ("FAILED", "DELETING", "DELETED")
_STARTING = ("CREATING", "UPDATING")


def serving_router(
    runtime: ServingRuntime, hotload: HotloadService, check_account: AccountCheck
) -> APIRouter:
    """Completions and hotload POST/GET (their hosts default to the control plane's)."""
    router = APIRouter()

    @router.post("/inference/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        replica = await _serving_replica(runtime, body.model, check_account)
        return await _complete(replica, body, request.headers.get("x-request-id"))

    @router.post(HOTLOAD_PATH)
    def hot_load(
        body: HotloadRequest,
        fireworks_deployment: Annotated[str | None, Header()] = None,
        fireworks_model: Annotated[str | None, Header()] = None,
        x_fireworks_hot_load_source_url: Annotated[str | None, Header()] = None,
    ) -> HotloadAccepted:
        # The source URL names an object store; locally the snapshots are on this disk, found
        # through the deployment's trainer, so the header is accepted and not needed.
        return hotload.load(fireworks_deployment, fireworks_model, body)

    @router.get(HOTLOAD_PATH)
    def hot_load_status(
        fireworks_deployment: Annotated[str | None, Header()] = None,
        fireworks_model: Annotated[str | None, Header()] = None,
        wait_for_identity: Annotated[str | None, Query(max_length=256)] = None,
        max_wait_s: Annotated[float, Query(ge=0)] = MAX_STATUS_HOLD_S,
    ) -> HotloadStatus:
        # A local extension the published client never sends: held while a load of
        # `wait_for_identity` runs (at most `max_wait_s`, capped), so a waiting client learns
        # when it ends at once. A sync route: the hold blocks a worker thread, not the loop.
        return hotload.status(
            fireworks_deployment, fireworks_model, wait_for=wait_for_identity, wait_s=max_wait_s
        )

    return router


async def _serving_replica(runtime: ServingRuntime, model: str, check: AccountCheck) -> Replica:
    """The replica that will serve `model` (`accounts/{a}/deployments/{d}`), up."""
    deployment_id = _deployment_id(model, check)
    replica = runtime.replica(deployment_id)
    if replica is not None and replica.serving:
        return replica  # the hot path: no store access on the event loop
    record = await asyncio.to_thread(runtime.deployments.find, deployment_id)
    if record is None or record.state in _NOT_SERVING:
        state = "not found" if record is None else f"is {record.state}"
        raise ApiError.not_found(f"deployment {model!r} {state}", reason="DEPLOYMENT_NOT_FOUND")
    replica = runtime.ensure_replica(deployment_id, record.spec.base_model)
    if replica.start_error is not None:
        raise ApiError.unavailable(f"deployment {model!r} cannot serve: {replica.start_error}")
    if record.state in _STARTING:
        raise _too_early(f"deployment {model!r} is {record.state}: its replica is loading")
    timeout_s = runtime.settings.scale_up_timeout_s
    if not await asyncio.to_thread(replica.wait_started, timeout_s):
        reason = replica.start_error or f"its replica did not come up within {timeout_s:g} s"
        raise ApiError.unavailable(f"deployment {model!r} cannot serve: {reason}")
    return replica


def _deployment_id(model: str, check: AccountCheck) -> str:
    # `accounts/x/models/m#accounts/a/deployments/d` names the deployment after the '#'.
    name = model.rsplit("#", 1)[-1]
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments" or not parts[3]:
        raise ApiError.invalid_argument(
            f"model {model!r} is not a deployment: expected accounts/<account>/deployments/<id>"
        )
    check(parts[1])
    return parts[3]


def _too_early(message: str) -> ApiError:
    return ApiError(425, GrpcCode.UNAVAILABLE, message, "TOO_EARLY")


async def _complete(
    replica: Replica, body: CompletionRequest, request_id: str | None
) -> JSONResponse | StreamingResponse:
    # Imported here: it pulls in torch, which only a replica that is up has loaded.
    from backend.serving.generation import SequenceTooLongError
    from backend.serving.relay import CompletionRun

    model, factory = replica.model, replica.factory
    if model is None or factory is None:
        raise _too_early("the replica is being replaced; retry shortly")
    run = CompletionRun(body, model, factory, asyncio.get_running_loop())
    try:
        served = replica.submit(run.submission)
    except ReplicaBusyError as busy:
        raise _too_early(f"a hotload of {str(busy)!r} is in progress; retry shortly") from None
    except ReplicaStoppedError:
        raise ApiError.unavailable("the replica was stopped; retry shortly") from None
    except SequenceTooLongError as too_long:
        raise ApiError.invalid_argument(str(too_long)) from None
    headers = {"x-fireloop-weight-version": str(served.version)}
    # The base weights have no snapshot identity: the field and the header are left out.
    snapshot = served.snapshot_identity or None
    if snapshot is not None:
        headers[SNAPSHOT_IDENTITY_HEADER] = snapshot
    if request_id:
        headers["x-request-id"] = request_id
    if body.stream:
        return StreamingResponse(
            run.stream(snapshot), media_type="text/event-stream", headers=headers
        )
    result = await run.collect(snapshot)
    return JSONResponse(result, headers=headers | run.metric_headers())
