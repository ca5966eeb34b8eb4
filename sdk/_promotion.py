"""Checkpoint promotion: the request, the older-server fallback and the operation wait.

`FireworksClient.promote_checkpoint` turns a trainer job's checkpoint into a model of the
account. The body is snake_case (the one control-plane body that is). A server may answer the
model at once or a long-running operation, which is polled until done.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdk._http import HttpClient, response_json
from sdk._ids import check_id
from sdk.errors import BadRequestError, ConfigError, FireworksError, WaitTimeoutError

__all__ = ["PromotionTarget", "promote", "promotion_target"]

PROMOTE_TIMEOUT_S = 300.0
OPERATION_TIMEOUT_S = 7200.0
OPERATION_POLL_S = 10.0
_OPERATION_GET_TIMEOUT_S = 30.0
_MODEL_ID = re.compile(r"^[a-z0-9-]{1,63}$")
_CHECKPOINT_NAME = re.compile(
    r"^accounts/(?P<account>[^/]+)/rlorTrainerJobs/(?P<job>[^/]+)/checkpoints/(?P<ckpt>[^/]+)$"
)


@dataclass(frozen=True)
class PromotionTarget:
    """Which checkpoint of which job to promote."""

    job_id: str
    checkpoint_id: str


def promotion_target(
    job_id: str | None, checkpoint_id: str | None, name: str | None
) -> PromotionTarget:
    """The checkpoint from `name` (4 segments, preferred) or from the deprecated id pair."""
    if name is not None:
        match = _CHECKPOINT_NAME.match(name.strip())
        if match is None:
            raise ConfigError(
                f"name must be accounts/<a>/rlorTrainerJobs/<job>/checkpoints/<id>, got {name!r}"
            )
        return PromotionTarget(match["job"], match["ckpt"])
    if not job_id or not checkpoint_id:
        raise ConfigError("promote_checkpoint needs name= (or job_id and checkpoint_id)")
    warnings.warn(
        "promote_checkpoint(job_id, checkpoint_id, ...) is deprecated; pass "
        "name='accounts/<a>/rlorTrainerJobs/<job>/checkpoints/<id>'",
        DeprecationWarning,
        stacklevel=3,
    )
    return PromotionTarget(job_id, checkpoint_id)


def promote(
    http: HttpClient,
    account_id: str,
    target: PromotionTarget,
    *,
    output_model_id: str | None,
    base_model: str | None,
    hot_load_deployment_id: str | None,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> dict[str, Any]:
    """Send the promote request (async first, then without on an older server); the model."""
    if not output_model_id or not _MODEL_ID.match(output_model_id):
        raise ConfigError(
            "output_model_id must be 1-63 lowercase letters, digits or '-', "
            f"got {output_model_id!r}"
        )
    check_id("job_id", target.job_id)
    body: dict[str, Any] = {
        "output_model": f"accounts/{account_id}/models/{output_model_id}",
        "trainer_job_id": f"accounts/{account_id}/rlorTrainerJobs/{target.job_id}",
    }
    if base_model is not None:
        body["base_model"] = base_model
    if hot_load_deployment_id is not None:
        deployment = hot_load_deployment_id.rsplit("/", 1)[-1]
        body["hot_load_deployment_id"] = f"accounts/{account_id}/deployments/{deployment}"
    path = f"/v1/accounts/{account_id}/checkpoints/{target.checkpoint_id}:promote"
    try:
        response = http.request(
            "POST", path, json=body | {"async_promotion": True}, timeout=PROMOTE_TIMEOUT_S
        )
    except BadRequestError as exc:
        # Servers that predate asynchronous promotion reject the field by name; the platform's
        # documented client behaviour is to send the request again without it.
        text = f"{exc.server_message or ''} {exc.message}".lower()
        if "async_promotion" not in text and "asyncpromotion" not in text:
            raise
        response = http.request("POST", path, json=body, timeout=PROMOTE_TIMEOUT_S)
    answer = response_json(response, path)
    if isinstance(answer.get("operation"), dict):
        return _wait_for_operation(http, answer["operation"], sleep=sleep, clock=clock)
    model = answer.get("model", answer)
    return dict(model) if isinstance(model, dict) else {}


def _wait_for_operation(
    http: HttpClient,
    operation: dict[str, Any],
    *,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> dict[str, Any]:
    """Poll `GET /v1/<operation name>` until done; its response is the model."""
    name = str(operation.get("name", ""))
    started = clock()
    while not operation.get("done"):
        if clock() - started > OPERATION_TIMEOUT_S:
            raise WaitTimeoutError(
                waited_for=f"promotion operation {name}",
                last_state="running",
                waited_s=clock() - started,
            )
        sleep(OPERATION_POLL_S)
        path = f"/v1/{name}"
        operation = response_json(http.request("GET", path, timeout=_OPERATION_GET_TIMEOUT_S), path)
    error = operation.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise FireworksError(f"promotion operation {name} failed: {message}")
    model = operation.get("response") or (operation.get("result") or {}).get("model") or {}
    return {key: value for key, value in dict(model).items() if key != "@type"}
