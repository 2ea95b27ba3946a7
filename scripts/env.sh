# Sourced by scripts/demo.sh and scripts/test.sh: create .venv on first use, then activate it.
# torch/torchvision are pinned to the releases this project is tested with.
# TOPK_VENV may name another environment: one these scripts created is kept up to date; any other is
# only activated, never modified (install the project into it yourself: pip install -e ".[all]").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOPK_VENV:-$root/.venv}"
owned="$venv/.topk-created"
stamp="$venv/.topk-installed"
if [ -d "$venv" ] && [ ! -f "$owned" ]; then
  echo "[env] using $venv as it is (not created by these scripts, so never modified)" >&2
else
  if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    echo "[env] installing into $venv (first run takes a few minutes)" >&2
    [ -d "$venv" ] || { python3 -m venv "$venv" && touch "$owned"; }
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    "$venv/bin/python" -m pip install -q -e "$root[all]"
    touch "$stamp"
  fi
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
cd "$root"
