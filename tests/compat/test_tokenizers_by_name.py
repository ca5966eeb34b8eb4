"""`fireloop tokenizers`: clients that call `AutoTokenizer.from_pretrained("fireloop/tiny")`
offline find the local model's tokenizer in the Hugging Face cache it publishes to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fireloop.cli import app

LOOKUP = (
    "from transformers import AutoTokenizer\n"
    "print(AutoTokenizer.from_pretrained('fireloop/tiny').encode('abc='))\n"
)


def publish(hf_home: Path, *models: str) -> list[str]:
    result = CliRunner().invoke(app, ["tokenizers", *models, "--hf-home", str(hf_home)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_a_published_tokenizer_is_found_by_name_offline(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    (line,) = publish(hf_home, "fireloop/tiny")
    snapshot = Path(line.removeprefix("fireloop/tiny: "))
    repo = hf_home / "hub" / "models--fireloop--tiny"
    assert snapshot.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert not any(snapshot.glob("*.safetensors"))  # tokenizer files only, no weights

    # A fresh interpreter, as a client would be: HF reads HF_HOME and offline mode at import.
    env = os.environ | {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    lookup = subprocess.run(
        [sys.executable, "-c", LOOKUP], env=env, capture_output=True, text=True, timeout=120
    )
    assert lookup.returncode == 0, lookup.stderr[-4000:]
    assert lookup.stdout.strip().splitlines()[-1] == "[97, 98, 99, 61]"


def test_publishing_again_keeps_the_same_snapshot(tmp_path: Path) -> None:
    first = publish(tmp_path, "tiny")
    assert publish(tmp_path, "accounts/fireworks/models/tiny") == [
        first[0].replace("tiny:", "accounts/fireworks/models/tiny:", 1)
    ]
    assert len(list((tmp_path / "hub" / "models--fireloop--tiny" / "snapshots").iterdir())) == 1


def test_an_unknown_model_is_refused_by_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tokenizers", "nope", "--hf-home", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown base model 'nope'" in result.output
    assert not (tmp_path / "hub").exists()
