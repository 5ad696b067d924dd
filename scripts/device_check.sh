#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine whose python3 already holds torch, timm,
# accelerate, typer, rich, safetensors and matplotlib. Carried beside the tree: .whl/site (the
# pyautoattack package), .fmnist (the four Fashion-MNIST IDX files). The calibration it writes
# (calibration_cuda.json) merges into moeify/nn/executors/calibration.json under "devices".
# Writes the log and JSON results to $OUT (default: ./device-out). Steps run most important first.
# Prepare the carried folders here (both ignored through .git/info/exclude):
#   mkdir -p .whl/site && cp -r .venv/lib/python3*/site-packages/pyautoattack .whl/site/ \
#     && rm -rf .whl/site/pyautoattack/examples      # its example weights alone are 44 MB
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/* .fmnist/
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

  step CUDA tests and the static strategy compiled as one graph
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_execution.py -k "cuda or nan or cached or compile or auto" -rs

  step calibration for auto: every strategy on the reference models
  timeout 150 python3 -m moeify bench --calibrate "$OUT/calibration_cuda.json" --batch 1,16,64,256,1024 --repeats 5 --device cuda

  step bench default scope, eval, eager and compiled
  timeout 90 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --batch 1,16,256,1024 --repeats 9 --device cuda --json "$OUT/cuda_default.json"
  timeout 150 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --batch 1,256 --repeats 9 --device cuda --compile --json "$OUT/cuda_default_compiled.json"

  step bench the paper CIFAR ResNet-18, BatchNorm folded on every side
  timeout 60 python3 -m moeify bench cifar_resnet18 --scope paper --experts 2 --top-k 1 --batch 1,128,1024 --repeats 9 --device cuda --fold-bn --json "$OUT/cuda_paper_folded.json"

  step bench paper scope, training step
  timeout 60 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --scope paper --batch 256 --mode train --repeats 5 --device cuda --json "$OUT/cuda_train.json"

  step robust training step: dense / S-Dense / MoE TRADES and AdvMoE, width 64, eager and compiled
  timeout 90 python3 -m moeify bench-train --recipe quickstart --set model.kwargs.width=64 --repeats 5 --device cuda
  timeout 180 python3 -m moeify bench-train --recipe quickstart --set model.kwargs.width=64 --set train.compile=true --repeats 5 --device cuda

  step bench sweep
  timeout 90 python3 -m moeify bench resnet18 --sweep --batch 16,256 --repeats 5 --device cuda --json "$OUT/cuda_sweep.json"

  step evaluate eager vs --compile: a one-epoch quickstart model, PGD on 1000 images, the same per-example results
  timeout 90 python3 -m moeify robustify --recipe quickstart --set train.epochs=1 --out "$OUT/qs1"
  timeout 90 python3 -m moeify evaluate "$OUT/qs1" --n 1000 --attacks pgd --out "$OUT/qs1-eval"
  timeout 150 python3 -m moeify evaluate "$OUT/qs1" --n 1000 --attacks pgd --compile --out "$OUT/qs1-eval-compiled"
  python3 -c "import json; a, b = (json.load(open(f'$OUT/{d}/report.json')) for d in ('qs1-eval', 'qs1-eval-compiled')); print('timings eager', a['timings_s'], 'compiled', b['timings_s'], 'same per-example results:', a['per_example'] == b['per_example'])"
  step done
} 2>&1 | tee "$OUT/log.txt"
