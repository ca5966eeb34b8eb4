"""FiretitanTrainingClient: tinker 0.23's TrainingClient with the Firetitan extensions.

What it adds: `optim_step` with gradient-accumulation normalisation, a `response_tokens` metric
on cross-entropy `forward_backward`, sampler snapshots with a checkpoint type and a per-client
name suffix, `save_state` with a blocking timeout, trainer-side `list_checkpoints`,
`load_adapter`, `unload_model`, and cross-job checkpoint references.
Sampling never goes through the trainer (deployments serve it), so the tinker shortcuts that
would are refused.

Ordered operations that tinker does not know are submitted the way tinker submits its own
(`training_client.py`), relying on these tinker 0.23.0 internals (the version is pinned):
`_get_request_id` + `_take_turn` (per-client order; `seq_id = request id + 1`),
`_guaranteed_model_id`, `_queue_state_logger`, `holder.aclient(ClientConnectionPoolType.TRAIN)`,
`holder.execute_with_retries`, `holder.run_coroutine_threadsafe` and `_APIFuture` (polls
`retrieve_future`). Fields the stock request models (`extra="forbid"`) lack travel in the
resources' documented `extra_body`.

Every failure of a trainer call leaves this module (and `sdk/firetitan.py`) as the SDK's own
error (`trainer_errors`): callers never see tinker's or httpx's exception types.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import httpx
import tinker
from pydantic import BaseModel, ConfigDict
from tinker import types
from tinker.lib.api_future_impl import _APIFuture
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType
from tinker.lib.public_interfaces.api_future import APIFuture
from tinker.lib.public_interfaces.training_client import CustomLossFnV1, TrainingClient

from sdk.checkpoint_refs import new_snapshot_suffix, qualify_snapshot_name, resolve_checkpoint_path
from sdk.errors import (
    BadRequestError,
    FireworksError,
    TrainerLostError,
    exception_chain,
    status_error,
)
from sdk.firetitan_types import (
    CHECKPOINT_TYPES,
    CheckpointType,
    GradAccNormalization,
    GradNormMetricsMode,
    LoadAdapterResponse,
    SaveSamplerResult,
)

if TYPE_CHECKING:
    from tinker._client import AsyncTinker
    from tinker.lib.internal_client_holder import InternalClientHolder

__all__ = ["FiretitanTrainingClient", "trainer_error", "trainer_errors"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Sends one ordered request with the given seq id and answers the untyped future.
_SendOrdered = Callable[["AsyncTinker", int], Awaitable[types.UntypedAPIFuture]]


# 404: the trainer route (or a request id it forgot) is gone; 410: the server forgot a promise.
_GONE_STATUSES: Final = frozenset({404, 410})
_MAX_CAUSE_CHARS: Final = 300


def _lost(operation: str, link: BaseException) -> TrainerLostError:
    cause = f"{type(link).__name__}: {link}"[:_MAX_CAUSE_CHARS]
    return TrainerLostError(None, operation, None, cause)


def _mapped(link: BaseException, operation: str) -> FireworksError | None:
    """The SDK error for one foreign exception, by type and status code; None if not foreign."""
    if isinstance(link, tinker.RequestFailedError):
        # A user-category failure is a refused request (it would fail again); any other
        # category is the server failing the operation, typically because the trainer went away.
        if link.category == types.RequestErrorCategory.User:
            return BadRequestError(
                f"{operation} was refused by the trainer: {link.message}",
                status_code=400,
                server_message=link.message,
                request_id=link.request_id,
            )
        return _lost(operation, link)
    if isinstance(link, tinker.APIStatusError):
        if link.status_code in _GONE_STATUSES:
            return _lost(operation, link)
        return status_error(link.response, operation)
    # Connection failures reach here only after tinker's own retry budget is spent.
    if isinstance(link, tinker.APIConnectionError | httpx.TransportError):
        return _lost(operation, link)
    return None


def trainer_error(exc: BaseException, operation: str) -> BaseException:
    """The exception a failed trainer `operation` raises: the SDK's own error for a tinker or
    httpx failure (found in `exc` or what it was raised from), else `exc` itself."""
    if isinstance(exc, FireworksError):
        return exc
    for link in exception_chain(exc):
        mapped = _mapped(link, operation)
        if mapped is not None:
            return mapped
    return exc


@contextmanager
def trainer_errors(operation: str) -> Iterator[None]:
    """Within the block, a tinker or httpx failure is raised as the SDK's error for it."""
    try:
        yield
    except Exception as exc:
        mapped = trainer_error(exc, operation)
        if mapped is exc:
            raise
        raise mapped from exc


def _identity(value: T) -> T:
    return value


