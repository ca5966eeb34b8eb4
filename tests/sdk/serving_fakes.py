"""Stateful fakes of the serving side for the SDK tests: a hotload-enabled deployment with
replicas that load snapshots over a few status polls, an SSE completions endpoint, and a
training client that saves sampler snapshots into the deployment's bucket.

`FakeServing` answers the hotload (load, status) and completions routes itself and hands every other
request to a `FakeControlPlane`. Time in a load advances by *ticks*: every status read and every
completion request while a load runs is one tick, so tests need no real sleeping.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from sdk.firetitan_types import SaveSamplerResult
from tests.sdk.fakes import ACCOUNT, API_KEY, FakeControlPlane, rpc_error

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
DEP = "dep-1"
DEP_NAME = f"accounts/{ACCOUNT}/deployments/{DEP}"
TRAINER_JOB = f"accounts/{ACCOUNT}/rlorTrainerJobs/job-1"
HOTLOAD_PATH = "/hot_load/v1/models/hot_load"
COMPLETIONS_PATH = "/inference/v1/completions"
STRICT_SCHEMA_MESSAGE = "reset_prompt_cache: Extra inputs are not permitted"


@dataclass
class Snapshot:
    """A sampler snapshot in the bucket: a delta records the snapshot it was taken against."""

    identity: str
    kind: str
    recorded_base: str | None = None


@dataclass
class FakeReplica:
    identity: str = ""
    ready: bool = True
    stage: str = "idle"
    target: str | None = None
    error_message: str | None = None
    adapters: list[dict[str, str]] = field(default_factory=list)
    loading: str | None = None  # the identity being loaded
    ticks_left: int = 0
    metadata: dict[str, Any] | None = None
    stuck: bool = False  # never finishes a load (a replica that is gone for good)
    pod: str = "pod-0"  # the replica's own name: a new one on every restart

    def restart(self) -> None:
        """What a re-attach does to the pod: a new one, serving the base weights."""
        self.pod, self.identity, self.adapters = f"{self.pod}-r", "", []

    def wire(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stage": self.stage, "target_snapshot_identity": self.target}
        if self.error_message:
            state["error_message"] = self.error_message
        return {
            "identity": self.pod,
            "current_snapshot_identity": self.identity,
            "readiness": self.ready,
            "loading_state": state,
            "loaded_adapters": self.adapters,
        }


class FakeServing:
    """One deployment's hotload and inference endpoints, in memory."""

    def __init__(
        self,
        control: FakeControlPlane | None = None,
        *,
        replicas: int = 1,
        load_ticks: int = 2,
        lora: bool = False,
    ) -> None:
        self.control = control or FakeControlPlane()
        self.replicas = [FakeReplica() for _ in range(replicas)]
        self.lag = [0] * replicas  # extra ticks each replica needs per load
        self.load_ticks = load_ticks
        self.lora = lora  # snapshots load as adapters (`loaded_adapters`)
        self.bucket: dict[str, Snapshot] = {}
        self.hidden_polls = 0  # hotload not up: the status lists no replicas this many times
        self.omit_replicas_key = False
        self.strict_schema = False  # an older server that refuses `reset_prompt_cache`
        self.busy_status = 425  # what completions answer while a load runs
        self.weights_version = 0
        self.hotload_posts: list[httpx.Request] = []
        self.status_gets: list[httpx.Request] = []
        self.completions: list[httpx.Request] = []
        self.canned_status: deque[httpx.Response | Exception] = deque()
        self.canned_posts: deque[httpx.Response] = deque()
        self.canned_completions: deque[httpx.Response | Exception] = deque()
        self.on_request: Callable[[httpx.Request], None] | None = None

    # -- test-side helpers ------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def add_replica(self, *, lag: int = 0) -> FakeReplica:
        """Another replica serving what the first one does, `lag` ticks slower to load."""
        replica = FakeReplica(identity=self.replicas[0].identity)
        self.replicas.append(replica)
        self.lag.append(lag)
        return replica

    def add_snapshot(self, identity: str, kind: str = "base", base: str | None = None) -> None:
        self.bucket[identity] = Snapshot(identity, kind, base)

    def serve(self, identity: str) -> None:
        """Every replica serves `identity` now (e.g. left over from an earlier run)."""
        self.add_snapshot(identity)
        for replica in self.replicas:
            replica.identity = identity

    @property
    def loading(self) -> bool:
        return any(r.loading is not None for r in self.replicas)

    def sent_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.hotload_posts]

    # -- the wire ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.on_request is not None:
            self.on_request(request)
        path = request.url.path
        if path == HOTLOAD_PATH:
            return self._hotload(request)
        if path == COMPLETIONS_PATH and json.loads(request.content).get("stream"):
            return self._completions(request)
        return self.control.handle(request)  # incl. the non-streaming probe (warmup)

    def _authorized(self, request: httpx.Request) -> bool:
        authorization: str | None = request.headers.get("authorization")
        return authorization == f"Bearer {API_KEY}"

    def _hotload(self, request: httpx.Request) -> httpx.Response:
        if not self._authorized(request):
            return rpc_error(401, "missing bearer token", code=16)
        if request.headers.get("fireworks-deployment") != DEP_NAME:
            return rpc_error(404, "unknown deployment", code=5)
        if request.headers.get("fireworks-model") != BASE_MODEL:
            return rpc_error(400, "fireworks-model does not match the deployment's base model")
        if request.method == "GET":
            self.status_gets.append(request)
            return self._status()
        self.hotload_posts.append(request)
        if self.canned_posts:
            return self.canned_posts.popleft()
        return self._accept(json.loads(request.content))

    def _status(self) -> httpx.Response:
        if self.canned_status:
            answer = self.canned_status.popleft()
            if isinstance(answer, Exception):
                raise answer
            return answer
        self.tick()
        if self.omit_replicas_key:
            return httpx.Response(200, json={"status": "ok"})
        if self.hidden_polls > 0:
            self.hidden_polls -= 1
            return httpx.Response(200, json={"replicas": []})
        return httpx.Response(200, json={"replicas": [r.wire() for r in self.replicas]})

    def _accept(self, body: dict[str, Any]) -> httpx.Response:
        allowed = {"identity", "incremental_snapshot_metadata"}
        if not self.strict_schema:
            allowed.add("reset_prompt_cache")
        extra = set(body) - allowed
        if extra:
            return rpc_error(400, f"{sorted(extra)[0]}: Extra inputs are not permitted")
        identity = body["identity"]
        if identity not in self.bucket:
            return rpc_error(404, f"snapshot {identity} is not in the hotload bucket", code=5)
        for index, replica in enumerate(self.replicas):
            replica.loading, replica.metadata = identity, body.get("incremental_snapshot_metadata")
            replica.ticks_left = self.load_ticks + self.lag[index]
            replica.stage, replica.target, replica.ready = "downloading", identity, False
            replica.error_message = None
        return httpx.Response(200, json={"identity": identity, "accepted": True})

    def tick(self) -> None:
        """One step of every running load."""
        for replica in self.replicas:
            if replica.loading is None or replica.stuck:
                continue
            replica.ticks_left -= 1
            replica.stage = "loading"
            if replica.ticks_left <= 0:
                self._finish(replica)

    def _finish(self, replica: FakeReplica) -> None:
        identity = replica.loading
        assert identity is not None
        replica.loading, replica.ready = None, True
        error = self._refusal(replica, self.bucket[identity], replica.metadata)
        if error is not None:
            replica.stage, replica.error_message = "error", error
            return
        replica.stage, replica.error_message = "completed", None
        if self.lora:
            replica.adapters = [{"identity": identity, "status": "loaded"}]
        else:
            replica.identity = identity
        self.weights_version += 1

    @staticmethod
    def _refusal(
        replica: FakeReplica, snapshot: Snapshot, metadata: dict[str, Any] | None
    ) -> str | None:
        """The local backend's delta rule: the previous identity named in the metadata
        must be what the replica serves and what the delta was taken against."""
        if snapshot.kind != "delta":
            return None
        if metadata is None:
            return f"delta {snapshot.identity} needs incremental_snapshot_metadata"
        previous = metadata.get("previous_snapshot_identity")
        if previous != replica.identity or previous != snapshot.recorded_base:
            return (
                f"delta {snapshot.identity} was taken against {snapshot.recorded_base!r} but "
                f"previous_snapshot_identity is {previous!r} and the replica serves "
                f"{replica.identity!r}"
            )
        return None

    def _completions(self, request: httpx.Request) -> httpx.Response:
        self.completions.append(request)
        if self.canned_completions:
            answer = self.canned_completions.popleft()
            if isinstance(answer, Exception):
                raise answer
            return answer
        if not self._authorized(request):
            return rpc_error(401, "missing bearer token", code=16)
        if self.loading:
            self.tick()
            return rpc_error(self.busy_status, "the deployment is loading weights", code=14)
        body = json.loads(request.content)
        return sse_response(
            body["prompt"], max_tokens=body["max_tokens"], echo=bool(body.get("echo"))
        )


