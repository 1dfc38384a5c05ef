#!/usr/bin/env bash
# Create .venv-tinker: a separate virtual environment holding a real Tinker-API server (SkyRL's
# skyrl-tx, JAX on CPU) and the `tinker` client SDK, used by the integration test of the
# `tinker` finetuning provider (tests/test_provider_tinker.py). skyrl-tx pins transformers<5,
# which conflicts with the training stack in .venv, hence a venv of its own.
# Idempotent: a venv that already imports both is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TINKER_VENV:-.venv-tinker}"
PY="${PYTHON:-python3}"

install_shim() {
    # The API server starts its engine through `uv run ...`; the shim runs it in this venv.
    install -m 0755 .ci/uv-shim "$VENV/bin/uv"
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import tx.tinker.api, tinker" >/dev/null 2>&1; then
    install_shim
    echo "setup-tinker: $VENV already has skyrl-tx and tinker $("$VENV/bin/python" -c 'import tinker; print(tinker.__version__)')"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch (which peft, a dependency of skyrl-tx, imports) first and at the CPU build, as in
# .ci/run: left to itself pip pulls several GB of CUDA packages.
if ! "$VENV/bin/pip" install --quiet torch==2.13.0; then
    "$VENV/bin/pip" install --quiet torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
fi
# The CPU wheel of jax (no [cuda] extra); tinker 0.13.1 is the newest SDK the 0.3.0 server
# answers (later SDKs first call a client_config endpoint it does not have).
"$VENV/bin/pip" install --quiet "skyrl-tx[tinker]==0.3.0" "jax>=0.8,<1.0" "flax>=0.12.2" \
    "optax>=0.2.5" "tinker==0.13.1"
install_shim
"$VENV/bin/python" -c "import tx.tinker.api, tinker, jax; print('setup-tinker: tinker', tinker.__version__, 'jax', jax.__version__, 'ready in $VENV')"
