"""The tinker 0.23 JSON protocol under the trainer gateway.

Mounted by `backend.gateway.gateway_router` under `/training/v1/rlorTrainerJobs/{account}/
{job_id}/api/v1`. Every route resolves the job first; a job that is unknown or not RUNNING
answers 404 with a JSON body, which tinker treats as fatal, so a client of a preempted trainer
fails fast instead of retrying for minutes (healthz, owned by the gateway, keeps its 503 for
readiness probes). Errors are always JSON; 402 is never sent.

Handlers are plain functions (FastAPI runs them on its thread pool) except `retrieve_future`,
which long-polls on the event loop; no handler computes: work goes to the job's worker.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the handlers' annotations,
# which use aliases local to `trainer_router`.
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from backend.control.jobs import JobRecord
from backend.errors import ApiError
from backend.gateway import TrainerGateway
from backend.trainer.errors import UserError
from backend.trainer.futures import TryAgain
from backend.trainer.service import JobTrainer, OrderedKind, TrainerRegistry
from backend.trainer.wire import (
    CheckpointListResponse,
    ClientConfig,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    GetInfoResponse,
    GetSamplerResponse,
    HeartbeatResponse,
    JsonDict,
    ModelRequest,
    RetrieveFutureRequest,
    ServerCapabilities,
    SessionRequest,
    SupportedModel,
    TelemetryResponse,
    TryAgainResponse,
    UntypedFuture,
    WeightsInfoRequest,
    WeightsInfoResponse,
)

__all__ = ["trainer_router"]

_ORDERED: tuple[OrderedKind, ...] = (
    "forward",
    "forward_backward",
    "optim_step",
    "save_weights",
    "load_weights",
    "save_weights_for_sampler",
    "load_adapter",
)


def trainer_router(gateway: TrainerGateway, registry: TrainerRegistry) -> APIRouter:
    """The trainer's routes, relative to the gateway's `/api/v1`."""
    router = APIRouter()

    def running(account: str, job_id: str, *, touch: bool) -> JobRecord:
        try:
            if touch:
                return gateway.active_job(account, job_id)
            return gateway.running_job(account, job_id)
        except ApiError as exc:
            if exc.http_status != 503:
                raise
            # 404, not 503: tinker retries 5xx for minutes; a lost trainer should fail fast.
            raise ApiError.not_found(exc.message, reason="TRAINER_NOT_RUNNING") from None

    async def active_trainer(account: str, job_id: str) -> JobTrainer:
        """The job's trainer; the request counts as activity (inactivity timeout)."""
        return registry.trainer(running(account, job_id, touch=True))

    async def background_trainer(account: str, job_id: str) -> JobTrainer:
        """For background traffic (heartbeats, telemetry, config) that is not use of the job."""
        return registry.trainer(running(account, job_id, touch=False))

    # Type aliases of the two dependencies, named like types.
    Active = Annotated[JobTrainer, Depends(active_trainer)]
    Background = Annotated[JobTrainer, Depends(background_trainer)]

    @router.post("/client/config")
    def client_config(trainer: Background) -> ClientConfig:
        return ClientConfig()

    @router.post("/create_session")
    def create_session(body: CreateSessionRequest, trainer: Active) -> CreateSessionResponse:
        return CreateSessionResponse(session_id=trainer.create_session())

    @router.post("/session_heartbeat")
    async def session_heartbeat(body: SessionRequest, trainer: Background) -> HeartbeatResponse:
        if not trainer.has_session(body.session_id):
            raise ApiError.not_found(f"unknown session {body.session_id!r}", "SESSION_NOT_FOUND")
        return HeartbeatResponse()

    @router.post("/telemetry")
    async def telemetry(body: Annotated[Any, Body()], trainer: Background) -> TelemetryResponse:
        # Accepted and dropped: events may carry request headers, so they are never logged.
        return TelemetryResponse()

    @router.get("/get_server_capabilities")
    def get_server_capabilities(trainer: Background) -> ServerCapabilities:
        model = SupportedModel(
            model_name=trainer.base_model_name,
            max_context_length=trainer.context.context_length,
        )
        return ServerCapabilities(supported_models=[model])

    @router.post("/create_model", response_model_exclude_none=True)
    def create_model(body: CreateModelRequest, trainer: Active) -> UntypedFuture:
        try:
            request_id, model_id = trainer.create_model(body)
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "SESSION_NOT_FOUND") from None
        return UntypedFuture(request_id=request_id, model_id=model_id)

    @router.post("/get_info", response_model_exclude_none=True)
    def get_info(body: ModelRequest, trainer: Active) -> GetInfoResponse:
        try:
            return trainer.get_info(body.model_id)
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "MODEL_NOT_FOUND") from None

    @router.post("/unload_model", response_model_exclude_none=True)
    def unload_model(body: ModelRequest, trainer: Active) -> UntypedFuture:
        try:
            return UntypedFuture(request_id=trainer.unload_model(body.model_id))
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "MODEL_NOT_FOUND") from None

    for kind in _ORDERED:
        router.add_api_route(
            f"/{kind}",
            _ordered_handler(kind, active_trainer),
            methods=["POST"],
            response_model_exclude_none=True,
            name=kind,
        )

    @router.get("/list_checkpoints")
    def list_checkpoints(trainer: Active) -> CheckpointListResponse:
        return CheckpointListResponse(checkpoints=trainer.list_checkpoints())

    @router.post("/weights_info", response_model_exclude_none=True)
    def weights_info(body: WeightsInfoRequest, trainer: Active) -> WeightsInfoResponse:
        try:
            return trainer.weights_info(body.tinker_path)
        except UserError as exc:
            raise ApiError.invalid_argument(str(exc)) from None
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "CHECKPOINT_NOT_FOUND") from None

    @router.post("/create_sampling_session")
    def create_sampling_session(
        body: CreateSamplingSessionRequest, trainer: Active
    ) -> CreateSamplingSessionResponse:
        try:
            sampler_id = trainer.create_sampling_session(body)
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "SESSION_NOT_FOUND") from None
        except UserError as exc:
            raise ApiError.invalid_argument(str(exc)) from None
        return CreateSamplingSessionResponse(sampling_session_id=sampler_id)

    @router.get("/samplers/{sampler_id}", response_model_exclude_none=True)
    def get_sampler(sampler_id: str, trainer: Active) -> GetSamplerResponse:
        try:
            info = trainer.samplers.get(sampler_id)
        except KeyError as exc:
            raise ApiError.not_found(_text(exc), "SAMPLER_NOT_FOUND") from None
        return GetSamplerResponse(
            sampler_id=sampler_id, base_model=info.base_model, model_path=info.model_path
        )

    @router.post("/asample")
    def asample(body: Annotated[dict[str, Any], Body()], trainer: Active) -> UntypedFuture:
        return UntypedFuture(request_id=trainer.sample(body))

    @router.post("/retrieve_future")
    async def retrieve_future(body: RetrieveFutureRequest, trainer: Active) -> JsonDict:
        hold_s = registry.settings.retrieve_hold_s
        try:
            outcome = await trainer.futures.retrieve(body.request_id, hold_s=hold_s)
        except KeyError:
            raise ApiError.not_found(
                f"unknown request_id {body.request_id!r}: the trainer does not know it "
                "(it may have restarted since the request was submitted)",
                "REQUEST_NOT_FOUND",
            ) from None
        if isinstance(outcome, TryAgain):
            return TryAgainResponse(request_id=outcome.request_id).model_dump()
        return outcome

    return router


def _ordered_handler(kind: OrderedKind, trainer_dependency: Any) -> Any:
    """A route handler that hands one ordered request to the trainer and answers its future."""

    async def handler(
        body: Annotated[dict[str, Any], Body()],
        trainer: Annotated[JobTrainer, Depends(trainer_dependency)],
    ) -> UntypedFuture:
        model_id = body.get("model_id")
        seq_id = body.get("seq_id")
        if not isinstance(model_id, str) or not model_id:
            raise ApiError.invalid_argument(f"{kind}: model_id is required and must be a string")
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int)):
            raise ApiError.invalid_argument(f"{kind}: seq_id must be an integer")
        request_id = trainer.submit(kind, model_id, seq_id, body)
        return UntypedFuture(request_id=request_id, model_id=model_id)

    handler.__name__ = kind
    return handler


def _text(error: KeyError) -> str:
    # str(KeyError) adds quotes around the message.
    return str(error.args[0]) if error.args else "not found"
