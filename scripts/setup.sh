#!/usr/bin/env bash
# Set up moeify in ./.venv: PyTorch first (pinned to the releases this project is tested with),
# then moeify itself with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test]'
