"""The wheel holds everything the CLI needs: built, installed in a clean venv, run from outside.

Approach: copy the working tree's sources (tracked and new, not ignored) to a scratch directory
and build the wheel there (`pip wheel --no-deps --no-build-isolation`, with .venv's
setuptools), so nothing built lands in the repository. The wheel goes into a new virtualenv
(`venv --without-pip`, installed by .venv's pip through `--python`). Its third-party dependencies
come from .venv by one plain path line in a `.pth` file: installing torch and the rest again
would take minutes. A plain path line only appends that directory to `sys.path`; the `.pth` files
inside it (the editable install's finder) are not executed, which the probe checks: no editable
finder on `sys.meta_path`, no repository on `sys.path`, and `fireloop`, `flows`, `backend` and
the other packages imported from the new venv. Then, from a directory outside the repository,
the installed `fireloop` runs `demo --smoke`, a two-step `run sft` and `export`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sdk", "algorithms", "tasks", "flows", "deployments", "backend", "fireloop")
TIMEOUT_S = 240
PIP = [sys.executable, "-m", "pip"]

PROBE = """
import importlib.metadata, json, sys
import algorithms, backend, deployments, fireloop, flows, sdk, tasks
import backend.trainer.engine, backend.serving.runtime, fireloop.cli
packages = (algorithms, backend, deployments, fireloop, flows, sdk, tasks)
modules = {m.__name__: m.__file__ for m in packages}
print(json.dumps({
    "files": modules,
    "path": sys.path,
    "finders": [type(f).__module__ + "." + type(f).__qualname__ for f in sys.meta_path],
    "dist": str(importlib.metadata.distribution("fireloop").locate_file("")),
}))
"""


def _source_files() -> list[str]:
    """The project's files as a fresh clone plus the uncommitted work would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *PACKAGES, "pyproject.toml"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def _build_wheel(tmp_path: Path) -> tuple[Path, list[str]]:
    source = tmp_path / "src"
    files = _source_files()
    for name in [*files, "README.md"]:  # README: the project's `readme`
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    out = tmp_path / "wheel"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        cwd=tmp_path,
        check=True,
        timeout=TIMEOUT_S,
    )
    (wheel,) = out.glob("fireloop-*.whl")
    return wheel, files


def _clean_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies only: a plain path line (never an `import` line) to .venv's packages.
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=TIMEOUT_S,
    )
    return venv


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "VIRTUAL_ENV": str(tmp_path / "venv")}
    env.pop("PREFECT_API_URL", None)
    return env


def _run(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args}:\n{output[-4000:]}"
    return output


def test_the_wheel_holds_every_package_and_module(tmp_path: Path) -> None:
    wheel, files = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [name for name in files if "__pycache__" not in name and name != "pyproject.toml"]
    missing = sorted(name for name in sources if name not in names)
    assert missing == [], f"files of the packages left out of the wheel: {missing}"
    subpackages = {str(Path(name).parent) for name in sources if name.endswith("/__init__.py")}
    assert {"backend/trainer", "backend/serving", "backend/control", "backend/models"} <= (
        subpackages
    )


@pytest.mark.slow
def test_the_installed_wheel_runs_smoke_train_and_export(tmp_path: Path) -> None:
    wheel, _ = _build_wheel(tmp_path)
    venv = _clean_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = _environment(tmp_path)

    probe = json.loads(_run([venv / "bin" / "python", "-c", PROBE], outside, env))
    for name, file in probe["files"].items():
        assert Path(file).is_relative_to(venv), f"{name} imported from {file}"
    assert Path(probe["dist"]).is_relative_to(venv)
    assert not any("editable" in finder.lower() for finder in probe["finders"])
    # Only the new venv holds the project's packages: neither the repository nor .venv's
    # editable install is on the path (the `.pth` line adds .venv's third-party packages).
    holders = [p for p in probe["path"] if p and (Path(p) / "flows" / "__init__.py").is_file()]
    assert [Path(p) for p in holders] == [
        venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    ]
    assert any(Path(p) == Path(sysconfig.get_paths()["purelib"]) for p in probe["path"])

    fireloop = venv / "bin" / "fireloop"
    smoke = _run([fireloop, "demo", "--smoke"], outside, env)
    assert "JOB_STATE_DELETED" in smoke

    fields = ["max_steps=2", "batch_size=4", "checkpoint_every=2", "eval_every=0"]
    fields += ["sample_eval=false", "run_name=packaged", "flow_retries=0"]
    sets = [part for field in fields for part in ("--set", field)]
    _run([fireloop, "run", "sft", *sets], outside, env)
    _run([fireloop, "export", "runs/packaged", "--out", "exported"], outside, env)
    exported = outside / "exported"
    assert (exported / "config.json").is_file()
    assert (exported / "model.safetensors").stat().st_size > 0
