"""Ctrl-C and SIGTERM stop a running `fireloop run sft` within seconds, cleanly, resumably.

A terminal's Ctrl-C goes to the whole foreground process group: the test sends SIGINT to the
group, as the terminal would, which used to reach Prefect's temporary server first (the flow
then hung for minutes and stayed Running for ever). SIGTERM goes to the CLI's pid, as `kill`
or a supervisor sends it, which used to leave that server running. Each interrupted run is
then run again with the same command and must end bitwise where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fireloop.interrupts import Terminated, interrupt_exit_code, sigterm_raises
from tests.cli.support import (
    cli_env,
    final_weights,
    flow_run_states,
    prefect_server,
    run_cli,
    sft_args,
    start_cli,
    training_trace,
    wait_for_checkpoint_row,
)

MAX_STEPS = 24
CHECKPOINT_EVERY = 2
# About 2 s on an idle machine; the bound leaves room for a shared, loaded 2-CPU machine (where
# a step can take 15 s) and still catches the old behaviour: over two and a half minutes.
STOP_WITHIN_S = 45.0
FINAL_STATES = {"CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        yield api_url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, server: str) -> Path:
    """An uninterrupted run: what every resumed run must reach."""
    root = tmp_path_factory.mktemp("reference")
    run_dir = root / "run"
    args = sft_args(run_dir, "ref", max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    done = run_cli(args, cli_env(root / "home", server), cwd=root)
    assert done.returncode == 0, done.stdout
    return run_dir


def interrupt(
    tmp_path: Path, run_name: str, api_url: str | None, sig: signal.Signals
) -> tuple[list[str], dict[str, str], subprocess.Popen[bytes], float, str]:
    """Start a run, signal it once its ledger has a checkpoint; how long it took to exit."""
    run_dir = tmp_path / "run"
    args = sft_args(run_dir, run_name, max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    env = cli_env(tmp_path / "home", api_url)
    log = tmp_path / "interrupted.log"
    process = start_cli(args, env, tmp_path, log)
    try:
        wait_for_checkpoint_row(run_dir, process, log)
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)  # the terminal's Ctrl-C: the whole group
        else:
            os.kill(process.pid, sig)
        process.wait(timeout=120)
        waited = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return args, env, process, waited, log.read_text(encoding="utf-8")


def assert_resumes_to_reference(
    args: list[str], env: dict[str, str], tmp_path: Path, reference: Path
) -> None:
    rerun = run_cli(args, env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout
    run_dir = tmp_path / "run"
    assert training_trace(run_dir) == training_trace(reference)
    assert final_weights(run_dir) == final_weights(reference)


def test_ctrl_c_stops_within_seconds_marks_the_flow_run_final_and_resumes(
    tmp_path: Path, server: str, reference: Path
) -> None:
    args, env, process, waited, output = interrupt(tmp_path, "sigint", server, signal.SIGINT)

    assert process.returncode == 130, output
    assert waited < STOP_WITHIN_S, f"{waited:.1f} s to stop\n{output}"
    assert set(flow_run_states(server, "sft-sigint")) <= FINAL_STATES
    assert flow_run_states(server, "sft-sigint"), "the flow run was never recorded"
    assert "to resume, run:" in output
    assert "--set run_name=sigint" in output
    assert "Error logging to API" not in output and "Traceback" not in output
    assert_resumes_to_reference(args, env, tmp_path, reference)


def test_an_interrupt_that_library_code_swallows_is_delivered_again() -> None:
    """Prefect runs some calls in the main thread and keeps their exception in a future that
    no one reads; an interrupt landing there must not be lost."""
    arrivals = 0
    with sigterm_raises(redeliver_after_s=0.2):
        deadline = time.monotonic() + 5
        with pytest.raises(Terminated) as second:
            while time.monotonic() < deadline:
                try:
                    if not arrivals:
                        os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)
                except Terminated:
                    if arrivals:
                        raise
                    arrivals += 1  # swallowed, as such library code does
        assert interrupt_exit_code(second.value) == 143
    assert arrivals == 1


def test_acting_on_an_interrupt_releases_prefects_task_timeout_watchers() -> None:
    """A task cut short off the main thread never leaves its cancel scope; the scope's watcher
    (not a daemon) would keep the exiting CLI alive for the rest of the task's timeout."""
    from prefect._internal.concurrency.cancellation import WatcherThreadCancelScope

    entered, stop = threading.Event(), threading.Event()

    def interrupted_task() -> None:
        WatcherThreadCancelScope(timeout=600).__enter__()  # never exited, as after an interrupt
        entered.set()
        stop.wait(30)

    threading.Thread(target=interrupted_task).start()  # not a daemon, as Prefect's workers
    assert entered.wait(10)
    watchers = [t for t in threading.enumerate() if t.name.startswith("timeout-watcher")]
    assert watchers and all(not t.daemon for t in watchers)
    try:
        assert interrupt_exit_code(KeyboardInterrupt()) == 130
        for watcher in watchers:
            watcher.join(5)
            assert not watcher.is_alive(), "the watcher still waits out its 600 s"
    finally:
        stop.set()


