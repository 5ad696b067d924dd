#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine whose python3 already holds torch, timm,
# accelerate, typer, rich, safetensors and matplotlib. Carried beside the tree: .whl/site (the
# pyautoattack package), .fmnist (the four Fashion-MNIST IDX files), runs/quickstart (a quickstart run).
# Writes the log and JSON results to $OUT (default: ./device-out). Steps run most important first.
# Prepare the carried folders here (both ignored through .git/info/exclude):
#   mkdir -p .whl/site && cp -r .venv/lib/python3*/site-packages/pyautoattack .whl/site/ \
#     && rm -rf .whl/site/pyautoattack/examples      # its example weights alone are 44 MB
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/* .fmnist/
#   a run folder: .venv/bin/moeify robustify --recipe quickstart --out runs/quickstart
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.whl/site" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/* /usr/share/datasets/fashion-mnist/ 2>/dev/null
step() { echo; echo "=== $* ($(date +%T))"; }
{
  step environment
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
  nproc

  step CUDA tests
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_execution.py -k "cuda or nan or cached" -rs

  step bench default scope, eval
  timeout 120 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --batch 1,16,64,256 --repeats 9 --device cuda --json "$OUT/cuda_default.json"

  step bench paper scope, eval
  timeout 90 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --scope paper --batch 16,64,256 --repeats 9 --device cuda --json "$OUT/cuda_paper.json"

  step bench paper scope, training step
  timeout 90 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --scope paper --batch 64 --mode train --repeats 5 --device cuda --json "$OUT/cuda_train.json"

  step evaluate quickstart, 1000 test images
  time timeout 240 python3 -m moeify evaluate runs/quickstart --n 1000 --out /tmp/eval-qs
  cp /tmp/eval-qs/report.json "$OUT/eval_report.json" 2>/dev/null

  step bench sweep
  timeout 120 python3 -m moeify bench resnet18 --sweep --batch 1,16,64 --repeats 5 --device cuda --json "$OUT/cuda_sweep.json"
  step quickstart training on the GPU
  time timeout 150 python3 -m moeify robustify --recipe quickstart --out /tmp/qs-gpu
  cp /tmp/qs-gpu/metrics.json "$OUT/qs_gpu_metrics.json" 2>/dev/null
  step done
} 2>&1 | tee "$OUT/log.txt"
