"""The tinker protocol's shapes as the trainer gateway reads and answers them: typed commands in,
typed results out.

They are the trainer's one internal form: the edges decode a request (JSON from tinker 0.23,
protobuf from tinker 0.38, in `wire_proto`) into its command here, and encode a result back
(`WireResult.wire_json` for JSON, `wire_proto` for protobuf), so the sequencer, the worker, the
operations and the futures never see a dialect.

Requests ignore unknown fields: later tinker clients and the Firetitan extensions add fields, and
a trainer must not refuse a client for sending more than it needs. An ordered request whose body
is malformed is refused at the edge but still consumes its sequence id (it fails as a
`category: "user"` future instead of stalling the operations queued behind it).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from backend.errors import ApiError, describe_validation_errors
from backend.trainer.errors import UserError

JsonDict = dict[str, Any]
M = TypeVar("M", bound=BaseModel)


class WireModel(BaseModel):
    # Non-finite floats travel as JSON's usual NaN/Infinity constants (what Python's json, and
    # so the tinker client, reads), not as null, which a float field would refuse.
    model_config = ConfigDict(
        extra="ignore", frozen=True, protected_namespaces=(), ser_json_inf_nan="constants"
    )


def parse(model: type[M], body: object) -> M:
    """`body` as `model`, or a `UserError` naming every invalid field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise UserError(describe_validation_errors(errors)) from None


def parse_json_body(raw: bytes, route: str) -> JsonDict:
    """A JSON request body that must be an object; 400 naming the route otherwise."""
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError.invalid_argument(
            f"{route}: request body is not valid JSON ({exc})"
        ) from None
    if not isinstance(body, dict):
        raise ApiError.invalid_argument(f"{route}: request body must be a JSON object")
    return body


def parse_request(model: type[M], body: object) -> M:
    """`body` as `model`, or a 400 naming every invalid field (for synchronous routes)."""
    try:
        return parse(model, body)
    except UserError as exc:
        raise ApiError.invalid_argument(str(exc)) from None


# -- requests ------------------------------------------------------------------------------


class CreateSessionRequest(WireModel):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str = ""


class SessionRequest(WireModel):
    session_id: str


class LoraConfigWire(WireModel):
    rank: StrictInt = Field(ge=0)
    # torch seeds are signed 64-bit: a larger seed would fail inside the trainer, not here.
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True
    alpha: float | None = Field(default=None, gt=0)  # Firetitan extension


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: StrictInt = Field(ge=0)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigWire | None = None
    base_only: bool = False  # Firetitan extension: a frozen reference model


class ModelRequest(WireModel):
    model_id: str


class LossInput(WireModel):
    data: list[dict[str, Any]]
    loss_fn: str
    loss_fn_config: dict[str, Any] | None = None


class ForwardRequest(WireModel):
    forward_input: LossInput


class ForwardBackwardRequest(WireModel):
    forward_backward_input: LossInput


class OptimStepRequest(WireModel):
    adam_params: dict[str, Any] = {}
    grad_accumulation_normalization: Literal["num_loss_tokens", "num_sequences", "none"] | None = (
        None
    )


class SaveWeightsRequest(WireModel):
    path: str | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False


class LoadWeightsRequest(WireModel):
    path: str
    optimizer: bool = False
    weights_access_token: str | None = None


class CreateViaLoadRequest(WireModel):
    """tinker 0.38's `load_weights` that creates its model (no `model_id`, no `create_model`)."""

    session_id: str
    model_seq_id: StrictInt = Field(ge=0)
    path: str
    optimizer: bool = False
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None


class SaveForSamplerRequest(WireModel):
    path: str | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: int | None = None
    checkpoint_type: str | None = None  # Firetitan extension: base | delta | merged_base


class LoadAdapterRequest(WireModel):
    adapter_path: str


# The command of each ordered route (forward and forward_backward differ by their input's key).
OrderedCommand = (
    ForwardRequest
    | ForwardBackwardRequest
    | OptimStepRequest
    | SaveWeightsRequest
    | LoadWeightsRequest
    | SaveForSamplerRequest
    | LoadAdapterRequest
)
_ORDERED_COMMANDS: dict[str, type[WireModel]] = {
    "forward": ForwardRequest,
    "forward_backward": ForwardBackwardRequest,
    "optim_step": OptimStepRequest,
    "save_weights": SaveWeightsRequest,
    "load_weights": LoadWeightsRequest,
    "save_weights_for_sampler": SaveForSamplerRequest,
    "load_adapter": LoadAdapterRequest,
}


def parse_command(route: str, body: object) -> OrderedCommand:
    """The typed command of an ordered route's body, or a `UserError` naming every bad field."""
    return cast(OrderedCommand, parse(_ORDERED_COMMANDS[route], body))


class WeightsInfoRequest(WireModel):
    tinker_path: str


class RetrieveFutureRequest(WireModel):
    request_id: str
    allow_metadata_only: bool = False


# -- answers -------------------------------------------------------------------------------


class ClientConfig(WireModel):
    """The answer to `/api/v1/client/config` for a local server: JSON, no JWT, plain httpx."""

    pjwt_auth_enabled: bool = False
    credential_default_source: str = "api_key"
    use_pyqwest_transport: bool = False
    parallel_fwdbwd_chunks: bool = True
    proto_write_fwdbwd: bool = False
    proto_compress_fwdbwd: bool = False
    fwd_via_fwdbwd: bool = False
    sample_no_retries: bool = False
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False


