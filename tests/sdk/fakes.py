"""Hand-written stateful fakes for the SDK tests: a control plane behind `httpx.MockTransport`,
and a clock whose `sleep` advances time instead of waiting.

The fake keeps jobs, deployments, checkpoints and shapes as plain dicts and answers like the
platform's control plane; tests script state sequences and one-off answers, then assert on what was
sent (`requests`) and slept (`clock.sleeps`).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

API_KEY = "fw-test-key-0123456789abcdef"
ACCOUNT = "acct"
BASE_URL = "https://api.example.test"

Canned = httpx.Response | Exception


class FakeClock:
    """Monotonic time that only moves when someone sleeps (or a test calls `advance`)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


def rpc_error(status: int, message: str, code: int = 3) -> httpx.Response:
    """A google.rpc-style error answer, as the platform sends."""
    body = {"error": {"code": code, "message": message, "status": "ERROR", "details": []}}
    return httpx.Response(status, json=body)


@dataclass
class Job:
    wire: dict[str, Any]
    # States the next GETs reveal, one per GET (the first GET sees the first); the last sticks.
    upcoming: deque[str] = field(default_factory=deque)
    healthz_failures: int = 0


@dataclass
class Deployment:
    wire: dict[str, Any]
    upcoming: deque[str] = field(default_factory=deque)