def logprob_of(position: int, version: int = 0) -> float:
    """The fake model's raw logprob of its `position`-th generated token."""
    return -0.1 * (version + 1) - 0.01 * position


def sse_events(
    prompt: list[int],
    *,
    max_tokens: int = 3,
    echo: bool = False,
    version: int = 0,
    with_raw_output: bool = True,
    sampling_logprobs: bool = True,
) -> list[str]:
    """The SSE events of a completion of the fake model: token i is prompt[-1] + i + 1."""
    completion = [prompt[-1] + i + 1 for i in range(max_tokens)]
    entries: list[dict[str, Any]] = []
    if echo:  # the prompt's logprobs come first; the first prompt token has none
        entries = [
            {"token": f"p{t}", "token_id": t, "logprob": None if i == 0 else -1.0 - i}
            for i, t in enumerate(prompt)
        ]
    events = []
    for i, token in enumerate(completion):
        entry: dict[str, Any] = {
            "token": f"t{token}",
            "token_id": token,
            "logprob": logprob_of(i, version),
        }
        if sampling_logprobs:
            entry["sampling_logprob"] = logprob_of(i, version) - 0.5
        chunk_entries = [*entries, entry] if i == 0 else [entry]
        choice: dict[str, Any] = {
            "index": 0,
            "text": f"t{token} ",
            "logprobs": {"content": chunk_entries},
            "finish_reason": None,
        }
        events.append(json.dumps({"choices": [choice]}))
    final: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
    if with_raw_output:
        ids = prompt + completion if echo else completion
        final["raw_output"] = {"prompt_token_ids": prompt, "completion_token_ids": ids}
    events.append(
        json.dumps(
            {
                "choices": [final],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": max_tokens,
                    "total_tokens": len(prompt) + max_tokens,
                },
                "perf_metrics": {"prefill-queue-duration": 0.25, "prompt-tokens": len(prompt)},
            }
        )
    )
    return events


