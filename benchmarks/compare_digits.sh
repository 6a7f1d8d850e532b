#!/usr/bin/env bash
# The README's main table: `fewstep compare` with its defaults on the built-in digits model.
set -euo pipefail
cd "$(dirname "$0")/.."
fewstep compare --out benchmarks/results/compare-digits --no-progress "$@"
