"""A published schedule on another model: Align Your Steps for SD-1.5 (``solver_schedule="ays:sd15"``) vs each
solver's default grid (the models' common ``linspace`` grid, as ``fewstep compare`` uses) and vs the log-SNR
grid, on the built-in digits model and the GMM (both DDPM ``linear`` schedules, not SD's).

    python benchmarks/ays_transfer.py            # ~10 min on one CPU thread; rerun to resume

Evaluation as ``fewstep compare``: samples i = 0..N-1 use noise seed i (nothing is fitted: the schedule is used as
published, log-linearly interpolated for NFE 6), the testbeds' default guidance (digits 1.5, GMM 2). Metrics:
digits-FD (digits) and MSE to the exact ODE solution (GMM), each with a paired bootstrap over the evaluation
samples (1000 resamples, 95% percentile interval) of the differences AYS - default and AYS - logsnr
(FD of a resample with repeated samples is inflated, about equally in both arms: its difference, not
its ratio, is what the resamples estimate without bias).
Results: ``benchmarks/results/ays/transfer.json`` and ``transfer.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewstep.eval.metrics.fd import feature_statistics, frechet_distance  # noqa: E402
from fewstep.infra.io import atomic_write_bytes, read_json, write_json  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed  # noqa: E402

SOLVERS = ("ddim", "dpmpp", "unipc")
NFES = (6, 10)
OUT = Path(__file__).resolve().parent / "results" / "ays"
N = {"digits": 500, "gmm": 1000}


def main() -> None:
    torch.set_num_threads(1)
    path = OUT / "transfer.json"
    store = read_json(path) if path.exists() else {}
    lines = ["# Align Your Steps (SD-1.5) on models it was not tuned for", "",
             "default = the common linspace grid; logsnr = uniform in log-SNR. Ratios AYS / grid; in brackets the "
             "paired-bootstrap 95% interval of the difference AYS - grid (1000 resamples; negative: AYS better).", ""]
    for tb in (DigitsTestbed(), GMMTestbed()):
        n, g = N[tb.name], tb.default_guidance
        x, cond = tb.initial_noise(n, 0)
        ref = None
        metric = "digits-FD" if tb.name == "digits" else "MSE to the exact ODE solution"
        lines += [f"## {tb.name} ({n} samples, guidance {g:g}; {metric})", "",
                  "| solver | NFE | default | logsnr | ays:sd15 | AYS / default [95% CI of AYS - default] | "
                  "AYS / logsnr [95% CI of AYS - logsnr] |", "|---|---:|---:|---:|---:|---|---|"]
        for solver in SOLVERS:
            for nfe in NFES:
                key = f"{tb.name}/{solver}/nfe{nfe}"
                if key not in store:
                    t0 = time.perf_counter()
                    arms = {}
                    for arm, options, spacing in (("default", {}, None), ("logsnr", {}, "logsnr"),
                                                  ("ays", {"solver_schedule": "ays:sd15"}, None)):
                        arms[arm] = torch.cat([tb.generate(solver, options, nfe, x[i:i + tb.batch_size],
                                                           cond[i:i + tb.batch_size], g, spacing)
                                               for i in range(0, n, tb.batch_size)])
                    if tb.name == "digits":
                        feats = {a: tb._features(s.clamp(-1, 1)) for a, s in arms.items()}
                        value = {a: frechet_distance(*feature_statistics(f), *tb._real_stats) for a, f in feats.items()}
                        ci = {base: _bootstrap(lambda idx, a: frechet_distance(*feature_statistics(feats[a][idx]),
                                                                               *tb._real_stats), n, base)
                              for base in ("default", "logsnr")}
                    else:
                        if ref is None:
                            ref = tb.reference(x, cond, g, None, None, None, None)
                        err = {a: (s - ref).pow(2).flatten(1).mean(1).double() for a, s in arms.items()}
                        value = {a: float(e.mean()) for a, e in err.items()}
                        ci = {base: _bootstrap(lambda idx, a: float(err[a][idx].mean()), n, base)
                              for base in ("default", "logsnr")}
                    store[key] = {**value, "ci95_of_difference": ci,
                                  "seconds": round(time.perf_counter() - t0, 1)}
                    write_json(path, store)
                    print(key, store[key], flush=True)
                r = store[key]
                fmt = "{:.3f}" if tb.name == "digits" else "{:.2e}"
                ci = r["ci95_of_difference"]
                lines.append(f"| {solver} | {nfe} | {fmt.format(r['default'])} | {fmt.format(r['logsnr'])} | "
                             f"{fmt.format(r['ays'])} | " + " | ".join(
                                 f"{r['ays'] / r[b]:.2f}x [{fmt.format(ci[b][0])}, {fmt.format(ci[b][1])}]"
                                 for b in ("default", "logsnr")) + " |")
        lines.append("")
    atomic_write_bytes(OUT / "transfer.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def _bootstrap(stat, n: int, base: str, resamples: int = 1000) -> list[float]:
    """95% interval of stat(idx, 'ays') - stat(idx, base) over paired resamples of the evaluation samples."""
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        ratios.append(stat(idx, "ays") - stat(idx, base))
    r = torch.tensor(ratios)
    return [float(r.quantile(0.025)), float(r.quantile(0.975))]


if __name__ == "__main__":
    main()
