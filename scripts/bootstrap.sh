#!/usr/bin/env bash
# Make this checkout runnable on a fresh machine: a virtualenv with the package and
# its dev extras, and a Chromium for the runners. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TB_VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_root() { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=""
apt_install() {
  command -v apt-get >/dev/null && need_root || return 1
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "TrafficBuster needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)." >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv || { echo "python3 -m venv failed: install your distribution's venv package" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV"
  fi
fi

stamp="$VENV/.tb-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing trafficbuster[dev] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

# A browser for the runners: Debian's chromium, or Playwright's own where it can download.
have_browser() {
  "$VENV/bin/python" - <<'PY'
import sys
from agents.browser import find_chromium, managed_chromium_installed
sys.exit(0 if (find_chromium() or managed_chromium_installed()) else 1)
PY
}
if ! have_browser; then
  echo "==> installing Chromium"
  apt_install chromium || apt_install chromium-browser || "$VENV/bin/python" -m playwright install --with-deps chromium || true
  if ! have_browser; then
    echo "No Chromium found. Install one: 'apt-get install chromium' (Debian/Ubuntu)" >&2
    echo "or 'python -m playwright install --with-deps chromium', then retry." >&2
    exit 1
  fi
fi

# A virtual display for headed browsers where there is none (./dev up --headed,
# TB_HEADED=1; CI runs the headed test, so it sets it too).
if [ "${TB_HEADED:-}" = 1 ] && ! command -v Xvfb >/dev/null; then
  echo "==> installing Xvfb"
  apt_install xvfb || { echo "Xvfb is needed for --headed without a display: install the 'xvfb' package" >&2; exit 1; }
fi
