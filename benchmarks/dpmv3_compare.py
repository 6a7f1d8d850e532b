"""DPM-Solver-v3 against DPM-Solver++ and UniPC: MSE to the reference at NFE 5, 6, 8, 10.

    python benchmarks/dpmv3_ems.py        # first: the EMS files (fewstep ems compute)
    python benchmarks/dpmv3_compare.py    # then this; resumes, skipping finished entries

Protocol (that of `fewstep compare`): samples i = 0..999 use noise seed i (EMS seeds start at
100000); every solver runs on the common `linspace` grid (dpmv3 snaps those timesteps to its
EMS grid); the reference is third-order DPM-Solver++ (third_order="taylor") with 200 steps on
the same grid for digits and the exact ODE solution for the GMM; MSE is the mean over samples
of ||x - x_ref||^2 / D. Digits "uncond" is the unconditional model (null label), "cfg W" is
classifier-free guidance with labels i mod 10. All three solvers run at the same order: 3
unconditional, 2 guided (the paper's choices). Writes benchmarks/results/dpmv3_compare.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMS_DIR = ROOT / "runs" / "dpmv3" / "ems"
REF_DIR = ROOT / "runs" / "dpmv3" / "references"
RESULTS = ROOT / "benchmarks" / "results" / "dpmv3_compare.json"
REPORT = ROOT / "benchmarks" / "results" / "dpmv3_compare.md"
NFES = (5, 6, 8, 10)
NUM_SAMPLES = 1000
REFERENCE = ("dpmpp", {"order": 3, "third_order": "taylor"}, 200)

# setting: (model, guidance, order)
SETTINGS = {
    "digits-uncond": ("digits", None, 3),
    "digits-cfg3": ("digits", 3.0, 2),
    "digits-cfg7.5": ("digits", 7.5, 2),
    "gmm-uncond": ("gmm", None, 3),
    "gmm-cfg2": ("gmm", 2.0, 2),
}


def guidance_of(setting: str) -> float | None:
    return SETTINGS[setting][1]


def methods(setting: str, order: int) -> dict[str, tuple[str, dict]]:
    """Label -> (solver, options) for one setting: the comparison, then ablations."""
    ems = f"{setting}"
    rows = {
        "dpmpp": ("dpmpp", {"order": order}),
        "unipc": ("unipc", {"order": order}),
        "dpmv3": ("dpmv3", {"order": order, "ems": ems}),
        "dpmv3 degenerate": ("dpmv3", {"order": order, "ems": ems, "degenerate": True}),
        "dpmv3 no corrector": ("dpmv3", {"order": order, "ems": ems, "corrector": False}),
    }
    if guidance_of(setting) is not None:  # the paper (Sec. 3.4): EMS of the unguided model also serve guided sampling
        rows["dpmv3 EMS without guidance"] = ("dpmv3", {"order": order, "ems": setting.split("-")[0] + "-uncond"})
    if setting == "digits-cfg7.5":
        rows["dpmv3 half_corrector=low_noise"] = ("dpmv3", {"order": order, "ems": ems, "half_corrector": "low_noise"})
        rows["dpmv3 half_corrector=high_noise"] = ("dpmv3", {"order": order, "ems": ems, "half_corrector": "high_noise"})
        rows["dpmv3 EMS from samples"] = ("dpmv3", {"order": order, "ems": f"{setting}-samples"})
    study = {"digits-uncond": ("K64", "K128", "K512", "N25", "N50"),
             "gmm-uncond": ("K64", "K256", "N25", "N50", "N100", "N400")}.get(setting, ())
    for tag in study:
        rows[f"dpmv3 {tag}"] = ("dpmv3", {"order": order, "ems": f"{setting}-{tag}"})
    return rows


def _load_ems(name: str, cache: dict):
    from fewstep import EMS

    if name not in cache:
        path = EMS_DIR / f"{name}.safetensors"
        cache[name] = EMS.load(path) if path.exists() else None
    return cache[name]


def main(only: list[str]) -> None:
    from fewstep.eval.io import load_tensors, read_json, save_tensors, write_json
    from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed

    torch.set_num_threads(1)
    results = read_json(RESULTS) if RESULTS.exists() else {"protocol": __doc__.split("Protocol", 1)[1].strip(),
                                                           "entries": []}
    done = {(e["setting"], e["method"], e["nfe"]) for e in results["entries"]}
    beds, ems_cache = {}, {}
    for setting, (model, guidance, order) in SETTINGS.items():
        if only and setting not in only:
            continue
        if model not in beds:
            beds[model] = DigitsTestbed() if model == "digits" else GMMTestbed()
        bed = beds[model]
        x_T, labels = bed.initial_noise(NUM_SAMPLES, 0)
        null = bed.null_label if model == "digits" else -1
        cond = labels if guidance is not None else torch.full_like(labels, null)
        ref_path = REF_DIR / f"{setting}.safetensors"
        if ref_path.exists():
            ref = load_tensors(ref_path)["x"]
        else:
            solver, opts, nfe = REFERENCE
            ref = torch.cat([bed.reference(x_T[i:i + bed.batch_size], cond[i:i + bed.batch_size], guidance, None,
                                           solver, opts, nfe) for i in range(0, NUM_SAMPLES, bed.batch_size)])
            save_tensors(ref_path, {"x": ref})
        for label, (solver, options) in methods(setting, order).items():
            options = dict(options)
            if "ems" in options:
                options["ems"] = _load_ems(options["ems"], ems_cache)
                if options["ems"] is None:
                    print(f"skip {setting} {label}: no EMS file (run benchmarks/dpmv3_ems.py)", flush=True)
                    continue
            for nfe in NFES:
                if (setting, label, nfe) in done:
                    continue
                start = time.perf_counter()
                out = torch.cat([bed.generate(solver, options, nfe, x_T[i:i + bed.batch_size],
                                              cond[i:i + bed.batch_size], guidance, None)
                                 for i in range(0, NUM_SAMPLES, bed.batch_size)])
                seconds = time.perf_counter() - start
                mse = (out.double() - ref.double()).pow(2).flatten(1).mean(1).mean().item()
                extra = bed.evaluate(out, labels) if guidance is not None else {}
                results["entries"].append({"setting": setting, "method": label, "solver": solver, "nfe": nfe,
                                           "order": order, "mse": mse, "time_s": round(seconds, 2), **extra})
                done.add((setting, label, nfe))
                write_json(RESULTS, results)
                print(f"{setting:16s} {label:34s} NFE {nfe:2d}  MSE {mse:.3e}", flush=True)
    REPORT.write_text(report(results))


def report(results: dict) -> str:
    """Markdown tables: MSE per setting (comparison, ablations) and the K / N study."""
    by = {}
    for e in results["entries"]:
        by.setdefault(e["setting"], {}).setdefault(e["method"], {})[e["nfe"]] = e
    lines = ["MSE to the reference (mean over 1000 samples of ||x - x_ref||^2 / D; lower is better).", ""]
    for setting, rows in by.items():
        model, guidance, order = SETTINGS[setting]
        what = "unconditional" if guidance is None else f"CFG {guidance:g}"
        lines += [f"**{model}, {what}** (order {order} for every solver)", "",
                  "| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---:|" * len(NFES)]
        for method, cells in rows.items():
            best = method == "dpmv3"
            vals = [f"{cells[n]['mse']:.3e}" if n in cells else "-" for n in NFES]
            lines.append(f"| {'**' + method + '**' if best else method} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
