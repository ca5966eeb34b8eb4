"""The compatibility harness's own rules: a built virtualenv is reused only for its exact
requirement list, an unreachable registry skips, and a real install failure fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat import support


def test_a_ready_virtualenv_is_reused_for_its_exact_requirements_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRELOOP_COMPAT_VENVS", str(tmp_path))
    requirements = ["tinker==0.38.0"]
    # A finished build, as an earlier run would have left it (nothing is installed here).
    built = support.venv_root() / f"tinker-{support.requirements_digest(requirements)}"
    built.mkdir(parents=True)
    (built / "READY").write_text(support.ready_text(requirements))

    assert support.compat_python("tinker", requirements) == built / "bin" / "python"
    other = support.requirements_digest(["tinker==0.23.0"])
    assert other != support.requirements_digest(requirements)


def test_an_unreachable_registry_skips_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRELOOP_COMPAT_VENVS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    # Port 9 on loopback: nothing listens, so the connection is refused at once.
    with pytest.raises(pytest.skip.Exception, match="registry unreachable"):
        support.compat_python("unreachable", ["pkg @ http://127.0.0.1:9/pkg-1.0.tar.gz"])
    assert list(tmp_path.iterdir()) == []


def test_a_broken_requirement_fails_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRELOOP_COMPAT_VENVS", str(tmp_path / "venvs"))
    missing = tmp_path / "no-such-project"
    with pytest.raises(AssertionError, match="failed"):
        support.compat_python("broken", [str(missing)])
    assert list((tmp_path / "venvs").iterdir()) == []
