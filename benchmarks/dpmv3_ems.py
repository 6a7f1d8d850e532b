"""Compute, with the CLI, every EMS the DPM-Solver-v3 benchmark uses, and time each computation.

    python benchmarks/dpmv3_ems.py [NAME ...]          # default: all, skipping finished files

Writes the EMS files to runs/dpmv3/ems/NAME.safetensors and the wall times to
benchmarks/results/dpmv3_ems.json. One torch thread per run; a rerun resumes an interrupted
computation (the CLI keeps finished chunks) and skips finished ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMS_DIR = ROOT / "runs" / "dpmv3" / "ems"
RESULTS = ROOT / "benchmarks" / "results" / "dpmv3_ems.json"

DIGITS = ["--model", "digits", "--batch-size", "128"]
GMM = ["--model", "gmm", "--batch-size", "256"]
# digits: K = 64 datapoints (one batch), N = 50, sized for a shared 2-core machine (the K = 256, N = 100 files
# of earlier runs took 8 minutes per 8 grid points there); the K / N study below covers larger ones.
# Batch 16: four blocks, so `torchrun --nproc_per_node 4 -m fewstep.cli ems compute ARGS` can split one over
# processes (how these were made there; the file is the one a single process makes).
DIGITS_MAIN = DIGITS[:2] + ["--batch-size", "16", "--n-grid", "50", "--n-data", "64"]
RUNS = {
    # the EMS behind the MSE tables (the paper uses K = 1024)
    "digits-uncond": DIGITS_MAIN,
    "digits-cfg3": DIGITS_MAIN + ["--guidance", "3"],
    "digits-cfg7.5": DIGITS_MAIN + ["--guidance", "7.5"],
    "gmm-uncond": GMM + ["--n-grid", "200", "--n-data", "1024"],
    "gmm-cfg2": GMM + ["--n-grid", "200", "--n-data", "1024", "--guidance", "2"],
    # how the result varies with K and N (digits, unconditional)
    **{f"digits-uncond-K{k}-N100": DIGITS + ["--n-grid", "100", "--n-data", str(k)] for k in (128, 256, 512)},
    **{f"digits-cfg{w}-K256-N100": DIGITS + ["--n-grid", "100", "--n-data", "256", "--guidance", w] for w in ("3", "7.5")},
    **{f"digits-uncond-N{n}": DIGITS_MAIN[:-4] + ["--n-grid", str(n), "--n-data", "64"] for n in (25, 100)},
    # the same on the exact mixture, where it is cheap
    **{f"gmm-uncond-K{k}": GMM + ["--n-grid", "200", "--n-data", str(k)] for k in (64, 256)},
    **{f"gmm-uncond-N{n}": GMM + ["--n-grid", str(n), "--n-data", "1024"] for n in (25, 50, 100, 400)},
    # the time derivative: forward AD in t between the integer timesteps the digits UNet was trained on
    # (format 1's only way) against the finite difference every digits EMS above uses (--time-derivative auto)
    "digits-uncond-jvp": DIGITS_MAIN + ["--time-derivative", "jvp"],
    "gmm-uncond-fd": GMM + ["--n-grid", "200", "--n-data", "1024", "--time-derivative", "finite_difference"],
    # EMS data: the guided model's own samples instead of the real digits
    "digits-cfg7.5-samples": DIGITS + ["--n-grid", "100", "--n-data", "256", "--guidance", "7.5", "--data", "samples"],
}


def main(names: list[str]) -> None:
    from fewstep.cli import main as cli
    from fewstep.infra.io import lock_directory, read_json, write_json

    torch.set_num_threads(1)
    EMS_DIR.mkdir(parents=True, exist_ok=True)
    for name in names or list(RUNS):
        out = EMS_DIR / f"{name}.safetensors"
        if out.exists() and name in (read_json(RESULTS) if RESULTS.exists() else {}):
            continue
        resumed = (EMS_DIR / f"{name}.safetensors.parts").exists()  # then the time covers the rest only
        start, cpu = time.perf_counter(), time.process_time()
        status = cli(["ems", "compute", *RUNS[name], "--out", str(out), "--threads", "1", "--no-progress"])
        if status:
            raise SystemExit(f"{name}: fewstep ems compute failed with status {status}")
        # CPU time is the comparable number on a shared machine (one thread: it is the compute time)
        entry = {"args": RUNS[name], "seconds": round(time.perf_counter() - start, 1),
                 "cpu_seconds": round(time.process_time() - cpu, 1), "threads": 1, "resumed": resumed}
        with lock_directory(RESULTS.parent, "another benchmarks/dpmv3_ems.py"):  # several may run at once
            results = read_json(RESULTS) if RESULTS.exists() else {}
            results[name] = entry
            write_json(RESULTS, dict(sorted(results.items())))
        print(json.dumps({name: entry}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
