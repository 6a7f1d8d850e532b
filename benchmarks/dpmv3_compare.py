"""DPM-Solver-v3 against DPM-Solver++ and UniPC: MSE to the reference at NFE 5, 6, 8, 10.

    python benchmarks/dpmv3_ems.py        # first: the EMS files (fewstep ems compute)
    python benchmarks/dpmv3_compare.py    # then this; resumes, skipping finished entries

Protocol (that of `fewstep compare`): samples i = 0..N-1 use noise seed i (N = 1000 for the
mixture, 500 for digits) (EMS seeds start at
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
EMS_TIMES = ROOT / "benchmarks" / "results" / "dpmv3_ems.json"
NFES = (5, 6, 8, 10)
# samples per model: 1000 on the mixture; 500 (the protocol's minimum) on digits, whose 200-step
# references dominate the CPU time of this script
NUM_SAMPLES = {"gmm": 1000, "digits": 500}
MAIN = ("dpmpp", "unipc", "dpmv3")
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
        # the half-corrector: the paper's rule (low-noise half) against the official code's (high-noise half)
        rows["dpmv3 half_corrector=low_noise"] = ("dpmv3", {"order": order, "ems": ems, "half_corrector": "low_noise"})
        rows["dpmv3 half_corrector=high_noise"] = ("dpmv3", {"order": order, "ems": ems, "half_corrector": "high_noise"})
    if setting == "digits-cfg7.5":
        rows["dpmv3 EMS from samples"] = ("dpmv3", {"order": order, "ems": f"{setting}-samples"})
    study = {"digits-uncond": ("K64", "K128", "K512", "N25", "N50"),
             "gmm-uncond": ("K64", "K256", "N25", "N50", "N100", "N400")}.get(setting, ())
    for tag in study:
        rows[f"dpmv3 {tag}"] = ("dpmv3", {"order": order, "ems": f"{setting}-{tag}"})
    return rows


def read_results() -> dict:
    from fewstep.eval.io import read_json

    return read_json(RESULTS)


def _load_ems(name: str, cache: dict):
    from fewstep import EMS

    if name not in cache:
        path = EMS_DIR / f"{name}.safetensors"
        cache[name] = EMS.load(path) if path.exists() else None
    return cache[name]


def _record(entry: dict) -> None:
    """Add one entry to the results file (several processes may run settings side by side)."""
    from fewstep.eval.io import DirectoryLockedError, lock_directory, read_json, write_json

    while True:
        try:
            with lock_directory(RESULTS.parent, "another benchmarks/dpmv3_compare.py"):
                results = read_json(RESULTS) if RESULTS.exists() else {
                    "protocol": __doc__.split("Protocol", 1)[1].strip(), "entries": []}
                results["entries"].append(entry)
                write_json(RESULTS, results)
                return
        except DirectoryLockedError:
            time.sleep(0.5)


def main(only: list[str]) -> None:
    if only == ["--report"]:
        REPORT.write_text(report(read_results()))
        return
    from fewstep.eval.io import load_tensors, save_tensors
    from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed

    torch.set_num_threads(1)
    done = {(e["setting"], e["method"], e["nfe"]) for e in read_results()["entries"]} if RESULTS.exists() else set()
    beds, ems_cache, cases = {}, {}, []
    for setting, (model, guidance, order) in SETTINGS.items():
        if only and setting not in only:
            continue
        if model not in beds:
            beds[model] = DigitsTestbed() if model == "digits" else GMMTestbed()
        bed, n = beds[model], NUM_SAMPLES[model]
        x_T, labels = bed.initial_noise(n, 0)
        null = bed.null_label if model == "digits" else -1
        cond = labels if guidance is not None else torch.full_like(labels, null)
        ref_path = REF_DIR / f"{setting}.safetensors"
        if ref_path.exists():
            ref = load_tensors(ref_path)["x"]
        else:
            solver, opts, nfe = REFERENCE
            ref = torch.cat([bed.reference(x_T[i:i + bed.batch_size], cond[i:i + bed.batch_size], guidance, None,
                                           solver, opts, nfe) for i in range(0, n, bed.batch_size)])
            save_tensors(ref_path, {"x": ref})
        if ref.shape[0] != n:
            raise SystemExit(f"{ref_path} holds {ref.shape[0]} samples, not {n}: delete it")
        cases += [(setting, label, spec, bed, x_T, labels, cond, ref) for label, spec in methods(setting, order).items()]
    cases.sort(key=lambda c: c[1] not in MAIN)  # the three-solver comparison first, then the ablations
    for setting, label, (solver, options), bed, x_T, labels, cond, ref in cases:
        model, guidance, order = SETTINGS[setting]
        options = dict(options)
        if "ems" in options:
            options["ems"] = _load_ems(options["ems"], ems_cache)
            if options["ems"] is None:
                print(f"skip {setting} {label}: no EMS file (run benchmarks/dpmv3_ems.py)", flush=True)
                continue
            if label == "dpmv3 EMS without guidance":  # the ablation uses it at another guidance on purpose
                options["ems"] = options["ems"].relabel(guidance=guidance)
        for nfe in NFES:
            if (setting, label, nfe) in done:
                continue
            start = time.perf_counter()
            out = torch.cat([bed.generate(solver, options, nfe, x_T[i:i + bed.batch_size],
                                          cond[i:i + bed.batch_size], guidance, None)
                             for i in range(0, x_T.shape[0], bed.batch_size)])
            seconds = time.perf_counter() - start
            mse = (out.double() - ref.double()).pow(2).flatten(1).mean(1).mean().item()
            extra = bed.evaluate(out, labels) if guidance is not None else {}
            _record({"setting": setting, "method": label, "solver": solver, "nfe": nfe, "order": order,
                     "samples": x_T.shape[0], "mse": mse, "time_s": round(seconds, 2), **extra})
            print(f"{setting:16s} {label:34s} NFE {nfe:2d}  MSE {mse:.3e}", flush=True)
    REPORT.write_text(report(read_results()))


def report(results: dict) -> str:
    """Markdown: per setting the comparison, the ablations and the K / N study (with EMS CPU times)."""
    from fewstep.eval.io import read_json

    times = read_json(EMS_TIMES) if EMS_TIMES.exists() else {}
    by: dict = {}
    fd: dict = {}  # digits-FD of the guided digits runs (the class labels make it meaningful)
    for e in results["entries"]:
        by.setdefault(e["setting"], {}).setdefault(e["method"], {})[e["nfe"]] = e["mse"]
        if "fd" in e:
            fd.setdefault(e["setting"], {}).setdefault(e["method"], {})[e["nfe"]] = e["fd"]
    head = "| {} | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    rule = "|---|" + "---:|" * len(NFES)

    def row(label, cells, best=None):
        vals = []
        for n in NFES:
            v = cells.get(n)
            text = "-" if v is None else f"{v:.2e}"
            vals.append(f"**{text}**" if best is not None and v is not None and v == best[n] else text)
        return f"| {label} | " + " | ".join(vals) + " |"

    lines = ["MSE to the reference (mean over N samples of ||x - x_ref||^2 / D, N = 1000 on the mixture and 500 on "
             "digits; lower is better; bold: best of "
             "the three solvers).", ""]
    for setting in [s for s in SETTINGS if s in by]:
        rows = by[setting]
        model, guidance, order = SETTINGS[setting]
        what = "unconditional" if guidance is None else f"CFG {guidance:g}"
        main = [m for m in ("dpmpp", "unipc", "dpmv3") if m in rows]
        best = {n: min(rows[m][n] for m in main if n in rows[m]) for n in NFES}
        lines += [f"### {model}, {what} (order {order}; EMS `{setting}`)", "", head.format("solver"), rule]
        lines += [row(m, rows[m], best) for m in main]
        if setting in fd:
            lines += ["", head.format(f"{'digits-' if model == 'digits' else ''}FD (lower is better)"), rule]
            lines += [f"| {m} | " + " | ".join(f"{fd[setting][m][n]:.3f}" if n in fd[setting].get(m, {}) else "-"
                                               for n in NFES) + " |" for m in main]
        ablations = [m for m in rows if m not in main and not _is_study(m)]
        if ablations:
            lines += ["", head.format("dpmv3 ablation"), rule] + [row(m[len("dpmv3 "):], rows[m]) for m in ablations]
        study = [m for m in rows if _is_study(m)]
        if study:
            base = main_ems_kn(setting)
            lines += ["", "| EMS (K datapoints, N intervals) | CPU s | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                      "|---|---:|" + "---:|" * len(NFES)]
            entries = [(setting, "dpmv3")] + [(f"{setting}-{m.split()[-1]}", m) for m in study]
            for name, method in sorted(entries, key=lambda e: _kn(base, e[0])):
                k, n = _kn(base, name)
                entry = times.get(name, {})
                cpu = None if entry.get("resumed") else entry.get("cpu_seconds")  # a resumed run timed its rest only
                vals = " | ".join(f"{rows[method][x]:.2e}" if x in rows[method] else "-" for x in NFES)
                lines.append(f"| K={k}, N={n} | {'-' if cpu is None else f'{cpu:.0f}'} | {vals} |")
        lines.append("")
    return "\n".join(lines)


def _is_study(method: str) -> bool:
    tag = method.split()[-1]
    return method.startswith("dpmv3 ") and tag[0] in "KN" and tag[1:].split("-")[0].isdigit()


def main_ems_kn(setting: str) -> tuple[int, int]:
    """(K, N) of the main EMS of a setting."""
    return {"digits": (256, 100), "gmm": (1024, 200)}[SETTINGS[setting][0]]


def _kn(base: tuple[int, int], name: str) -> tuple[int, int]:
    k, n = base
    for part in name.split("-"):
        if part[:1] == "K" and part[1:].isdigit():
            k = int(part[1:])
        if part[:1] == "N" and part[1:].isdigit():
            n = int(part[1:])
    return k, n


if __name__ == "__main__":
    main(sys.argv[1:])
