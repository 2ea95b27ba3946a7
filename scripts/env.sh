# Sourced by scripts/demo.sh and scripts/test.sh: create .venv on first use, then activate it.
# torch/torchvision are pinned to the releases this project is tested with.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOPK_VENV:-$root/.venv}"
stamp="$venv/.topk-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "[env] installing into $venv (first run takes a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/python" -m pip install -q -e "$root[all]"
  touch "$stamp"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$root"