class FakeControlPlane:
    """The control plane, trainer gateway healthz and completions probe, in memory."""

    def __init__(self, *, accounts: list[str] | None = None) -> None:
        self.accounts = [ACCOUNT] if accounts is None else accounts
        self.jobs: dict[str, Job] = {}
        self.deployments: dict[str, Deployment] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.shape_versions: dict[str, list[dict[str, Any]]] = {}
        self.job_boot_states = ["JOB_STATE_PENDING", "JOB_STATE_CREATING", "JOB_STATE_RUNNING"]
        self.deployment_boot_states = ["CREATING", "READY"]
        self.completions_status = 503
        self.requests: list[httpx.Request] = []
        # One-off answers (or exceptions) per "METHOD /path", served before the stateful routes.
        self.canned: dict[str, deque[Canned]] = {}
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., httpx.Response]]] = [
            ("GET", re.compile(r"/v1/accounts"), self._list_accounts),
            ("POST", re.compile(r"/v1/accounts/([^/]+)/rlorTrainerJobs"), self._create_job),
            ("GET", re.compile(r"/v1/accounts/([^/]+)/rlorTrainerJobs/([^/:]+)"), self._get_job),
            ("DELETE", re.compile(r"/v1/accounts/([^/]+)/rlorTrainerJobs/([^/:]+)"), self._del_job),
            (
                "POST",
                re.compile(r"/v1/accounts/([^/]+)/rlorTrainerJobs/([^/]+):resume"),
                self._resume,
            ),
            (
                "GET",
                re.compile(r"/v1/accounts/([^/]+)/rlorTrainerJobs/([^/]+)/checkpoints"),
                self._list_checkpoints,
            ),
            ("GET", re.compile(r"/v1/(accounts/[^/]+/trainingShapes/[^/]+)/versions"), self._s1),
            (
                "GET",
                re.compile(r"/v1/(accounts/[^/]+/trainingShapes/[^/]+/versions/[^/]+)"),
                self._s2,
            ),
            (
                "GET",
                re.compile(r"/training/v1/rlorTrainerJobs/([^/]+)/([^/]+)/api/v1/healthz"),
                self._healthz,
            ),
            ("POST", re.compile(r"/v1/accounts/([^/]+)/deployments"), self._create_deployment),
            ("GET", re.compile(r"/v1/accounts/([^/]+)/deployments/([^/]+)"), self._get_deployment),
            (
                "DELETE",
                re.compile(r"/v1/accounts/([^/]+)/deployments/([^/]+)"),
                self._del_deployment,
            ),
            (
                "PATCH",
                re.compile(r"/v1/accounts/([^/]+)/deployments/([^/]+)"),
                self._patch_deployment,
            ),
            ("POST", re.compile(r"/inference/v1/completions"), self._completions),
        ]

    # -- test-side helpers ------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def queue(self, route: str, *answers: Canned) -> None:
        """Serve `answers` (in order) to the next requests on `route`, e.g. "GET /v1/accounts"."""
        self.canned.setdefault(route, deque()).extend(answers)

    def add_job(self, job_id: str, *states: str, **fields: Any) -> Job:
        wire = {"name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}", "state": states[0]}
        wire.update(fields)
        job = Job(wire=wire, upcoming=deque(states))
        self.jobs[job_id] = job
        return job

    def add_deployment(self, deployment_id: str, *states: str) -> Deployment:
        wire = {"name": f"accounts/{ACCOUNT}/deployments/{deployment_id}", "state": states[0]}
        deployment = Deployment(wire=wire, upcoming=deque(states))
        self.deployments[deployment_id] = deployment
        return deployment

    def sent(self, method: str, path_fragment: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and path_fragment in r.url.path]

    # -- the wire ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        canned = self.canned.get(f"{request.method} {request.url.path}")
        if canned:
            answer = canned.popleft()
            if isinstance(answer, Exception):
                raise answer
            return answer
        if request.headers.get("x-api-key") != API_KEY:
            return rpc_error(401, "missing or wrong API key", code=16)
        for method, pattern, route in self._routes:
            match = pattern.fullmatch(request.url.path)
            if match and method == request.method:
                return route(request, *match.groups())
        return rpc_error(404, f"no route for {request.method} {request.url.path}", code=5)

    def _list_accounts(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"accounts": [{"name": f"accounts/{a}"} for a in self.accounts]}
        )

    def _create_job(self, request: httpx.Request, account: str) -> httpx.Response:
        job_id = request.url.params["rlorTrainerJobId"]
        if job_id in self.jobs:
            return rpc_error(409, f"rlorTrainerJob {job_id} already exists", code=6)
        body = json.loads(request.content)
        job = self.add_job(job_id, *self.job_boot_states, **body)
        return httpx.Response(200, json=job.wire)

    def _job(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None and job.upcoming:
            job.wire["state"] = job.upcoming.popleft()
        return job

    def _get_job(self, request: httpx.Request, account: str, job_id: str) -> httpx.Response:
        job = self._job(job_id)
        if job is None:
            return rpc_error(404, "rlorTrainerJob not found", code=5)
        return httpx.Response(200, json=job.wire)

    def _del_job(self, request: httpx.Request, account: str, job_id: str) -> httpx.Response:
        job = self.jobs.get(job_id)
        if job is None:
            return rpc_error(404, "rlorTrainerJob not found", code=5)
        job.wire["state"], job.upcoming = "JOB_STATE_DELETED", deque()
        return httpx.Response(200, json={})

    def _resume(self, request: httpx.Request, account: str, job_id: str) -> httpx.Response:
        job = self.jobs[job_id]
        job.wire["state"] = "JOB_STATE_PENDING"  # synchronous, as the local backend does
        job.upcoming = deque(["JOB_STATE_PENDING", "JOB_STATE_RUNNING"])
        return httpx.Response(200, json=job.wire)

    def _list_checkpoints(
        self, request: httpx.Request, account: str, job_id: str
    ) -> httpx.Response:
        rows = self.checkpoints.get(job_id, [])
        size = int(request.url.params["pageSize"])
        start = int(request.url.params.get("pageToken") or 0)
        page = rows[start : start + size]
        body: dict[str, Any] = {"checkpoints": page}
        if start + size < len(rows):
            body["nextPageToken"] = str(start + size)
        return httpx.Response(200, json=body)

    def _s1(self, request: httpx.Request, shape: str) -> httpx.Response:
        if shape not in self.shape_versions:
            return rpc_error(404, "training shape not found", code=5)
        return httpx.Response(200, json={"trainingShapeVersions": self.shape_versions[shape][:1]})

    def _s2(self, request: httpx.Request, name: str) -> httpx.Response:
        for versions in self.shape_versions.values():
            for version in versions:
                if version["name"] == name:
                    return httpx.Response(200, json=version)
        return rpc_error(404, "training shape version not found", code=5)

    def _healthz(self, request: httpx.Request, account: str, job_id: str) -> httpx.Response:
        job = self.jobs.get(job_id)
        if job is None:
            return rpc_error(404, "no such trainer", code=5)
        if job.wire["state"] != "JOB_STATE_RUNNING" or job.healthz_failures > 0:
            job.healthz_failures -= 1
            return rpc_error(503, "trainer not ready", code=14)
        return httpx.Response(200, json={"status": "ok"})

    def _create_deployment(self, request: httpx.Request, account: str) -> httpx.Response:
        deployment_id = request.url.params["deploymentId"]
        if deployment_id in self.deployments:
            return rpc_error(409, f"deployment {deployment_id} already exists", code=6)
        deployment = self.add_deployment(deployment_id, *self.deployment_boot_states)
        deployment.wire.update(json.loads(request.content))
        return httpx.Response(200, json=deployment.wire)

    def _get_deployment(self, request: httpx.Request, account: str, dep_id: str) -> httpx.Response:
        deployment = self.deployments.get(dep_id)
        if deployment is None:
            return rpc_error(404, "deployment not found", code=5)
        if deployment.upcoming:
            deployment.wire["state"] = deployment.upcoming.popleft()
        return httpx.Response(200, json=deployment.wire)

    def _del_deployment(self, request: httpx.Request, account: str, dep_id: str) -> httpx.Response:
        if self.deployments.pop(dep_id, None) is None:
            return rpc_error(404, "deployment not found", code=5)
        return httpx.Response(200, json={})

    def _patch_deployment(
        self, request: httpx.Request, account: str, dep_id: str
    ) -> httpx.Response:
        deployment = self.deployments.get(dep_id)
        if deployment is None:
            return rpc_error(404, "deployment not found", code=5)
        deployment.wire.update(json.loads(request.content))
        return httpx.Response(200, json=deployment.wire)

    def _completions(self, request: httpx.Request) -> httpx.Response:
        if self.completions_status != 200:
            return rpc_error(self.completions_status, "model not loaded", code=14)
        return httpx.Response(200, json={"object": "text_completion", "choices": [{"text": "ok"}]})
