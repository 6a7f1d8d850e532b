"""S3 solver schedules vs the best hand-set solver and vs tuned timesteps (the README's USF tables).

Stages (each resumable; rerun the same command after an interruption):

  handset    every registered solver x options x spacing x terminal point (deduplicated by
             plan), scored on the first --screen-samples search samples; the best 20 rescored
             on the whole search batch (128 digits, 1024 GMM samples); the best 5 kept as
             timesteps-only schedule files of their grids.
  timesteps  `fewstep search timesteps` for the best hand-set solver (and UniPC).
  s3         `fewstep search usf` with the predictor (and, at NFE 5, without it).
  evaluate   `fewstep compare` on the evaluation seeds 0..N-1 (disjoint from the search seeds
             100000+): the 5 hand-set finalists, the tuned timesteps and the S3 schedules.
  bootstrap  (optional) a paired bootstrap over the evaluation seeds: 95% intervals of S3's
             MSE ratios to the best hand-set finalist and the best tuned timesteps.
  report     benchmarks/results/usf/summary.{json,md}.

  python benchmarks/usf_benchmark.py --settings gmm digits-g3 digits-g7.5 --nfe 5 6 8

Search runs live under runs/usf-bench/ (log, state, reference); schedule files, screens and
compare results are copied to benchmarks/results/usf/<setting>/nfe<k>/.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep import ArtifactMeta, GridSpec, SolverSchedule, make_plan  # noqa: E402
from fewstep.eval.compare import CompareConfig, run_compare  # noqa: E402
from fewstep.infra.io import read_json, write_json  # noqa: E402
from fewstep.eval.testbeds import make_testbed  # noqa: E402
from fewstep.tuning.search import search_timesteps, search_usf  # noqa: E402
from fewstep.tuning.search.fitness import Fitness  # noqa: E402

SETTINGS = {"gmm": ("gmm", 2.0), "digits-g3": ("digits", 3.0), "digits-g7.5": ("digits", 7.5)}
SPACINGS = ("linspace", "leading", "trailing", "logsnr", "time_uniform", "time_quadratic", "karras")
RESULTS = ROOT / "benchmarks" / "results" / "usf"
RUNS = ROOT / "runs" / "usf-bench"
# Search samples (seeds 100000...) of the rescreen and of both searches. The GMM's MSE has a heavy
# tail (samples near a boundary between components), so its cheap exact model gets a larger batch.
SEARCH = {"gmm": 1024, "digits": 128}


def handset_options():
    """Every option combination of the registered hand-set solvers that can matter at low NFE."""
    yield "ddim", {}
    for order, space, lof in itertools.product((2, 3), ("data", "noise"), (True, False)):
        for v in (("midpoint", "heun") if order == 2 else ("reference", "taylor")):
            yield "dpmpp", {"order": order, "space": space, "lower_order_final": lof,
                            ("variant" if order == 2 else "third_order"): v}
    for order, variant, space, corrector, lof in itertools.product(
            (1, 2, 3), ("bh1", "bh2"), ("data", "noise"), (True, False), (True, False)):
        yield "unipc", {"order": order, "variant": variant, "space": space, "corrector": corrector,
                        "lower_order_final": lof}


def _label(solver, options, spacing, final):
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{solver}({opts})@{spacing}/{final}"


def _plan_key(plan) -> str:
    h = hashlib.sha256()
    for t in (plan.grid.model_timesteps, plan.grid.sigma, plan.x0_coef, plan.predict, plan.correct,
              plan.predict_raw):
        if t is not None:
            h.update(t.double().numpy().round(12).tobytes())
    return h.hexdigest()


def stage_handset(testbed, name, guidance, nfe, out, run, log, screen_samples):
    screen_path = out / "handset.json"
    screen = read_json(screen_path) if screen_path.exists() else {"configs": {}, "rescreen": {}}
    if screen.get("screen_samples", screen_samples) != screen_samples:
        raise ValueError(f"{screen_path} was screened on {screen['screen_samples']} samples; delete it to rescreen")
    screen["screen_samples"] = screen_samples
    fit32 = Fitness(testbed, nfe, guidance, screen_samples, 100000, "mse", run / f"handset{screen_samples}", log=log)
    configs, seen = {}, set()
    for (solver, options), spacing, final in itertools.product(list(handset_options()), SPACINGS, ("zero", "min")):
        try:
            plan = make_plan(fit32.schedule, solver, nfe=nfe, spacing=GridSpec(spacing=spacing, final_sigma=final,
                                                                                 convention="multistep"), **options)
        except ValueError:
            continue
        key = _plan_key(plan)
        if key not in seen:
            seen.add(key)
            configs[_label(solver, options, spacing, final)] = (solver, options, plan.grid)
    log(f"{name} NFE {nfe}: {len(configs)} distinct hand-set configurations")
    start = time.perf_counter()
    for i, (label, (solver, options, grid)) in enumerate(configs.items()):
        if label in screen["configs"]:
            continue
        sched = SolverSchedule.from_grid(grid)
        screen["configs"][label] = fit32(solver, {**options, "solver_schedule": sched})
        if i % 50 == 0 or i == len(configs) - 1:
            write_json(screen_path, screen)
    screen["screen_seconds"] = screen.get("screen_seconds", 0.0) + time.perf_counter() - start
    ranked = sorted(configs, key=lambda k: (screen["configs"][k], k))
    fit256 = Fitness(testbed, nfe, guidance, SEARCH[testbed.name], 100000, "mse", run / "handset-search", log=log)
    for label in ranked[:20]:
        if label not in screen["rescreen"]:
            solver, options, grid = configs[label]
            screen["rescreen"][label] = fit256(solver, {**options, "solver_schedule": SolverSchedule.from_grid(grid)})
    finalists = sorted(screen["rescreen"], key=lambda k: (screen["rescreen"][k], k))[:5]
    screen["finalists"] = []
    for rank, label in enumerate(finalists):
        solver, options, grid = configs[label]
        path = out / "handset" / f"{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        SolverSchedule.from_grid(grid, meta=ArtifactMeta(solver=solver, nfe=nfe, guidance=guidance, extra={
            "handset": label, "solver_options": options})).save(path)
        screen["finalists"].append({"label": label, "solver": solver, "options": options, "file": str(path.relative_to(ROOT)),
                                    "search_mse": screen["rescreen"][label]})
    write_json(screen_path, screen)
    log(f"{name} NFE {nfe}: best hand-set on the search batch {finalists[0]} ({screen['rescreen'][finalists[0]]:.4g})")


def _spec(solver, options, path):
    opts = ",".join(f"{k}={json.dumps(v)}" for k, v in options.items())
    return f"{solver}:{opts + ',' if opts else ''}solver_schedule={path}"


def stage_timesteps(testbed, name, guidance, nfe, out, run, log, budget, which):
    best = read_json(out / "handset.json")["finalists"][0]
    opts = ",".join(f"{k}={json.dumps(v)}" for k, v in best["options"].items())
    solvers = {"unipc": "unipc", "best-handset": f"{best['solver']}:{opts}" if opts else best["solver"]}
    for tag, spec in solvers.items():
        if tag not in which:
            continue
        search_timesteps(testbed, spec, nfe, guidance, budget, out=out / f"timesteps-{tag}.json",
                         run_dir=str(run / f"timesteps-{tag}"), num_samples=SEARCH[testbed.name], progress=False,
                         log=log)


def stage_s3(testbed, name, guidance, nfe, out, run, log, budget, no_predictor):
    for predictor in ((True, False) if no_predictor else (True,)):
        tag = "s3" if predictor else "s3-nopredictor"
        search_usf(testbed, nfe, guidance, budget, out=out / f"{tag}.json", run_dir=str(run / tag),
                   predictor=predictor, num_samples=SEARCH[testbed.name], progress=False, log=log)


def _methods(out):
    screen = read_json(out / "handset.json")
    methods = {f"handset {f['label']}": _spec(f["solver"], f["options"], ROOT / f["file"]) for f in screen["finalists"]}
    for tag in ("unipc", "best-handset"):
        path = out / f"timesteps-{tag}.json"
        if path.exists():
            tuned = json.loads(path.read_text())
            meta = tuned["meta"]
            methods[f"timesteps {tag}"] = _spec(meta["solver"], meta["extra"]["solver_options"], path)
    for tag in ("s3", "s3-nopredictor"):
        if (out / f"{tag}.json").exists():
            methods[tag] = f"usf:solver_schedule={out / f'{tag}.json'}"
    return methods


def stage_evaluate(testbed, name, guidance, nfe, out, run, log, num_samples):
    methods = _methods(out)
    shutil.rmtree(run / "compare", ignore_errors=True)  # schedule files may have changed; the reference is cached
    cfg = CompareConfig(model=testbed.name, solvers=list(methods.values()), nfe=[nfe], num_samples=num_samples,
                        seed=0, guidance=guidance, out=str(run / "compare"), plot=False, progress=False)
    results = run_compare(testbed, cfg, log=lambda m: None)
    by_spec = {e["method"]: e for e in results["entries"]}
    from fewstep.eval.compare import Method

    table = {}
    for label, spec in methods.items():
        e = by_spec[Method.parse(spec).label]
        table[label] = {k: e.get(k) for k in ("mse", "fd", "accuracy", "diverged")}
    write_json(out / "evaluation.json", {"num_samples": num_samples, "seeds": [0, num_samples], "guidance": guidance,
                                         "reference": results["reference"]["description"], "methods": table})
    log(f"{name} NFE {nfe}: evaluated {len(table)} methods on seeds 0..{num_samples - 1}")


def stage_bootstrap(testbed, name, guidance, nfe, out, run, log, num_samples, resamples=2000):
    """Paired bootstrap of S3's held-out MSE ratios (same seeds, same reference as `evaluate`).

    Regenerates the samples of S3, the best hand-set finalist and the best tuned timesteps on
    seeds 0..N-1 (the evaluation's), takes per-sample MSEs to the evaluation's cached reference
    and resamples the N seeds jointly: a 95% interval for S3 / hand-set and S3 / tuned.
    """
    from fewstep.eval.compare import Method, _run_method
    from fewstep.infra.io import load_tensors

    ev = read_json(out / "evaluation.json")
    if ev["num_samples"] != num_samples:
        raise ValueError(f"{out / 'evaluation.json'} has {ev['num_samples']} samples, not {num_samples}")
    methods, table = _methods(out), ev["methods"]
    pick = lambda prefix: min((k for k in table if k.startswith(prefix) and table[k]["mse"] is not None),  # noqa: E731
                              key=lambda k: table[k]["mse"], default=None)
    chosen = {"s3": "s3", "handset": pick("handset"), "tuned": pick("timesteps")}
    chosen = {k: v for k, v in chosen.items() if v in methods}
    cfg = CompareConfig(model=testbed.name, solvers=[methods[v] for v in chosen.values()], nfe=[nfe],
                        num_samples=num_samples, seed=0, guidance=guidance, out=str(run / "compare"), plot=False,
                        progress=False).with_defaults(testbed)
    ref = load_tensors(run / "compare" / "reference.safetensors")["samples"]
    x_T, cond = testbed.initial_noise(num_samples, 0)
    per_sample = {}
    for tag, label in chosen.items():
        samples, _ = _run_method(testbed, cfg, Method.parse(methods[label]), nfe, x_T, cond)
        per_sample[tag] = (samples - ref).pow(2).flatten(1).mean(1).double()
        if abs(per_sample[tag].mean().item() - table[label]["mse"]) > 1e-6 * table[label]["mse"] + 1e-9:
            raise RuntimeError(f"{label}: regenerated MSE {per_sample[tag].mean().item()} != {table[label]['mse']}")
    idx = torch.randint(num_samples, (resamples, num_samples), generator=torch.Generator().manual_seed(0))
    result = {"num_samples": num_samples, "resamples": resamples, "methods": chosen}
    for other in ("handset", "tuned"):
        if other in per_sample:
            ratios = per_sample["s3"][idx].mean(1) / per_sample[other][idx].mean(1)
            lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            result[f"s3_vs_{other}"] = {"ratio": (per_sample["s3"].mean() / per_sample[other].mean()).item(),
                                        "ci95": [lo, hi]}
    write_json(out / "bootstrap.json", result)
    log(f"{name} NFE {nfe}: paired bootstrap {result}")


def _search_result(name, nfe, tag, out):
    """The search's result.json (cost, evaluations to best), kept next to the schedule as <tag>-search.json.

    runs/ is not committed; the copy under benchmarks/results/ lets the report be regenerated anywhere.
    """
    kept = out / f"{tag}-search.json"
    run_result = RUNS / name / f"nfe{nfe}" / tag / "result.json"
    if run_result.exists():
        result = read_json(run_result)
        result["schedule"] = str(out.relative_to(ROOT) / f"{tag}.json")
        write_json(kept, result)
    return read_json(kept) if kept.exists() else None


def stage_report(settings, nfes):
    rows, data = [], {}
    for name in settings:
        for nfe in nfes:
            out = RESULTS / name / f"nfe{nfe}"
            if not (out / "evaluation.json").exists():
                continue
            ev = read_json(out / "evaluation.json")["methods"]
            hand = {k: v["mse"] for k, v in ev.items() if k.startswith("handset") and v["mse"] is not None}
            best_hand = min(hand, key=hand.get)
            tuned = {k: v["mse"] for k, v in ev.items() if k.startswith("timesteps") and v["mse"] is not None}
            best_tuned = min(tuned, key=tuned.get) if tuned else None
            entry = {"best_handset": best_hand, "best_handset_mse": hand[best_hand],
                     "best_tuned": best_tuned, "best_tuned_mse": tuned.get(best_tuned),
                     "methods": ev}
            for tag in ("s3", "s3-nopredictor"):
                if tag in ev and ev[tag]["mse"] is not None:
                    entry[f"{tag}_mse"] = ev[tag]["mse"]
                    entry[f"{tag}_vs_handset"] = ev[tag]["mse"] / hand[best_hand]
                    if best_tuned:
                        entry[f"{tag}_vs_tuned"] = ev[tag]["mse"] / tuned[best_tuned]
                    result = _search_result(name, nfe, tag, out)
                    if result:
                        entry[f"{tag}_search"] = result
            if (out / "bootstrap.json").exists():
                entry["bootstrap"] = read_json(out / "bootstrap.json")
            data[f"{name}/nfe{nfe}"] = entry
            rows.append((name, nfe, entry))
    write_json(RESULTS / "summary.json", data)
    lines = ["| model | NFE | best hand-set (MSE) | tuned timesteps (MSE) | S3 (MSE) | S3 / hand-set | S3 / tuned |",
             "|---|---:|---|---|---:|---:|---:|"]
    for name, nfe, e in rows:
        s3 = e.get("s3_mse")

        def ratio(key, e=e):
            if e.get(key) is None:
                return ""
            ci = e.get("bootstrap", {}).get(key, {}).get("ci95")
            return f"{e[key]:.2f}x" + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
        lines.append(f"| {name} | {nfe} | {e['best_handset']} ({e['best_handset_mse']:.3e}) | "
                     f"{e['best_tuned']} ({e['best_tuned_mse']:.3e}) | {'' if s3 is None else format(s3, '.3e')} | "
                     f"{ratio('s3_vs_handset')} | {ratio('s3_vs_tuned')} |")
    lines += ["", "| model | NFE | search | search-batch MSE | held-out MSE | full evaluations to best (of budget) | "
              "search wall time (s) |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, nfe, e in rows:
        for tag in ("s3", "s3-nopredictor"):
            r = e.get(f"{tag}_search")
            if r:
                lines.append(f"| {name} | {nfe} | {tag} | {r['best_fitness']:.3e} | {e[f'{tag}_mse']:.3e} | "
                             f"{r['evaluations_to_best']} (of {r['evaluations']}) | {r['seconds']:.0f} |")
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8])
    p.add_argument("--stages", nargs="+", default=["handset", "timesteps", "s3", "evaluate", "report"],
                   choices=["handset", "timesteps", "s3", "evaluate", "bootstrap", "report"])
    p.add_argument("--s3-budget", type=int, default=200, help="full evaluations per S3 search")
    p.add_argument("--timesteps-budget", type=int, default=150, help="full evaluations per timestep search")
    p.add_argument("--timesteps-solvers", nargs="+", default=["best-handset", "unipc"],
                   choices=["best-handset", "unipc"], help="whose timesteps to tune")
    p.add_argument("--screen-samples", type=int, default=32, help="samples of the first hand-set screen")
    p.add_argument("--no-predictor-nfe", nargs="*", type=int, default=[5],
                   help="NFEs at which S3 also runs without the predictor")
    p.add_argument("--eval-samples", type=int, default=1000, help="evaluation samples (seeds 0..N-1)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    for name in args.settings:
        model, guidance = SETTINGS[name]
        stages = [s for s in args.stages if s != "report"]
        if not stages:
            continue
        testbed = make_testbed(model)
        for nfe in args.nfe:
            out, run = RESULTS / name / f"nfe{nfe}", RUNS / name / f"nfe{nfe}"
            out.mkdir(parents=True, exist_ok=True)
            for stage in stages:
                t = time.perf_counter()
                if stage == "handset":
                    stage_handset(testbed, name, guidance, nfe, out, run, log, args.screen_samples)
                elif stage == "timesteps":
                    stage_timesteps(testbed, name, guidance, nfe, out, run, log, args.timesteps_budget,
                                    args.timesteps_solvers)
                elif stage == "s3":
                    stage_s3(testbed, name, guidance, nfe, out, run, log, args.s3_budget,
                             nfe in args.no_predictor_nfe)
                elif stage == "evaluate":
                    stage_evaluate(testbed, name, guidance, nfe, out, run, log, args.eval_samples)
                elif stage == "bootstrap":
                    stage_bootstrap(testbed, name, guidance, nfe, out, run, log, args.eval_samples)
                log(f"{name} NFE {nfe}: {stage} took {time.perf_counter() - t:.0f} s")
    if "report" in args.stages:
        stage_report(args.settings, args.nfe)


if __name__ == "__main__":
    main()
