"""The held-out guard on the S3 settings that lost to the best hand-set solver (README, "USF", issue 18).

    python benchmarks/usf_guard.py [gmm-nfe8] [digits-g3-nfe6]   # resumable (the search run folders)
    python benchmarks/usf_guard.py --report                       # the tables from guard.json

Reruns `fewstep search usf` with the settings of benchmarks/usf_benchmark.py (budget 200, predictor on,
seed 0; search batch: 1024 GMM / 128 digits samples from seed 100000) and the guard's defaults (128
validation samples right after the search batch). Reports what the command said on validation and
what it wrote, then evaluates on the evaluation seeds 0..N-1 (never seen by the search or the guard)
against the evaluation reference: the searched schedule (S3's best), the guard's baseline (the best
hand-set solver of the search space) and the written file, with 95% paired-bootstrap intervals.
Results: benchmarks/results/usf/guard.{json,md}; runs under runs/usf-guard/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep.infra.io import atomic_write_bytes, read_json, write_json  # noqa: E402
from fewstep.eval.testbeds import make_testbed  # noqa: E402
from fewstep.eval.holdout import paired_ratio  # noqa: E402
from fewstep.tuning.search import search_usf  # noqa: E402
from fewstep.tuning.search.fitness import Fitness, noise_schedule_of  # noqa: E402
from fewstep.tuning.search.runlog import SearchLog  # noqa: E402
from fewstep.tuning.search.space import Candidate, LogSNRAxis, SearchSpace  # noqa: E402

SETTINGS = {"gmm-nfe8": ("gmm", 2.0, 8, 1024, 1000), "digits-g3-nfe6": ("digits", 3.0, 6, 128, 500)}
RUNS = ROOT / "runs" / "usf-guard"
OUT = ROOT / "benchmarks" / "results" / "usf" / "guard"


def main() -> None:
    torch.set_num_threads(1)
    report_only = sys.argv[1:] == ["--report"]  # only the tables, from guard.json
    names = [] if report_only else (sys.argv[1:] or list(SETTINGS))
    path = OUT.with_suffix(".json")
    results = read_json(path) if path.exists() else {}
    for name in names:
        model, guidance, nfe, search_samples, eval_samples = SETTINGS[name]
        testbed = make_testbed(model, "cpu")
        messages: list[str] = []
        out = RUNS / f"{name}.json"
        sched = search_usf(testbed, nfe, guidance, 200, out=str(out), num_samples=search_samples, progress=False,
                           log=lambda m: (messages.append(m), print(m, flush=True)))
        v, s = sched.meta.extra["validation"], sched.meta.extra["search"]
        # The searched best and the guard's baseline, rebuilt from the search log.
        entries = SearchLog(out.with_suffix(".run") / "search_log.jsonl").entries
        fit = [float("inf") if e["fitness"] is None else e["fitness"] for e in entries]
        best = min(range(len(entries)), key=lambda i: (fit[i], i))
        base = next(i for i, e in enumerate(entries) if e["origin"] == s["baseline"])
        space = SearchSpace(LogSNRAxis(noise_schedule_of(testbed)), nfe)
        sched_of = lambda i: space.schedule(Candidate.from_dict(entries[i]["candidate"]))  # noqa: E731
        ev = Fitness(testbed, nfe, guidance, eval_samples, 0, "mse", RUNS / f"{name}-eval", log=print)
        err = {"s3": ev.errors("usf", {"solver_schedule": sched_of(best)}),
               "baseline": ev.errors("usf", {"solver_schedule": sched_of(base)}),
               "written": ev.errors("usf", {"solver_schedule": str(out)})}
        results[name] = {
            "validation": v, "guard_message": next((m for m in messages if m.startswith("validation")), None),
            "search_batch": {"s3": fit[best], "baseline": fit[base]}, "eval_samples": eval_samples,
            "held_out": {k: float(e.mean()) for k, e in err.items()},
            "s3_vs_baseline": list(paired_ratio(err["s3"], err["baseline"])),
            "written_vs_baseline": list(paired_ratio(err["written"], err["baseline"])),
        }
        write_json(path, results)
    lines = ["# The guard on the S3 settings that lost (benchmarks/usf_guard.py)", "",
             "| setting | search batch: S3 / baseline | validation (128 samples): S3 / baseline | written | "
             "held out: S3 / baseline [95% CI] | held out: written / baseline [95% CI] |",
             "|---|---:|---:|---|---:|---:|"]
    for name, r in results.items():
        v, sb = r["validation"], r["search_batch"]
        s3, wr = r["s3_vs_baseline"], r["written_vs_baseline"]
        lines.append(f"| {name} | {sb['s3'] / sb['baseline']:.2f}x | {v['ratio']:.2f}x "
                     f"[{v['interval95'][0]:.2f}, {v['interval95'][1]:.2f}] | {v['written']} | "
                     f"{s3[0]:.2f}x [{s3[1]:.2f}, {s3[2]:.2f}] | {wr[0]:.2f}x [{wr[1]:.2f}, {wr[2]:.2f}] |")
    lines += ["", "Baselines: " + "; ".join(f"{n}: {r['validation']['baseline']}" for n, r in results.items()),
              "", "What the command said:", ""] + [f"- {n}: `{r['guard_message']}`" for n, r in results.items()]
    atomic_write_bytes(OUT.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
