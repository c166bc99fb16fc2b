#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: the Fashion-MNIST package and the project (editable, with test deps).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e ".[dev]"
