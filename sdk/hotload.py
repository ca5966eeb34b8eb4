"""Hotload: ask a deployment to load a snapshot, watch it load, verify what it serves.

`Hotloader` is the logic behind `DeploymentManager.hotload*`: the load request with the
`reset_prompt_cache` drop-and-remember rule, the status read, the wire-compatible `wait`
(replica 0 only, like the published SDK) and fireloop's stricter `verify` that every replica
serves the snapshot. Sampling before `verify` succeeds would evaluate stale weights. Both
waits look again after 50 ms and back off to their poll interval, which caps the pauses: a load
takes well under a second locally, and one pause of the whole default (5 s) would be most of a
sync. Their status reads also ask the server to hold the answer while the load runs (a local
platform extension, query `wait_for_identity`; a server without it answers at once, as before),
so the end of a load is seen when it happens. The wire facts: docs/platform-contract.md,
'Hotload'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from sdk._http import HttpClient, response_json
from sdk._polling import (
    Clock,
    Deadline,
    Done,
    Pending,
    Sleep,
    backoff_intervals,
    check_interval,
    poll_until,
)
from sdk.errors import (
    APIConnectionError,
    APIStatusError,
    DeploymentError,
    FireworksError,
    HotloadError,
    StaleDeploymentError,
    WaitTimeoutError,
)
from sdk.hotload_types import (
    STAGE_ERROR,
    DeltaMetadata,
    HotloadAck,
    HotloadStatus,
    IncrementalSnapshotMetadata,
)
from sdk.states import DEPLOYMENT_READY

if TYPE_CHECKING:
    import httpx

    from sdk.deployment import DeploymentManager
    from sdk.resources import DeploymentInfo

__all__ = ["HOTLOAD_PATH", "Hotloader", "reattach_trainer"]

logger = logging.getLogger(__name__)

_ModelT = TypeVar("_ModelT", bound=BaseModel)

HOTLOAD_PATH = "/hot_load/v1/models/hot_load"
_SOURCE_URL_HEADER = "x-fireworks-hot-load-source-url"
_RESET_FIELD = "reset_prompt_cache"
_EXTRA_FORBIDDEN = "extra inputs are not permitted"
# The longest the waits ask the server to hold a status answer while the load runs (the local
# platform caps it there too); far below the GET timeout.
STATUS_HOLD_S = 2.0
# What a server that validates its query parameters answers to ones it does not know.
_REFUSED_PARAMETERS = (400, 422)
# Failures of one status read that a wait outlives: no answer, or a non-2xx after retries.
_TRANSIENT = (APIStatusError, APIConnectionError)


def _describe(status: HotloadStatus | None) -> str:
    if status is None:
        return "no status read"
    if not status.replicas:
        return "no replicas yet (stage pending)"
    first = status.replicas[0]
    return (
        f"replica 0 serves {first.current_snapshot_identity!r} "
        f"(ready={first.readiness}, stage {first.loading_state.stage!r})"
    )


class Hotloader:
    """Load requests and status reads at `hotload_api_url`, for deployments named by
    `deployment_name(id)`."""

    def __init__(
        self,
        http: HttpClient,
        hotload_api_url: str,
        deployment_name: Callable[[str], str],
        *,
        sleep: Sleep,
        clock: Clock,
    ) -> None:
        self._http = http
        self._url = f"{hotload_api_url}{HOTLOAD_PATH}"
        self._deployment_name = deployment_name
        self.sleep = sleep
        self.clock = clock
        # None: unknown yet. False once a server refused the field; True once one accepted it.
        self.reset_prompt_cache_supported: bool | None = None
        # False once a server refused the held-status parameters (never sent to it again).
        self.status_hold_supported: bool | None = None
        self.last_error_message: str | None = None

    def _headers(
        self, deployment_id: str, base_model: str, source_url: str | None
    ) -> dict[str, str]:
        headers = {
            "fireworks-model": base_model,
            "fireworks-deployment": self._deployment_name(deployment_id),
        }
        if source_url:
            headers[_SOURCE_URL_HEADER] = source_url
        return headers

    def hotload(
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: DeltaMetadata | None,
        reset_prompt_cache: bool,
        timeout: float,
        path: str | None,
    ) -> HotloadAck:
        """Ask the deployment to load `snapshot_identity` (a delta when metadata is given)."""
        body: dict[str, Any] = {"identity": snapshot_identity}
        if incremental_snapshot_metadata is not None:
            body["incremental_snapshot_metadata"] = (
                incremental_snapshot_metadata.model_dump()
                if isinstance(incremental_snapshot_metadata, IncrementalSnapshotMetadata)
                else dict(incremental_snapshot_metadata)
            )
        send_reset = self.reset_prompt_cache_supported is not False
        if send_reset:
            body[_RESET_FIELD] = reset_prompt_cache
        headers = self._headers(deployment_id, base_model, path)
        what = f"hotload {snapshot_identity} onto {deployment_id}"
        response = self._post(body, headers, timeout)
        if response.status_code == 400 and send_reset and _refuses_reset_field(response.text):
            # An older server's strict schema: drop the field, and never send it again.
            logger.info("%s: the server does not know %s; resending without it", what, _RESET_FIELD)
            self.reset_prompt_cache_supported = False
            del body[_RESET_FIELD]
            response = self._post(body, headers, timeout)
        if not response.is_success:
            raise self._http.error_for(response, what)
        if send_reset and _RESET_FIELD in body:
            self.reset_prompt_cache_supported = True
        logger.info("%s: accepted (delta=%s)", what, incremental_snapshot_metadata is not None)
        return _parse(HotloadAck, response_json(response, what), what)

    def _post(
        self, body: dict[str, Any], headers: dict[str, str], timeout: float
    ) -> httpx.Response:
        # 400 comes back (not raised) so that `hotload` can recognise the strict-schema refusal.
        return self._http.request(
            "POST",
            self._url,
            json=body,
            headers=headers,
            timeout=timeout,
            bearer=True,
            ok_statuses=(400,),
        )

    def check_status(
        self,
        deployment_id: str,
        base_model: str,
        *,
        retry: bool = True,
        wait_for: str | None = None,
        hold_s: float = 0.0,
    ) -> HotloadStatus:
        """The hotload status: every replica's served snapshot, readiness and loading stage.
        `wait_for` with `hold_s` > 0: the local platform answers once no load of that identity
        is in progress any more, or after `hold_s` (a server without the extension at once)."""
        what = f"hotload status of {deployment_id}"
        headers = self._headers(deployment_id, base_model, None)
        if wait_for and hold_s > 0 and self.status_hold_supported is not False:
            params = {"wait_for_identity": wait_for, "max_wait_s": f"{hold_s:.3f}"}
            response = self._http.request(
                "GET",
                self._url,
                params=params,
                headers=headers,
                bearer=True,
                retry=retry,
                ok_statuses=_REFUSED_PARAMETERS,
            )
            if response.is_success:
                return _parse(HotloadStatus, response_json(response, what), what)
            # A server that refuses the parameters: plain reads from now on.
            logger.info("%s: the server refuses a held status; polling instead", what)
            self.status_hold_supported = False
        response = self._http.request("GET", self._url, headers=headers, bearer=True, retry=retry)
        return _parse(HotloadStatus, response_json(response, what), what)

    def _held_status(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str | None,
        deadline: Deadline,
    ) -> HotloadStatus:
        """One status read of a wait: held by the server while `expected_identity` loads, for
        at most what is left of the wait's deadline (and never more than `STATUS_HOLD_S`)."""
        return self.check_status(
            deployment_id,
            base_model,
            retry=False,
            wait_for=expected_identity,
            hold_s=min(STATUS_HOLD_S, deadline.remaining),
        )

    def wait(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        timeout_seconds: float,
        poll_interval: float,
    ) -> bool:
        """The published SDK's wait: True once replica 0 is ready and serves
        `expected_identity`; False on an `error` stage for that identity or at the deadline,
        with the reason in `last_error_message`. Transient read failures are logged and outlived.
        The pauses between reads back off from 50 ms to `poll_interval`.
        """
        check_interval("timeout_seconds", timeout_seconds, allow_zero=True)
        check_interval("poll_interval", poll_interval)
        deadline = Deadline(timeout_seconds, self.clock)
        pauses = backoff_intervals(poll_interval)
        status: HotloadStatus | None = None
        while True:
            try:
                status = self._held_status(deployment_id, base_model, expected_identity, deadline)
            except _TRANSIENT as exc:
                logger.warning("hotload status of %s: %s; polling on", deployment_id, exc)
            else:
                if status.replicas is None:
                    raise DeploymentError(
                        f"hotload status of {deployment_id} has no `replicas` list",
                        deployment_id=deployment_id,
                        state=None,
                    )
                first = status.replicas[0] if status.replicas else None
                if first is not None and first.serves(expected_identity):
                    self.last_error_message = None
                    return True
                if first is not None and first.failed_on(expected_identity):
                    message = first.loading_state.error_message or "stage error (no message)"
                    self.last_error_message = message
                    logger.warning("hotload of %s failed: %s", expected_identity, message)
                    return False
            if deadline.expired:
                break
            self.sleep(min(next(pauses), deadline.remaining))
        self.last_error_message = (
            f"hotload of {expected_identity!r} onto {deployment_id} not confirmed after "
            f"{deadline.elapsed:.1f}s: {_describe(status)}"
        )
        logger.warning("%s", self.last_error_message)
        return False

    def verify(
        self,
        deployment_id: str,
        base_model: str,
        expected_identity: str,
        *,
        timeout_s: float,
        poll_interval_s: float,
    ) -> HotloadStatus:
        """Wait until *every* replica, not only replica 0, is ready and serves `expected_identity`
        (pauses backing off from 50 ms to `poll_interval_s`).

        A replica whose load of this identity failed → `HotloadError` at once; one still
        serving something else at the deadline → `StaleDeploymentError` naming both identities.
        """
        lagging: tuple[int, str | None] = (0, None)

        deadline = Deadline(timeout_s, self.clock)

        def check() -> Done[HotloadStatus] | Pending:
            nonlocal lagging
            try:
                status = self._held_status(deployment_id, base_model, expected_identity, deadline)
            except _TRANSIENT as exc:
                return Pending(f"status read failed: {exc}")
            replicas = status.replicas or []
            if not replicas:
                return Pending("no replicas")
            for index, replica in enumerate(replicas):
                if replica.failed_on(expected_identity):
                    raise HotloadError(
                        f"replica {index} of {deployment_id} failed to load "
                        f"{expected_identity!r}: {replica.loading_state.error_message}",
                        deployment_id=deployment_id,
                        snapshot_identity=expected_identity,
                        state=STAGE_ERROR,
                    )
                if not replica.serves(expected_identity):
                    lagging = (index, replica.current_snapshot_identity)
                    return Pending(f"replica {index} serves {lagging[1]!r}")
            return Done(status)

        try:
            return poll_until(
                check,
                waited_for=f"every replica of {deployment_id} to serve {expected_identity}",
                timeout_s=timeout_s,
                poll_interval_s=poll_interval_s,
                sleep=self.sleep,
                clock=self.clock,
                backoff=True,
            )
        except WaitTimeoutError:
            index, served = lagging
            raise StaleDeploymentError(
                expected_identity, served, deployment_id=deployment_id, replica_index=index
            ) from None

    def restart_marker(self, deployment_id: str, base_model: str) -> str | None:
        """Replica 0's `restart_marker`; None while no replica is listed (or readable)."""
        try:
            status = self.check_status(deployment_id, base_model, retry=False)
        except _TRANSIENT as exc:
            logger.info("hotload status of %s unavailable: %s", deployment_id, exc)
            return None
        if not status.replicas:
            return None
        return status.replicas[0].restart_marker

    def wait_for_replicas(
        self, deployment_id: str, base_model: str, *, timeout_s: float, poll_interval_s: float
    ) -> HotloadStatus:
        """Wait until the status lists at least one replica: a hotload sent before that can
        crash a serving container. Pauses back off to `poll_interval_s`; `WaitTimeoutError` at
        the deadline."""

        def check() -> Done[HotloadStatus] | Pending:
            try:
                status = self.check_status(deployment_id, base_model, retry=False)
            except _TRANSIENT as exc:
                return Pending(f"status read failed: {exc}")
            return Done(status) if status.replicas else Pending("no replicas")

        return poll_until(
            check,
            waited_for=f"the hot-load subsystem of {deployment_id} to list replicas",
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
            sleep=self.sleep,
            clock=self.clock,
            backoff=True,
        )


