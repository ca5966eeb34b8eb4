"""`FireworksClient`: what both managers share — the HTTP client, the account, shapes, checkpoints.

The account is never configured: it is resolved once, lazily, from the API key, so a
key can't be paired with an account it doesn't belong to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from sdk._closing import ClosesOnExit
from sdk._http import HttpClient, RetryPolicy, response_json
from sdk._ids import check_id, check_training_shape_ref
from sdk._promotion import promote, promotion_target
from sdk.errors import ConfigError, FireworksError, TrainingShapeError
from sdk.resources import CheckpointInfo, TrainingShapeProfile
from sdk.settings import DEFAULT_BASE_URL, resolve_api_key

__all__ = ["ACCOUNT_ID_REMOVED", "FireworksClient"]

logger = logging.getLogger(__name__)

# Sentinel default of the removed `account_id=`: tells "not passed" from any value, None too.
ACCOUNT_ID_REMOVED: Any = object()
_SHAPE_ADVICE: Mapping[int, str] = {
    401: "training shapes need a training-scoped API key (inference-only keys get 401)",
    403: "this key's account may not use that training shape; check the shape's account",
    404: "no such training shape or version; check the id (accounts/<a>/trainingShapes/<s>)",
}


class FireworksClient(ClosesOnExit):
    """Base of `TrainerJobManager` and `DeploymentManager`: one `HttpClient`, one account.

    `sleep` and `clock` drive every wait and retry; tests inject fakes instead of patching time.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
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
        if account_id is not ACCOUNT_ID_REMOVED:
            raise ConfigError("account_id: removed; the account is resolved from the API key")
        self._http = HttpClient(
            resolve_api_key(api_key),
            base_url,
            additional_headers=additional_headers,
            verify_ssl=verify_ssl,
            transport=transport,
            http_client=http_client,
            retry=retry,
            sleep=sleep,
            clock=clock,
        )
        self._sleep = sleep
        self._clock = clock
        self._account_id: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        """Release the HTTP connections this client opened."""
        self._http.close()

    @property
    def base_url(self) -> str:
        """The control-plane base URL, without a trailing slash."""
        return self._http.base_url

    @property
    def account_id(self) -> str:
        """The key's one account (`GET /v1/accounts`), fetched on first use and cached."""
        if self._account_id is None:
            self._account_id = self._fetch_account_id()
        return self._account_id

    def _fetch_account_id(self) -> str:
        what = "list accounts"
        response = self._http.request("GET", "/v1/accounts", params={"pageSize": 2})
        accounts = response_json(response, what).get("accounts") or []
        names = [a.get("name", "") for a in accounts if isinstance(a, Mapping)]
        if not names:
            raise ConfigError("api_key: the key sees no account; check FIREWORKS_API_KEY")
        if len(names) > 1:
            raise ConfigError(
                "api_key: the key sees more than one account; multi-account keys are unsupported"
            )
        return str(names[0]).removeprefix("accounts/")

    def resolve_training_profile(self, shape_id: str) -> TrainingShapeProfile:
        """The training shape version `shape_id` names, or the shape's latest validated one."""
        check_training_shape_ref("training_shape_id", shape_id)
        params: dict[str, str | int] | None = None
        path = f"/v1/{shape_id}"
        if "/versions/" not in shape_id:  # unversioned: ask for the latest validated version
            path += "/versions"
            params = {"filter": "latest_validated=true", "pageSize": 1}
        response = self._http.request("GET", path, params=params, ok_statuses=tuple(_SHAPE_ADVICE))
        what = f"resolve training shape {shape_id}"
        if advice := _SHAPE_ADVICE.get(response.status_code):
            raise self._http.error_for(response, what, advice=advice)
        body = response_json(response, what)
        if params is None:
            return TrainingShapeProfile.from_api(body)
        versions = body.get("trainingShapeVersions") or []
        if not versions or not isinstance(versions[0], Mapping):
            raise TrainingShapeError(f"training shape {shape_id} has no validated version")
        return TrainingShapeProfile.from_api(versions[0])

    def list_checkpoints(self, job_id: str, *, page_size: int = 200) -> list[CheckpointInfo]:
        """Every checkpoint row of a trainer job, oldest first, across all pages."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be a positive integer, got {page_size!r}")
        path = f"{self._job_path(job_id)}/checkpoints"
        rows: list[CheckpointInfo] = []
        seen_tokens: set[str] = set()
        token: str | None = None
        while True:
            params: dict[str, str | int] = {"pageSize": page_size}
            if token:
                params["pageToken"] = token
            body = response_json(self._http.request("GET", path, params=params), path)
            page = body.get("checkpoints") or body.get("rlorTrainerJobCheckpoints") or []
            rows.extend(CheckpointInfo.from_api(row) for row in page if isinstance(row, Mapping))
            token = body.get("nextPageToken") or body.get("next_page_token") or None
            if token is None:
                return rows
            if token in seen_tokens:  # a server bug would otherwise make this loop forever
                raise FireworksError(f"listing checkpoints of {job_id}: page token repeated")
            seen_tokens.add(token)

    def promote_checkpoint(
        self,
        job_id: str | None = None,
        checkpoint_id: str | None = None,
        output_model_id: str | None = None,
        base_model: str | None = None,
        *,
        name: str | None = None,
        hot_load_deployment_id: str | None = None,
    ) -> dict[str, Any]:
        """Promote a checkpoint to model `accounts/<a>/models/<output_model_id>`.

        Preferred: `name=` the checkpoint's full name
        (`accounts/<a>/rlorTrainerJobs/<job>/checkpoints/<id>`); the `job_id, checkpoint_id`
        form warns. Answers the model (`state`, `kind`, `peftDetails` for LoRA), waiting for
        the promotion operation if the server answers one.
        """
        target = promotion_target(job_id, checkpoint_id, name)
        return promote(
            self._http,
            self.account_id,
            target,
            output_model_id=output_model_id,
            base_model=base_model,
            hot_load_deployment_id=hot_load_deployment_id,
            sleep=self._sleep,
            clock=self._clock,
        )

    def _job_path(self, job_id: str) -> str:
        check_id("job_id", job_id)  # before the account lookup: bad input sends nothing
        return f"/v1/accounts/{self.account_id}/rlorTrainerJobs/{job_id}"

    def _job_name(self, job_id: str) -> str:
        return f"accounts/{self.account_id}/rlorTrainerJobs/{job_id}"