def _prefect_servers_of(pid: int) -> list[psutil.Process]:
    """The Prefect API servers started by process `pid`."""
    children = psutil.Process(pid).children(recursive=True)
    return [c for c in children if "prefect.server.api.server:create_app" in " ".join(c.cmdline())]


@pytest.mark.parametrize(
    ("sig", "code", "rerun"),
    [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)],  # one rerun is enough here
    ids=["sigterm", "ctrl-c"],
)
def test_with_its_own_prefect_server_it_stops_fast_and_leaves_no_server(
    tmp_path: Path, reference: Path, sig: signal.Signals, code: int, rerun: bool
) -> None:
    run_dir = tmp_path / "run"
    run_name = f"own-{sig.name.lower()}"
    args = sft_args(run_dir, run_name, max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    env = cli_env(tmp_path / "home", None)  # no PREFECT_API_URL: the CLI starts its own
    log = tmp_path / "interrupted.log"
    process = start_cli(args, env, tmp_path, log)
    try:
        wait_for_checkpoint_row(run_dir, process, log)
        servers = _prefect_servers_of(process.pid)
        assert len(servers) == 1, [s.cmdline() for s in servers]
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)  # the terminal's Ctrl-C: the whole group
        else:
            os.kill(process.pid, sig)  # `kill PID`, a supervisor
        process.wait(timeout=120)
        waited = time.monotonic() - sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text(encoding="utf-8")

    assert process.returncode == code, output
    assert waited < STOP_WITHIN_S, f"{waited:.1f} s to stop\n{output}"
    _gone, alive = psutil.wait_procs(servers, timeout=5)
    assert not alive, f"Prefect server left running: {[p.pid for p in alive]}"
    # The server is gone; its database says how the flow run ended.
    with sqlite3.connect(tmp_path / "home" / "prefect.db") as db:
        states = [row[0] for row in db.execute("SELECT state_type FROM flow_run")]
    assert states and set(states) <= FINAL_STATES, states
    assert "to resume, run:" in output
    assert "Error logging to API" not in output and "Traceback" not in output
    if rerun:
        assert_resumes_to_reference(args, env, tmp_path, reference)


def test_a_killed_cli_takes_its_prefect_server_with_it(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the server is told by the kernel that its parent died."""
    args = sft_args(tmp_path / "run", "killed", max_steps=MAX_STEPS)
    log = tmp_path / "killed.log"
    process = start_cli(args, cli_env(tmp_path / "home", None), tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while not (servers := _prefect_servers_of(process.pid)):
            assert process.poll() is None, log.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, "the CLI started no Prefect server"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI's group: the server is not in it
        process.wait()

    _gone, alive = psutil.wait_procs(servers, timeout=15)
    for orphan in alive:  # do not leave it behind even when the test fails
        orphan.kill()
    assert not alive, "the Prefect server outlived the killed CLI"
