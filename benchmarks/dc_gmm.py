"""DC-Solver on the class-conditional Gaussian mixture (exact model, exact ODE reference).

    python benchmarks/dc_gmm.py            # a few minutes on one CPU thread; rerun to resume

DC vs UniPC-2 at guidance 2 (the testbed's default) and NFE 5, 6, 8, 10 with ratios
calibrated on 10 and on 128 samples (seeds 100000..), DC on DPM-Solver++ at NFE 5, and
how heavy-tailed the per-sample errors are (median and the share of the top 1% of samples).
Results: ``benchmarks/results/dc/gmm.json`` and ``gmm.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import CALIBRATION_SEED, Bench, fmt  # noqa: E402

from fewstep.infra.io import atomic_write_bytes  # noqa: E402
from fewstep.eval.testbeds import GMMTestbed  # noqa: E402

GUIDANCE = 2.0
NFES = (5, 6, 8, 10)
SIZES = (10, 128)


def main() -> None:
    b = Bench.from_command_line(__doc__, GMMTestbed, "gmm", eval_samples=1000)
    res = lambda key, solver, options, nfe: b.unit(key, lambda: b.evaluate(solver, options, nfe, GUIDANCE, key))  # noqa: E731
    rows = {}
    for n in NFES:
        rows[n] = {"unipc": res(f"unipc/nfe{n}", "unipc", {}, n)}
        for size in SIZES:
            r = b.calibrate(n, GUIDANCE, num_samples=size)
            rows[n][size] = res(f"dc/nfe{n}/calib{size}", "dc", {"ratios": r}, n)
            rows[n][f"calib{size}"] = r.meta.extra
        r = b.calibrate(n, GUIDANCE, num_samples=SIZES[-1], exact_targets=True)
        rows[n]["exact"] = res(f"dc/nfe{n}/calib{SIZES[-1]}-exact", "dc", {"ratios": r}, n)
        rows[n]["calib-exact"] = r.meta.extra
    r = b.calibrate(5, GUIDANCE, solver="dc_dpmpp")
    dpmpp = res("dpmpp/nfe5", "dpmpp", {}, 5), res("dc_dpmpp/nfe5", "dc_dpmpp", {"ratios": r}, 5)

    lines = [f"# DC-Solver on the class-conditional GMM (guidance {GUIDANCE:g}; {b.n} evaluation samples, seeds "
             f"0..{b.n - 1}; calibration on seeds >= {CALIBRATION_SEED}; exact ODE reference)", "",
             "| NFE | UniPC-2 MSE | DC, 10 calib. samples | DC, 128 | DC, 128, exact-ODE targets | calibration-set "
             "MSE, uncompensated -> DC (10 / 128 / 128 exact) |", "|---|---:|---:|---:|---:|---|"]
    for n in NFES:
        u = rows[n]["unipc"]["mse"]
        cells = [f"{fmt(rows[n][s]['mse'])} ({rows[n][s]['mse'] / u:.2f}x)" for s in (*SIZES, "exact")]
        cal = " / ".join(f"{fmt(rows[n][k]['loss_uncompensated'])} -> {fmt(rows[n][k]['loss'])}"
                         for k in (*(f"calib{s}" for s in SIZES), "calib-exact"))
        lines.append(f"| {n} | {fmt(u)} | " + " | ".join(cells) + f" | {cal} |")
    lines += ["", "Per-sample errors ||x - x_ref||^2 / D, UniPC-2 -> DC (128 calibration samples): median, share of "
              "the total carried by the worst 1% of samples, samples DC improves, and the largest increase", "",
              "| NFE | median | worst-1% share | samples improved | largest increase |", "|---|---:|---:|---:|---:|"]
    for n in NFES:
        u, d = rows[n]["unipc"], rows[n][SIZES[-1]]
        eu, ed = b.errors(f"unipc/nfe{n}"), b.errors(f"dc/nfe{n}/calib{SIZES[-1]}")
        lines.append(f"| {n} | {fmt(u['mse_median'])} -> {fmt(d['mse_median'])} | {100 * u['mse_top1pct_share']:.0f}% -> "
                     f"{100 * d['mse_top1pct_share']:.0f}% | {100 * (ed < eu).double().mean():.0f}% | "
                     f"{fmt((ed - eu).max().item())} |")
    a, d = dpmpp
    lines += ["", f"DC on DPM-Solver++(2M), NFE 5: {fmt(a['mse'])} -> {fmt(d['mse'])} ({d['mse'] / a['mse']:.2f}x); "
              f"FD {a['fd']:.4f} -> {d['fd']:.4f}."]
    atomic_write_bytes(b.results_dir / "gmm.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
