"""Which `fewstep compare --threads` default is fastest for the digits run, on a quiet and on a loaded machine.

The work unit is what compare does for one (solver, NFE) pair: UniPC at NFE 5 on 500 digits
samples with CFG, in chunks of the testbed's batch size (and, for comparison, in one batch).
Load is simulated with busy-looping processes (one per core taken), since other jobs share
the machine. Settings are interleaved and repeated; the table reports medians.

    OMP_NUM_THREADS=1 python benchmarks/compare_threads.py      # ~3 min on 2 cores
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fewstep.eval.testbeds import DigitsTestbed

REPEATS = 3
SAMPLES = 500
OUT = Path(__file__).resolve().parent / "results" / "compare_threads.md"


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    bed = DigitsTestbed()
    x_T, cond = bed.initial_noise(SAMPLES, 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = [(threads, batch) for threads in (1, 2) for batch in (bed.batch_size, SAMPLES)]
    rows = []
    for load in (0, 1, 2):
        load_avg = os.getloadavg()[0]  # the machine's other jobs, before ours start
        hogs = _busy(load)
        try:
            times = {s: [] for s in settings}
            bed.generate("unipc", {}, 5, x_T[:50], cond[:50], 1.5, None)  # warm-up
            for _ in range(REPEATS):
                for threads, batch in settings:  # interleaved, so drifts in load hit every setting
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    for i in range(0, SAMPLES, batch):
                        bed.generate("unipc", {}, 5, x_T[i:i + batch], cond[i:i + batch], 1.5, None)
                    times[(threads, batch)].append(time.perf_counter() - start)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        for (threads, batch), ts in times.items():
            rows.append((load, load_avg, threads, batch, statistics.median(ts), min(ts), max(ts)))
            print(f"busy processes {load}: threads {threads}, batch {batch}: median {statistics.median(ts):.2f} s")
    lines = [
        f"# `fewstep compare --threads`: digits, UniPC NFE 5, {SAMPLES} samples, CFG 1.5",
        "",
        f"{cores} cores, torch {torch.__version__}; median (min-max) of {REPEATS} interleaved runs. "
        "'busy' = processes this script starts, each spinning one core, on top of whatever else runs "
        "(the 1-minute load average before they start).",
        "",
        "| busy processes | load average before | threads | batch | seconds |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {load} | {avg:.1f} | {t} | {b} | {med:.2f} ({lo:.2f}-{hi:.2f}) |"
          for load, avg, t, b, med, lo, hi in rows],
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/compare_threads.py`",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
