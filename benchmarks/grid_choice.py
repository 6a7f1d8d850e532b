"""Which timestep spacing to use at low NFE on the built-in models (backs the README's grid advice).

MSE to the `fewstep compare` reference (3rd-order DPM-Solver++ taylor, 200 steps, same noise) for
UniPC-2 and DPM-Solver++(2M) on each spacing, digits model (guidance 1.5) and GMM.

    python benchmarks/grid_choice.py [--num-samples 500] [--out benchmarks/results/grid_choice.md]
"""

import argparse
from pathlib import Path

import torch

from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed

SPACINGS = ("linspace", "trailing", "logsnr", "karras", "time_uniform", "time_quadratic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 8])
    p.add_argument("--out", default="benchmarks/results/grid_choice.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    lines = ["# MSE to the reference by spacing", "",
             f"{args.num_samples} samples, seeds 0..{args.num_samples - 1}; command: "
             f"`python benchmarks/grid_choice.py --num-samples {args.num_samples}`", ""]
    for name, bed, guidance in (("digits", DigitsTestbed(), 1.5), ("gmm", GMMTestbed(), 2.0)):
        x_T, cond = bed.initial_noise(args.num_samples, 0)
        ref = bed.reference(x_T, cond, guidance, None, "dpmpp", {"order": 3, "third_order": "taylor"}, 200)
        for solver in ("unipc", "dpmpp"):
            lines += [f"## {name}, {solver}", "", "| spacing | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |",
                      "|---|" + "---:|" * len(args.nfe)]
            for spacing in SPACINGS if name == "digits" else [s for s in SPACINGS if s not in ("trailing",)]:
                cells = []
                for n in args.nfe:
                    x = bed.generate(solver, {}, n, x_T, cond, guidance, spacing)
                    cells.append(f"{(x - ref).pow(2).flatten(1).mean(1).mean().item():.2e}")
                lines.append(f"| {spacing} | " + " | ".join(cells) + " |")
            lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