class _CheckpointList(BaseModel):
    model_config = ConfigDict(extra="ignore")

    checkpoints: list[str]


class _TrainerFuture(APIFuture[T]):
    """A tinker future whose failure is the SDK's error (`trainer_errors`) and whose result
    is passed through `transform` (which must be idempotent)."""

    def __init__(
        self, inner: APIFuture[T], operation: str, transform: Callable[[T], T] = _identity
    ) -> None:
        self._inner = inner
        self._operation = operation
        self._transform = transform

    def result(self, timeout: float | None = None) -> T:
        with trainer_errors(self._operation):
            value = self._inner.result(timeout)
        return self._transform(value)

    async def result_async(self, timeout: float | None = None) -> T:
        with trainer_errors(self._operation):
            value = await self._inner.result_async(timeout)
        return self._transform(value)


class _CompletedFuture(APIFuture[T]):
    """A future whose result is already known."""

    def __init__(self, value: T) -> None:
        self._value = value

    def result(self, timeout: float | None = None) -> T:
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        return self._value


def _count_response_tokens(data: Sequence[types.Datum]) -> float:
    """Σ non-zero `weights` over the batch; a datum without weights counts its targets."""
    total = 0
    for datum in data:
        weights = datum.loss_fn_inputs.get("weights")
        targets = datum.loss_fn_inputs.get("target_tokens")
        if weights is not None:
            total += sum(1 for value in weights.data if value != 0)
        elif targets is not None:
            total += len(targets.data)
    return float(total)


def _checkpoint_type(value: str) -> CheckpointType:
    lowered = value.strip().lower()
    for kind in CHECKPOINT_TYPES:
        if lowered == kind:
            return kind
    raise ValueError(f"checkpoint_type must be one of {', '.join(CHECKPOINT_TYPES)}, got {value!r}")


def _grad_norm_mode(value: bool | GradNormMetricsMode | str) -> bool | str:
    if isinstance(value, bool):
        return value
    return GradNormMetricsMode(value).value


