"""Robustify and evaluate from Python: a recipe with overrides, AdvMoE training, then the honest
evaluation (PGD, MoE-adaptive attacks, router/expert dissection) of the best checkpoint.

Run: python examples/robustify_and_evaluate.py [OUT_DIR] [--full]
Without --full it trains on a small Fashion-MNIST subset for a few steps (about a minute).
"""
import sys
import tempfile
from pathlib import Path


import moeify
from moeify.data import load_data, to_float
from moeify.evaluate import EvalConfig, evaluate
from moeify.recipes import load_recipe
from moeify.train import robustify

full = "--full" in sys.argv
args = [a for a in sys.argv[1:] if a != "--full"]
out = Path(args[0]) if args else Path(tempfile.mkdtemp()) / "run"

quick = [] if full else ["data.train_subset=512", "data.val_size=128", "data.test_subset=128", "train.epochs=1",
                         "train.max_steps_per_epoch=4", "eval.pgd_steps=5"]
recipe = load_recipe("quickstart", quick)
print(f"training {recipe.model.kind} {recipe.model.name} with {recipe.train.method} into {out}")
metrics = robustify(recipe, out)
print(f"test: clean {metrics['clean_accuracy']:.1%}, PGD-{recipe.eval.pgd_steps} {metrics['robust_accuracy']:.1%}")

model = moeify.load(out / "model.moe")  # the best checkpoint by validation robust accuracy
data = load_data("fashion-mnist", test_subset=1000 if full else 64)
x = to_float(data.test.tensors[0])
y = data.test.tensors[1]
attacks = ("pgd", "autoattack", "adaptive", "sweep") if full else ("pgd", "adaptive")
report = evaluate(model, x, y, EvalConfig(eps=recipe.attack.eps, attacks=attacks, square_queries=50 if not full else 1000,
                                          pgd_steps=20 if full else 5))
print(f"clean {report['clean_acc']:.1%}  PGD {report['pgd_acc']:.1%}  MoE-adaptive {report['adaptive_acc']:.1%}  "
      f"flip rate {report['flip_rate']:.1%}  RA-E {report['ra_e']:.1%}  RA-R {report['ra_r']:.1%}")
print(f"routes per layer: {[len(x['load']) for x in report['load_clean']]} experts, dead: "
      f"{sum(len(x['dead']) for x in report['load_clean'])}")
assert report["adaptive_acc"] <= report["pgd_acc"] <= report["clean_acc"]
