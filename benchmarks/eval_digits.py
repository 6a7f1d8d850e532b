"""README table: ``fewstep eval fid`` and ``fewstep eval mse`` on the built-in digits model, every registered solver.

    nice -n 10 python benchmarks/eval_digits.py [--num-samples 300] [--mse-num-samples N] [--nfe 5 6 8 10]
        [--tuned SOLVER:OPTION=FILE ...] [--resume]

Solvers come from the registry at run time, so the table grows as solvers land: each registered
solver runs with its defaults plus the variants listed in ``VARIANTS``; a solver that needs a
tuned file first (``fewstep.eval.runner.runnable_solvers``) is skipped with a note unless
``--tuned solver:option=FILE`` gives one. Runs ``fewstep eval`` as a user would (one process, one
thread, a fresh cache), then writes ``benchmarks/results/eval_digits.md`` / ``.json`` from the two
run folders ``benchmarks/results/eval-digits-{fid,mse}/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fewstep.eval.runner import runnable_solvers
from fewstep.samplers import list_solvers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Variants worth a row besides each solver's defaults (unknown solvers run with defaults only).
VARIANTS = {
    "dpmpp": ["dpmpp:order=3,third_order=taylor"],
    "unipc": ["unipc:variant=bh1", "unipc:order=3"],
}


def solver_specs(tuned: list[str]) -> tuple[list[str], list[str]]:
    """(specs to run, notes on skipped solvers); ``tuned``: full specs such as ``dc:ratios=FILE``."""
    runnable, skipped = runnable_solvers()
    given = {spec.partition(":")[0]: spec for spec in tuned}
    specs, notes = [], []
    for name in list_solvers():
        if name in runnable:
            specs += [name, *VARIANTS.get(name, [])]
        elif name in given:
            specs.append(given[name])
        else:
            notes.append(f"{name}: skipped, {skipped[name]}; rerun with --tuned {name}:OPTION=FILE")
    return specs, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--mse-num-samples", type=int, default=None, help="default: --num-samples")
    parser.add_argument("--resume", action="store_true", help="continue the run folders instead of starting afresh")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--reference-nfe", type=int, default=200)
    parser.add_argument("--tuned", nargs="*", default=[], metavar="SOLVER:OPTION=FILE",
                        help="specs of solvers that need a tuned file, e.g. dc:ratios=ratios.json")
    args = parser.parse_args()
    specs, notes = solver_specs(args.tuned)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--model", "digits", "--solver", *specs, "--nfe", *map(str, args.nfe), "--threads", "1", "--no-progress"]
    counts = {"fid": args.num_samples, "mse": args.mse_num_samples or args.num_samples}
    walls = {}
    with tempfile.TemporaryDirectory() as cache:
        for kind, extra in (("fid", ["--extractor", "digits", "--ref", "digits"]),
                            ("mse", ["--reference-nfe", str(args.reference_nfe)])):
            out = RESULTS / f"eval-digits-{kind}"
            if not args.resume:
                subprocess.run(["rm", "-rf", str(out)], check=True)  # a fresh run, not a resume
            cmd = ["fewstep", "eval", kind, *common, "--num-samples", str(counts[kind]), *extra, "--out", str(out),
                   "--cache-dir", cache]
            print(" ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            walls[kind] = (" ".join(cmd).replace(cache, "$TMPCACHE").replace(str(ROOT) + "/", ""),
                           time.perf_counter() - start)
    fid = json.loads((RESULTS / "eval-digits-fid" / "results.json").read_text())
    mse = json.loads((RESULTS / "eval-digits-mse" / "results.json").read_text())
    by_key = {(e["method"], e["nfe"]): e for e in mse["entries"]}
    rows = []
    for e in fid["entries"]:
        m = by_key[(e["method"], e["nfe"])]
        rows.append({"method": e["method"], "nfe": e["nfe"], "fd_digits": e["fd"], "mse": m["mse"],
                     "mse_ci95": m["mse_ci95"], "sampling_s": e["gen_s"], "samples_per_s": e["samples_per_s"],
                     "features_per_s": e["features_per_s"]})
    load = os.getloadavg()[0]
    summary = {"num_samples": counts, "resumed": args.resume, "guidance": fid["config"]["guidance"], "threads": 1,
               "commands": {k: v[0] for k, v in walls.items()}, "wall_s": {k: v[1] for k, v in walls.items()},
               "mse_reference": mse["reference"], "load_avg_1min_after": load, "skipped": notes, "rows": rows}
    (RESULTS / "eval_digits.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Built-in digits model, {counts['fid']} samples (FD) / {counts['mse']} samples (MSE) per solver and NFE "
        f"(sample i: seed i), guidance "
        f"{fid['config']['guidance']}, linspace grid, 1 process, 1 thread, CPU shared with other jobs "
        f"(1-min load {load:.1f} at the end). FD uses the digits classifier's 64-d features against the 1797 real "
        f"digits; MSE is to {mse['reference']['description']} from the same noise (± 95% CI).",
        "",
        "| solver | NFE | FD (digits) | MSE to reference | sampling time (s) | samples/s | features/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fd = "-" if r["fd_digits"] is None else f"{r['fd_digits']:.3f}"
        ms = "-" if r["mse"] is None else f"{r['mse']:.2e} ± {r['mse_ci95']:.1e}"
        sp = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.0f}"
        fp = "-" if r["features_per_s"] is None else f"{r['features_per_s']:.0f}"
        lines.append(f"| {r['method']} | {r['nfe']} | {fd} | {ms} | {r['sampling_s']:.2f} | {sp} | {fp} |")
    lines += ["", *(f"- {n}" for n in notes),
              *(f"- `{cmd}`: {wall:.0f} s wall (start-up, reference and report included"
                f"{'; this invocation only, it resumed an earlier one' if args.resume else ''})"
                for cmd, wall in walls.values()), ""]
    (RESULTS / "eval_digits.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
