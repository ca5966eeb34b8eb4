"""The recipe lifecycle every flow shares: open the run, checkpoint, hotload, evaluate, finish.

`open_run` is the frame of one attempt: it locks the run directory (one run directory, one
run), resolves the platform (the embedded backend when the config names none) and checks that
it answers, masks the key in every log handler, opens the ledger (a ledger of another run fails
here, before any compute) and the monitors, and tears down per policy in `finally` once the run
is over: completed, or failed for good (a failure no retry can fix, or the last attempt; an
earlier failure is followed by the flow retry, which needs the trainer and the lock). A crash
or cancel (a signal: Prefect retries neither) defers the teardown and says so in the ledger,
so running the same config again resumes. When the run is over it gives back the lock and its
lease on the embedded platform. The
`RunContext` methods append a ledger row only after what it records is durable: a save read
back from the control plane, a hotload the deployment was seen serving, computed evaluation
metrics: a resume trusts every row it reads.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from uuid import uuid4

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, ConfigDict

from flows.attempt_end import record_attempt_end
from flows.config import RUN_ONLY_FIELDS, RecipeConfig, training_identity_hash
from flows.embedded import acquire_embedded, release_embedded
from flows.failures import flow_retry_helps
from flows.ledger import (
    CheckpointRow,
    EvaluationRow,
    ExtensionRow,
    HotloadRow,
    Ledger,
    RunEndRow,
    RunHeader,
)
from flows.monitoring import METRICS_FILENAME, MetricsLog, RunMonitor
from flows.notices import notice
from flows.redaction import redact_secrets
from flows.run_lock import hold_run_dir, release_run_dir
from flows.scheduling import flow_run_retries
from flows.secrets import platform_api_key
from flows.wandb_run import WandbRun, wandb_api_key, wandb_run_id
from tasks.platform import PlatformEndpoint, Waits
from tasks.teardown import TeardownPlan, teardown
from tasks.training import SegmentResult
from tasks.weight_sync import HotloadResult

__all__ = [
    "ResourceFate",
    "RunContext",
    "RunResult",
    "config_resource_id",
    "derive_id",
    "open_run",
    "resolve_endpoint",
    "run_header",
]

# What became of a trainer job or deployment after the run: the teardown policy's doing, or
# `stops_with_process` (the embedded platform stops when its last run ends, at the latest when
# this process exits; its data directory keeps the checkpoints), or `not_owned` (handed in by
# id: never touched).
ResourceFate = Literal["kept", "scaled_to_zero", "deleted", "stops_with_process", "not_owned"]


class RunResult(BaseModel):
    """What a finished run reports (also for a run found already finished in its ledger): the
    numbers, and where everything a person may want to take away lives."""

    model_config = ConfigDict(frozen=True)

    run_name: str
    steps_done: int
    data_cursor: int
    final_metrics: dict[str, float]
    last_checkpoint: str | None
    last_checkpoint_path: str | None
    served_snapshot: str | None
    deployment_id: str | None
    trainer_job_id: str
    ledger_path: str
    wandb_run_id: str | None = None
    already_complete: bool = False  # the ledger had ended before: nothing was trained now
    run_dir: str
    metrics_path: str
    wandb_dir: str | None = None  # W&B's files (offline runs: sync them from here)
    platform: Literal["embedded", "remote"]
    platform_data_dir: str | None = None  # embedded: jobs, checkpoints and snapshots live here
    checkpoint_dir: str | None = None  # embedded: this run's trainer job's checkpoints
    trainer_after: ResourceFate
    deployment_after: ResourceFate | None = None  # None: the run had no deployment


def derive_id(run_name: str, run_dir: str, kind: str) -> str:
    """A DNS-label resource id owned by the run: `<run_name>-<kind>-<hash of run_dir>`."""
    digest = hashlib.sha256(run_dir.encode("utf-8")).hexdigest()[:8]
    return f"{run_name[:40]}-{kind}-{digest}"


def config_resource_id(config: RecipeConfig, kind: str) -> str:
    """The id of the run's own `kind` resource, from what the config says: its `run_dir` as
    written (a path or URL), else `runs/<run_name>`, never the absolute local directory, so the
    same config derives the same trainer and deployment ids from any directory or host (a flow
    retry on another worker finds the same job)."""
    run_dir = config.run_dir.rstrip("/") if config.run_dir else f"runs/{config.run_name}"
    return derive_id(config.run_name, run_dir, kind)


def _recorded_ids(ledger: Ledger, run_name: str) -> tuple[str | None, str | None]:
    """The run's own trainer job and deployment as its ledger rows name them (the newest): a
    run begun when ids were derived from the absolute run directory keeps its resources. Only
    ids of the derived form count, so a job or deployment once handed in by id never becomes
    one the run owns (and tears down)."""
    jobs = [row.job_id for row in ledger.checkpoints(resumable_only=False) if row.job_id]
    deployments = [row.deployment for row in ledger.rows if isinstance(row, HotloadRow)]
    own_job = [job for job in jobs if job.startswith(f"{run_name[:40]}-trainer-")]
    own_deployment = [d for d in deployments if d.startswith(f"{run_name[:40]}-deploy-")]
    return (own_job[-1] if own_job else None), (own_deployment[-1] if own_deployment else None)


def _is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def embedded_data_dir(config: RecipeConfig) -> Path:
    """Where the embedded platform of a run keeps its state: `<run_dir>/platform` when local."""
    fs, path = fsspec.core.url_to_fs(config.resolved_run_dir)
    local = isinstance(fs, LocalFileSystem)
    return (Path(path, "platform") if local else Path(".fireloop", "platform")).absolute()


def resolve_endpoint(config: RecipeConfig, owner: str) -> PlatformEndpoint:
    """The configured platform (its key: see `platform_api_key`), else a lease for the flow
    run `owner` on the embedded one (given back by `open_run` when the run is over)."""
    platform = config.platform
    if platform is None:
        return acquire_embedded(embedded_data_dir(config), owner, config.waits)
    key = platform_api_key(platform)
    return PlatformEndpoint(
        base_url=platform.base_url,
        api_key=key,
        inference_url=platform.inference_url,
        hotload_api_url=platform.hotload_api_url,
        waits=config.waits or Waits(),
    )


@dataclass
class RunContext:
    """One attempt of one run: its config, platform, ledger, ids and monitors."""

    config: RecipeConfig
    recipe: str
    endpoint: PlatformEndpoint
    ledger: Ledger
    monitor: RunMonitor
    job_id: str
    deployment_id: str | None
    taken_names: set[str] = field(default_factory=set)  # checkpoint names the job holds
    final_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def waits(self) -> Waits:
        return self.endpoint.waits

    @property
    def wandb_id(self) -> str | None:
        return self.monitor.wandb.id if self.monitor.wandb is not None else None

    def finished(self) -> RunResult | None:
        """The result of a run whose ledger already ends (`run_end` after any extension), else
        None; says so to the user."""
        ends = [row for row in self.ledger.rows if isinstance(row, RunEndRow | ExtensionRow)]
        if not ends or not isinstance(ends[-1], RunEndRow):
            return None
        result = self.result().model_copy(update={"already_complete": True})
        notice(
            f"run {self.config.run_name} is already complete ({result.steps_done} steps, "
            f"ledger {self.ledger.path}); nothing to do. To train it further, run it again "
            "with a larger max_steps and extend=true"
        )
        return result

    def evaluated(self, point: int) -> bool:
        return any(isinstance(r, EvaluationRow) and r.step == point for r in self.ledger.rows)

    def checkpoint_name(self, point: int) -> str:
        """`step-<point>`, or `step-<point>-a<k>` when a crashed attempt left that name
        (`save_state` cannot overwrite a name the job already holds)."""
        name, attempt = f"step-{point}", 1
        while name in self.taken_names:
            name, attempt = f"step-{point}-a{attempt}", attempt + 1
        return name

    def record_checkpoint(self, result: SegmentResult, snapshot: str | None) -> CheckpointRow:
        """Append the ledger row of the segment's save, under the name the segment task read
        back from the control plane (a trainer may rename a save)."""
        assert result.saved_name is not None and result.confirmed_name is not None
        name = result.confirmed_name
        self.taken_names.add(name)
        last = result.steps[-1]
        row = self.ledger.append_checkpoint(
            name=name,
            requested_name=result.saved_name,
            step=last.step,
            data_cursor=last.data_cursor,
            epoch=last.epoch,
            state_path=name,  # this job's checkpoint, by name (resolve_checkpoint_path)
            job_id=self.job_id,
            snapshot_identity=snapshot,
            wandb_run_id=self.wandb_id,
            inputs_position=last.inputs_position,
        )
        notice(f"checkpoint {name} saved at step {row.next_step}")
        return row

    def record_hotload(self, hotload: HotloadResult, *, announce: bool = True) -> None:
        """Ledger row for a verified hotload. The person running the flow is told of a `base`
        load and of the hotloads `announce` marks (those with a checkpoint or an evaluation);
        the others (an RL run hotloads every step) are logged at DEBUG."""
        self.ledger.append(
            HotloadRow(
                identity=hotload.identity,
                deployment=hotload.deployment_id,
                verified=True,
                step=hotload.step,
                checkpoint_type=hotload.checkpoint_type,
            )
        )
        notice(
            f"hotload of step {hotload.step} verified on {hotload.deployment_id} "
            f"({hotload.checkpoint_type}, snapshot {hotload.identity})",
            level=logging.INFO if announce or hotload.checkpoint_type == "base" else logging.DEBUG,
        )

    def record_evaluation(self, point: int, metrics: Mapping[str, float]) -> None:
        self.ledger.append(EvaluationRow(step=point, metrics=dict(metrics)))
        self.final_metrics.update(metrics)
        self.monitor.log_eval(point, metrics)
        notice(f"evaluation at step {point}: {_shown(metrics)}")

    def report(self) -> None:
        """Once per cadence point, after its rows: the run's artifacts (`RunMonitor`)."""
        self.monitor.report_ledger(self.ledger, self.deployment_id)

    def complete(self, next_step: int, data_cursor: int) -> RunResult:
        """Append `run_end` (the loop and final save are done) and report."""
        self.ledger.append(RunEndRow(next_step=next_step, data_cursor=data_cursor))
        self.monitor.report_ledger(self.ledger, self.deployment_id)
        result = self.result()
        notice(
            f"run {self.config.run_name} complete: {result.steps_done} steps, last checkpoint "
            f"{result.last_checkpoint}, ledger {result.ledger_path}"
        )
        return result

    def result(self) -> RunResult:
        checkpoint = self.ledger.last_checkpoint()
        hotloads = [row for row in self.ledger.rows if isinstance(row, HotloadRow)]
        evaluations = [row for row in self.ledger.rows if isinstance(row, EvaluationRow)]
        metrics = {**(evaluations[-1].metrics if evaluations else {}), **self.final_metrics}
        return RunResult(
            run_name=self.config.run_name,
            steps_done=checkpoint.next_step if checkpoint else 0,
            data_cursor=checkpoint.data_cursor if checkpoint else 0,
            final_metrics=metrics,
            last_checkpoint=checkpoint.name if checkpoint else None,
            last_checkpoint_path=checkpoint.state_path if checkpoint else None,
            served_snapshot=hotloads[-1].identity if hotloads else None,
            deployment_id=self.deployment_id,
            trainer_job_id=self.job_id,
            ledger_path=self.ledger.path,
            wandb_run_id=self.wandb_id or (checkpoint.wandb_run_id if checkpoint else None),
            **self._places(),
        )

    def _places(self) -> dict[str, object]:
        """Where the run's files are, and what its teardown leaves of its resources."""
        run_dir = self.config.resolved_run_dir
        embedded = self.config.platform is None
        wandb_dir = f"{run_dir}/wandb" if self.config.wandb is not None else None
        places: dict[str, object] = {
            "run_dir": run_dir,
            "metrics_path": f"{run_dir}/{METRICS_FILENAME}",
            "wandb_dir": wandb_dir if wandb_dir and _is_local(run_dir) else None,
            "platform": "embedded" if embedded else "remote",
        }
        if embedded:
            data_dir = embedded_data_dir(self.config)
            places["platform_data_dir"] = str(data_dir)
            places["checkpoint_dir"] = str(data_dir / "jobs" / self.job_id / "checkpoints")
            places["trainer_after"] = "stops_with_process"
            places["deployment_after"] = "stops_with_process" if self.deployment_id else None
            return places
        platform = self.config.platform
        assert platform is not None
        policy = self.config.teardown
        owned_job = platform.trainer_job_id is None
        places["trainer_after"] = (
            ("kept" if policy == "keep" else "deleted") if owned_job else "not_owned"
        )
        if self.deployment_id is not None:
            fates: dict[str, ResourceFate] = {
                "keep": "kept",
                "scale_to_zero": "scaled_to_zero",
                "delete": "deleted",
            }
            owned = platform.deployment_id is None
            places["deployment_after"] = fates[policy] if owned else "not_owned"
        return places


