"""Screenshots of finished fireloop runs in the Prefect UI, for docs/images/.

Starts a Prefect server WITH its UI on a free loopback port (its own PREFECT_HOME in a scratch
directory), runs a short SFT run (the tiny model on the embedded platform, with checkpoints,
hotloads and sampled evaluations) and the RL demo (SFT warm start, then GRPO), then drives
Chromium, headless, over the DevTools protocol to the runs' pages (the UI a browser lands
on, /v2) and saves under --out:

    prefect-run-graph.png            the SFT flow run page: its task graph
    prefect-run-artifacts.png        the same run's Artifacts tab
    prefect-curves-artifact.png      its curves artifact, as the UI renders it
    prefect-rl-curves-artifact.png   the RL run's curves artifact
    curves-sft.png, curves-rl.png    the runs' own `curves.png`

Chromium is not a Python package: on Debian or Ubuntu `sudo apt-get install -y chromium`, else
pass --chromium PATH. The test suite does not run this script (it needs Chromium and ~3 min).

    .venv/bin/python scripts/ui_screenshot.py                 # writes docs/images/
    .venv/bin/python scripts/ui_screenshot.py --no-rl --out /tmp/shots
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "Chromium was not found. Install it (Debian/Ubuntu: `sudo apt-get install -y chromium`) "
    "or pass --chromium /path/to/chromium."
)
SERVER_START_TIMEOUT_S = 180.0
UI = "/v2"  # the UI a browser lands on by default (Prefect 3.9's React UI)


class ScreenshotError(RuntimeError):
    """Something the screenshots need is missing or did not answer; the message says what."""


@dataclass(frozen=True)
class Options:
    out: Path
    chromium: str
    rl: bool
    sft_steps: int
    rl_steps: int
    width: int
    height: int
    settle_s: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--chromium", help="the browser binary (default: found on PATH)")
    parser.add_argument("--no-rl", dest="rl", action="store_false", help="skip the RL demo")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--rl-steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument(
        "--settle-s", type=float, default=6.0, help="wait after a page loads before the shot"
    )
    return parser.parse_args(argv)


def find_chromium(explicit: str | None) -> str:
    """The browser to drive: `explicit`, else the first of the usual names on PATH."""
    if explicit:
        if shutil.which(explicit) is None and not Path(explicit).is_file():
            raise ScreenshotError(f"--chromium {explicit}: no such program. {INSTALL_HINT}")
        return explicit
    for name in CHROMIUM_NAMES:
        if (path := shutil.which(name)) is not None:
            return path
    raise ScreenshotError(INSTALL_HINT)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, timeout_s: float, what: str, process: subprocess.Popen[bytes]) -> None:
    """Poll `url` until it answers 200; fail if `process` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScreenshotError(f"{what} exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise ScreenshotError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


@contextmanager
def stopped_at_exit(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Terminate the process group on the way out, however the block is left."""
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()


@contextmanager
def prefect_server(scratch: Path) -> Iterator[str]:
    """`prefect server start` with the UI on a free loopback port; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(scratch / "prefect"),
        "PREFECT_UI_API_URL": f"{base}/api",  # else the UI calls the default port, 4200
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    log = (scratch / "prefect-server.log").open("wb")
    command = [sys.executable, "-m", "prefect", "server", "start"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    with stopped_at_exit(process):
        wait_for(f"{base}/api/health", SERVER_START_TIMEOUT_S, "prefect server", process)
        yield base


@dataclass(frozen=True)
class FinishedRun:
    """A run the screenshots show: its flow run, its curves artifact, its `curves.png`."""

    flow_run_id: str
    curves_artifact_id: str
    curves_png: Path


def finished_run(flow_run_id: str, recipe: str, run_name: str, run_dir: str) -> FinishedRun:
    """The run's latest curves artifact, read back through the Prefect API as the UI reads it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.monitoring import artifact_key

    key = artifact_key(recipe, run_name, "curves")
    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    if not latest:
        raise ScreenshotError(f"the {recipe} run {run_name} left no {key} artifact")
    return FinishedRun(flow_run_id, str(latest[0].id), Path(run_dir) / "curves.png")


def run_sft(runs: Path, steps: int) -> FinishedRun:
    """A short SFT run with checkpoints, hotloads and sampled evaluations. Imported here:
    Prefect reads PREFECT_API_URL once, at import."""
    from flows.config import SFTConfig
    from flows.sft import configured_sft_flow

    config = SFTConfig(
        run_name="ui-sft",
        run_dir=str(runs / "ui-sft"),
        max_steps=steps,
        batch_size=32,
        checkpoint_every=10,
        eval_every=20,
        eval_size=16,
        retry_delay_s=1,
    )
    state = configured_sft_flow(config)(config, return_state=True)
    if not state.is_completed():
        raise ScreenshotError(f"the SFT run did not complete: {state.message}")
    flow_run_id = str(state.state_details.flow_run_id)
    return finished_run(flow_run_id, "sft", config.run_name, config.resolved_run_dir)


def run_rl_demo(runs: Path, steps: int) -> FinishedRun:
    """The RL demo (SFT warm start, then GRPO); what its RL run left."""
    from flows.rl_demo import RLDemoConfig, rl_demo_flow

    state = rl_demo_flow(
        RLDemoConfig(name="ui", runs_dir=str(runs), rl_steps=steps), return_state=True
    )
    if not state.is_completed():
        raise ScreenshotError(f"the RL demo did not complete: {state.message}")
    rl = state.result().rl
    flow_run_id = str(state.state_details.flow_run_id)  # the demo's parent flow run
    return finished_run(flow_run_id, "rl", rl.run_name, rl.run_dir)


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, websocket: Any) -> None:
        self._ws = websocket
        self._next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise ScreenshotError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def open(self, url: str, settle_s: float) -> None:
        """Navigate, wait for the document, then for the SPA's data (no spinner left)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.evaluate("document.readyState") == "complete":
                break
            time.sleep(0.2)
        time.sleep(settle_s)

    def resize(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


@contextmanager
def chromium(binary: str, scratch: Path, width: int, height: int) -> Iterator[DevTools]:
    """Headless Chromium with remote debugging on a free loopback port; one page's client."""
    import httpx
    from websockets.sync.client import connect

    port = free_port()
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace sandbox
        "--disable-gpu",
        "--use-angle=swiftshader",  # the run graph is WebGL: a software renderer draws it
        "--enable-unsafe-swiftshader",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={scratch / 'chromium'}",
        f"--window-size={width},{height}",
        "--remote-debugging-address=127.0.0.1",
        f"--remote-debugging-port={port}",
        "about:blank",
    ]
    log = (scratch / "chromium.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    with stopped_at_exit(process):
        wait_for(f"http://127.0.0.1:{port}/json/version", 60, "chromium", process)
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        page = next(p for p in pages if p.get("type") == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as websocket:
            tools = DevTools(websocket)
            tools.call("Page.enable")
            tools.resize(width, height)
            yield tools


@dataclass(frozen=True)
class Shot:
    """One page to capture: its path under the UI, the file, the viewport height."""

    path: str
    filename: str
    height: int


def shots(sft: FinishedRun, rl: FinishedRun | None) -> list[Shot]:
    run_page = f"/runs/flow-run/{sft.flow_run_id}"
    planned = [
        Shot(run_page, "prefect-run-graph.png", 900),
        Shot(f"{run_page}?tab=Artifacts", "prefect-run-artifacts.png", 1250),
        Shot(f"/artifacts/artifact/{sft.curves_artifact_id}", "prefect-curves-artifact.png", 760),
    ]
    if rl is not None:
        artifact_page = f"/artifacts/artifact/{rl.curves_artifact_id}"
        planned.append(Shot(artifact_page, "prefect-rl-curves-artifact.png", 1000))
    return planned


def take_screenshots(
    base: str, planned: Sequence[Shot], options: Options, scratch: Path
) -> list[Path]:
    options.out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with chromium(options.chromium, scratch, options.width, options.height) as page:
        for shot in planned:
            page.resize(options.width, shot.height)
            page.open(f"{base}{UI}{shot.path}", options.settle_s)
            page.screenshot(options.out / shot.filename)
            saved.append(options.out / shot.filename)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = Options(
            out=args.out.resolve(),
            chromium=find_chromium(args.chromium),
            rl=args.rl,
            sft_steps=args.sft_steps,
            rl_steps=args.rl_steps,
            width=args.width,
            height=args.height,
            settle_s=args.settle_s,
        )
        with tempfile.TemporaryDirectory(prefix="fireloop-ui-") as name:
            scratch = Path(name)
            with prefect_server(scratch) as base:
                os.environ["PREFECT_API_URL"] = f"{base}/api"
                os.environ.setdefault("DO_NOT_TRACK", "1")
                runs = scratch / "runs"
                sft = run_sft(runs, options.sft_steps)
                rl = run_rl_demo(runs, options.rl_steps) if options.rl else None
                saved = take_screenshots(base, shots(sft, rl), options, scratch)
            for name, run in (("curves-sft.png", sft), ("curves-rl.png", rl)):
                if run is not None:
                    shutil.copyfile(run.curves_png, options.out / name)
                    saved.append(options.out / name)
    except ScreenshotError as error:
        sys.stderr.write(f"ui_screenshot: {error}\n")
        return 1
    for path in saved:
        sys.stdout.write(f"{path} ({path.stat().st_size // 1024} KiB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
