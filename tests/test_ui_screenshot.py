"""scripts/ui_screenshot.py without a browser: its arguments, the browser lookup, the pages.

The script itself needs Chromium and a few minutes, so the suite never runs it; these tests
pin what can go wrong before it starts anything: a missing browser fails at once, naming how
to install one, and the pages it captures are the ones the docs show.
"""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ui_screenshot", ROOT / "scripts/ui_screenshot.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ui = load_script()


def test_the_defaults_write_every_picture_into_docs_images() -> None:
    args = ui.parse_args([])
    assert args.out == ROOT / "docs" / "images"
    assert args.rl and args.rl_steps == 60 and args.chromium is None
    assert not ui.parse_args(["--no-rl"]).rl


def test_a_missing_browser_fails_at_once_with_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser anywhere on it
    with pytest.raises(ui.ScreenshotError, match="apt-get install -y chromium"):
        ui.find_chromium(None)
    with pytest.raises(ui.ScreenshotError, match="--chromium /nowhere/chrome: no such program"):
        ui.find_chromium("/nowhere/chrome")
    assert ui.main(["--out", str(tmp_path / "shots")]) == 1  # before any server starts
    assert "apt-get install -y chromium" in capsys.readouterr().err
    assert not (tmp_path / "shots").exists()


def test_the_browser_is_found_on_path_under_its_debian_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ui.find_chromium(None) == str(browser)


def test_the_pages_captured_are_the_run_its_artifacts_and_the_curves() -> None:
    sft = ui.FinishedRun("run-1", "artifact-1", Path("sft/curves.png"))
    rl = ui.FinishedRun("run-2", "artifact-2", Path("rl/curves.png"))
    assert [(s.path, s.filename) for s in ui.shots(sft, None)] == [
        ("/runs/flow-run/run-1", "prefect-run-graph.png"),
        ("/runs/flow-run/run-1?tab=Artifacts", "prefect-run-artifacts.png"),
        ("/artifacts/artifact/artifact-1", "prefect-curves-artifact.png"),
    ]
    assert ui.shots(sft, rl)[-1].path == "/artifacts/artifact/artifact-2"
