"""Calibration losses of calibrate_dc's default optimiser vs a cosine-annealed, bounded one (digits, 16 pairs).

    python benchmarks/dc_optimiser.py    # after benchmarks/dc_digits.py; ~20 min on one CPU thread

Both calibrate the same 10 samples (seeds 100000..) against the same 200-step DDIM targets
with 40 Adam iterations from rho = 1: the default (lr 0.1 constant, unbounded; its ratio files
are dc_digits.py's) and ``lr_schedule="cosine", bounds=(0, 2)`` (lr 0.1 annealed to 0, every
step projected into [0, 2]). Only calibration losses are compared, no evaluation seed is used.
Then the two sample-count draws of dc_digits.py whose default calibration kept iterate 1 or 2
of 40 are recalibrated with the alternative and evaluated like dc_digits.py (500 seeds 0..;
reported, not used to choose anything).
Results: ``benchmarks/results/dc/optimiser.{md,json}`` and the ratio files under ``.../dc/optimiser/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import CALIBRATION_SEED, ROOT, Bench  # noqa: E402

import fewstep  # noqa: E402
from fewstep.tuning.dc.command import calibration_inputs  # noqa: E402
from fewstep.infra.io import atomic_write_bytes, read_json  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed  # noqa: E402

GUIDANCES = (1.5, 3.0, 5.0, 7.5)
NFES = (5, 6, 8, 10)
ALTERNATIVE = {"lr_schedule": "cosine", "bounds": (0.0, 2.0)}
# (guidance, calibration samples, seed) of the draws whose default calibration stopped early; NFE 5.
STALLED = ((7.5, 32, CALIBRATION_SEED), (3.0, 128, CALIBRATION_SEED))
SMALL_RATE = {"lr": 0.03, "lr_schedule": "cosine"}  # tried on the stalled draws only


def main() -> None:
    torch.set_num_threads(1)
    tb, folder = DigitsTestbed(), ROOT / "results" / "dc"
    work = ROOT.parent / "runs" / "dc-bench" / "digits-optimiser"
    lines = ["# DC calibration loss / uncompensated loss: default optimiser vs cosine-annealed, bounded "
             "(digits, 10 samples, seeds 100000..)", "",
             "| guidance | NFE | default (lr 0.1 constant) | cosine lr 0.1 -> 0, rho in [0, 2] |",
             "|---|---|---:|---:|"]
    for g in GUIDANCES:
        for n in NFES:
            tag = f"nfe{n}-g{g:g}-n10-s{CALIBRATION_SEED}"
            default = fewstep.DCRatios.load(folder / "digits" / f"ratios-dc-{tag}.json").meta.extra
            path = folder / "optimiser" / f"ratios-cosine-{tag}.json"
            if not path.exists():
                inputs = calibration_inputs(tb, g, 10, CALIBRATION_SEED, None)
                fewstep.calibrate_dc(**inputs, nfe=n, checkpoint=work / f"state-{tag}.json", objective="final",
                                     **ALTERNATIVE).save(path)
                print(f"calibrated {tag}", flush=True)
            other = fewstep.DCRatios.load(path).meta.extra
            lines.append(f"| {g:g} | {n} | {default['loss'] / default['loss_uncompensated']:.3f} | "
                         f"{other['loss'] / other['loss_uncompensated']:.3f} |")
    b = Bench(tb, "optimiser", 500)
    digits = read_json(folder / "digits.json")
    lines += ["", "## Sample-count draws whose default calibration kept iterate 1 or 2 (NFE 5; MSE / UniPC-2's "
              "on the 500 evaluation samples)", "",
              "Cells: best iteration, calibration loss / uncompensated, held-out MSE / UniPC-2's.", "",
              "| guidance | samples | default (lr 0.1) | cosine lr 0.1, rho in [0, 2] | cosine lr 0.03 |",
              "|---|---:|---|---|---|"]
    for g, size, seed in STALLED:
        tag = f"nfe5-g{g:g}-n{size}-s{seed}"
        default = fewstep.DCRatios.load(folder / "digits" / f"ratios-dc-{tag}.json").meta.extra
        base = digits[f"unipc/g{g:g}/nfe5"]["mse"]
        cell = lambda e, mse: (f"{e['best_iteration']}, {e['loss'] / e['loss_uncompensated']:.3f}, "  # noqa: E731
                               f"{mse / base:.2f}x")
        cells = [cell(default, digits[f"dc/g{g:g}/nfe5/calib{size}/draw0"]["mse"])]
        for name, options in (("cosine", ALTERNATIVE), ("cosine-lr0.03", SMALL_RATE)):
            path = folder / "optimiser" / f"ratios-{name}-{tag}.json"
            if not path.exists():
                inputs = calibration_inputs(tb, g, size, seed, None)
                fewstep.calibrate_dc(**inputs, nfe=5, checkpoint=work / f"state-{name}-{tag}.json", objective="final",
                                     **options).save(path)
            ratios = fewstep.DCRatios.load(path)
            key = f"dc/g{g:g}/nfe5/calib{size}/" + name
            held = b.unit(key, lambda r=ratios, g=g: b.evaluate("dc", {"ratios": r}, 5, g))["mse"]
            cells.append(cell(ratios.meta.extra, held))
        lines.append(f"| {g:g} | {size} | " + " | ".join(cells) + " |")
    atomic_write_bytes(folder / "optimiser.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
