"""Does S3's learned predictor save full evaluations? Several seeds, with and without it.

For each seed, S3 runs with the same budget twice (``predictor=True`` / ``False``) on the GMM
(cheap and exact; NFE 5, guidance 2, 1024 search samples by default). Reported: the best
search-batch MSE reached at equal numbers of full evaluations (50, 100, 150, budget; the screen of
the initial population is the same for both and not counted) per seed and the median ratio
on/off; how often the predictor passed its held-out rank-correlation gate (``predictor_min_rank``)
and the correlations it measured; the full evaluations until the best-so-far first reaches the
median final best of the runs without the predictor; and the wall time of the search.

  python benchmarks/usf_predictor.py [--seeds 0 1 2 3 4] [--budget 200]

Writes benchmarks/results/usf/predictor-<model>.{json,md}; runs live under runs/usf-bench/predictor/
(delete that folder after changing the search code: finished runs are reused).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep.infra.io import write_json  # noqa: E402
from fewstep.eval.testbeds import make_testbed  # noqa: E402
from fewstep.tuning.search import search_usf  # noqa: E402

RUNS = ROOT / "runs" / "usf-bench" / "predictor"
RESULTS = ROOT / "benchmarks" / "results" / "usf"


def best_so_far(run_dir: Path) -> list[float]:
    out, best = [], math.inf
    for line in (run_dir / "search_log.jsonl").read_text().splitlines():
        v = json.loads(line)["fitness"]
        best = min(best, math.inf if v is None else v)
        out.append(best)
    return out


def gate_log(run_dir: Path) -> list[tuple[float, bool]]:
    """(held-out rank correlation, predictor switched off) of every generation the gate was asked about."""
    seen = {}
    for line in (run_dir / "search_log.jsonl").read_text().splitlines():
        e = json.loads(line)
        if "predictor rank" in e["origin"]:
            text = e["origin"].split("predictor rank ")[1]
            seen[e["generation"]] = (float(text.split(",")[0].rstrip(")")), text.endswith(", off)"))
    return list(seen.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gmm")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    testbed = make_testbed(args.model)
    runs = {}
    for seed in args.seeds:
        for predictor in (True, False):
            tag = f"{args.model}-nfe{args.nfe}-seed{seed}-{'on' if predictor else 'off'}"
            run = RUNS / tag
            search_usf(testbed, args.nfe, args.guidance, args.budget, out=str(run / "schedule.json"),
                       run_dir=str(run), predictor=predictor, seed=seed, num_samples=args.num_samples,
                       progress=False, log=lambda m: None)
            result = json.loads((run / "result.json").read_text())
            ranks = gate_log(run)
            runs[tag] = {"seed": seed, "predictor": predictor, "curve": best_so_far(run),
                         "seconds": result["seconds"], "best": result["best_fitness"],
                         "gate": {"generations": len(ranks), "used": sum(not off for _, off in ranks),
                                  "ranks": [r for r, _ in ranks]}}
    target = statistics.median(r["best"] for r in runs.values() if not r["predictor"])
    for r in runs.values():
        r["evaluations_to_target"] = next((i + 1 for i, v in enumerate(r["curve"]) if v <= target), None)
    summary = {"target": target, "budget": args.budget, "model": args.model, "nfe": args.nfe,
               "guidance": args.guidance, "num_samples": args.num_samples, "runs": runs}
    lines = [f"Target: median final best of the runs without the predictor, MSE {target:.4g} "
             f"({args.model}, NFE {args.nfe}, budget {args.budget} full evaluations, {args.num_samples} search samples).",
             "", "| seed | predictor | final best | evaluations to target | wall time (s) |", "|---:|---|---:|---:|---:|"]
    for r in runs.values():
        reached = r["evaluations_to_target"]
        lines.append(f"| {r['seed']} | {'on' if r['predictor'] else 'off'} | {r['best']:.4g} | "
                     f"{'not reached' if reached is None else reached} | {r['seconds']:.0f} |")
    for predictor in (True, False):
        rs = [r for r in runs.values() if r["predictor"] == predictor]
        reached = [r["evaluations_to_target"] for r in rs if r["evaluations_to_target"] is not None]
        summary[f"{'on' if predictor else 'off'}_summary"] = {
            "median_best": statistics.median(r["best"] for r in rs), "reached": len(reached), "runs": len(rs),
            "median_evaluations_to_target": statistics.median(reached) if reached else None,
            "median_seconds": statistics.median(r["seconds"] for r in rs)}
        s = summary[f"{'on' if predictor else 'off'}_summary"]
        lines.append(f"| all | {'on' if predictor else 'off'} | median {s['median_best']:.4g} | "
                     f"{s['reached']}/{s['runs']} reached, median {s['median_evaluations_to_target']} | "
                     f"median {s['median_seconds']:.0f} |")
    marks = [b for b in (50, 100, 150) if b < args.budget] + [args.budget]
    lines += ["", "Best search-batch MSE at equal full-evaluation budgets (on / off, and the ratio):", "",
              "| seed | " + " | ".join(f"{b} evaluations" for b in marks) + " |", "|---:|" + "---:|" * len(marks)]
    ratios = {b: [] for b in marks}
    for seed in args.seeds:
        on, off = (runs[f"{args.model}-nfe{args.nfe}-seed{seed}-{k}"]["curve"] for k in ("on", "off"))
        cells = []
        for b in marks:
            a, c = on[min(b, len(on)) - 1], off[min(b, len(off)) - 1]
            ratios[b].append(a / c)
            cells.append(f"{a:.4g} / {c:.4g} ({a / c:.2f}x)")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("| median ratio | " + " | ".join(f"{statistics.median(ratios[b]):.2f}x" for b in marks) + " |")
    summary["equal_budget_ratio_median"] = {b: statistics.median(ratios[b]) for b in marks}
    gates = [r["gate"] for r in runs.values() if r["predictor"]]
    all_ranks = [x for g in gates for x in g["ranks"]]
    lines += ["", f"Predictor gate (held-out Spearman >= 0.3): used in {sum(g['used'] for g in gates)} of "
              f"{sum(g['generations'] for g in gates)} evolutionary generations over the seeds; measured rank "
              f"correlations: median {statistics.median(all_ranks) if all_ranks else float('nan'):.2f}, "
              f"range {min(all_ranks, default=float('nan')):.2f} to {max(all_ranks, default=float('nan')):.2f}."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"predictor-{args.model}.json", summary)
    (RESULTS / f"predictor-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
