"""The platform starts without torch: only a replica that loads weights imports it."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_platform_does_not_import_torch() -> None:
    code = "import sys, backend.platform; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
