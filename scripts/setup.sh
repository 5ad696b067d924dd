#!/usr/bin/env bash
# Set up moeify in ./.venv: PyTorch first (pinned to the releases this project is tested with),
# then moeify itself with its test extras, and the offline Fashion-MNIST (Debian's package
# dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist) the quickstart trains on.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "warning: could not install dataset-fashion-mnist; the quickstart needs Fashion-MNIST (see README)" >&2
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test]'
