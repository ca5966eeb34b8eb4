"""The tinker protocol under the trainer gateway, in both of its dialects.

tinker 0.23 speaks JSON; tinker 0.38 posts forward/backward as protobuf and reads fwd/bwd and
sample results as protobuf. The dialect is read from each request's headers (`Content-Type`,
`Accept`) here, at the edge: bodies are decoded into the typed commands the trainer runs (`wire`
for JSON, `wire_proto` for protobuf) and typed results are encoded on the way out, so nothing
behind the routes knows which client it serves.

Mounted by `backend.gateway.gateway_router` under `/training/v1/rlorTrainerJobs/{account}/
{job_id}/api/v1`. Every route resolves the job first; a job that is unknown or not RUNNING
answers 404 with a JSON body, which tinker treats as fatal, so a client of a preempted trainer
fails fast instead of retrying for minutes (healthz, owned by the gateway, keeps its 503 for
readiness probes). Errors are always JSON, in both dialects; 402 is never sent.

Handlers are plain functions (FastAPI runs them on its thread pool) except `retrieve_future`,
which long-polls on the event loop; no handler computes: work goes to the job's worker.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the handlers' annotations,
# which use aliases local to `trainer_router`.
import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response

from backend.control.jobs import JobRecord
from backend.errors import ApiError
from backend.gateway import TrainerGateway
from backend.trainer.errors import UserError
from backend.trainer.futures import TryAgain
from backend.trainer.refusals import read_ordered_ids
from backend.trainer.service import JobTrainer, OrderedKind, TrainerRegistry
from backend.trainer.wire import (
    MAX_NUM_SAMPLES,
    CheckpointListResponse,
    ClientConfig,
    CreateModelRequest,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    CreateViaLoadRequest,
    GetInfoResponse,
    GetSamplerResponse,
    HeartbeatResponse,
    JsonDict,
    LoadWeightsRequest,
    LoraConfigWire,
    ModelRequest,
    OrderedCommand,
    RetrieveFutureRequest,
    SampleRequest,
    ServerCapabilities,
    SessionRequest,
    SupportedModel,
    TelemetryResponse,
    TryAgainResponse,
    UntypedFuture,
    WeightsInfoRequest,
    WeightsInfoResponse,
    parse,
    parse_command,
    parse_json_body,
    parse_request,
)
from backend.trainer.wire_proto import (
    PROTO_MEDIA_TYPE,
    PROTO_RESULTS,
    ProtoDecodeError,
    ProtoForwardBackward,
    decode_forward_backward_command,
    encode_result,
    request_body,
    wants_proto,
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
        except UserError as exc:  # a rank the job cannot hold, or a full trainer
            raise ApiError.invalid_argument(str(exc)) from None
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

    @router.post("/asample", response_model_exclude_none=True)
    def asample(body: Annotated[dict[str, Any], Body()], trainer: Active) -> UntypedFuture:
        # A body that is not a valid request still gets a future, which fails with the reason.
        try:
            command: SampleRequest | UserError = parse(SampleRequest, body)
        except UserError as exc:
            command = exc
        request_id = trainer.sample(command)
        # tinker 0.38 stamps each returned sequence with these ids and refuses an answer
        # without exactly one per requested sample; 0.23 ignores them.
        count = body.get("num_samples", 1)
        count = count if isinstance(count, int) and 0 < count <= MAX_NUM_SAMPLES else 1
        ids = [f"{request_id}:{index}" for index in range(count)]
        return UntypedFuture(request_id=request_id, sample_sequence_ids=ids)

    @router.post("/sessions/{session_id}/finish")
    def finish_session(session_id: str, trainer: Background) -> JsonDict:
        # tinker 0.38's close(): the session ends; its models stay loaded until a newer
        # session takes the trainer over, as when a 0.23 client simply goes away.
        if not trainer.has_session(session_id):
            raise ApiError.not_found(f"unknown session {session_id!r}", "SESSION_NOT_FOUND")
        return {}

    @router.post("/retrieve_future", response_model=None)
    async def retrieve_future(
        body: RetrieveFutureRequest, request: Request, trainer: Active
    ) -> JsonDict | Response:
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
        # A 0.38 client reads fwd/bwd and sample results only as protobuf; errors stay JSON.
        if isinstance(outcome, PROTO_RESULTS) and wants_proto(request.headers.get("accept")):
            return Response(content=encode_result(outcome), media_type=PROTO_MEDIA_TYPE)
        # Encoded here, not by FastAPI, whose generic encoder walks every float of a result.
        return Response(content=outcome.wire_json_bytes(), media_type="application/json")

    return router


def _ordered_handler(kind: OrderedKind, trainer_dependency: Any) -> Any:
    """A route handler that hands one ordered request to the trainer and answers its future."""

    async def handler(
        request: Request,
        trainer: Annotated[JobTrainer, Depends(trainer_dependency)],
    ) -> UntypedFuture:
        try:
            operation, body = await _ordered_body(kind, request)
        except ApiError as refusal:
            return await _refused(trainer, kind, request, refusal)
        if isinstance(body, ProtoForwardBackward):
            model_id, seq_id = _ids(kind, body.model_id, body.seq_id)
            command: OrderedCommand | UserError = body.command
        elif kind == "load_weights" and body.get("model_id") is None and "session_id" in body:
            return _create_via_load(trainer, body)
        else:
            model_id, seq_id = _ids(kind, body.get("model_id"), body.get("seq_id"))
            try:
                command = parse_command(operation, body)
            except UserError as exc:
                command = exc
        if isinstance(command, UserError):  # readable ids, a malformed command: seq id consumed
            request_id = trainer.refuse(operation, model_id, seq_id, command)
        else:
            request_id = trainer.submit(operation, model_id, seq_id, command)
        return UntypedFuture(request_id=request_id, model_id=model_id)

    handler.__name__ = kind
    return handler


async def _refused(
    trainer: JobTrainer, kind: OrderedKind, request: Request, refusal: ApiError
) -> UntypedFuture:
    """An ordered body refused at the edge. When its model and seq id can still be read, the
    refusal consumes that seq id (the client's future for it fails with the message, and its
    later operations run at once instead of waiting for it until the gap timeout); otherwise
    there is nothing to consume and it stays a plain 400."""
    headers = request.headers
    ids = read_ordered_ids(
        await request.body(), headers.get("content-type"), headers.get("content-encoding")
    )
    if ids is None or refusal.http_status != 400:
        raise refusal
    model_id, seq_id = ids
    request_id = trainer.reject(kind, model_id, seq_id, UserError(refusal.message))
    if request_id is None:
        raise refusal
    return UntypedFuture(request_id=request_id, model_id=model_id)


# Per trainer: model id → the request id of its create-via-load, so a resubmission (the client
# retries a lost answer) gets the same future instead of loading twice.
_CREATED_BY_LOAD: weakref.WeakKeyDictionary[JobTrainer, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def _create_via_load(trainer: JobTrainer, body: JsonDict) -> UntypedFuture:
    """tinker 0.38's `create_training_client_from_state`: `load_weights` addressed by session
    and model seq id creates the model (its LoRA shape read from the checkpoint) and loads it,
    as the model's request 0; the model's next ordered request is seq id 1."""
    request = parse_request(CreateViaLoadRequest, body)
    try:
        info = trainer.weights_info(request.path)
    except UserError as exc:
        raise ApiError.invalid_argument(f"load_weights: {exc}") from None
    except KeyError as exc:
        raise ApiError.not_found(_text(exc), "CHECKPOINT_NOT_FOUND") from None
    lora = None
    if info.is_lora:
        lora = LoraConfigWire(
            rank=info.lora_rank or 0,
            train_unembed=bool(info.train_unembed),
            train_mlp=bool(info.train_mlp),
            train_attn=bool(info.train_attn),
        )
    create = CreateModelRequest(
        session_id=request.session_id,
        model_seq_id=request.model_seq_id,
        base_model=request.base_model or info.base_model,
        user_metadata=request.user_metadata,
        lora_config=lora,
    )
    try:
        _, model_id = trainer.create_model(create)
    except KeyError as exc:
        raise ApiError.not_found(_text(exc), "SESSION_NOT_FOUND") from None
    except UserError as exc:
        raise ApiError.invalid_argument(f"load_weights: {exc}") from None
    loads = _CREATED_BY_LOAD.setdefault(trainer, {})
    if model_id not in loads:
        # Unordered: it runs on the job's worker right after the model's loading.
        load = LoadWeightsRequest(path=request.path, optimizer=request.optimizer)
        loads[model_id] = trainer.submit("load_weights", model_id, None, load)
    return UntypedFuture(request_id=loads[model_id], model_id=model_id)


async def _ordered_body(
    kind: OrderedKind, request: Request
) -> tuple[OrderedKind, JsonDict | ProtoForwardBackward]:
    """The dialect edge of an ordered request: (the operation, its JSON body or decoded message).

    tinker 0.38 posts `forward_backward` as protobuf (`forward_only` selects a forward, possibly
    zstd-compressed); it decodes into the same typed command a 0.23 JSON body decodes into, so
    everything behind the route sees one form whichever dialect the client speaks.
    """
    raw = await request.body()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != PROTO_MEDIA_TYPE:
        return kind, parse_json_body(raw, kind)
    if kind != "forward_backward":
        raise ApiError.invalid_argument(f"{kind}: {PROTO_MEDIA_TYPE} bodies are not accepted here")
    try:
        data = request_body(raw, request.headers.get("content-encoding"))
        decoded = decode_forward_backward_command(data)
    except ProtoDecodeError as exc:
        raise ApiError.invalid_argument(f"{kind}: {exc}") from None
    return ("forward" if decoded.forward_only else "forward_backward"), decoded


def _ids(kind: OrderedKind, model_id: object, seq_id: object) -> tuple[str, int | None]:
    """An ordered request's model id and (optional) seq id; 400 when they are unusable."""
    if not isinstance(model_id, str) or not model_id:
        raise ApiError.invalid_argument(f"{kind}: model_id is required and must be a string")
    if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int)):
        raise ApiError.invalid_argument(f"{kind}: seq_id must be an integer")
    return model_id, seq_id


def _text(error: KeyError) -> str:
    # str(KeyError) adds quotes around the message.
    return str(error.args[0]) if error.args else "not found"
