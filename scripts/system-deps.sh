#!/usr/bin/env bash
# Debian packages the tests and benchmarks need. Installs only what is missing, so a machine
# that already has them pays nothing. Needs root (or passwordless sudo) on a fresh machine.
set -euo pipefail

# command -> Debian package
declare -A wanted=(
  [openssl]=openssl
  [haproxy]=haproxy
  [wrk]=wrk
  [promtool]=prometheus
  [chromium]=chromium
  # mypyc compiles the data plane's hot path (scripts/native.py): a C compiler and Python's headers.
  [gcc]=gcc
)

missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
python="${PYTHON:-python3.11}"
if command -v "$python" >/dev/null 2>&1 && ! "$python" -c \
  'import os, sysconfig; raise SystemExit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then
  missing+=("$(basename "$python")-dev")
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
