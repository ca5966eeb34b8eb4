"""Fan-out of reward and evaluation scoring over the task runner a run's config names.

Prefect fixes a flow's task runner where the flow is defined, but a deployment calls the flow
with nothing but its config. So the flows keep Prefect's default runner and enter the one the
config's `task_runner` names themselves, once per attempt, at its first use: a thread pool by
default, or Dask (a temporary LocalCluster on this machine, or an existing scheduler by address)
to spread user rewards over processes or machines. A step's rows go out as a few contiguous
shards, one task run each, and come back in row order, so both runners give the same results.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from prefect import Task
from prefect.context import TaskRunContext
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.config import TaskRunnerConfig
from sdk import ConfigError

__all__ = ["FanOut", "by_value", "shards_of"]

T = TypeVar("T")
R = TypeVar("R")

# Packages the image installs: functions from them ship to Dask workers by reference (the
# worker imports them); anything else, such as a reward in the user's own file, by value.
INSTALLED_PACKAGES: Final = frozenset(
    {"algorithms", "flows", "tasks", "sdk", "backend", "fireloop"}
)


def shards_of(items: Sequence[T], shards: int) -> list[list[T]]:
    """`items` in at most `shards` contiguous, near-equal, non-empty parts, in order."""
    n = len(items)
    parts = min(shards, n)
    bounds = [round(i * n / parts) for i in range(parts + 1)] if parts else [0]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


class _ByValue:
    """A function that pickles by value (its code, not its import path), for workers that do
    not have the module it lives in; it unpickles as the plain function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle  # type: ignore[import-untyped]  # Prefect's own dependency

        module = sys.modules[self.fn.__module__]
        cloudpickle.register_pickle_by_value(module)
        try:
            payload = cloudpickle.dumps(self.fn)
        finally:
            cloudpickle.unregister_pickle_by_value(module)
        return (cloudpickle.loads, (payload,))


def by_value(fn: Callable[..., R]) -> Callable[..., R]:
    """`fn` as it should ship to a remote worker: by reference when it comes from an installed
    fireloop package, by value otherwise (a reward in a file the workers do not have)."""
    module = getattr(fn, "__module__", None)
    if module is None or module not in sys.modules or module == "__main__":
        return fn  # cloudpickle already ships these by value
    if module.split(".")[0] in INSTALLED_PACKAGES:
        return fn
    return _ByValue(fn)


class FanOut:
    """The config's task runner, started at the first `map` and stopped by `close` (the
    attempt's session closes it)."""

    def __init__(self, config: TaskRunnerConfig) -> None:
        self.config = config
        self._runner: TaskRunner[Any] | None = None

    def map(self, task: Task[..., Any], items: Sequence[Any], **static: Any) -> list[Any]:
        """`task(items=shard, part=i, **static)` for each shard of `items`, as task runs on
        the runner; every shard's results concatenated in order. The first failed shard (in
        order) raises its task's exception, after every shard has finished."""
        if not items:
            return []
        runner = self._started()
        shards = shards_of(items, self.config.workers)
        token = None
        if self.config.kind == "dask":
            static = {k: by_value(v) if callable(v) else v for k, v in static.items()}
            # An enclosing task's context (a training segment's) holds its parameters, live
            # clients among them, and Dask would pickle it: the shards run as the flow's own
            # task runs instead of that task's children.
            token = TaskRunContext.__var__.set(None)  # type: ignore[arg-type]
        try:
            futures = [
                runner.submit(task, {"items": shard, "part": part, **static})
                for part, shard in enumerate(shards)
            ]
        finally:
            if token is not None:
                TaskRunContext.__var__.reset(token)
        wait(futures)
        return [result for future in futures for result in future.result()]

    def close(self) -> None:
        """Stop the runner (a temporary LocalCluster with it); a no-op when never started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.__exit__(None, None, None)

    def _started(self) -> TaskRunner[Any]:
        if self._runner is None:
            runner = _runner_for(self.config)
            runner.__enter__()
            self._runner = runner
        return self._runner


def _runner_for(config: TaskRunnerConfig) -> TaskRunner[Any]:
    if config.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=config.workers)
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(
            "task_runner.kind dask needs prefect-dask: pip install prefect-dask==0.3.7"
        ) from exc
    if config.address is not None:
        return DaskTaskRunner(address=config.address)
    # One single-threaded process per worker (rewards are user Python, often GIL-bound), on
    # loopback only (its status page on a free port).
    cluster = {
        "n_workers": config.workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    return DaskTaskRunner(cluster_kwargs=cluster)
