"""DC-Solver on the built-in digits model: the numbers behind the README's DC-Solver section.

    python benchmarks/dc_digits.py               # ~1.5 h on one CPU thread; rerun to resume
    python benchmarks/dc_digits.py --skip-study  # without part 3 (two thirds of the calibration time)

1. DC (UniPC-2 + compensation) vs UniPC-2: MSE to the reference and digits-FD at guidance
   1.5, 3, 5, 7.5 and NFE 5, 6, 8, 10; ratios calibrated on 10 samples (seeds 100000..).
2. DC on DPM-Solver++(2M) (``dc_dpmpp``) at NFE 5.
3. Held-out gain vs the number of calibration samples (10, 32, 128; several disjoint draws).
4. CPR: fitted on all 16 pairs (``cpr.json``), and leave-one-out: for each pair, CPR fitted on
   the other 15, its predicted ratios evaluated on the left-out pair.

Results: ``benchmarks/results/dc/digits.json`` (every unit), ``digits.md`` (tables), the ratio
and CPR files under ``benchmarks/results/dc/digits/``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import CALIBRATION_SEED, Bench, fmt  # noqa: E402

import fewstep  # noqa: E402
from fewstep.infra.io import atomic_write_bytes, write_json  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed  # noqa: E402

GUIDANCES = (1.5, 3.0, 5.0, 7.5)
NFES = (5, 6, 8, 10)
# Sample-count study: (guidance, NFE), sizes and how many disjoint draws of each.
STUDY = ((7.5, 5), (1.5, 5), (3.0, 5))
DRAWS = {10: 3, 32: 2, 128: 1}


def draw_seed(k: int) -> int:
    return CALIBRATION_SEED + 1000 * k  # draws of up to 1000 samples never overlap


def main() -> None:
    b = Bench.from_command_line(__doc__, DigitsTestbed, "digits",
                                switches={"skip-study": "leave out the sample-count study (part 3)"})
    res = lambda key, solver, options, nfe, g: b.unit(key, lambda: b.evaluate(solver, options, nfe, g))  # noqa: E731

    table, calibrated = {}, {}
    for g in GUIDANCES:
        for n in NFES:
            r = calibrated[g, n] = b.calibrate(n, g)
            table[g, n] = (res(f"unipc/g{g:g}/nfe{n}", "unipc", {}, n, g),
                           res(f"dc/g{g:g}/nfe{n}", "dc", {"ratios": r}, n, g))
    dpmpp = {}
    for g in GUIDANCES:
        r = b.calibrate(5, g, solver="dc_dpmpp")
        dpmpp[g] = (res(f"dpmpp/g{g:g}/nfe5", "dpmpp", {}, 5, g),
                    res(f"dc_dpmpp/g{g:g}/nfe5", "dc_dpmpp", {"ratios": r}, 5, g))
    cpr_all = fewstep.fit_cpr(list(calibrated.values()), meta_of(calibrated))
    cpr_all.save(b.artifacts / "cpr.json")
    loo, loo_plain = {}, {}
    for (g, n), r in calibrated.items():
        others = [v for k, v in calibrated.items() if k != (g, n)]
        cpr = fewstep.fit_cpr(others, meta_of(calibrated))
        loo[g, n] = res(f"cpr-loo/g{g:g}/nfe{n}", "dc", {"cpr": cpr}, n, g)
        b.store.setdefault("cpr_loo_ratios", {})[f"g{g:g}/nfe{n}"] = cpr.ratios(n, g)
        plain = fewstep.fit_cpr(others, meta_of(calibrated), ridge=0.0)  # plain least squares, for comparison
        loo_plain[g, n] = res(f"cpr-loo-ridge0/g{g:g}/nfe{n}", "dc", {"cpr": plain}, n, g)
    study = {}
    for g, n in () if b.switches["skip-study"] else STUDY:
        for size, draws in DRAWS.items():
            for k in range(draws):
                r = b.calibrate(n, g, num_samples=size, seed=draw_seed(k))
                study[g, n, size, k] = res(f"dc/g{g:g}/nfe{n}/calib{size}/draw{k}", "dc", {"ratios": r}, n, g)
    refs = {g: b.unit(f"reference/g{g:g}", lambda g=g: b.tb.evaluate(b.reference(g), b.cond)) for g in GUIDANCES}
    report(b, table, dpmpp, study, {"": loo, " (ridge 0, plain least squares)": loo_plain}, calibrated, refs)


def meta_of(calibrated):
    first = next(iter(calibrated.values())).meta
    return fewstep.ArtifactMeta(fingerprint=first.fingerprint, schedule=first.schedule, solver=first.solver,
                                extra={"num_samples": 10, "seed": CALIBRATION_SEED, "model": "digits"})


def report(b, table, dpmpp, study, loo, calibrated, refs) -> None:
    lines = [f"# DC-Solver on the digits model ({b.n} evaluation samples, seeds 0..{b.n - 1}; "
             f"calibration on seeds >= {CALIBRATION_SEED})", ""]
    lines += ["## MSE to the reference: UniPC-2 / DC (ratio DC/UniPC)", "",
              "| guidance | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---:|" * len(NFES)]
    for g in GUIDANCES:
        cells = [f"{fmt(table[g, n][0]['mse'])} / {fmt(table[g, n][1]['mse'])} "
                 f"({table[g, n][1]['mse'] / table[g, n][0]['mse']:.2f}x)" for n in NFES]
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    lines += ["", "## digits-FD: UniPC-2 / DC (last column: the 200-step reference samples themselves)", "",
              "| guidance | " + " | ".join(f"NFE {n}" for n in NFES) + " | reference |",
              "|---|" + "---:|" * (len(NFES) + 1)]
    for g in GUIDANCES:
        lines.append(f"| {g:g} | " + " | ".join(f"{table[g, n][0]['fd']:.3f} / {table[g, n][1]['fd']:.3f}"
                                                 for n in NFES) + f" | {refs[g]['fd']:.3f} |")
    lines += ["", "## DC on DPM-Solver++(2M), NFE 5", "", "| guidance | dpmpp MSE | dc_dpmpp MSE | ratio | "
              "dpmpp FD | dc_dpmpp FD |", "|---|---:|---:|---:|---:|---:|"]
    for g in GUIDANCES:
        a, d = dpmpp[g]
        lines.append(f"| {g:g} | {fmt(a['mse'])} | {fmt(d['mse'])} | {d['mse'] / a['mse']:.2f}x | "
                     f"{a['fd']:.3f} | {d['fd']:.3f} |")
    lines += ["", "## Held-out MSE ratio DC/UniPC vs calibration samples (NFE 5; one value per disjoint draw)", ""]
    lines += ["| guidance | " + " | ".join(f"{s} samples" for s in DRAWS) + " |", "|---|" + "---:|" * len(DRAWS)
              ] if study else ["Not run (--skip-study)."]
    for g, n in STUDY if study else ():
        base = table[g, n][0]["mse"]
        cells = [", ".join(f"{study[g, n, s, k]['mse'] / base:.2f}x" for k in range(DRAWS[s])) for s in DRAWS]
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    for label, fits in loo.items():
        lines += ["", f"## CPR leave-one-out{label}: share of the calibrated MSE reduction recovered by CPR fitted "
                  "on the other 15 pairs (in brackets: its MSE / UniPC-2's)", "",
                  "| guidance | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---:|" * len(NFES)]
        shares = []
        for g in GUIDANCES:
            cells = []
            for n in NFES:
                u, d, c = table[g, n][0]["mse"], table[g, n][1]["mse"], fits[g, n]["mse"]
                share = (u - c) / (u - d) if u > d else float("nan")
                shares.append(share)
                cells.append(f"{100 * share:.0f}% ({c / u:.2f}x)")
            lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
        finite = [s for s in shares if s == s]
        lines += ["", f"Median over the {len(finite)} pairs: {100 * statistics.median(finite):.0f}%; "
                  f"pairs >= 80%: {sum(s >= 0.8 for s in finite)} of {len(finite)}."]
    lines += ["",
              "## Calibrated ratios (rho_3..rho_NFE; rho_1 = rho_2 = 1) and calibration time (1 thread)", "",
              "| guidance | NFE | ratios | seconds |", "|---|---|---|---:|"]
    for (g, n), r in calibrated.items():
        lines.append(f"| {g:g} | {n} | {', '.join(f'{v:.3f}' for v in r.ratios[2:])} | {r.meta.extra['seconds']:.0f} |")
    write_json(b.path, b.store)
    atomic_write_bytes(b.results_dir / "digits.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