def _shown(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))


def _flow_run_owner() -> str:
    """Who holds the run directory: this flow run (the same across its retries)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return f"no-flow-run-{uuid4().hex[:8]}"
    return str(context.flow_run.id)


def _last_attempt() -> bool:
    """Whether Prefect will not retry this flow run if it fails now: its run count has reached
    the retries of the flow run's policy (what the server decides by, set from the config)."""
    context = FlowRunContext.get()
    retries = flow_run_retries()
    if context is None or context.flow_run is None or retries is None:
        return True
    return context.flow_run.run_count > retries


def _start_wandb(config: RecipeConfig, ledger: Ledger) -> WandbRun | None:
    if config.wandb is None:
        return None
    recorded = [row.wandb_run_id for row in ledger.checkpoints() if row.wandb_run_id]
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    run_dir = config.resolved_run_dir
    return WandbRun.start(
        config.wandb,
        run_id=recorded[-1] if recorded else wandb_run_id(config.run_name, flow_run_id),
        run_name=config.run_name,
        default_project=config.wandb_project,
        run_dir=Path(run_dir) if _is_local(run_dir) else None,
        logged_config=config,
    )


def run_header(config: RecipeConfig, dataset_fingerprint: str) -> RunHeader:
    """The ledger header naming this run: any difference means another run's ledger."""
    return RunHeader(
        run_id=config.run_name,
        recipe=config.recipe,
        config_hash=training_identity_hash(config),
        base_model=config.base_model,
        tokenizer_model=config.tokenizer_model or config.base_model,
        lora_rank=config.lora_rank,
        dataset_fingerprint=dataset_fingerprint,
        training_config=config.model_dump(mode="json", exclude=set(RUN_ONLY_FIELDS)),
    )