def sse_response(
    prompt: list[int],
    *,
    max_tokens: int = 3,
    echo: bool = False,
    done: bool = True,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    events = sse_events(prompt, max_tokens=max_tokens, echo=echo, **kwargs)
    body = ": keep-alive comment\n\n" + "".join(f"data: {event}\n\n" for event in events)
    if done:
        body += "data: [DONE]\n\n"
    return httpx.Response(
        200, text=body, headers={"content-type": "text/event-stream", **(headers or {})}
    )


def truncated_response(prompt: list[int]) -> httpx.Response:
    """A stream cut off after its first token: no finish_reason, raw_output or [DONE]."""
    first = sse_events(prompt)[0]
    return httpx.Response(200, text=f"data: {first}\n\ndata: {first[:20]}")


class FakePolicyClient:
    """A training client that saves sampler snapshots into a `FakeServing` bucket.

    A delta records this client's previous snapshot as its base, as the local trainer does.
    """

    def __init__(
        self, serving: FakeServing, *, lora_rank: int = 0, session_id: str = "c0ffee00"
    ) -> None:
        self.serving = serving
        self.lora_rank = lora_rank
        self.session_id = session_id
        self.saves: list[tuple[str, str | None]] = []
        self.fail_next_save = False
        self._previous: str | None = None

    def save_weights_for_sampler_ext(
        self, name: str, checkpoint_type: str | None = None, ttl_seconds: int | None = None
    ) -> SaveSamplerResult:
        if self.fail_next_save:
            self.fail_next_save = False
            raise RuntimeError("trainer unavailable")
        identity = f"{name}-{self.session_id}"
        kind = checkpoint_type or "base"
        self.saves.append((identity, checkpoint_type))
        self.serving.add_snapshot(identity, kind, self._previous if kind == "delta" else None)
        self._previous = identity
        return SaveSamplerResult(path=identity, snapshot_name=identity)