class CreateSessionResponse(WireModel):
    type: Literal["create_session"] = "create_session"
    session_id: str


class HeartbeatResponse(WireModel):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class TelemetryResponse(WireModel):
    status: Literal["accepted"] = "accepted"


class SupportedModel(WireModel):
    model_name: str
    max_context_length: int


class ServerCapabilities(WireModel):
    supported_models: list[SupportedModel]


class UntypedFuture(WireModel):
    request_id: str
    model_id: str | None = None
    # asample only: one id per requested sample (tinker 0.38 requires them).
    sample_sequence_ids: list[str] | None = None


class TryAgainResponse(WireModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active"] = "active"


class ModelData(WireModel):
    model_name: str
    tokenizer_id: str | None = None
    arch: str | None = None


class GetInfoResponse(WireModel):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    is_lora: bool
    lora_rank: int | None = None
    model_name: str


class WeightsInfoResponse(WireModel):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class CheckpointListResponse(WireModel):
    checkpoints: list[str]


# -- sampling (stock tinker clients) -------------------------------------------------------


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: StrictInt = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class CreateSamplingSessionResponse(WireModel):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(WireModel):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class PromptWire(WireModel):
    chunks: list[dict[str, Any]]


MAX_NUM_SAMPLES = 64


class SamplingParamsWire(WireModel):
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    # None: stop at EOS; []: never stop early; strings: stop strings; ints: stop token ids.
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(WireModel):
    num_samples: int = Field(default=1, ge=1, le=MAX_NUM_SAMPLES)
    prompt: PromptWire
    sampling_params: SamplingParamsWire = SamplingParamsWire()
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0)
    # tinker 0.38 options the local sampler does not compute: refused when asked for, so a
    # client never silently receives less than it requested. (`record_stability_info` only
    # records data for `stable_reinforce`, which the trainer refuses, so it is ignored.)
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None

    @field_validator(
        "topk_sample_logprobs",
        "target_prompt_logprobs",
        "prompt_alt_tokens_k",
        "prompt_logprobs_last_n",
    )
    @classmethod
    def _not_computed_locally(cls, value: object) -> object:
        if value not in (None, 0):
            raise ValueError("not supported by the local trainer's sampler")
        return value


# -- results (what futures hold; `wire_json` is their 0.23 JSON form) -----------------------


class WireResult(WireModel):
    """The typed result of a future, encoded only at the edge."""

    def wire_json(self) -> JsonDict:
        """The JSON object a 0.23 client receives for this result."""
        return self.model_dump(**self._wire_fields())

    def wire_json_bytes(self) -> bytes:
        """`wire_json` already encoded, by pydantic's compiled serializer: a result holds a
        float per token, and walking those lists in Python on the server's event loop cost
        more than the rest of the request."""
        return self.model_dump_json(**self._wire_fields()).encode()

    def _wire_fields(self) -> dict[str, Any]:
        """Keyword arguments of `model_dump` that select the fields a client receives."""
        return {}


class FailedResult(WireResult):
    """A failed future: the message and whose fault it was."""

    error: str
    category: Literal["user", "server"]


class CreateModelResult(WireResult):
    model_id: str
    type: Literal["create_model"] = "create_model"


class UnloadModelResult(WireResult):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


class TensorDataWire(WireModel):
    """A tensor as tinker's JSON `TensorData`: flat values, dtype name, shape."""

    data: list[int | float]
    dtype: str
    shape: list[int]


class ForwardBackwardOutput(WireResult):
    """`forward` / `forward_backward`: per-datum output tensors by name, and loss metrics."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorDataWire]]
    metrics: dict[str, float]


class OptimStepResult(WireResult):
    metrics: dict[str, float]


class SaveWeightsResult(WireResult):
    path: str
    type: Literal["save_weights"] = "save_weights"


class LoadWeightsResult(WireResult):
    path: str
    type: Literal["load_weights"] = "load_weights"


class SaveForSamplerResult(WireResult):
    """A named snapshot answers its `path`; an ephemeral one its new `sampling_session_id`."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"

    def _wire_fields(self) -> dict[str, Any]:
        return {"exclude_none": True}


class LoadAdapterResult(WireResult):
    model_id: str
    adapter_path: str
    type: Literal["load_adapter"] = "load_adapter"


class SampledSequenceWire(WireModel):
    stop_reason: str
    tokens: list[int]
    # The logprob of each sampled token under the distribution it was drawn from.
    logprobs: list[float] = []


class SampleResult(WireResult):
    """`asample`: the sequences, and the prompt's logprobs (first position None) when asked."""

    type: Literal["sample"] = "sample"
    sequences: list[SampledSequenceWire]
    prompt_cache_hit_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None

    def _wire_fields(self) -> dict[str, Any]:
        # Absent unless asked for; the None inside the lists (prompt position 0) stays.
        unasked = {
            name
            for name in ("prompt_logprobs", "topk_prompt_logprobs")
            if getattr(self, name) is None
        }
        return {"exclude": unasked}