class FiretitanTrainingClient(TrainingClient):
    """One model on a Firetitan trainer: train, checkpoint, export snapshots for serving.

    `session_id` is this client's snapshot suffix (8 hex digits, fresh for every client, hence
    fresh after every reconnect): `save_weights_for_sampler_ext("step-4")` saves `step-4-<id>`.
    """

    def __init__(
        self,
        holder: InternalClientHolder,
        model_seq_id: int,
        model_id: types.ModelID,
        *,
        lora_rank: int = 0,
        first_sampler_checkpoint_type: CheckpointType = "base",
        run_name: str | None = None,
    ) -> None:
        super().__init__(holder, model_seq_id=model_seq_id, model_id=model_id)
        self.lora_rank = lora_rank
        self.run_name = run_name
        self.first_sampler_checkpoint_type = _checkpoint_type(first_sampler_checkpoint_type)
        self.session_id = new_snapshot_suffix()
        self._sampler_saved = False
        self._saved_sampler_names: set[str] = set()
        self._saved_state_names: set[str] = set()
        logger.info("training client %s uses snapshot suffix %s", model_id, self.session_id)

    # -- training --------------------------------------------------------------------------

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """tinker's `forward` (no gradient), failing with the SDK's errors."""
        with trainer_errors("forward"):
            future = super().forward(data, loss_fn, loss_fn_config)
        return _TrainerFuture(future, "forward")

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """tinker's `forward_backward`; cross-entropy results also carry `response_tokens`."""
        with trainer_errors("forward_backward"):
            future = super().forward_backward(data, loss_fn, loss_fn_config)
        if loss_fn != "cross_entropy":
            return _TrainerFuture(future, "forward_backward")
        response_tokens = _count_response_tokens(data)

        def _add_response_tokens(
            output: types.ForwardBackwardOutput,
        ) -> types.ForwardBackwardOutput:
            output.metrics.setdefault("response_tokens", response_tokens)
            return output

        return _TrainerFuture(future, "forward_backward", _add_response_tokens)

    def forward_backward_custom(
        self,
        data: list[types.Datum],
        loss_fn: CustomLossFnV1,
        *,
        loss_type_input: Literal["logprobs"] = "logprobs",
        output: str = "logprobs",
        pooling: str = "mean",
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """A Python loss over per-token logprobs (tinker's two-phase forward + backward).

        `output` other than `"logprobs"` (embedding training, with its `pooling`) is a Firetitan
        extension the local platform does not serve.
        """
        if output != "logprobs":
            raise NotImplementedError(
                f"forward_backward_custom(output={output!r}, pooling={pooling!r}): only "
                "output='logprobs' is supported"
            )
        with trainer_errors("forward_backward_custom"):
            future = super().forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)
        return _TrainerFuture(future, "forward_backward_custom")

    def optim_step(
        self,
        adam_params: types.AdamParams,
        grad_accumulation_normalization: GradAccNormalization | str | None = None,
        emit_grad_norm_metrics: bool | GradNormMetricsMode | str | None = None,
    ) -> APIFuture[types.OptimStepResponse]:
        """Apply the accumulated gradient with AdamW, after optional normalisation.

        `grad_accumulation_normalization`: None or `none` leaves the summed gradient as it is
        (losses that normalise themselves: SFT, DPO); `num_loss_tokens` divides by the loss
        tokens accumulated since the last step (raw-sum RL losses); `num_sequences` by the datums.
        """
        extra_body: dict[str, Any] = {}
        if grad_accumulation_normalization is not None:
            mode = GradAccNormalization(grad_accumulation_normalization)
            extra_body["grad_accumulation_normalization"] = mode.value
        if emit_grad_norm_metrics is not None:
            extra_body["adam_params"] = {
                **adam_params.model_dump(mode="json"),
                "emit_grad_norm_metrics": _grad_norm_mode(emit_grad_norm_metrics),
            }

        async def _send(client: AsyncTinker, seq_id: int) -> types.UntypedAPIFuture:
            request = types.OptimStepRequest(
                adam_params=adam_params, model_id=self._guaranteed_model_id(), seq_id=seq_id
            )
            return await client.training.optim_step(request=request, extra_body=extra_body or None)

        return self._submit_ordered("OptimStep", types.OptimStepResponse, _send)

    # -- checkpoints -----------------------------------------------------------------------

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        *,
        timeout: float | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Save weights and optimizer state (resumable) as checkpoint `name` of this job.

        With `timeout`, block until the save completes (TimeoutError past it).
        """
        if overwrite:
            raise NotImplementedError(
                "save_state(overwrite=True) is not supported: checkpoints are immutable, "
                "save under a new name"
            )
        if name in self._saved_state_names:
            logger.warning("checkpoint name %r was already saved by this client", name)
        self._saved_state_names.add(name)
        operation = f"save_state {name}"
        with trainer_errors(operation):
            future: APIFuture[types.SaveWeightsResponse] = _TrainerFuture(
                super().save_state(name, ttl_seconds=ttl_seconds), operation
            )
        if timeout is not None:
            future.result(timeout=timeout)
        return future

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Load the weights of checkpoint `path` (optimizer state reset)."""
        operation = f"load_state {path}"
        with trainer_errors(operation):
            future = super().load_state(path, weights_access_token=weights_access_token)
        return _TrainerFuture(future, operation)

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Load the weights and optimizer state of checkpoint `path`."""
        operation = f"load_state_with_optimizer {path}"
        with trainer_errors(operation):
            future = super().load_state_with_optimizer(
                path, weights_access_token=weights_access_token
            )
        return _TrainerFuture(future, operation)

    def get_info(self) -> types.GetInfoResponse:
        """The model's configuration and metadata."""
        with trainer_errors("get_info"):
            return super().get_info()

    async def get_info_async(self) -> types.GetInfoResponse:
        """Async version of get_info."""
        with trainer_errors("get_info"):
            return await super().get_info_async()

    def unload_model(self) -> APIFuture[types.UnloadModelResponse]:
        """Unload this model from the trainer, after its queued work; later calls on it fail.

        A reference model whose log-probabilities are all cached frees its memory this way.
        tinker 0.23 has the route (`models.unload`) but no client method for it.
        """

        async def _unload() -> types.UnloadModelResponse:
            start = time.time()
            request = types.UnloadModelRequest(model_id=self._guaranteed_model_id())
            with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                untyped = await client.models.unload(request=request)
            return await _APIFuture(
                types.UnloadModelResponse,
                self.holder,
                untyped,
                request_start_time=start,
                request_type="UnloadModel",
                queue_state_observer=self._queue_state_logger,
            ).result_async()

        with trainer_errors("unload_model"):
            future = self.holder.run_coroutine_threadsafe(_unload())
        return _TrainerFuture(future, "unload_model")

    def list_checkpoints(self) -> list[str]:
        """Resumable checkpoints of the trainer's job, oldest first; [] (and a warning) on error.

        Callers fall back to the control plane's checkpoint list when this is empty.
        """

        async def _list() -> object:
            with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                return await client.get("/api/v1/list_checkpoints", cast_to=object)

        try:
            answer = self.holder.run_coroutine_threadsafe(_list()).result()
            return _CheckpointList.model_validate(answer).checkpoints
        except Exception as exc:  # the contract: any failure means "nothing to resume from here"
            logger.warning(
                "list_checkpoints failed (%s: %s); resume may start from scratch",
                type(exc).__name__,
                exc,
            )
            return []

    def resolve_checkpoint_path(self, name: str, source_job_id: str | None = None) -> str:
        """The reference `load_state_with_optimizer` takes for `name` (of `source_job_id`)."""
        return resolve_checkpoint_path(name, source_job_id)

    def load_adapter(self, adapter_path: str) -> APIFuture[LoadAdapterResponse]:
        """Load HF PEFT adapter weights into this LoRA model (weights only; optimizer reset)."""
        path = adapter_path.strip()
        if not path:
            raise ValueError("adapter_path must not be empty")

        async def _send(client: AsyncTinker, seq_id: int) -> types.UntypedAPIFuture:
            body = {"adapter_path": path, "model_id": self._guaranteed_model_id(), "seq_id": seq_id}
            return await client.post(
                "/api/v1/load_adapter", body=body, cast_to=types.UntypedAPIFuture
            )

        return self._submit_ordered("LoadAdapter", LoadAdapterResponse, _send)

    # -- sampler snapshots -----------------------------------------------------------------

    def save_weights_for_sampler_ext(
        self,
        name: str,
        checkpoint_type: CheckpointType | str | None = None,
        ttl_seconds: int | None = None,
    ) -> SaveSamplerResult:
        """Export the weights for serving as snapshot `<name>-<session_id>`; blocks until saved.

        Without `checkpoint_type`: LoRA → `base` (the adapter); full-parameter → `delta` once this
        client saved a snapshot, else `first_sampler_checkpoint_type`.
        """
        kind = self._sampler_checkpoint_type(checkpoint_type)
        actual_name = qualify_snapshot_name(self.session_id, name)
        if actual_name in self._saved_sampler_names:
            logger.warning("sampler snapshot %r was already saved by this client", actual_name)

        async def _send(client: AsyncTinker, seq_id: int) -> types.UntypedAPIFuture:
            request = types.SaveWeightsForSamplerRequest(
                model_id=self._guaranteed_model_id(),
                path=actual_name,
                seq_id=seq_id,
                ttl_seconds=ttl_seconds,
            )
            return await client.weights.save_for_sampler(
                request=request, extra_body={"checkpoint_type": kind}, max_retries=0
            )

        response = self._submit_ordered(
            "SaveWeightsForSampler", types.SaveWeightsForSamplerResponseInternal, _send
        ).result()
        if response.path is None:
            raise RuntimeError(f"the trainer saved snapshot {actual_name!r} but reported no path")
        self._saved_sampler_names.add(actual_name)
        self._sampler_saved = True
        return SaveSamplerResult(path=response.path, snapshot_name=actual_name)

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        *,
        checkpoint_type: CheckpointType | str | None = None,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """`save_weights_for_sampler_ext`, answered as tinker's (already completed) future."""
        result = self.save_weights_for_sampler_ext(name, checkpoint_type, ttl_seconds)
        return _CompletedFuture(types.SaveWeightsForSamplerResponse(path=result.path))

    def save_weights_and_get_sampling_client(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: sample through a deployment (`sdk.DeploymentSampler`)."""
        raise NotImplementedError(_NO_TRAINER_SAMPLING)

    async def save_weights_and_get_sampling_client_async(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: sample through a deployment (`sdk.DeploymentSampler`)."""
        raise NotImplementedError(_NO_TRAINER_SAMPLING)

    # -- internals -------------------------------------------------------------------------

    def _sampler_checkpoint_type(self, explicit: str | None) -> CheckpointType:
        if explicit is not None:
            return _checkpoint_type(explicit)
        if self.lora_rank > 0:
            return "base"  # an adapter snapshot is always complete
        return "delta" if self._sampler_saved else self.first_sampler_checkpoint_type

    def _submit_ordered(
        self, request_type: str, result_type: type[R], send: _SendOrdered
    ) -> APIFuture[R]:
        """Submit one ordered operation in this client's turn and poll its result."""
        request_id = self._get_request_id()

        async def _run() -> R:
            start = time.time()

            async def _send_once() -> types.UntypedAPIFuture:
                with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                    return await send(client, request_id + 1)

            async with self._take_turn(request_id):
                untyped = await self.holder.execute_with_retries(_send_once)
            return await _APIFuture(
                result_type,
                self.holder,
                untyped,
                request_start_time=start,
                request_type=request_type,
                queue_state_observer=self._queue_state_logger,
            ).result_async()

        return _TrainerFuture(self.holder.run_coroutine_threadsafe(_run()), request_type)


_NO_TRAINER_SAMPLING = (
    "Firetitan trainers do not sample: save with save_weights_for_sampler_ext, hotload the "
    "snapshot onto a deployment and sample with sdk.DeploymentSampler"
)
