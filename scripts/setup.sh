#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (re-running it is quick and safe):
#  1. the Debian package dataset-fashion-mnist (the embedded default's real data, read offline);
#  2. a virtual environment .venv in this folder with this project, editable, and its test dependencies.
# pip installs into .venv only, never into the system Python, so it works where the system refuses
# (PEP 668, "externally-managed-environment"). The environment sees the system's packages
# (--system-site-packages): an installed torch is reused, not downloaded again.
# PYTHON=/path/to/python3 picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt_install dataset-fashion-mnist
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install "python3-venv"  # Debian ships venv's pip bootstrap separately
    fi
    "$PYTHON" -m venv --system-site-packages .venv
fi
# (re)install when pyproject.toml changed since the last set-up
stamp=.venv/.timm-lambda-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    .venv/bin/python -m pip install -q -e ".[dev]"
    cp pyproject.toml "$stamp"
fi
