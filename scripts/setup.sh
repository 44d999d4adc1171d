#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (root, no venv): the apt packages that
# Xvfb and Qt need (only with --gui and only when missing), a .venv, torch==2.13.0 first
# (pinned, so that resolving the package's dependencies never pulls another torch; which
# build it is, CPU or CUDA, is up to pip's index: see the README), then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
GUI=0
EXTRAS=""
for arg in "$@"; do
  case "$arg" in
    --gui) GUI=1 ;;
    --testing) EXTRAS="[testing]" ;;
  esac
done

if [ "$GUI" = 1 ]; then
  pkgs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb-randr0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
  missing=""
  for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "setup: installing apt packages:$missing"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # Debian ships venv's pip bootstrap (ensurepip) in a package of its own
  if ! "$PY" -c "import ensurepip, venv" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing apt package python3-venv"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 first (the build pip's index gives; see README)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
fi
stamp=".venv/.napari-smear-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing napari-smear$EXTRAS (editable)"
  "$VPY" -m pip install -q -e ".$EXTRAS"
  touch "$stamp"
fi
