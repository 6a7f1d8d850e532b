"""Empirical convergence orders of DPM-Solver-v3 on the analytic mixture, with its computed EMS.

    python benchmarks/dpmv3_convergence.py > benchmarks/results/dpmv3_convergence.md

The setting of benchmarks/convergence_orders.py (logSNR grid ending at t_min, lower_order_final=False,
RMS error at the final time against the exact ODE solution); the EMS is computed once for the
mixture (N = 1600, so that its quadrature error stays below the solver error; K = 256; seeds 100000+).
"""

import time

import torch

import fewstep
from fewstep.eval.convergence import ConvergenceStudy, fitted_order

NFES = [20, 28, 40, 56, 80]
METHODS = [
    ("dpmpp(order=3, third_order=taylor)", "dpmpp", {"order": 3, "third_order": "taylor"}),
    ("unipc(order=3)", "unipc", {"order": 3}),
    ("dpmv3(order=1, corrector=False)", "dpmv3", {"order": 1, "corrector": False}),
    ("dpmv3(order=2, corrector=False)", "dpmv3", {"order": 2, "corrector": False}),
    ("dpmv3(order=3, corrector=False)", "dpmv3", {"order": 3, "corrector": False}),
    ("dpmv3(order=2) (pseudo-order corrector 3)", "dpmv3", {"order": 2}),
    ("dpmv3(order=3) (pseudo-order corrector 4)", "dpmv3", {"order": 3}),
    ("dpmv3(order=3, corrector_pseudo=False) (corrector 3)", "dpmv3", {"order": 3, "corrector_pseudo": False}),
    ("dpmv3(order=3, degenerate=True, corrector=False)", "dpmv3", {"order": 3, "degenerate": True, "corrector": False}),
]


def main() -> None:
    torch.set_num_threads(1)
    study = ConvergenceStudy()
    mix = study.mixture
    start = time.process_time()
    ems = fewstep.compute_ems(study.model, lambda i: mix.sample(len(i), torch.Generator().manual_seed(100_000 + int(i[0]))),
                              "linear", n_grid=1600, n_data=256, batch_size=256, progress=False)
    print(f"VP (DDPM betas), eps; EMS N=1600, K=256 ({time.process_time() - start:.0f} CPU s). Fitted slope of "
          f"log RMS error vs log NFE over NFE {NFES}, logSNR grid, lower_order_final=False.\n")
    print("| solver | order | RMS error at NFE 20 | at NFE 80 |")
    print("|---|---:|---:|---:|")
    for label, solver, options in METHODS:
        extra = {"ems": ems} if solver == "dpmv3" else {}
        errs = study.errors(solver, NFES, lower_order_final=False, **extra, **options)
        print(f"| {label} | {fitted_order(NFES, errs):.2f} | {errs[0]:.1e} | {errs[-1]:.1e} |")


if __name__ == "__main__":
    main()
