#!/usr/bin/env bash
# Quality bar of the shipped digits model: classifier accuracy and digits-FD of 1000 CFG samples
# (100 per class) from a 100-step run, against the FD between two halves of the real data.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/digits_quality.txt
{
  echo "# python -m fewstep.zoo.digits evaluate --threads 1 --nfe 100 --n 1000 (DPM-Solver++ 2M, default guidance)"
  python -m fewstep.zoo.digits evaluate --threads 1 --nfe 100 --n 1000
  python - <<'PY'
from fewstep.zoo.digits import load_digits_classifier, load_digits_data
from fewstep.zoo.digits_train import classifier_accuracy

images, labels = load_digits_data("test")
print(f"classifier accuracy on the held-out test split: {classifier_accuracy(load_digits_classifier(), images, labels):.4f}")
PY
} | tee "$out.tmp"
mv "$out.tmp" "$out"
