"""`--profile DIR` for the benchmarks: one way to record where the time of a measured block goes.

py-spy samples every thread of the process (the SDK path spans the caller, tinker's loop, the
HTTP server, the trainer and the hotload loader) into a speedscope JSON (open it at
speedscope.app); where py-spy is not installed, cProfile of the calling thread is the fallback,
with a text summary beside it. Imported by the benchmark scripts, which run as files.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["profiled"]

ATTACH_S = 1.0  # py-spy needs about this long to attach before the measured work starts


@contextlib.contextmanager
def profiled(
    directory: Path | None,
    name: str,
    *,
    rate: int = 200,
    idle: bool = False,
    pid: int | None = None,
) -> Iterator[None]:
    """Profile the block into `directory/<name>.*` (nothing when `directory` is None).
    `idle=True` keeps the samples of waiting threads: a latency profile must show its waits.
    `pid`: py-spy another process (a server the benchmark started) instead of this one."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or _venv_tool("py-spy")
    if py_spy is None and pid is not None:
        print(f"py-spy is not installed: no profile of process {pid}")
        yield
        return
    if py_spy is None:
        with _cprofiled(directory / f"{name}.prof"):
            yield
        return
    out = directory / f"{name}.speedscope.json"
    command = [py_spy, "record", "--pid", str(pid or os.getpid()), "--rate", str(rate), "--threads"]
    command += ["--idle"] if idle else []
    command += ["--format", "speedscope", "--output", str(out)]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(ATTACH_S)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        _, stderr = recorder.communicate(timeout=120)
        if out.exists():
            print(f"profile: {out}")
        else:
            print(f"py-spy wrote no profile: {stderr.decode(errors='replace')[-500:]}")


@contextlib.contextmanager
def _cprofiled(path: Path) -> Iterator[None]:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)
        with path.with_suffix(".txt").open("w") as summary:
            pstats.Stats(profiler, stream=summary).sort_stats("cumulative").print_stats(40)
        print(f"profile: {path} (cProfile of the calling thread; install py-spy for every thread)")


def _venv_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None
