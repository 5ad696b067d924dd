#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine whose python3 already holds torch, timm,
# accelerate, typer, rich, safetensors and matplotlib. Carried beside the tree: .whl/site (the
# pyautoattack package), .fmnist (the four Fashion-MNIST IDX files). The calibration it writes
# (calibration_cuda_train.json) merges into moeify/nn/executors/calibration.json under "devices".
# At most 8 files come back from a lent machine: the steps write 7 into $OUT and the log.
# Writes the log and JSON results to $OUT (default: ./device-out). Steps run most important first,
# each within what is left of BUDGET_S seconds (default 420: a lent machine's 15 minutes hold its
# start-up, this run and a short rerun); a step that no longer fits is logged as skipped.
# Prepare the carried folders here (both ignored through .git/info/exclude):
#   mkdir -p .whl/site && cp -r .venv/lib/python3*/site-packages/pyautoattack .whl/site/ \
#     && rm -rf .whl/site/pyautoattack/examples      # its example weights alone are 44 MB
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/* .fmnist/
set -u
OUT=${OUT:-device-out}
# only a few files come back from a lent machine: the quickstart run and its reports stay in RUNS
RUNS=${RUNS:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.whl/site" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/* /usr/share/datasets/fashion-mnist/ 2>/dev/null
step() { echo; echo "=== $* ($(date +%T), $(( END - $(date +%s) )) s left)"; }
END=$(( $(date +%s) + ${BUDGET_S:-420} ))
# run CAP CMD...: CMD under a timeout of CAP seconds or what is left of the budget, whichever is less
run() {
  local cap=$1 left=$(( END - $(date +%s) )); shift
  if (( left < 20 )); then echo "skipped (budget spent): $*"; return; fi
  timeout $(( cap < left ? cap : left )) "$@"
}
{
  step environment
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
  nproc

  step CUDA tests, the static strategy compiled as one graph and captured in CUDA graphs
  run 100 python3 -m pytest -q -p no:cacheprovider tests/test_execution.py tests/test_compile.py -k "cuda or nan or cached or torch_compile or auto or refuses" -rs

  # measured in the sixteenth session (docs/benchmarks.md, "CUDA (H200)"): eager at batch 1-1024, the
  # eager training steps, the calibration, the gathered path compiled at batch 1. Still owed, first:
  step "eval compiled into CUDA graphs, static (the masked math on CUDA), one call per batch so each keeps its result"
  for b in 1 16 256 1024; do
    run 80 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --batch $b --repeats 9 --device cuda --compile-mode reduce-overhead --strategies static --json "$OUT/graphs_b$b.json"
  done

  step training step compiled into CUDA graphs, paper scope, the training target of the issue
  run 150 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --scope paper --batch 256 --mode train --repeats 5 --device cuda --compile-mode reduce-overhead --strategies static --json "$OUT/train_graphs.json"

  step "eager training step, paper scope, masked math (the seventeenth session cut its calls; the sixteenth read masked 0.39x)"
  run 60 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --scope paper --batch 256 --mode train --repeats 5 --device cuda --strategies masked,static

  step robust training step compiled: dense / S-Dense / MoE TRADES and AdvMoE, width 64
  run 180 python3 -m moeify bench-train --recipe quickstart --set model.kwargs.width=64 --set train.compile=true --repeats 5 --device cuda

  step "calibration of training calls for auto (the shipped table has eval points only on CUDA)"
  run 120 python3 -m moeify bench --calibrate "$OUT/calibration_cuda_train.json" --mode train --batch 16,64,256 --repeats 3 --device cuda

  step bench default scope, eval, eager, auto from the shipped table
  run 90 python3 -m moeify bench resnet18 --experts 2 --top-k 1 --batch 1,16,256,1024 --repeats 9 --device cuda --json "$OUT/cuda_default.json"

  step evaluate eager vs --compile: a one-epoch quickstart model, PGD on 1000 images, the same per-example results
  run 90 python3 -m moeify robustify --recipe quickstart --set train.epochs=1 --out "$RUNS/qs1"
  run 90 python3 -m moeify evaluate "$RUNS/qs1" --n 1000 --attacks pgd --out "$RUNS/qs1-eval"
  run 150 python3 -m moeify evaluate "$RUNS/qs1" --n 1000 --attacks pgd --compile --out "$RUNS/qs1-eval-compiled"
  [ -f "$RUNS/qs1-eval-compiled/report.json" ] && python3 -c "import json; a, b = (json.load(open(f'$RUNS/{d}/report.json')) for d in ('qs1-eval', 'qs1-eval-compiled')); print('timings eager', a['timings_s'], 'compiled', b['timings_s'], 'same per-example results:', a['per_example'] == b['per_example'])"
  step done
} 2>&1 | tee "$OUT/log.txt"
