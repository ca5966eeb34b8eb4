"""No API key reaches any file a run writes, however the key was given.

The real CLI runs in a subprocess, with W&B on (offline) and its own HOME, PREFECT_HOME and
working directory inside one scratch root, so everything the run writes (run directory, W&B
files, the temporary Prefect server's database, caches, its own output) lies under that root;
every byte there is searched for the key. The key the run uses enters through one door per
case: `--set platform.api_key=…`, a config file, or the `FIREWORKS_API_KEY` environment
variable; the standalone backend the run trains on (a remote platform to the flow) gets the
same key by `fireloop backend --api-key …`, and its output is searched too. Before the fix,
W&B's run file held the `--set` key (it records the command line).

The tests after it check, without a run, where a key may come from (a Secret block the config
names, the environment; never Prefect's mask of a stored parameter) and that every log handler
masks it, those of loggers no list names and those attached while a run is under way.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import SecretStr

from flows.config import PlatformConfig
from flows.redaction import redact_secrets
from flows.secrets import MASKED_PARAMETER, platform_api_key
from sdk import ConfigError

CLI = [sys.executable, "-m", "fireloop.cli"]
RUN_TIMEOUT_S = 240
# A short run that still saves a checkpoint and logs W&B metrics; no deployment.
RUN_FIELDS = [
    "max_steps=2",
    "batch_size=4",
    "checkpoint_every=1",
    "eval_every=0",
    "sample_eval=false",
    "flow_retries=0",
    "wandb.project=leak-test",
    "wandb.mode=offline",
]


def _key(door: str) -> str:
    return f"fw-{door}-{secrets.token_hex(16)}"


def _environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PREFECT_"))}
    env.pop("FIREWORKS_API_KEY", None)
    env |= {
        "HOME": str(root / "home"),
        "PREFECT_HOME": str(root / "prefect"),
        "WANDB_DIR": str(root / "wandb-dir"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "TMPDIR": str(root / "tmp"),
    }
    for name in ("home", "prefect", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return env


def _leaks(root: Path, keys: dict[str, str]) -> list[str]:
    """`door: file` for every file under `root` that holds a key (as text, any encoding)."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        for door, key in keys.items():
            if key.encode() in data or key.encode("utf-16-le") in data:
                found.append(f"{door}: {path.relative_to(root)}")
    return found


def _run_cli(root: Path, env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess[str]:
    sets = [part for field in RUN_FIELDS for part in ("--set", field)]
    result = subprocess.run(
        [*CLI, "run", "sft", *sets, *args],
        cwd=root / "work",
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    (root / "cli-output.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _wandb_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.wandb") if p.is_file()]


@pytest.fixture(scope="module")
def standalone_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """`fireloop backend --api-key KEY` in a subprocess: (base URL, key, its output file)."""
    key = _key("backend-api-key")
    home = tmp_path_factory.mktemp("backend")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    log_path = home / "backend-output.txt"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*CLI, "backend", "--port", str(port), "--api-key", key, "--data-dir", "platform"],
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(f"{base_url}/health", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, log_path.read_text(errors="replace")
        yield base_url, key, log_path
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# The one key the run uses reaches it through exactly one door per case; the backend's own
# door (`fireloop backend --api-key`) is the same key on the server side in every case.
DOORS = ("--set platform.api_key", "config file", "FIREWORKS_API_KEY")


@pytest.mark.parametrize("door", DOORS)
def test_a_key_given_through_each_door_is_written_nowhere(
    tmp_path: Path, standalone_backend: tuple[str, str, Path], door: str
) -> None:
    base_url, key, backend_output = standalone_backend
    root = tmp_path / "scan"
    (root / "work").mkdir(parents=True)
    env = _environment(root)
    platform: dict[str, str] = {"base_url": base_url}
    args = ["--set", "run_name=leak"]
    if door == "--set platform.api_key":
        args += ["--set", f"platform.api_key={key}"]
    elif door == "config file":
        platform["api_key"] = key
    else:
        env["FIREWORKS_API_KEY"] = key
    config_file = tmp_path / "sft.yaml"  # outside the scanned root: it holds a key by design
    config_file.write_text(yaml.safe_dump({"platform": platform}))
    _run_cli(root, env, ["--config", str(config_file), *args])
    assert (root / "work" / "runs" / "leak" / "ledger.jsonl").is_file()
    assert _wandb_files(root), "W&B wrote no run file: the scan would prove nothing"
    # The temporary Prefect server's database (flow parameters, logs, artifacts) is scanned too.
    assert list((root / "prefect").rglob("*.db")), "no Prefect database under PREFECT_HOME"
    assert _leaks(root, {door: key}) == []
    assert key not in backend_output.read_text(errors="replace")


# --- Where the key comes from, and every log handler masking it (no CLI, no run) -----------


def test_a_key_in_a_secret_block_named_by_the_config_is_loaded(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    key = _key("secret-block")
    Secret(value=key).save("fireloop-test-key", overwrite=True)
    monkeypatch.setenv("FIREWORKS_API_KEY", _key("environment"))  # the named block wins
    platform = PlatformConfig(base_url="http://127.0.0.1:9", api_key_secret="fireloop-test-key")
    assert platform_api_key(platform).get_secret_value() == key
    assert key not in repr(platform) and key not in platform.model_dump_json()


def test_a_missing_secret_block_names_the_field(prefect_server: None) -> None:
    platform = PlatformConfig(base_url="http://127.0.0.1:9", api_key_secret="no-such-block")
    with pytest.raises(ConfigError, match=r"platform\.api_key_secret: no Prefect Secret block"):
        platform_api_key(platform)


def test_no_key_anywhere_names_both_right_places(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    with pytest.raises(ConfigError) as raised:
        platform_api_key(PlatformConfig(base_url="http://127.0.0.1:9"))
    assert "FIREWORKS_API_KEY" in str(raised.value) and "api_key_secret" in str(raised.value)


def test_prefects_mask_of_a_stored_key_is_refused_as_a_key() -> None:
    # What a deployment built in Python with a SecretStr parameter hands its runs.
    platform = PlatformConfig(base_url="http://127.0.0.1:9", api_key=SecretStr(MASKED_PARAMETER))
    with pytest.raises(ConfigError, match="Prefect's mask, not a key"):
        platform_api_key(platform)


def test_a_key_given_directly_works_outside_deployments() -> None:
    key = _key("direct")
    platform = PlatformConfig(base_url="http://127.0.0.1:9", api_key=SecretStr(key))
    assert platform_api_key(platform).get_secret_value() == key


def test_every_handler_masks_the_key_even_one_added_during_the_run() -> None:
    key = _key("handler")
    early, late = io.StringIO(), io.StringIO()
    # A library's logger that no fixed list names, with a handler before the run starts...
    library = logging.getLogger(f"some.library.{secrets.token_hex(4)}")
    library.addHandler(logging.StreamHandler(early))
    library.propagate = False
    added_later = logging.getLogger(f"wandb.like.{secrets.token_hex(4)}")
    added_later.propagate = False
    try:
        with redact_secrets([key]):
            library.warning("key is %s", key)
            # ...and one that attaches its handler mid-run, as W&B does.
            added_later.addHandler(logging.StreamHandler(late))
            added_later.warning("key is %s", key)
            try:
                raise RuntimeError(f"refused {key}")
            except RuntimeError:
                added_later.exception("failed")
    finally:
        library.handlers.clear()
        added_later.handlers.clear()
    for output in (early.getvalue(), late.getvalue()):
        assert "key is ***" in output and key not in output
    assert "refused ***" in late.getvalue()
