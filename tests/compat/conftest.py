"""Fixtures of the compatibility tests: a `fireloop backend` per test module.

A module names the key its clients need with a `BACKEND_API_KEY` attribute (stock tinker clients
only send `tml-` keys); without one, the backend gets a fresh `fw-` key as a user's would be.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.compat.support import Backend, fireloop_backend


@pytest.fixture(scope="module")
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """`fireloop backend` in a subprocess for the whole test module."""
    api_key = getattr(request.module, "BACKEND_API_KEY", None) or f"fw-compat-{uuid.uuid4().hex}"
    cwd = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with fireloop_backend(cwd, api_key) as running:
        yield running
