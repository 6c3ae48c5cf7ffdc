# Sourced by scripts/demo and scripts/test: make .venv if missing and install qvl with its extras.
# Torch is pinned to the release this project's machines keep on disk, so no multi-GB download.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.qvl-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing qvl into .venv (first run takes a minute or two)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==${QVL_TORCH:-2.14.1}" "torchvision==${QVL_TORCHVISION:-0.29.1}" \
      2>&1 | grep -v '^WARNING: Location' || true
  fi
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, transformers, zmq, qvl.protocol, qvl.supervisor, qvl.worker"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