def reattach_trainer(
    manager: DeploymentManager,
    hotloader: Hotloader,
    deployment_id: str,
    *,
    base_model: str,
    trainer_job_name: str,
    timeout_s: float,
    poll_interval_s: float,
) -> DeploymentInfo:
    """`DeploymentManager.reattach_trainer`: PATCH `hotLoadTrainerJob` unless it already
    matches (a PATCH that changes nothing never restarts the pod, so the wait would time out),
    then poll until the deployment is READY and replica 0's identity (the served
    snapshot, else the replica's name) changed or appeared."""
    check_interval("timeout_s", timeout_s, allow_zero=True)
    check_interval("poll_interval_s", poll_interval_s)
    current = manager.get(deployment_id)
    if current is None:
        raise DeploymentError(
            f"deployment {deployment_id} does not exist", deployment_id=deployment_id, state=None
        )
    if current.hot_load_trainer_job == trainer_job_name:
        logger.info("deployment %s already attached to %s", deployment_id, trainer_job_name)
        return current
    before = hotloader.restart_marker(deployment_id, base_model)
    updated = manager.update(
        deployment_id, {"hotLoadTrainerJob": trainer_job_name}, ["hot_load_trainer_job"]
    )

    def check() -> Done[None] | Pending:
        info = manager.get(deployment_id)
        if info is None or info.state != DEPLOYMENT_READY:
            return Pending(info.state if info else "absent")
        # The identity changed, or appeared where no replica was listed before the PATCH.
        now = hotloader.restart_marker(deployment_id, base_model)
        rolled = now is not None and now != before
        return Done(None) if rolled else Pending(f"replica 0 still reports {before!r}")

    poll_until(
        check,
        waited_for=f"deployment {deployment_id} to restart attached to {trainer_job_name}",
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        sleep=hotloader.sleep,
        clock=hotloader.clock,
    )
    logger.info("deployment %s re-attached to %s", deployment_id, trainer_job_name)
    return updated


def _refuses_reset_field(text: str) -> bool:
    lowered = text.lower()
    return _RESET_FIELD in lowered and _EXTRA_FORBIDDEN in lowered


def _parse(model: type[_ModelT], body: Mapping[str, Any], what: str) -> _ModelT:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise FireworksError(f"{what}: unexpected answer from the platform: {exc}") from None
