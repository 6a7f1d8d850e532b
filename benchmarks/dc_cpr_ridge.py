"""Choose CPR's ridge weight on calibration data only: leave-one-out over the calibrated digits pairs.

    python benchmarks/dc_cpr_ridge.py       # after benchmarks/dc_digits.py has calibrated the 16 pairs

For each ridge weight and each (NFE, guidance) pair, CPR is fitted on the other 15 pairs'
calibrated ratios and its predicted ratios are scored on the left-out pair's *calibration*
samples (seeds 100000.., 10 samples, the 200-step DDIM targets of ``fewstep.calibrate_dc``):
the share of the calibrated loss reduction they recover. No evaluation seed is touched, so the
choice does not tune the evaluation. Results: ``benchmarks/results/dc/cpr_ridge.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import CALIBRATION_SEED, ROOT  # noqa: E402

import fewstep  # noqa: E402
from fewstep.tuning.dc.command import calibration_inputs  # noqa: E402
from fewstep.infra.io import atomic_write_bytes, write_json  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed  # noqa: E402

GUIDANCES = (1.5, 3.0, 5.0, 7.5)
NFES = (5, 6, 8, 10)
RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def main() -> None:
    torch.set_num_threads(1)
    tb, folder = DigitsTestbed(), ROOT / "results" / "dc"
    tag = "ratios-dc-nfe{n}-g{g:g}-n10-s" + str(CALIBRATION_SEED) + ".json"
    calibrated = {(g, n): fewstep.DCRatios.load(folder / "digits" / tag.format(n=n, g=g)) for g in GUIDANCES for n in NFES}
    shares: dict[float, dict[str, float]] = {}
    with torch.no_grad():
        for g in GUIDANCES:
            inputs = calibration_inputs(tb, g, 10, CALIBRATION_SEED, None)
            run = {k: inputs[k] for k in ("schedule", "prediction", "spacing", "guidance", "cond", "uncond")}
            target = fewstep.sample(inputs["model"], inputs["x_T"], solver="ddim", nfe=200, **run)
            for n in NFES:
                def loss(ratios: list[float]) -> float:
                    x = fewstep.sample(inputs["model"], inputs["x_T"], solver="dc", nfe=n, ratios=ratios, **run)
                    return (x.double() - target.double()).pow(2).mean().item()

                base, best = loss([1.0] * n), loss(calibrated[g, n].ratios)
                others = [v for k, v in calibrated.items() if k != (g, n)]
                for lam in RIDGES:
                    predicted = fewstep.fit_cpr(others, ridge=lam).ratios(n, g)
                    shares.setdefault(lam, {})[f"g{g:g}/nfe{n}"] = (base - loss(predicted)) / (base - best)
                print(f"g{g:g} nfe{n}: " + ", ".join(f"{lam:g}: {shares[lam][f'g{g:g}/nfe{n}']:.2f}" for lam in RIDGES),
                      flush=True)
    lines = ["# CPR ridge weight by leave-one-out on the calibration losses (digits, 16 pairs)", "",
             "Share of the calibrated loss reduction recovered on the left-out pair's calibration samples.", "",
             "| ridge | median | mean | worst | pairs >= 80% |", "|---:|---:|---:|---:|---:|"]
    for lam in RIDGES:
        s = list(shares[lam].values())
        lines.append(f"| {lam:g} | {100 * statistics.median(s):.0f}% | {100 * statistics.mean(s):.0f}% | "
                     f"{100 * min(s):.0f}% | {sum(v >= 0.8 for v in s)} of {len(s)} |")
    write_json(folder / "cpr_ridge.json", {str(k): v for k, v in shares.items()})
    atomic_write_bytes(folder / "cpr_ridge.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
