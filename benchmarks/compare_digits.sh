#!/usr/bin/env bash
# The README's main table: `fewstep compare` with its defaults on the built-in digits model.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf benchmarks/results/compare-digits  # a fresh run, not a resume of an older configuration
fewstep compare --out benchmarks/results/compare-digits --no-progress "$@"
