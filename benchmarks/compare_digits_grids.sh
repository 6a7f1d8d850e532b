#!/usr/bin/env bash
# The README's second `fewstep compare` example (log-SNR grid, NFE 4 6 8) as written, and the same
# solvers on the default linspace grid, to show where a grid is poor.
#   bash benchmarks/compare_digits_grids.sh      # ~15-25 min on 2 CPU cores (two 200-step references)
set -euo pipefail
cd "$(dirname "$0")/.."
FEWSTEP_CACHE=$(mktemp -d)
export FEWSTEP_CACHE
trap 'rm -rf "$FEWSTEP_CACHE"' EXIT
for spacing in logsnr linspace; do
  out=benchmarks/results/compare-digits-$spacing
  rm -rf "$out"
  fewstep compare --solvers ddim unipc:order=3,variant=bh1 dpmpp:order=3 --nfe 4 6 8 --spacing $spacing \
    --out "$out" --no-progress
done
