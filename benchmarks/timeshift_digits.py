"""Time-Shift sampler on the digits model: digits-FD of DDIM and UniPC at 10 steps, with a window/cutoff sweep.

    python benchmarks/timeshift_digits.py          # ~30 min on one CPU thread; rerun to resume

Guidance 1.5 (the model's default), the common ``linspace`` grid, evaluation seeds 0..499
(as ``fewstep compare --seed 0``); window 0 is the plain solver. Also reported: MSE to the
200-step reference (Time-Shift moves samples off the ODE trajectory by design, so this
measures how far, not quality), and how far the rule shifts the timesteps at each step.
Results: ``benchmarks/results/timeshift/digits.json`` and ``digits.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import Bench, fmt  # noqa: E402

import fewstep  # noqa: E402
from fewstep.eval.io import atomic_write_bytes  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed, _common_grid  # noqa: E402

GUIDANCE, NFE = 1.5, 10
SOLVERS = ("ddim", "unipc")
WINDOWS = (10, 20, 40, 80)
CUTOFFS = (0, 300, 600)


def shift_profile(b: Bench, solver: str, rule: fewstep.TimeShift, n: int = 200) -> list[float]:
    """Mean signed shift t_s - t at each step over the first ``n`` evaluation samples."""
    tb, seen = b.tb, []

    def model(x, t, c):  # called on the CFG batch (uncond, cond): record the first half
        seen.append(t[: len(t) // 2].double())
        return tb.unet(x, t, class_labels=c).sample

    x, cond = b.x[:n], b.cond[:n]
    grid = _common_grid(None, tb.schedule)
    nominal = fewstep.make_plan(tb.schedule, solver, NFE, spacing=grid).grid.model_timesteps
    with torch.no_grad():
        fewstep.sample(model, x, schedule=tb.schedule, solver=solver, nfe=NFE, spacing=grid, guidance=GUIDANCE,
                       cond=cond, uncond=torch.full_like(cond, tb.null_label), time_shift=rule)
    return [round(float((t - float(t0)).mean()), 1) for t, t0 in zip(seen, nominal)]


def main() -> None:
    b = Bench.from_command_line(__doc__, DigitsTestbed, "digits", folder="timeshift")
    rows = {}
    for solver in SOLVERS:
        rows[solver, 0, 0] = b.unit(f"{solver}/plain", lambda: b.evaluate(solver, {}, NFE, GUIDANCE))
        for w in WINDOWS:
            for c in CUTOFFS:
                opts = {"time_shift": [w, c]}
                rows[solver, w, c] = b.unit(f"{solver}/w{w}/c{c}", lambda: b.evaluate(solver, opts, NFE, GUIDANCE))
    reference = b.unit("reference", lambda: b.tb.evaluate(b.reference(GUIDANCE), b.cond))
    profiles = {w: b.unit(f"shift-profile/ddim/w{w}/c0", lambda: shift_profile(b, "ddim", fewstep.TimeShift(w, 0)))
                for w in WINDOWS}

    lines = [f"# Time-Shift on the digits model: DDIM and UniPC-2, {NFE} steps, guidance {GUIDANCE:g} "
             f"({b.n} samples, seeds 0..{b.n - 1})", "",
             f"digits-FD of the reference samples themselves (DPM-Solver++(3), 200 steps): {reference['fd']:.3f}", ""]
    for metric, title in (("fd", "digits-FD"), ("mse", "MSE to the 200-step reference")):
        lines += [f"## {title} (window 0 = the plain solver: "
                  + ", ".join(f"{s} {format_value(rows[s, 0, 0][metric], metric)}" for s in SOLVERS) + ")", "",
                  "| solver | window | " + " | ".join(f"cutoff {c}" for c in CUTOFFS) + " |",
                  "|---|---:|" + "---:|" * len(CUTOFFS)]
        for s in SOLVERS:
            for w in WINDOWS:
                lines.append(f"| {s} | {w} | " + " | ".join(format_value(rows[s, w, c][metric], metric)
                                                          for c in CUTOFFS) + " |")
        lines.append("")
    lines += ["## Mean shift t_s - t per step (DDIM, cutoff 0, first 200 samples)", "",
              "| window | " + " | ".join(f"step {i}" for i in range(NFE)) + " |", "|---:|" + "---:|" * NFE]
    for w in WINDOWS:
        lines.append(f"| {w} | " + " | ".join(f"{v:+.1f}" for v in profiles[w]) + " |")
    atomic_write_bytes(b.results_dir / "digits.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def format_value(v: float, metric: str) -> str:
    return f"{v:.3f}" if metric == "fd" else fmt(v)


if __name__ == "__main__":
    main()