def _teardown(endpoint: PlatformEndpoint, plan: TeardownPlan) -> None:
    """Best effort: a failing teardown is logged, never masks the run's own outcome."""
    try:
        teardown(endpoint, plan)
    except Exception:  # the run's result (or its real failure) matters more than cleanup
        get_run_logger().exception("teardown (%s) failed; clean up by hand", plan.policy)


@contextmanager
def open_run(config: RecipeConfig, *, dataset_fingerprint: str) -> Iterator[RunContext]:
    """The frame of one attempt (see the module docstring); yields the `RunContext`."""
    run_dir = config.resolved_run_dir
    owner = _flow_run_owner()
    hold_run_dir(run_dir, owner)  # before the ledger and the embedded platform
    # Whether this attempt ends the run: then the lock and the embedded platform's lease go
    # back. A crash or cancel ends it too (Prefect retries neither); a pending retry keeps both.
    over = True
    try:
        with _attempt(config, dataset_fingerprint, owner) as run:
            yield run
    except Exception as exc:
        over = not flow_retry_helps(exc) or _last_attempt()
        raise
    finally:
        if over:
            release_embedded(owner)
            release_run_dir(run_dir)


@contextmanager
def _attempt(config: RecipeConfig, dataset_fingerprint: str, owner: str) -> Iterator[RunContext]:
    """Platform, ledger and monitors of one attempt; teardown once the run is over (deferred,
    and said so in the ledger, when a signal ends the attempt)."""
    endpoint = resolve_endpoint(config, owner)
    secrets = [endpoint.api_key.get_secret_value(), wandb_api_key() or ""]
    with redact_secrets(secrets) as redactor:
        run_dir = config.resolved_run_dir
        platform = config.platform
        user_job = platform.trainer_job_id if platform else None
        user_deployment = platform.deployment_id if platform else None
        derived_job = config_resource_id(config, "trainer")
        if platform is not None:
            # a wrong URL or key fails here, in seconds
            endpoint.check_reachable(user_job or derived_job)
        header = run_header(config, dataset_fingerprint)
        ledger = Ledger.open(run_dir, header, extend=config.extend)
        recorded_job, recorded_deployment = _recorded_ids(ledger, config.run_name)
        job_id = user_job or recorded_job or derived_job
        deployment_id = None
        if config.needs_deployment:
            deployment_id = (
                user_deployment or recorded_deployment or config_resource_id(config, "deploy")
            )
        monitor = RunMonitor(
            recipe=config.recipe,
            run_name=config.run_name,
            total_steps=config.max_steps,
            metrics_log=MetricsLog(run_dir),
            headline_metric=config.headline_metric,
            wandb=_start_wandb(config, ledger),
        )
        run = RunContext(
            config=config,
            recipe=config.recipe,
            endpoint=endpoint,
            ledger=ledger,
            monitor=monitor,
            job_id=job_id,
            deployment_id=deployment_id,
        )
        outcome = "crashed"
        try:
            yield run
            outcome = "completed"
        except Exception as exc:
            outcome = "failed" if flow_retry_helps(exc) else "failed for good"
            raise
        except GeneratorExit:
            raise
        except BaseException as exc:  # SIGTERM, a cancel, Ctrl-C: no retry follows
            # First, while the grace period lasts: the row saying why, and what was kept.
            record_attempt_end(ledger, exc, redactor.redact)
            raise
        finally:
            monitor.close(failed=outcome != "completed", report=outcome != "crashed")
            over = outcome in ("completed", "failed for good")
            if over or (outcome == "failed" and _last_attempt()):
                plan = TeardownPlan(
                    policy=config.teardown,
                    job_id=None if user_job else run.job_id,
                    deployment_id=None if user_deployment else run.deployment_id,
                )
                _teardown(endpoint, plan)
            if outcome != "crashed":
                monitor.wait_for_pictures()  # the last one was drawn beside the teardown
