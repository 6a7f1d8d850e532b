#!/usr/bin/env bash
# The README's main table: `fewstep compare` with its defaults on the built-in digits model, from scratch
# (an empty reference cache, so the 200-step reference is part of the time), timed.
#   bash benchmarks/compare_digits.sh            # ~10 min on 2 CPU cores (see timing.txt)
# Extra arguments go to `fewstep compare`. The timings in the README are those of timing.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/compare-digits
rm -rf "$out"  # a fresh run, not a resume of an older configuration
FEWSTEP_CACHE=$(mktemp -d)
export FEWSTEP_CACHE
trap 'rm -rf "$FEWSTEP_CACHE"' EXIT
load_before=$(cut -d' ' -f1 /proc/loadavg)
start=$(date +%s)
fewstep compare --out "$out" --no-progress "$@"
seconds=$(( $(date +%s) - start ))
cat > "$out/timing.txt" <<TIMING
fewstep compare --out $out --no-progress $*
wall time: ${seconds} s ($(( seconds / 60 )) min $(( seconds % 60 )) s), including start-up and the reference
machine: $(nproc --all) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), --threads default
1-minute load average before / after: ${load_before} / $(cut -d' ' -f1 /proc/loadavg) (other jobs on the machine)
TIMING
cat "$out/timing.txt"
