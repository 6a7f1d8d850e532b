"""Empirical convergence orders of every solver on the analytic Gaussian mixture.

    python benchmarks/convergence_orders.py > benchmarks/results/convergence_orders.md
"""

import torch

from fewstep.eval.convergence import ConvergenceStudy, fitted_order

NFES = [20, 28, 40, 56, 80]
METHODS = [
    ("ddim", {}),
    ("dpmpp", {"order": 1}),
    ("dpmpp", {"order": 2}),
    ("dpmpp", {"order": 2, "variant": "heun"}),
    ("dpmpp", {"order": 3}),
    ("dpmpp", {"order": 3, "third_order": "taylor"}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 3, "variant": "bh1"}),
    ("unipc", {"order": 3, "corrector": False}),
]
CASES = {
    "VP (DDPM betas), eps": dict(schedule="linear", prediction="epsilon"),
    "flow matching, velocity": dict(schedule="flow", prediction="flow", t_start=0.999, t_end=0.002),
}


def main() -> None:
    torch.set_num_threads(1)
    studies = {name: ConvergenceStudy(**kw) for name, kw in CASES.items()}
    print(f"Fitted slope of log RMS error vs log NFE over NFE {NFES}, logSNR grid, lower_order_final=False.\n")
    print("| solver | " + " | ".join(studies) + " | RMS error at NFE 20 (VP) |")
    print("|---|" + "---:|" * (len(studies) + 1))
    for solver, options in METHODS:
        opts = {"lower_order_final": False, **options} if solver != "ddim" else options
        label = solver + (f"({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
        errs = {name: s.errors(solver, NFES, **opts) for name, s in studies.items()}
        orders = " | ".join(f"{fitted_order(NFES, e):.2f}" for e in errs.values())
        print(f"| {label} | {orders} | {next(iter(errs.values()))[0]:.1e} |")


if __name__ == "__main__":
    main()
