"""DC-Solver's two calibration objectives and ``objective="auto"``, held out: the README's DC objective table.

    python benchmarks/dc_objectives.py gmm                 # minutes on one CPU thread
    python benchmarks/dc_objectives.py digits [--pairs K]  # hours; rerun to resume (K: pairs this run)

For each (guidance, NFE) pair -- digits: guidance 1.5, 3, 5, 7.5 x NFE 5, 6, 8, 10; the mixture:
guidance 2 x NFE 5, 6, 8, 10 -- ``fewstep.calibrate_dc(objective="auto")`` with the CLI's default
split: fit on 10 samples (seeds 100000..100009), validation on the next 32 (100010..100041),
DDIM-200 reference. It fits both objectives (``trajectory``: official, per step; ``final``: joint,
final-sample MSE), keeps the one with the lower validation MSE, and writes all-ones ratios (plain
UniPC) when that one does not beat UniPC on validation. Each candidate and the written ratios are
then evaluated on the held-out evaluation seeds 0..N-1 against the evaluation reference (DPM-Solver++(3),
200 steps; the mixture: its exact ODE), with a 95% paired-bootstrap interval of auto's MSE ratio to UniPC.
Results: ``benchmarks/results/dc/objectives-{model}.json`` and ``.md``; ratio files under
``benchmarks/results/dc/objectives-{model}/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dc_common import CALIBRATION_SEED, Bench  # noqa: E402

import fewstep  # noqa: E402
from fewstep.tuning.dc.command import calibration_inputs  # noqa: E402
from fewstep.infra.io import atomic_write_bytes, load_tensors, read_json, save_tensors  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed  # noqa: E402
from fewstep.eval.holdout import paired_ratio  # noqa: E402

FIT, VALIDATION = 10, 32
# Evaluation samples: 1000 on the mixture; 100 on digits (the machine this ran on was shared by 8 jobs on
# 2 cores: the 200-step evaluation references dominate the cost; the intervals show the uncertainty).
SETTINGS = {"digits": (DigitsTestbed, (1.5, 3.0, 5.0, 7.5), (5, 6, 8, 10), 100),
            "gmm": (GMMTestbed, (2.0,), (5, 6, 8, 10), 1000)}


def main() -> None:
    global VALIDATION
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(SETTINGS))
    p.add_argument("--pairs", type=int, default=99, help="calibrate at most this many new pairs in this run")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--part", nargs="+", type=int, metavar="NFE",
                   help="only these NFEs, from the last guidance down, in a results file of their own (a second "
                        "process on a shared machine); a run without --part merges every part into the table")
    p.add_argument("--report", action="store_true", help="only write the table from what is stored")
    p.add_argument("--validation", type=int, default=VALIDATION,
                   help=f"validation samples (default: {VALIDATION}, the CLI's; others get files of their own)")
    args = p.parse_args()
    torch.set_num_threads(1)
    VALIDATION = args.validation
    make, guidances, nfes, n_eval = SETTINGS[args.model]
    stem = f"objectives-{args.model}" + ("" if VALIDATION == 32 else f"-v{VALIDATION}")
    name = stem + ("" if not args.part else "-part" + "-".join(map(str, args.part)))
    b = Bench(make(), name, args.eval_samples or n_eval)
    b.artifacts = b.results_dir / stem
    if args.part:
        nfes, guidances = [n for n in nfes if n in args.part][::-1], guidances[::-1]
    else:  # what the parts evaluated is not evaluated again
        for part in sorted(b.results_dir.glob(f"{stem}-part*.json")):
            b.store.update({k: v for k, v in read_json(part).items() if k != "num_eval"})
    b.artifacts.mkdir(parents=True, exist_ok=True)
    res = lambda key, solver, options, nfe, g: b.unit(key, lambda: b.evaluate(solver, options, nfe, g, key))  # noqa: E731
    fresh = 0
    for n in nfes if not args.report else ():  # NFE-major: a partial run still covers every guidance
        for g in guidances:
            path = b.artifacts / f"auto-nfe{n}-g{g:g}.json"
            if not path.exists():
                if fresh >= args.pairs:
                    continue
                fresh += 1
                inputs = calibration_inputs(b.tb, g, FIT + VALIDATION, CALIBRATION_SEED, None)
                start = time.perf_counter()
                r = fewstep.calibrate_dc(**inputs, nfe=n, objective="auto", validation=VALIDATION,
                                         reference=ddim_reference(b, g, inputs),
                                         checkpoint=b.work / f"objectives-state-nfe{n}-g{g:g}.json")
                r.meta.extra.update(seconds=round(time.perf_counter() - start, 1), threads=1, seed=CALIBRATION_SEED,
                                    reference="ddim, 200 steps")
                r.save(path)
                b.log(f"{b.name}: nfe {n} g {g:g}: {r.meta.extra['objective']} "
                      f"(written: {r.meta.extra['validation']['written']}) in {r.meta.extra['seconds']:.0f} s")
            r = fewstep.DCRatios.load(path)
            k = f"g{g:g}/nfe{n}"
            res(f"unipc/{k}", "unipc", {}, n, g)
            for name, ratios in r.meta.extra["ratios_by_objective"].items():
                res(f"{name}/{k}", "dc", {"ratios": ratios}, n, g)
            auto_ci(b, r, k)
    if not args.part:
        write_table(b, stem, *SETTINGS[args.model][1:3])


def ddim_reference(b: Bench, g: float, inputs: dict) -> torch.Tensor:
    """calibrate_dc's default reference (DDIM, 200 steps) of the calibration samples, once per guidance
    (as ``fewstep calibrate dc`` keeps it), instead of once per pair."""
    path = b.work / f"objectives-ddim200-g{g:g}-n{FIT + VALIDATION}.safetensors"
    if not path.exists():
        run = {k: inputs[k] for k in ("schedule", "prediction", "spacing", "guidance", "cond", "uncond")}
        with torch.no_grad():
            save_tensors(path, {"x": fewstep.sample(inputs["model"], inputs["x_T"], solver="ddim", nfe=200, **run)})
    return load_tensors(path)["x"]


def auto_ci(b: Bench, r: fewstep.DCRatios, k: str) -> None:
    """auto's held-out MSE ratio to UniPC and its paired-bootstrap interval (from the stored per-sample errors)."""
    written = "unipc" if r.meta.extra["validation"]["written"] == "baseline" else r.meta.extra["objective"]
    b.store[f"auto-ci/{k}"] = list(paired_ratio(b.errors(f"{written}/{k}"), b.errors(f"unipc/{k}")))


