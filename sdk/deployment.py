"""`DeploymentManager`: create or reuse, wait for, update, scale down and delete deployments.

The deployment calls of the control plane (create, get, update, scale to zero, delete), the
completion probe used for readiness and warmup, re-attaching a deployment to another trainer,
and the hotload methods, whose logic lives in `sdk.hotload` (this class is their public
surface). The wire facts: docs/platform-contract.md.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from sdk._account import ACCOUNT_ID_REMOVED, FireworksClient
from sdk._http import RetryPolicy, response_json
from sdk._ids import check_id
from sdk._polling import Done, Pending, check_interval, poll_until
from sdk.concurrency import ConcurrencyController
from sdk.deployment_config import DeploymentConfig, build_deployment_request
from sdk.errors import ConfigError, DeploymentError, FireworksError, WaitTimeoutError
from sdk.hotload import Hotloader, reattach_trainer
from sdk.hotload_types import DeltaMetadata, HotloadAck, HotloadStatus
from sdk.resources import DeploymentInfo
from sdk.sampling import DeploymentSampler
from sdk.sampling_types import Tokenizer
from sdk.settings import DEFAULT_BASE_URL, normalize_url
from sdk.states import DEPLOYMENT_CREATING, DEPLOYMENT_READY, is_bad_deployment

__all__ = ["DeploymentConfig", "DeploymentInfo", "DeploymentManager"]

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
WARMUP_TIMEOUT_S = 30.0
# Token ids every served vocabulary has: the probe's answer, not its text, matters.
_PROBE_PROMPT = [1, 2]
_SNAKE_CASE_FIELD = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"


class DeploymentManager(FireworksClient):
    """Manages inference deployments of the API key's account.

    `inference_url` and `hotload_api_url` default to `base_url` (one host serves all three);
    `boot_time_s` is the duration of the last successful `wait_for_ready`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        inference_url: str | None = None,
        hotload_api_url: str | None = None,
        additional_headers: Mapping[str, str] | None = None,
        verify_ssl: bool | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        account_id: object = ACCOUNT_ID_REMOVED,
    ) -> None:
        super().__init__(
            api_key,
            base_url,
            additional_headers,
            verify_ssl,
            transport=transport,
            http_client=http_client,
            retry=retry,
            sleep=sleep,
            clock=clock,
            account_id=account_id,
        )
        self.inference_url = self._url_or_base(inference_url, "inference_url")
        self.hotload_api_url = self._url_or_base(hotload_api_url, "hotload_api_url")
        self.boot_time_s: float | None = None
        self._hotloader = Hotloader(
            self._http, self.hotload_api_url, self._deployment_name, sleep=sleep, clock=clock
        )

    @property
    def last_hotload_error_message(self) -> str | None:
        """Why the last `wait_for_hotload` returned False (None after a success)."""
        return self._hotloader.last_error_message

    def _url_or_base(self, url: str | None, field: str) -> str:
        return self.base_url if url is None else normalize_url(url, field=field)

    def create_or_get(
        self,
        config: DeploymentConfig,
        force_recreate: bool = False,
        *,
        delete_poll_interval_s: float = 2,
        delete_timeout_s: float = 60,
    ) -> DeploymentInfo:
        """The deployment `config` names: reused if it exists in a usable state (its settings
        are *not* compared), else (re)created. A FAILED/DELETING/DELETED one, or any one with
        `force_recreate`, is deleted first and polled until gone (at most `delete_timeout_s`)."""
        config.validate()
        check_interval("delete_poll_interval_s", delete_poll_interval_s)
        check_interval("delete_timeout_s", delete_timeout_s, allow_zero=True)
        existing = self.get(config.deployment_id)
        if existing is not None:
            if not force_recreate and not is_bad_deployment(existing.state):
                logger.info("reusing deployment %s (%s)", existing.deployment_id, existing.state)
                return existing
            logger.info("recreating deployment %s (was %s)", config.deployment_id, existing.state)
            self.delete(config.deployment_id)
            self._wait_until_gone(config.deployment_id, delete_poll_interval_s, delete_timeout_s)
        return self._create(config)

    def _wait_until_gone(self, deployment_id: str, interval_s: float, timeout_s: float) -> None:
        def check() -> Done[None] | Pending:
            info = self.get(deployment_id)
            return Done(None) if info is None or info.state == "DELETED" else Pending(info.state)

        try:
            poll_until(
                check,
                waited_for=f"deployment {deployment_id} to be deleted",
                timeout_s=timeout_s,
                poll_interval_s=interval_s,
                sleep=self._sleep,
                clock=self._clock,
            )
        except WaitTimeoutError as exc:
            # Proceed anyway, as the published SDK does: a 409 on create → GET shows what is there.
            logger.warning("%s; creating anyway", exc)

    def _create(self, config: DeploymentConfig) -> DeploymentInfo:
        query, body = build_deployment_request(config, self.account_id)
        path = f"/v1/accounts/{self.account_id}/deployments"
        response = self._http.request("POST", path, params=query, json=body, ok_statuses=(409,))
        if response.status_code == 409:
            existing = self.get(config.deployment_id)
            if existing is None:  # deleted between the 409 and our GET
                raise self._http.error_for(response, f"create deployment {config.deployment_id}")
            logger.info("deployment %s already exists; reusing it", config.deployment_id)
            return existing
        logger.info("created deployment %s", config.deployment_id)
        return DeploymentInfo.from_api(response_json(response, path))

    def wait_for_ready(
        self, deployment_id: str, timeout_s: float = 600, poll_interval_s: float = 15
    ) -> DeploymentInfo:
        """Poll until READY, or CREATING and already answering a completion probe (then
        reported as READY). FAILED/DELETING/DELETED → `DeploymentError`; gone → `NotFoundError`.
        """
        check_interval("timeout_s", timeout_s, allow_zero=True)
        check_interval("poll_interval_s", poll_interval_s)
        path = self._deployment_path(deployment_id)
        started = self._clock()

        def check() -> Done[DeploymentInfo] | Pending:
            info = DeploymentInfo.from_api(response_json(self._http.request("GET", path), path))
            if info.state == DEPLOYMENT_READY:
                return Done(info)
            if is_bad_deployment(info.state):
                raise DeploymentError(
                    f"deployment {deployment_id} is {info.state}; recreate it",
                    deployment_id=deployment_id,
                    state=info.state,
                )
            if info.state == DEPLOYMENT_CREATING and self._answers_completions(info):
                return Done(info.model_copy(update={"state": DEPLOYMENT_READY}))
            return Pending(info.state)

        info = poll_until(
            check,
            waited_for=f"deployment {deployment_id} to become READY",
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
            sleep=self._sleep,
            clock=self._clock,
        )
        self.boot_time_s = self._clock() - started
        return info

    def _answers_completions(self, info: DeploymentInfo) -> bool:
        """Whether the deployment already serves a tiny completion (one attempt)."""
        model = info.inference_model or self._deployment_name(info.deployment_id)
        return self._probe_completion(model, PROBE_TIMEOUT_S)

    def _probe_completion(self, model: str, timeout_s: float) -> bool:
        body = {"model": model, "prompt": _PROBE_PROMPT, "max_tokens": 4, "temperature": 0.0}
        url = f"{self.inference_url}/inference/v1/completions"
        return self._http.probe("POST", url, json=body, timeout=timeout_s)

    def warmup(self, model: str, max_retries: int = 30, retry_interval_s: float = 10.0) -> bool:
        """Send a tiny completion to `model` (`accounts/<a>/deployments/<d>`) until one answers
        200, at most `max_retries` times: the first requests after a hotload can be slow or fail
        while caches are rebuilt. False when none succeeded; never raises."""
        for attempt in range(1, max_retries + 1):
            try:
                if self._probe_completion(model, WARMUP_TIMEOUT_S):
                    logger.info("warmup of %s succeeded on attempt %d", model, attempt)
                    return True
            except FireworksError as exc:  # e.g. a malformed URL: reported, never raised
                logger.warning("warmup of %s: %s", model, exc)
            if attempt < max_retries:
                self._sleep(retry_interval_s)
        logger.warning("warmup of %s failed %d times; continuing without it", model, max_retries)
        return False

    def get(self, deployment_id: str) -> DeploymentInfo | None:
        """The deployment, or None if it does not exist."""
        path = self._deployment_path(deployment_id)
        response = self._http.request("GET", path, ok_statuses=(404,))
        if response.status_code == 404:
            return None
        return DeploymentInfo.from_api(response_json(response, path))

    def update(
        self, deployment_id: str, body: Mapping[str, Any], update_mask: Sequence[str]
    ) -> DeploymentInfo:
        """PATCH the fields named in `update_mask` (snake_case) from the camelCase `body`."""
        if isinstance(update_mask, str) or not update_mask:
            raise ConfigError("update_mask must be a non-empty list of snake_case field names")
        for field in update_mask:
            if not isinstance(field, str) or not re.fullmatch(_SNAKE_CASE_FIELD, field):
                raise ConfigError(f"update_mask: {field!r} is not a snake_case field name")
        path = self._deployment_path(deployment_id)
        params = {"updateMask": ",".join(update_mask)}
        response = self._http.request("PATCH", path, params=params, json=dict(body))
        return DeploymentInfo.from_api(response_json(response, path))

    def scale_to_zero(self, deployment_id: str) -> None:
        """Set min and max replicas to 0, keeping the deployment. Best effort: failures
        are logged, never raised."""
        body = {"maxReplicaCount": 0, "minReplicaCount": 0}
        try:
            self._http.request("PATCH", self._deployment_path(deployment_id), json=body)
        except FireworksError as exc:
            logger.warning("could not scale deployment %s to zero: %s", deployment_id, exc)
        else:
            logger.info("scaled deployment %s to zero", deployment_id)

    def delete(self, deployment_id: str) -> None:
        """Hard-delete the deployment. Best effort: failures are logged, never raised."""
        params = {"ignoreChecks": "true", "hard": "true"}
        try:
            self._http.request("DELETE", self._deployment_path(deployment_id), params=params)
        except FireworksError as exc:
            logger.warning("could not delete deployment %s: %s", deployment_id, exc)
        else:
            logger.info("deleted deployment %s", deployment_id)

    def create_sampler(
        self,
        deployment_id: str,
        *,
        tokenizer: Tokenizer | str | None = None,
        concurrency_controller: ConcurrencyController | None = None,
        **kwargs: Any,
    ) -> DeploymentSampler:
        """A `DeploymentSampler` for the deployment at `inference_url`, with this manager's key,
        headers and TLS policy (`kwargs`: the sampler's keyword-only options)."""
        return DeploymentSampler(
            self.inference_url,
            self._deployment_name(deployment_id),
            self._http.api_key,
            tokenizer,
            concurrency_controller,
            additional_headers=self._http.additional_headers,
            verify_ssl=self._http.verify_ssl,
            **kwargs,
        )

    def reattach_trainer(
        self,
        deployment: str | DeploymentInfo,
        *,
        base_model: str,
        trainer_job_name: str,
        timeout_s: float,
        poll_interval_s: float = 5,
    ) -> DeploymentInfo:
        """Point the deployment's hotload bucket at `trainer_job_name` (`accounts/<a>/
        rlorTrainerJobs/<j>`) and wait until the restarted pod no longer serves the old
        trainer's snapshot. Already attached → returned as is, with no PATCH (one that
        changes nothing never restarts the pod, so the wait would time out). Reset the delta
        chain of any syncer on this deployment afterwards."""
        deployment_id = deployment if isinstance(deployment, str) else deployment.deployment_id
        return reattach_trainer(
            self,
            self._hotloader,
            deployment_id,
            base_model=base_model,
            trainer_job_name=trainer_job_name,
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
        )

    # -- hotload (the logic is in sdk.hotload) -------------------------------------------------

    def hotload(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: DeltaMetadata | None = None,
        reset_prompt_cache: bool = True,
        timeout: float = 60,
        path: str | None = None,
    ) -> HotloadAck:
        """Ask the deployment to load a snapshot; a delta when metadata is given. `path`
        (an object-store URI) travels in `x-fireworks-hot-load-source-url`. Returns once the
        request is accepted; loading is asynchronous (see `wait_for_hotload`)."""
        return self._hotloader.hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            incremental_snapshot_metadata,
            reset_prompt_cache,
            timeout,
            path,
        )

    def hotload_check_status(self, deployment_id: str, base_model: str) -> HotloadStatus:
        """The deployment's hotload status: per replica, what it serves and its stage."""
        return self._hotloader.check_status(deployment_id, base_model)

    def wait_for_hotload(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        timeout_seconds: float = 400,
        poll_interval: float = 5,
    ) -> bool:
        """True once replica 0 is ready and serves `expected_identity`; False when its load
        failed or the time ran out (reason in `last_hotload_error_message`). Replica 0 only, as
        on the platform: use `verify_hotload` before sampling a multi-replica deployment."""
        return self._hotloader.wait(
            deployment_id, base_model, expected_identity, timeout_seconds, poll_interval
        )

    def hotload_and_wait(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: DeltaMetadata | None = None,
        reset_prompt_cache: bool = True,
        timeout_seconds: float = 400,
        path: str | None = None,
        poll_interval: float = 5,
    ) -> bool:
        """`hotload` (60 s request timeout), then `wait_for_hotload`."""
        self.hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            incremental_snapshot_metadata,
            reset_prompt_cache,
            path=path,
        )
        return self.wait_for_hotload(
            deployment_id, base_model, snapshot_identity, timeout_seconds, poll_interval
        )

    def verify_hotload(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        *,
        timeout_s: float = 60,
        poll_interval_s: float = 1,
    ) -> HotloadStatus:
        """Wait until every replica is ready and serves `expected_identity`; otherwise
        `StaleDeploymentError` naming the expected and the served identity."""
        return self._hotloader.verify(
            deployment_id,
            base_model,
            expected_identity,
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
        )

    def wait_for_hotload_ready(
        self,
        deployment_id: str,
        base_model: str,
        timeout_s: float = 300,
        poll_interval_s: float = 5,
    ) -> HotloadStatus:
        """Wait until the hotload status lists replicas (loading earlier can crash them)."""
        return self._hotloader.wait_for_replicas(
            deployment_id, base_model, timeout_s=timeout_s, poll_interval_s=poll_interval_s
        )

    def _deployment_path(self, deployment_id: str) -> str:
        check_id("deployment_id", deployment_id)  # before the account lookup
        return f"/v1/accounts/{self.account_id}/deployments/{deployment_id}"

    def _deployment_name(self, deployment_id: str) -> str:
        check_id("deployment_id", deployment_id)
        return f"accounts/{self.account_id}/deployments/{deployment_id}"
