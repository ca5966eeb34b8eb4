"""The README's benchmark commands still run, in their smallest form, and check themselves.

Benchmarks measure and never assert a time, so nothing here looks at a number of seconds. What
is checked is that each command finishes and prints its table, and the correctness column each
one carries: served logprobs equal to the trainer's after a hotload, and the flow and the bare
SDK loop reaching the same loss. A benchmark that rots would otherwise only be found when someone
needs its numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def run_bench(script: str, *args: str, tmp_path: Path) -> str:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # its own temporary Prefect server
        "PREFECT_API_URL": "",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_trainer_throughput_runs(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    out = run_bench(
        "trainer_throughput.py", "--modes", "full", "--profile", str(profiles), tmp_path=tmp_path
    )
    assert re.search(r"tiny\s*\|\s*full", out), out
    # The per-thread CPU table: trainer, native, server, client loop, caller, other, totals.
    cpu_row = re.search(r"^\| tiny \| full \| 1 \|((?: [0-9.]+ \|){8})$", out, re.MULTILINE)
    assert cpu_row is not None, out
    # A profile of the SDK run, unless py-spy could not attach here (it says so).
    written = sorted(p.name for p in profiles.iterdir())
    assert written or "py-spy wrote no profile" in out, out
    assert all(name.startswith("trainer-tiny-full-depth1") for name in written), written


@pytest.mark.slow
def test_hotload_latency_serves_the_trainer_weights(tmp_path: Path) -> None:
    out = run_bench(
        "hotload_latency.py",
        *("--modes", "full", "--rounds", "1", "--deltas", "1"),  # the session model cache
        tmp_path=tmp_path,
    )
    rows = [line for line in out.splitlines() if line.startswith("| tiny | full |")]
    assert [row.split("|")[3].strip() for row in rows] == ["base", "delta"], out
    parity = [float(row.rstrip(" |").rsplit("|", 1)[1]) for row in rows]
    assert all(gap <= 1e-4 for gap in parity), out


@pytest.mark.slow
def test_sampling_throughput_runs(tmp_path: Path) -> None:
    out = run_bench(
        "sampling_throughput.py",
        *("--seconds", "1", "--concurrency", "1,4", "--max-tokens", "8"),
        *("--data-dir", str(tmp_path / "platform")),
        tmp_path=tmp_path,
    )
    sides = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    platform_rows = [side for side in sides if side.startswith("platform via SDK")]
    assert len(platform_rows) == 2 and "HF generate, batch 1" in sides, out


@pytest.mark.slow
def test_orchestration_overhead_compares_equal_work(tmp_path: Path) -> None:
    out = run_bench("orchestration_overhead.py", "--steps", "4", "--rounds", "1", tmp_path=tmp_path)
    row = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert row.split()[7] == "True", out  # the same final loss on both sides
    assert "median: flow" in out, out


@pytest.mark.slow
def test_rl_throughput_runs_every_mode_within_its_staleness_bound(tmp_path: Path) -> None:
    results = tmp_path / "rl.json"
    out = run_bench(
        "rl_throughput.py",
        *("--rounds", "1", "--steps", "2", "--sft-steps", "1", "--json", str(results)),
        tmp_path=tmp_path,
    )
    table = next(block for block in out.split("\n\n") if "| staleness max |" in block)
    modes = [line.split("|")[1].strip() for line in table.splitlines()[3:]]  # title, header, rule
    assert modes == ["sync", "async-O1", "async-O2"], out
    runs = json.loads(results.read_text())["runs"]
    assert [(run["mode"], len(run["reward"])) for run in runs] == [
        ("sync", 2),
        ("async-O1", 2),
        ("async-O2", 2),
    ]
    # Realised staleness never exceeds the mode's bound: 0 for sync, O for async.
    bounds = {"sync": 0, "async-O1": 1, "async-O2": 2}
    for run in runs:
        offsets = run["loop_metrics"]["async/version_offset_max"]
        assert len(offsets) == 2 and max(offsets) <= bounds[run["mode"]], run


def test_profile_summary_ranks_a_threads_frames_by_sampled_seconds(tmp_path: Path) -> None:
    # py-spy's speedscope shape: stacks from the thread's root to the sampled line, in seconds.
    frames = [
        {"name": "thread (1): MainThread", "file": "", "line": 0},
        {"name": "step", "file": "/x/backend/trainer/engine.py", "line": 10},
        {"name": "matmul", "file": "/x/torch/functional.py", "line": 5},
        {"name": "post", "file": "/x/sdk/_http.py", "line": 7},
    ]
    profile = {
        "type": "sampled",
        "name": 'Thread 1 "MainThread"',
        "unit": "seconds",
        "samples": [[0, 1, 2], [0, 1, 2], [0, 1], [0, 3]],
        "weights": [0.5, 0.5, 0.25, 0.25],
    }
    document = {"shared": {"frames": frames}, "profiles": [profile]}
    path = tmp_path / "run.speedscope.json"
    path.write_text(json.dumps(document))
    out = run_bench("profile_summary.py", "--top", "2", str(path), tmp_path=tmp_path)
    lines = out.splitlines()
    assert 'Thread 1 "MainThread": 1.50 seconds, 4 samples' in lines, out
    inclusive = lines[lines.index("  inclusive:") + 1 : lines.index("  self:")]
    own = lines[lines.index("  self:") + 1 :]
    # The root frame is in every sample and says nothing, so it is left out.
    assert [line.split()[0] for line in inclusive] == ["1.25", "1.00"], out
    assert "step (trainer/engine.py:10)" in inclusive[0] and "matmul" in inclusive[1], out
    assert "matmul" in own[0] and "1.00" in own[0], out
