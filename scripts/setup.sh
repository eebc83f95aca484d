#!/usr/bin/env bash
# Set up reelfarm on a fresh Debian machine with Python 3.11: system packages, a venv,
# the CPU torch build first (a plain `torch` requirement would pull a multi-GB CUDA build),
# then reelfarm with its workers and dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Mooncake's transfer engine links against libibverbs even for its TCP transport.
if ! ldconfig -p | grep -q 'libibverbs.so.1'; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libibverbs1
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[workers,dev]"
touch "$VENV/.reelfarm-installed"
