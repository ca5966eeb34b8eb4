"""FiretitanServiceClient: tinker 0.23's ServiceClient connected to one Firetitan trainer.

A trainer speaks the tinker 0.23 JSON protocol behind the platform gateway
(`{base_url}/training/v1/rlorTrainerJobs/{account}/{job}`). This client adds what the stock one
lacks: Fireworks API keys, full-parameter and base-only (reference) models, LoRA alpha, and a
guard against creating the same training client twice on one session.

How a Fireworks key gets through tinker 0.23 (a `tml-` key keeps the stock behaviour):

* the client config is injected (`_client_config`, a constructor argument of tinker's
  `InternalClientHolder`), so `/api/v1/client/config` is never called; it selects the JSON wire
  and plain httpx rather than the pyqwest transport;
* tinker's `ApiKeyAuthProvider` refuses keys without a `tml-`/`eyJ` prefix, and the holder builds
  one unconditionally in its constructor. There is no argument to avoid that, so the constructor
  runs while `tinker.lib.internal_client_holder.ApiKeyAuthProvider` is swapped for a provider
  that only sets `X-API-Key`; a lock serialises the swap and it is restored in `finally`.

Training calls fail with the SDK's own errors (`sdk.errors`), never tinker's or httpx's: the
mapping lives in `sdk/firetitan_training.py` (`trainer_errors`).

Importing this module imports tinker, which imports torch: `sdk/__init__.py` loads it lazily.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from tinker import types
from tinker.lib import internal_client_holder as _holder_module
from tinker.lib._auth_token_provider import AuthTokenProvider
from tinker.lib.api_future_impl import _APIFuture
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType
from tinker.lib.public_interfaces.service_client import ServiceClient
from tinker.lib.queue_state_logger import QueueStateLogger

from sdk._closing import ClosesOnExit
from sdk.concurrency import ConcurrencyController
from sdk.errors import ConfigError, WaitTimeoutError
from sdk.firetitan_sampling import FiretitanSamplingClient
from sdk.firetitan_training import FiretitanTrainingClient, trainer_errors
from sdk.sampling import DeploymentSampler
from sdk.sampling_types import Tokenizer
from sdk.settings import FireworksSettings, normalize_url, resolve_api_key

__all__ = ["FIRETITAN_CLIENT_CONFIG", "FiretitanServiceClient"]

logger = logging.getLogger(__name__)

# The tinker client config a Firetitan trainer would hand out: JSON requests and results,
# forward_backward chunks submitted in parallel, plain httpx (HTTP/1.1 on loopback). The platform
# client selects pyqwest; fireloop keeps httpx, the transport its tests and proxies understand.
FIRETITAN_CLIENT_CONFIG: Final[Mapping[str, bool]] = {
    "pjwt_auth_enabled": False,
    "parallel_fwdbwd_chunks": True,
    "proto_write_fwdbwd": False,
    "proto_compress_fwdbwd": False,
    "fwd_via_fwdbwd": False,
    "sample_no_retries": False,
    "use_pyqwest_transport": False,
}

_TINKER_KEY_PREFIX = "tml-"
_CLOSE_TIMEOUT_S = 10.0
# A trainer creating a model loads the base weights: minutes for a large model, never forever.
DEFAULT_MODEL_TIMEOUT_S: Final = 1800.0
# The name `InternalClientHolder.__init__` looks up to build its API-key auth provider.
_SWAPPED_NAME = "ApiKeyAuthProvider"
_auth_swap_lock = threading.Lock()

# (base_model, lora_rank, seed, train_mlp, train_attn, train_unembed, lora_alpha)
_TrainingClientKey = tuple[str, int, int | None, bool, bool, bool, int]


class _FireworksKeyAuth(AuthTokenProvider):
    """Sends the key as `X-API-Key`, whatever its format (tinker's check is for tinker keys)."""

    def __init__(self, api_key: str | None = None) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        self._token = api_key

    async def get_token(self) -> str | None:
        return self._token


@contextlib.contextmanager
def _accept_any_key_format() -> Iterator[None]:
    """Within the block, tinker's client holder builds `_FireworksKeyAuth` for API keys."""
    with _auth_swap_lock:
        original = getattr(_holder_module, _SWAPPED_NAME)
        setattr(_holder_module, _SWAPPED_NAME, _FireworksKeyAuth)
        try:
            yield
        finally:
            setattr(_holder_module, _SWAPPED_NAME, original)


class FiretitanServiceClient(ClosesOnExit, ServiceClient):
    """A tinker session on one trainer; creates `FiretitanTrainingClient`s.

    `base_url` is the trainer endpoint (`TrainerServiceEndpoint.base_url`); it falls back to
    `FIREWORKS_BASE_URL`, then the public platform. `api_key` falls back to `FIREWORKS_API_KEY`.
    Constructing the client creates the session and starts its heartbeat; `close()` stops them.
    A trainer serves one base model, and a second session on it unloads the first one's models.
    `model_timeout_s` bounds each model creation (`WaitTimeoutError` past it).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        model_timeout_s: float = DEFAULT_MODEL_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        if not model_timeout_s > 0:
            raise ConfigError(f"model_timeout_s must be > 0, got {model_timeout_s}")
        self._model_timeout_s = model_timeout_s
        key = resolve_api_key(api_key)
        url = (
            normalize_url(base_url, field="base_url")
            if base_url is not None
            else FireworksSettings.from_env().base_url
        )
        self._created_keys: set[_TrainingClientKey] = set()
        self._created_lock = threading.Lock()
        if key.startswith(_TINKER_KEY_PREFIX):
            # A tinker key: stock tinker behaviour, including the client-config fetch.
            with trainer_errors("create_session"):
                super().__init__(user_metadata, project_id, base_url=url, api_key=key, **kwargs)
            return
        headers = {**kwargs.pop("default_headers", {}), "X-API-Key": key}
        kwargs.setdefault("_client_config", dict(FIRETITAN_CLIENT_CONFIG))
        with _accept_any_key_format(), trainer_errors("create_session"):
            super().__init__(
                user_metadata,
                project_id,
                base_url=url,
                api_key=key,
                default_headers=headers,
                **kwargs,
            )

    # -- training clients ------------------------------------------------------------------

    def create_training_client(
        self,
        base_model: str,
        lora_rank: int = 0,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        lora_alpha: int = 32,
        user_metadata: dict[str, str] | None = None,
    ) -> FiretitanTrainingClient:
        """A training client for a full-parameter (`lora_rank=0`) or LoRA model.

        Raises ValueError when this service client already created one with the same settings:
        two clients would train two copies on the one trainer, which is never what was meant.
        """
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        if lora_rank > 0 and not (train_mlp or train_attn or train_unembed):
            raise ValueError("LoRA needs at least one of train_mlp, train_attn, train_unembed")
        key: _TrainingClientKey = (
            base_model,
            lora_rank,
            seed,
            train_mlp,
            train_attn,
            train_unembed,
            lora_alpha,
        )
        with self._created_lock:
            if key in self._created_keys:
                raise ValueError(
                    f"a training client for {base_model!r} with lora_rank={lora_rank} and these "
                    "settings already exists on this service client; reuse it, or connect a new "
                    "FiretitanServiceClient for a separate session"
                )
            self._created_keys.add(key)
        lora_config = types.LoraConfig(
            rank=lora_rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        wire_lora = lora_config.model_dump(mode="json", exclude_none=True)
        if lora_rank > 0:
            wire_lora["alpha"] = lora_alpha  # a Firetitan field the stock LoraConfig lacks
        try:
            model_seq_id, model_id = self._create_model(
                base_model, {"lora_config": wire_lora}, user_metadata
            )
        except BaseException:
            with self._created_lock:  # nothing was created: the same settings may be retried
                self._created_keys.discard(key)
            raise
        logger.info("created training client %s (lora_rank=%d)", model_id, lora_rank)
        return FiretitanTrainingClient(
            self.holder, model_seq_id, model_id, lora_rank=lora_rank, run_name=model_id
        )

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        *,
        alpha: int = 32,
    ) -> FiretitanTrainingClient:
        """A LoRA training client (`create_training_client` with `lora_rank=rank`)."""
        return self.create_training_client(
            base_model,
            lora_rank=rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
            lora_alpha=alpha,
            user_metadata=user_metadata,
        )

    def create_base_training_client(
        self, base_model: str, user_metadata: dict[str, str] | None = None
    ) -> FiretitanTrainingClient:
        """A frozen base model for reference logprobs: `forward` only, never trained."""
        model_seq_id, model_id = self._create_model(base_model, {"base_only": True}, user_metadata)
        logger.info("created base-only (reference) client %s", model_id)
        return FiretitanTrainingClient(self.holder, model_seq_id, model_id, run_name=model_id)

    def create_training_client_from_state(
        self,
        path: str,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> FiretitanTrainingClient:
        """A training client with the weights of checkpoint `path` (optimizer state reset)."""
        client = self._client_matching_state(path, user_metadata, weights_access_token)
        client.load_state(path).result()
        return client

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> FiretitanTrainingClient:
        """A training client with the weights and optimizer state of checkpoint `path`."""
        client = self._client_matching_state(path, user_metadata, weights_access_token)
        client.load_state_with_optimizer(path).result()
        return client

    def create_sampling_client(  # type: ignore[override]  # tinker-shaped, not a subclass
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        deployment_sampler: DeploymentSampler | None = None,
        *,
        tokenizer: Tokenizer | str | None = None,
        concurrency_controller: ConcurrencyController | None = None,
    ) -> FiretitanSamplingClient:
        """Wrap `deployment_sampler` in tinker's sampling interface (`sample`).

        Firetitan trainers do not sample: without a sampler (sampling a `model_path` or a
        `base_model` directly) this needs the managed or serverless platform, which fireloop
        does not use. The sampler keeps its own tokenizer and concurrency controller.
        """
        if deployment_sampler is None:
            raise NotImplementedError(
                "create_sampling_client needs deployment_sampler=: hotload a snapshot onto a "
                "deployment (WeightSyncer.save_and_hotload) and pass a sdk.DeploymentSampler "
                "for it; sampling model_path/base_model directly needs the managed platform"
            )
        if concurrency_controller is not None:
            raise ValueError(
                "concurrency_controller: set it on the DeploymentSampler, which owns the window"
            )
        if tokenizer is not None and deployment_sampler.tokenizer is None:
            deployment_sampler.tokenizer = tokenizer
        ignored = {"model_path": model_path, "base_model": base_model, "retry_config": retry_config}
        if any(value is not None for value in ignored.values()):
            logger.warning(
                "create_sampling_client: %s ignored; the deployment serves what was hotloaded",
                ", ".join(name for name, value in ignored.items() if value is not None),
            )
        return FiretitanSamplingClient(deployment_sampler)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the heartbeat and telemetry and close the HTTP connections of this session."""
        holder = self.holder
        holder.close()  # type: ignore[no-untyped-call]  # cancels the heartbeat, stops telemetry

        async def _close_connections() -> None:
            # tinker keeps its httpx clients in per-purpose pools and never closes them itself.
            for pool in list(holder._client_pools.values()):
                for client in list(pool._clients):
                    await client.close()

        holder.run_coroutine_threadsafe(_close_connections()).result(timeout=_CLOSE_TIMEOUT_S)

    # -- internals ---------------------------------------------------------------------------

    def _create_model(
        self,
        base_model: str,
        extra_body: dict[str, Any],
        user_metadata: dict[str, str] | None,
    ) -> tuple[int, str]:
        """POST create_model (Firetitan fields in `extra_body`), wait; (model_seq_id, model_id)."""
        session_id = self.holder.get_session_id()
        model_seq_id = self.holder.get_training_client_id()
        request = types.CreateModelRequest(
            session_id=session_id,
            model_seq_id=model_seq_id,
            base_model=base_model,
            user_metadata=user_metadata,
        )

        async def _create() -> types.CreateModelResponse:
            start = time.time()
            with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                untyped = await client.models.create(request=request, extra_body=extra_body)
            return await _APIFuture(
                types.CreateModelResponse,
                self.holder,
                untyped,
                request_start_time=start,
                request_type="CreateModel",
                queue_state_observer=QueueStateLogger(base_model, "Model creation"),
            ).result_async()

        future = self.holder.run_coroutine_threadsafe(_create())
        try:
            with trainer_errors(f"create_model {base_model}"):
                response = future.result(timeout=self._model_timeout_s)
        except concurrent.futures.TimeoutError:
            future.future().cancel()  # stops polling for a model nobody will use
            raise WaitTimeoutError(
                waited_for=f"the trainer to create a model of {base_model!r}",
                last_state=None,
                waited_s=self._model_timeout_s,
            ) from None
        return model_seq_id, response.model_id

    def _client_matching_state(
        self,
        path: str,
        user_metadata: dict[str, str] | None,
        weights_access_token: str | None,
    ) -> FiretitanTrainingClient:
        if weights_access_token is not None:
            raise NotImplementedError("weights_access_token is not supported by Firetitan trainers")
        with trainer_errors(f"get_weights_info {path}"):
            info = self.create_rest_client().get_weights_info_by_tinker_path(path).result()
        return self.create_training_client(
            info.base_model,
            lora_rank=info.lora_rank or 0,
            train_mlp=True if info.train_mlp is None else info.train_mlp,
            train_attn=True if info.train_attn is None else info.train_attn,
            train_unembed=True if info.train_unembed is None else info.train_unembed,
            user_metadata=user_metadata,
        )
