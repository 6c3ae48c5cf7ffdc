# Sourced by scripts/demo and scripts/test: make .venv if missing and install qvl with its extras.
# Torch is pinned to the release this project's machines keep on disk, so no multi-GB download.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.qvl-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing qvl and its extras into .venv (log: .venv/install.log)"
  pip=(.venv/bin/python -m pip install --disable-pip-version-check)
  {
    .venv/bin/python -c "import torch, torchvision" 2>/dev/null \
      || "${pip[@]}" "torch==${QVL_TORCH:-2.14.1}" "torchvision==${QVL_TORCHVISION:-0.29.1}"
    "${pip[@]}" -e ".[dev]"
    .venv/bin/python -c "import torch, transformers, zmq, qvl.protocol, qvl.supervisor, qvl.worker"
  } > .venv/install.log 2>&1 || { tail -n 30 .venv/install.log; echo "install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
