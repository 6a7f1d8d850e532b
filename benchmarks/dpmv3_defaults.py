"""Which corrector settings DPM-Solver-v3 defaults to: fewstep's against the official scripts' rules.

    python benchmarks/dpmv3_ems.py          # first: the EMS files
    python benchmarks/dpmv3_defaults.py [SETTING ...] [--wait]   # --wait: for EMS files still being computed

The official scripts (thu-ml/DPM-Solver-v3) use c_pseudo=False (an order-p corrector) and turn the
corrector off above 8 steps (ScoreSDE CIFAR-10) or 6 steps (EDM), and for Stable Diffusion
use_corrector = guidance < 5; fewstep's solver defaults to the corrector on with the pseudo-order
p + 1 (corrector_pseudo=True). Measured here on calibration seeds 50000.. (100 digits samples,
500 mixture samples), disjoint from the evaluation seeds 0..N-1 of benchmarks/dpmv3_compare.py
and the EMS seeds 100000+, with that script's grid, ending ("zero"), orders and references.
The rules are combinations of three runs per NFE: the corrector with pseudo-order, with order p,
and none. Writes benchmarks/results/dpmv3_defaults.{json,md}.
"""

from __future__ import annotations

import sys
import time

import torch

from dpmv3_compare import EMS_DIR, NFES, ROOT, SETTINGS, _load_ems, cached_reference, generate, testbed_inputs, update_json

RESULTS = ROOT / "benchmarks" / "results" / "dpmv3_defaults.json"
REPORT = ROOT / "benchmarks" / "results" / "dpmv3_defaults.md"
CALIBRATION_SEED = 50_000
NUM = {"digits": 100, "gmm": 500}
RUNS = {
    "corrector, pseudo-order (corrector_pseudo=True)": {},
    "corrector, order p (corrector_pseudo=False)": {"corrector_pseudo": False},
    "no corrector": {"corrector": False},
}
PSEUDO, ORDER_P, NONE = RUNS


def rules(setting: str) -> dict[str, dict[int, str]]:
    """Rule label -> the run each NFE uses under it."""
    guidance = SETTINGS[setting][1]
    return {
        "fewstep (corrector on, pseudo-order)": {n: PSEUDO for n in NFES},
        "official ScoreSDE: order-p corrector, off above 8 steps": {n: ORDER_P if n <= 8 else NONE for n in NFES},
        "official EDM: order-p corrector, off above 6 steps": {n: ORDER_P if n <= 6 else NONE for n in NFES},
        "official SD: corrector iff guidance < 5 (order p)": {
            n: ORDER_P if (guidance or 0) < 5 else NONE for n in NFES},
    }


def main(only: list[str]) -> None:
    from fewstep.infra.io import read_json

    torch.set_num_threads(1)
    wait = "--wait" in only
    only = [s for s in only if s != "--wait"]
    empty = {"protocol": __doc__.strip(), "mse": {}}
    results = read_json(RESULTS) if RESULTS.exists() else empty
    beds, cache = {}, {}
    for setting in ("digits-uncond", "digits-cfg3", "digits-cfg7.5", "gmm-uncond"):
        if only and setting not in only:
            continue
        model, guidance, order = SETTINGS[setting]
        bed, x_T, _, cond = testbed_inputs(setting, beds, CALIBRATION_SEED, NUM[model])
        ref = cached_reference(f"{setting}-calibration", bed, x_T, cond, guidance, "zero")
        while wait and (EMS_DIR / f"{setting}.safetensors").exists() is False:  # --wait: the EMS is being computed
            time.sleep(15)
        ems = _load_ems(setting, cache)
        if ems is None:
            print(f"skip {setting}: no EMS file (run benchmarks/dpmv3_ems.py)", flush=True)
            continue
        table = results["mse"].setdefault(setting, {})
        for label, options in RUNS.items():
            for nfe in NFES:
                if str(nfe) in table.get(label, {}):
                    continue
                out = generate(bed, "dpmv3", {"order": order, "ems": ems, **options}, nfe, x_T, cond, guidance, "zero")
                mse = (out.double() - ref.double()).pow(2).flatten(1).mean(1).mean().item()

                def add(res, setting=setting, label=label, nfe=nfe, mse=mse):
                    res["mse"].setdefault(setting, {}).setdefault(label, {})[str(nfe)] = mse
                results = update_json(RESULTS, add, empty)
                print(f"{setting:14s} {label:48s} NFE {nfe:2d}  MSE {mse:.3e}", flush=True)
    REPORT.write_text(report(results))


def report(results: dict) -> str:
    head = "| {} | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    rule = "|---|" + "---:|" * len(NFES)
    lines = ["DPM-Solver-v3 corrector settings on calibration seeds (MSE to the reference; lower is better; "
             "bold: best rule per NFE).", ""]
    for setting, table in results["mse"].items():
        lines += [f"### {setting} (order {SETTINGS[setting][2]})", "", head.format("run"), rule]
        lines += [f"| {label} | " + " | ".join(f"{table[label][str(n)]:.2e}" if str(n) in table.get(label, {})
                                              else "-" for n in NFES) + " |" for label in RUNS]
        ruled = {name: {n: table.get(run, {}).get(str(n)) for n, run in pick.items()}
                 for name, pick in rules(setting).items()}
        best = {n: min((v[n] for v in ruled.values() if v[n] is not None), default=None) for n in NFES}
        lines += ["", head.format("rule"), rule]
        for name, vals in ruled.items():
            cells = ["-" if vals[n] is None else (f"**{vals[n]:.2e}**" if vals[n] == best[n] else f"{vals[n]:.2e}")
                     for n in NFES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
