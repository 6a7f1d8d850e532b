"""Is USF's ``average_x0`` analytical first step worth adding? Measured against the zero-x0 one fewstep has.

    python benchmarks/usf_afs_average.py         # ~10 min on one CPU thread; rerun to resume

The released S3 search (thu-nics/USF, ``configs/evo_search.yml``: ``afs`` in no_afs / zero_x0 /
average_x0) may start from x0 = 0 (eps = x / sigma, fewstep's ``analytic_first_step``) or from x0 = the
training data's mean image. Same USF schedule for both: UniPC-2 spelled out (``spell_out``) on the
common grid of NFE + 1 timesteps, whose first step costs no evaluation; ``average_x0`` is run by
handing the solver, at that first step, the output the model would give if its x0 were the data mean
(the plan is the same, only D_0 differs: 0 vs the mean). Also the plain solver at NFE (no analytic
step). Evaluation seeds 0..N-1, testbed default guidance; digits-FD (digits, 500 samples) and MSE to the
exact ODE solution (GMM, 1000 samples), with paired-bootstrap 95% intervals of average / zero.
Results: ``benchmarks/results/usf/afs_average.json`` and ``afs_average.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import fewstep
from fewstep import SolverSchedule
from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
from fewstep.infra.io import atomic_write_bytes, read_json, write_json
from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed, common_grid
from fewstep.samplers.solvers.usf import spell_out

NFES = (5, 6, 8)
OUT = Path(__file__).resolve().parent / "results" / "usf"
N = {"digits": 500, "gmm": 1000}


def data_mean(tb) -> torch.Tensor:
    if tb.name == "digits":
        from fewstep.zoo.digits import load_digits_data

        return load_digits_data("all")[0].mean(0)
    return tb._real.double().mean(0)


def run(tb, arm: str, nfe: int, x: torch.Tensor, cond: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    g = tb.default_guidance
    null = tb.null_label if tb.name == "digits" else -1
    spacing = common_grid(None, tb.schedule)
    if arm == "plain":
        opts = dict(solver="unipc", nfe=nfe, spacing=spacing)
    else:
        grid = fewstep.make_plan(tb.schedule, "unipc", nfe + 1, spacing=spacing).grid
        sched = SolverSchedule.from_grid(grid, spell_out("unipc", grid), analytic_first_step=arm == "zero_x0")
        opts = dict(solver="usf", solver_schedule=sched)
        a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    calls = []

    def model(xx, t, c):
        calls.append(1)
        if arm == "average_x0" and len(calls) == 1:  # the analytical first step: x0 = the data mean
            return (xx - a0 * mean.to(xx)) / s0
        return tb.model(xx, t, c)

    out = []
    for i in range(0, len(x), tb.batch_size):
        calls.clear()
        xb, cb = x[i:i + tb.batch_size], cond[i:i + tb.batch_size]
        out.append(fewstep.sample(model, xb, schedule=tb.schedule, prediction=tb.prediction, guidance=g, cond=cb,
                                  uncond=torch.full_like(cb, null), **opts).float())
        assert len(calls) == nfe + (arm == "average_x0"), (arm, len(calls))  # evaluations actually made
    return torch.cat(out)


def bootstrap(stat, n: int, resamples: int = 1000) -> list[float]:
    g = torch.Generator().manual_seed(0)
    r = []
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        r.append(stat(idx, "average_x0") / stat(idx, "zero_x0"))
    r = torch.tensor(r)
    return [float(r.quantile(0.025)), float(r.quantile(0.975))]


def main() -> None:
    torch.set_num_threads(1)
    path = OUT / "afs_average.json"
    store = read_json(path) if path.exists() else {}
    lines = ["# USF analytical first step: x0 = 0 (fewstep) vs x0 = data mean (released S3's average_x0)", "",
             "UniPC-2 spelled out as a USF schedule on NFE + 1 timesteps (first step analytic); plain = UniPC-2 at "
             "NFE without an analytic step. Ratio average / zero with its paired-bootstrap 95% interval.", ""]
    for tb in (DigitsTestbed(), GMMTestbed()):
        n = N[tb.name]
        x, cond = tb.initial_noise(n, 0)
        mean = data_mean(tb)
        metric = "digits-FD" if tb.name == "digits" else "MSE to the exact ODE solution"
        lines += [f"## {tb.name} ({n} samples, guidance {tb.default_guidance:g}; {metric})", "",
                  "| NFE | plain UniPC | zero x0 | average x0 | average / zero [95% CI] |", "|---:|---:|---:|---:|---|"]
        ref = None
        for nfe in NFES:
            key = f"{tb.name}/nfe{nfe}"
            if key not in store:
                t0 = time.perf_counter()
                arms = {a: run(tb, a, nfe, x, cond, mean) for a in ("plain", "zero_x0", "average_x0")}
                if tb.name == "digits":
                    feats = {a: tb._features(s.clamp(-1, 1)) for a, s in arms.items()}

                    def stat(idx, a):
                        return frechet_distance(*feature_statistics(feats[a][idx]), *tb._real_stats)
                else:
                    if ref is None:
                        ref = tb.reference(x, cond, tb.default_guidance, None, None, None, None)
                    err = {a: (s - ref).pow(2).flatten(1).mean(1).double() for a, s in arms.items()}

                    def stat(idx, a):
                        return float(err[a][idx].mean())
                everything = torch.arange(n)
                store[key] = {**{a: stat(everything, a) for a in arms}, "ci95": bootstrap(stat, n),
                              "seconds": round(time.perf_counter() - t0, 1)}
                write_json(path, store)
                print(key, store[key], flush=True)
            r = store[key]
            f = "{:.3f}" if tb.name == "digits" else "{:.2e}"
            lines.append(f"| {nfe} | {f.format(r['plain'])} | {f.format(r['zero_x0'])} | {f.format(r['average_x0'])} | "
                         f"{r['average_x0'] / r['zero_x0']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] |")
        lines.append("")
    atomic_write_bytes(OUT / "afs_average.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
