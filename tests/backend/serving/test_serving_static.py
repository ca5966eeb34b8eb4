"""A replica on the static KV cache serves what one on the dynamic cache serves, over HTTP.

Two deployments of the tiny model on one platform, one started with the static engine (64 tokens
per slot), one with the CPU default (dynamic); the same seeded requests must come back with the
same tokens and logprobs within 1e-5, and a request that cannot fit the static slots is a 400
naming the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from backend.serving.engine import ServingEngineSettings
from tests.backend.serving.conftest import FAST_SERVING, ServingHarness

STATIC, DYNAMIC = "static-kv", "dynamic-kv"
STATIC_MAX_LEN = 64
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def serving(harness: ServingHarness) -> Iterator[ServingHarness]:
    engine = ServingEngineSettings(kv_cache="static", static_max_len=STATIC_MAX_LEN)
    harness.platform.state.serving.settings = FAST_SERVING.model_copy(update={"engine": engine})
    try:
        harness.deploy(STATIC)  # the replica reads the settings when it starts
    finally:
        harness.platform.state.serving.settings = FAST_SERVING
    harness.deploy(DYNAMIC)
    yield harness


def _choices(serving: ServingHarness, deployment: str, **body: Any) -> list[dict[str, Any]]:
    response = serving.complete(deployment, **body)
    assert response.status_code == 200, response.text
    choices: list[dict[str, Any]] = response.json()["choices"]
    return choices


def _assert_same_choices(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        assert have["raw_output"] == want["raw_output"]
        assert (have["text"], have["finish_reason"]) == (want["text"], want["finish_reason"])
        pairs = zip(want["logprobs"]["content"], have["logprobs"]["content"], strict=True)
        for a, b in pairs:
            assert b["logprob"] == pytest.approx(a["logprob"], abs=TOLERANCE)
            assert b["sampling_logprob"] == pytest.approx(a["sampling_logprob"], abs=TOLERANCE)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_concurrent_requests_decode_alike_on_both_caches(
    serving: ServingHarness, temperature: float
) -> None:
    bodies = [
        {
            "prompt": [*b"abc="[: 1 + i % 4], 40 + i],
            "max_tokens": 8 + 3 * i,
            "n": 1 + i % 3,
            "temperature": temperature,
            "seed": 100 + i,
            "logprobs": True,
        }
        for i in range(6)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:  # they join one another's running batch
        static = list(pool.map(lambda b: _choices(serving, STATIC, **b), bodies))
        dynamic = list(pool.map(lambda b: _choices(serving, DYNAMIC, **b), bodies))
    for expected, got in zip(dynamic, static, strict=True):
        _assert_same_choices(expected, got)


def test_a_request_too_long_for_the_static_slots_is_refused_naming_the_limit(
    serving: ServingHarness,
) -> None:
    body = {"prompt": [*b"abc="] * 10, "max_tokens": 30}  # 40 + 30 > 64
    refused = serving.complete(STATIC, **body)
    assert refused.status_code == 400, refused.text
    message = refused.text
    assert "static_max_len" in message and str(STATIC_MAX_LEN) in message
    assert serving.complete(DYNAMIC, **body).status_code == 200
    # The replica still serves what fits.
    fits = serving.complete(STATIC, prompt=[*b"abc="] * 10, max_tokens=24, seed=1)
    assert fits.status_code == 200, fits.text