def write_table(b: Bench, stem: str, guidances, nfes) -> None:
    model = stem.split("-")[1]
    lines = [f"# DC objectives on {model}: held-out MSE ratio to UniPC-2 ({b.n} evaluation samples, seeds 0..{b.n - 1}; "
             f"fit on seeds {CALIBRATION_SEED}..{CALIBRATION_SEED + FIT - 1}, validation on "
             f"{CALIBRATION_SEED + FIT}..{CALIBRATION_SEED + FIT + VALIDATION - 1})", "",
             "| guidance | NFE | UniPC-2 MSE | trajectory | final | auto: chosen (validation ratio) | auto, held out "
             "[95% paired-bootstrap CI] |", "|---:|---:|---:|---:|---:|---|---:|"]
    worst = 0.0
    for g in guidances:
        for n in nfes:
            k = f"g{g:g}/nfe{n}"
            path = b.artifacts / f"auto-nfe{n}-g{g:g}.json"
            done = path.exists() and all(f"{m}/{k}" in b.store for m in ("unipc", "trajectory", "final"))
            if done and f"auto-ci/{k}" not in b.store:
                auto_ci(b, fewstep.DCRatios.load(path), k)
            if not done:
                lines.append(f"| {g:g} | {n} | not run | | | | |")
                continue
            v = fewstep.DCRatios.load(path).meta.extra["validation"]
            u = b.store[f"unipc/{k}"]["mse"]
            cells = [f"{b.store[f'{name}/{k}']['mse'] / u:.2f}x" for name in ("trajectory", "final")]
            chosen = v["tuned"].split("(")[1].rstrip(")")
            pick = f"{chosen} ({v['ratio']:.2f}x)" + (" -> UniPC written" if v["written"] == "baseline" else "")
            ratio, lo, hi = b.store[f"auto-ci/{k}"]
            worst = max(worst, ratio)
            lines.append(f"| {g:g} | {n} | {u:.2e} | {cells[0]} | {cells[1]} | {pick} | {ratio:.2f}x [{lo:.2f}, {hi:.2f}] |")
    lines += ["", f"Worst held-out ratio of auto to UniPC over the pairs run: {worst:.2f}x."]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(b.results_dir / f"{stem}.md", text.encode())
    from fewstep.infra.io import write_json

    write_json(b.path, b.store)
    print(text)


if __name__ == "__main__":
    main()
