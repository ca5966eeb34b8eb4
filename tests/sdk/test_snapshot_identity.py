"""The served snapshot identity on a sampled completion: read from the stream's top-level
`snapshot_identity` (the last chunk that carries one wins), None when the server sends none,
and never a reason to fail a sample."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from sdk import DeploymentSampler, SamplerRetryPolicy
from sdk._sse import parse_stream
from tests.sdk.fakes import API_KEY, BASE_URL
from tests.sdk.serving_fakes import DEP_NAME, FakeServing, sse_events

PROMPT = [5, 6, 7]


def _with_fields(events: list[str], fields_by_event: dict[int, dict[str, Any]]) -> list[str]:
    """The events with extra top-level fields merged into the chunks at the given positions."""
    out = list(events)
    for position, fields in fields_by_event.items():
        out[position] = json.dumps(json.loads(out[position]) | fields)
    return out


def _sse_body(events: list[str]) -> str:
    return "".join(f"data: {event}\n\n" for event in events) + "data: [DONE]\n\n"


def _sample(answer: httpx.Response) -> Any:
    serving = FakeServing()
    serving.canned_completions.append(answer)
    sampler = DeploymentSampler(
        BASE_URL,
        DEP_NAME,
        API_KEY,
        transport=serving.transport(),
        retry_policy=SamplerRetryPolicy(base_delay_s=0.001, max_delay_s=0.01),
    )
    (sample,) = asyncio.run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=3))
    return sample


def test_the_final_chunks_snapshot_identity_surfaces_on_the_sample() -> None:
    events = _with_fields(sse_events(PROMPT), {-1: {"snapshot_identity": "step-4-45dda197"}})
    sample = _sample(
        httpx.Response(200, text=_sse_body(events), headers={"content-type": "text/event-stream"})
    )
    assert sample.snapshot_identity == "step-4-45dda197"
    assert sample.completion_tokens == [8, 9, 10]  # the rest of the sample is unchanged


def test_a_stream_without_it_gives_none() -> None:
    sample = _sample(
        httpx.Response(
            200, text=_sse_body(sse_events(PROMPT)), headers={"content-type": "text/event-stream"}
        )
    )
    assert sample.snapshot_identity is None
    assert sample.completion_len == 3


def test_the_last_chunk_that_carries_it_wins_and_unknown_fields_are_ignored() -> None:
    events = _with_fields(
        sse_events(PROMPT),
        {
            0: {"snapshot_identity": "old", "weight_epoch": 7},
            1: {"snapshot_identity": "new"},
            # A later chunk without it, or with something that is not a name, changes nothing.
            2: {"snapshot_identity": ""},
            -1: {"snapshot_identity": {"not": "a string"}, "some_future_field": [1, 2]},
        },
    )
    parsed = parse_stream(_sse_body(events))
    assert not parsed.truncated
    assert parsed.result.snapshot_identity == "new"


def test_a_plain_json_answer_carries_it_too() -> None:
    final = json.loads(sse_events(PROMPT, max_tokens=1)[-1]) | {"snapshot_identity": "s1"}
    assert parse_stream(json.dumps(final)).result.snapshot_identity == "s1"
