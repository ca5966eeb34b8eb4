"""Completions on a READY deployment of the tiny model's base weights.

The model is random-init, so tests derive expectations from the server's own greedy or seeded
output (and, for the sampling distribution, from the base model itself) rather than from text.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from backend.models.store import ensure_model_dir
from backend.trainer.modeling import load_hf_model
from tests.backend.serving.conftest import COMPLETIONS, ServingHarness, model_name

DEPLOYMENT = "plain"
PROMPT = [*b"abc"]
PERF_KEYS = {
    "num-concurrent-requests",
    "prefill-queue-duration",
    "generation-queue-duration",
    "server-time-to-first-token",
    "cached-prompt-tokens",
    "prompt-tokens",
    "server-processing-time",
}


@pytest.fixture(scope="module")
def serving(harness: ServingHarness) -> Iterator[ServingHarness]:
    harness.deploy(DEPLOYMENT)
    yield harness


def _ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    ids: list[int] = response.json()["choices"][0]["raw_output"]["completion_token_ids"]
    return ids


def test_a_non_streamed_completion_has_every_field(serving: ServingHarness) -> None:
    response = serving.complete(DEPLOYMENT, prompt=PROMPT, max_tokens=5, logprobs=True, seed=1)
    assert response.status_code == 200, response.text
    assert int(response.headers["x-fireloop-weight-version"]) >= 1
    body = response.json()
    assert (body["object"], body["model"]) == ("text_completion", model_name(DEPLOYMENT))
    (choice,) = body["choices"]
    assert (choice["index"], choice["finish_reason"]) == (0, "length")
    raw = choice["raw_output"]
    assert raw["prompt_token_ids"] == PROMPT and len(raw["completion_token_ids"]) == 5
    content = choice["logprobs"]["content"]
    assert [entry["token_id"] for entry in content] == raw["completion_token_ids"]
    for entry in content:
        assert isinstance(entry["token"], str)
        assert entry["logprob"] <= 0 and entry["logprob"] == entry["sampling_logprob"]  # T=1
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert set(body["perf_metrics"]) == PERF_KEYS
    assert all(isinstance(value, float) for value in body["perf_metrics"].values())
    assert float(response.headers["server-processing-time"]) >= 0


def test_a_streamed_completion_matches_the_non_streamed_one(serving: ServingHarness) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "logprobs": True, "seed": 7}
    chunks, done = serving.stream(DEPLOYMENT, **request)
    whole = serving.complete(DEPLOYMENT, **request).json()["choices"][0]
    assert done and len(chunks) >= 2
    choices = [chunk["choices"][0] for chunk in chunks]
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["raw_output"] == whole["raw_output"]
    assert last["usage"]["completion_tokens"] == 6 and set(last["perf_metrics"]) == PERF_KEYS
    assert "".join(c["text"] for c in choices) == whole["text"]
    streamed = [entry for c in choices for entry in c["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]


def test_the_same_seed_draws_the_same_tokens(serving: ServingHarness) -> None:
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    first, again = (_ids(serving.complete(DEPLOYMENT, **request)) for _ in range(2))
    other = _ids(serving.complete(DEPLOYMENT, **(request | {"seed": 43})))
    assert first == again and first != other
    # Choice i of an n-choice request draws with seed + i.
    many = serving.complete(DEPLOYMENT, **(request | {"n": 2})).json()["choices"]
    assert [c["raw_output"]["completion_token_ids"] for c in many] == [first, other]


def test_greedy_is_deterministic_and_temperature_zero(serving: ServingHarness) -> None:
    request = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}
    assert _ids(serving.complete(DEPLOYMENT, **request, seed=1)) == _ids(
        serving.complete(DEPLOYMENT, **request, seed=2)
    )


@pytest.fixture(scope="module")
def decode(serving: ServingHarness) -> Callable[[list[int]], str]:
    tokenizer = AutoTokenizer.from_pretrained(ensure_model_dir("tiny", serving.platform.models_dir))
    return lambda tokens: str(tokenizer.decode(tokens))


def _seed_with_ascii_stop(
    serving: ServingHarness, decode: Callable[[list[int]], str], size: int
) -> tuple[int, list[int], str]:
    """A seed whose 8 sampled bytes have an ASCII run of `size` at position 5 that does not
    occur earlier: (seed, tokens, that run as text)."""
    for seed in range(200):
        tokens = _ids(serving.complete(DEPLOYMENT, prompt=PROMPT, max_tokens=8, seed=seed))
        run = tokens[5 : 5 + size]
        if len(tokens) < 8 or max(tokens[: 5 + size]) >= 256 or max(run) >= 128:
            continue  # a special token (EOS ends the completion) or non-ASCII stop bytes
        stop = bytes(run).decode()
        if stop[0] not in decode(tokens[:5]):
            return seed, tokens, stop
    raise AssertionError("no seed gave an ASCII run at position 5")


def test_stop_token_ids_end_the_completion_and_stay_in_the_raw_ids(
    serving: ServingHarness, decode: Callable[[list[int]], str]
) -> None:
    seed, tokens, _ = _seed_with_ascii_stop(serving, decode, 1)
    request = {"prompt": PROMPT, "max_tokens": 8, "seed": seed, "stop": [tokens[5]]}
    choice = serving.complete(DEPLOYMENT, **request).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["raw_output"]["completion_token_ids"] == tokens[:6]
    assert choice["text"] == decode(tokens[:5])  # the stop token's text is not shown


def test_stop_strings_cut_the_text_also_across_streamed_tokens(
    serving: ServingHarness, decode: Callable[[list[int]], str]
) -> None:
    seed, tokens, stop = _seed_with_ascii_stop(serving, decode, 2)
    request = {"prompt": PROMPT, "max_tokens": 8, "seed": seed, "stop": ["never-seen", stop]}
    choice = serving.complete(DEPLOYMENT, **request).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["raw_output"]["completion_token_ids"] == tokens[:7]  # stop tokens included
    full_text = decode(tokens[:7])
    expected = full_text[: full_text.index(stop)]
    assert choice["text"] == expected
    chunks, done = serving.stream(DEPLOYMENT, **request)
    # The stop's first character was held back until the next token decided it.
    assert done and "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_echo_returns_the_prompt_and_its_logprobs(serving: ServingHarness) -> None:
    request = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": True, "seed": 3}
    choice = serving.complete(DEPLOYMENT, **request).json()["choices"][0]
    completion_ids = choice["raw_output"]["completion_token_ids"]
    assert completion_ids[:3] == PROMPT and len(completion_ids) == 5
    content = choice["logprobs"]["content"]
    assert [entry["token_id"] for entry in content] == completion_ids
    # The first prompt position is a number, never null: the published SDK drops a list with a
    # null in it (and strips that first row itself, as ours does).
    assert content[0]["logprob"] == 0.0 and all(e["logprob"] < 0 for e in content[1:])
    assert [e["sampling_logprob"] is None for e in content] == [True] * 3 + [False] * 2
    assert choice["text"].startswith("abc")
    scored = serving.complete(DEPLOYMENT, prompt=PROMPT, max_tokens=0, echo=True, logprobs=True)
    scored_choice = scored.json()["choices"][0]
    assert scored_choice["finish_reason"] == "length"
    assert scored_choice["raw_output"]["completion_token_ids"] == PROMPT
    assert scored_choice["logprobs"]["content"] == content[:3]


def test_top_logprobs_list_the_most_likely_tokens(serving: ServingHarness) -> None:
    request = {"prompt": PROMPT, "max_tokens": 3, "logprobs": True, "top_logprobs": 4}
    content = serving.complete(DEPLOYMENT, **request).json()["choices"][0]["logprobs"]["content"]
    for entry in content:
        top = entry["top_logprobs"]
        values = [t["logprob"] for t in top]
        assert len(top) == 4 and values == sorted(values, reverse=True)
        assert values[0] >= entry["logprob"]


def test_sampling_logprobs_follow_the_filtered_distribution(
    serving: ServingHarness,
) -> None:
    """`logprob` is the raw T=1 log-softmax; `sampling_logprob` the tempered, top-k and top-p
    filtered and renormalised one, both checked against the base model itself."""
    temperature, top_k, top_p = 0.7, 20, 0.9
    request = {
        "prompt": PROMPT,
        "max_tokens": 6,
        "logprobs": True,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": 5,
    }
    content = serving.complete(DEPLOYMENT, **request).json()["choices"][0]["logprobs"]["content"]
    tokens = PROMPT + [entry["token_id"] for entry in content]
    model = load_hf_model(
        ensure_model_dir("tiny", serving.platform.models_dir), torch.device("cpu")
    )
    with torch.no_grad():
        logits_TV = model(input_ids=torch.tensor([tokens])).logits[0].float()
    for offset, entry in enumerate(content):
        logits_V = logits_TV[len(PROMPT) - 1 + offset]
        raw_V = torch.log_softmax(logits_V, dim=-1)
        assert entry["logprob"] == pytest.approx(float(raw_V[entry["token_id"]]), abs=1e-5)
        expected = _filtered_logprob(logits_V, entry["token_id"], temperature, top_k, top_p)
        assert entry["sampling_logprob"] == pytest.approx(expected, abs=1e-5)


def _filtered_logprob(
    logits_V: torch.Tensor, token: int, temperature: float, top_k: int, top_p: float
) -> float:
    probs = torch.softmax(logits_V / temperature, dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    kept, mass = [], 0.0
    for index in ranked:
        if mass >= top_p:
            break
        kept.append(index)
        mass += probs[index]
    assert token in kept
    return math.log(probs[token] / sum(probs[i] for i in kept))


def test_sixty_four_concurrent_requests_are_batched_and_all_succeed(
    serving: ServingHarness,
) -> None:
    solo = serving.score(DEPLOYMENT, [*b"abc=cba"])

    async def fan_out() -> list[httpx.Response]:
        headers = {"X-Api-Key": serving.api_key}
        async with httpx.AsyncClient(
            base_url=serving.platform.base_url, headers=headers, timeout=60
        ) as client:
            bodies: list[dict[str, Any]] = [
                {"prompt": PROMPT, "max_tokens": 16, "seed": i, "stream": i % 2 == 0}
                for i in range(48)
            ]
            bodies += [
                {"prompt": [*b"abc=cba"], "max_tokens": 0, "echo": True, "logprobs": True}
                for _ in range(16)
            ]
            return await asyncio.gather(
                *(
                    client.post(COMPLETIONS, json={"model": model_name(DEPLOYMENT), **body})
                    for body in bodies
                )
            )

    responses = asyncio.run(fan_out())
    assert [r.status_code for r in responses] == [200] * 64
    streamed = [r.text for r in responses[:48:2]]
    assert all(text.rstrip().endswith("data: [DONE]") for text in streamed)
    plain = [r.json() for r in responses[1:48:2]]
    for body in plain:
        choice = body["choices"][0]
        generated = len(choice["raw_output"]["completion_token_ids"])
        # EOS (sampled now and then by the random model) ends a completion early.
        assert generated == 16 if choice["finish_reason"] == "length" else generated < 16
    assert max(b["perf_metrics"]["num-concurrent-requests"] for b in plain) > 1  # batched
    for response in responses[48:]:
        content = response.json()["choices"][0]["logprobs"]["content"]
        served = torch.tensor([entry["logprob"] for entry in content[1:]], dtype=torch.float64)
        assert float((served - solo).abs().max()) <= 1e-5  # padding changes nothing


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "abc"}, 400, "prompt: the local server is token-in"),
        ({"prompt": PROMPT, "frequency_penalty": 1.0}, 400, "extra inputs are not permitted"),
        ({"prompt": [1, 300]}, 400, "prompt[1]: token id 300 is outside the vocabulary"),
        ({"prompt": []}, 400, "prompt: must contain at least one token id"),
        ({"prompt": [97] * 256, "max_tokens": 1}, 400, "no room in the model's context"),
        ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
        ({"prompt": PROMPT, "model": "tiny"}, 400, "is not a deployment"),
        ({"prompt": PROMPT, "model": model_name("nowhere")}, 404, "not found"),
        ({"prompt": PROMPT, "model": "accounts/other/deployments/plain"}, 403, "other"),
    ],
    ids=[
        "text prompt",
        "unknown field",
        "token outside the vocabulary",
        "empty prompt",
        "prompt fills the context",
        "top_p zero",
        "not a deployment",
        "unknown deployment",
        "another account",
    ],
)
def test_bad_requests_get_a_json_error_naming_the_problem(
    serving: ServingHarness, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = serving.http.post(COMPLETIONS, json={"model": model_name(DEPLOYMENT), **body})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_completions_need_the_api_key(serving: ServingHarness) -> None:
    body = {"model": model_name(DEPLOYMENT), "prompt": PROMPT}
    url = serving.platform.base_url + COMPLETIONS
    assert httpx.post(url, json=body).status_code == 401
    bearer = {"Authorization": f"Bearer {serving.api_key}"}
    assert httpx.post(url, json=body, headers=bearer).status_code == 200
