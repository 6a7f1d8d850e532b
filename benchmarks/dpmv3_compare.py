"""DPM-Solver-v3 against DPM-Solver++ and UniPC: MSE to the reference at NFE 5, 6, 8, 10.

    python benchmarks/dpmv3_ems.py                 # first: the EMS files (fewstep ems compute)
    python benchmarks/dpmv3_compare.py [SETTING ...]   # then this; resumes, skipping finished entries
    python benchmarks/dpmv3_compare.py --report    # the markdown (and intervals) from the results
    python benchmarks/dpmv3_compare.py digits-cfg3 method=dpmv3 ending=min   # some rows only (parallel runs)

Protocol (that of `fewstep compare`): samples i = 0..N-1 use noise seed i (N = 1000 for the
mixture, 200 for digits), held out from the EMS seeds (100000+) and from the seeds that chose
the solver's defaults (benchmarks/dpmv3_defaults.py, 50000+); every solver runs on the common
`linspace` grid (dpmv3 snaps those timesteps to its EMS grid). Two endings: "zero" ends every
solver with the jump to sigma = 0 (the diffusers convention; no solver changes that last step),
"min" ends at the schedule's smallest time t_min without the jump (the official DPM-Solver-v3
code's ending: v3 integrates that last interval with its EMS too). The reference is third-order
DPM-Solver++ (third_order="taylor") with 200 steps on the same grid and ending for digits, the
exact ODE solution for the GMM (the digits `zero` reference is the `min` one plus the jump to
sigma = 0 from t_min); MSE is the mean over samples of ||x - x_ref||^2 / D. Digits
"uncond" is the unconditional model (null label), "cfg W" is classifier-free guidance with
labels i mod 10. All three solvers run at the same order: 3 unconditional, 2 guided (the
paper's choices); dpmv3 with its defaults. Intervals: paired bootstrap over the N seeds (2000
resamples) of the ratio MSE(dpmv3) / MSE(baseline), 95%. Writes
benchmarks/results/dpmv3_compare.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMS_DIR = ROOT / "runs" / "dpmv3" / "ems"
REF_DIR = ROOT / "runs" / "dpmv3" / "references"
ERR_DIR = ROOT / "runs" / "dpmv3" / "errors"
RESULTS = ROOT / "benchmarks" / "results" / "dpmv3_compare.json"
REPORT = ROOT / "benchmarks" / "results" / "dpmv3_compare.md"
EMS_TIMES = ROOT / "benchmarks" / "results" / "dpmv3_ems.json"
NFES = (5, 6, 8, 10)
ENDINGS = ("zero", "min")
# samples per model: 1000 on the mixture; 200 on digits, whose 200-step references dominate the CPU
# time of this script (sized for a shared 2-core machine; the paired intervals show what that resolves)
NUM_SAMPLES = {"gmm": 1000, "digits": 200}
MAIN = ("dpmpp", "unipc", "dpmv3")
REFERENCE = ("dpmpp", {"order": 3, "third_order": "taylor"}, 200)
RESAMPLES = 2000
# rows compared with the baselines by paired bootstrap
PAIRED = ("dpmv3", "dpmv3 EMS time_derivative=jvp", "dpmv3 K256-N100")

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


def methods(setting: str, order: int) -> dict[str, tuple[str, dict, tuple[str, ...]]]:
    """Label -> (solver, options, endings) for one setting: the comparison, then ablations."""
    ems = f"{setting}"
    rows = {
        "dpmpp": ("dpmpp", {"order": order}, ENDINGS),
        "unipc": ("unipc", {"order": order}, ENDINGS),
        "dpmv3": ("dpmv3", {"order": order, "ems": ems}, ENDINGS),
        "dpmv3 degenerate": ("dpmv3", {"order": order, "ems": ems, "degenerate": True}, ("zero",)),
        "dpmv3 no corrector": ("dpmv3", {"order": order, "ems": ems, "corrector": False}, ("zero",)),
        "dpmv3 corrector_pseudo=False": ("dpmv3", {"order": order, "ems": ems, "corrector_pseudo": False}, ("zero",)),
    }
    if setting == "digits-uncond":  # the time derivative of format 1: forward AD between integer timesteps
        rows["dpmv3 EMS time_derivative=jvp"] = ("dpmv3", {"order": order, "ems": f"{setting}-jvp"}, ENDINGS)
    if setting == "gmm-uncond":  # continuous time: the finite difference must change nothing
        rows["dpmv3 EMS time_derivative=finite_difference"] = ("dpmv3", {"order": order, "ems": f"{setting}-fd"},
                                                               ("zero",))
    if guidance_of(setting) is not None:  # the paper (Sec. 3.4): EMS of the unguided model also serve guided sampling
        rows["dpmv3 EMS without guidance"] = ("dpmv3", {"order": order, "ems": setting.split("-")[0] + "-uncond"},
                                              ("zero",))
    study = {"digits-uncond": ("K128-N100", "K256-N100", "K512-N100", "N25", "N100"), "digits-cfg3": ("K256-N100",),
             "digits-cfg7.5": ("K256-N100",),
             "gmm-uncond": ("K64", "K256", "N25", "N50", "N100", "N400")}.get(setting, ())
    for tag in study:
        rows[f"dpmv3 {tag}"] = ("dpmv3", {"order": order, "ems": f"{setting}-{tag}"}, ("zero",))
    if setting == "digits-cfg7.5":  # the large-guidance preset (no corrector) with the larger EMS
        rows["dpmv3 K256-N100 no corrector"] = ("dpmv3", {"order": order, "ems": f"{setting}-K256-N100",
                                                          "corrector": False}, ("zero",))
    return rows


def read_results() -> dict:
    from fewstep.infra.io import read_json

    return read_json(RESULTS)


def _load_ems(name: str, cache: dict):
    from fewstep import EMS

    if name not in cache:
        path = EMS_DIR / f"{name}.safetensors"
        cache[name] = EMS.load(path) if path.exists() else None
    return cache[name]


def update_json(path: Path, change, empty: dict) -> dict:
    """Apply ``change(results)`` to a results file under a lock (several processes may run settings side by side)."""
    from fewstep.infra.io import DirectoryLockedError, lock_directory, read_json, write_json

    while True:
        try:
            with lock_directory(path.parent, f"another writer of {path.name}"):
                results = read_json(path) if path.exists() else empty
                change(results)
                write_json(path, results)
                return results
        except DirectoryLockedError:
            time.sleep(0.5)


def _update(change) -> dict:
    return update_json(RESULTS, change, {"protocol": __doc__.split("Protocol", 1)[1].strip(), "entries": []})


def generate(bed, solver: str, options: dict, nfe: int, x_T, cond, guidance, ending: str) -> torch.Tensor:
    """The testbed's sampler on its common grid, ending at sigma = 0 (``zero``) or at t_min (``min``)."""
    import fewstep
    from fewstep.samplers import GridSpec

    out = []
    for i in range(0, x_T.shape[0], bed.batch_size):
        xb, cb = x_T[i:i + bed.batch_size], cond[i:i + bed.batch_size]
        if ending == "zero":
            out.append(bed.generate(solver, options, nfe, xb, cb, guidance, None))
            continue
        guided = guidance is not None and guidance > 1
        null = getattr(bed, "null_label", -1)
        spec = GridSpec(bed.schedule.default_spacing, final_sigma="min", convention="multistep")
        x = fewstep.sample(bed.model, xb.double() if bed.name == "gmm" else xb, schedule=bed.schedule,
                           prediction=bed.prediction, solver=solver, nfe=nfe, spacing=spec,
                           guidance=guidance if guided else None, cond=cb,
                           uncond=torch.full_like(cb, null) if guided else None, **options)
        out.append(x.float().cpu())
    return torch.cat(out)


def reference(bed, x_T, cond, guidance, ending: str, name: str | None = None) -> torch.Tensor:
    """The exact ODE solution (GMM) or 200-step third-order DPM-Solver++ to t_min (digits), at the ending's end.

    The digits reference of ``zero`` is the ``min`` one followed by the jump to sigma = 0 from t_min (one
    more model call): both endings share one 200-step trajectory.
    """
    if bed.name != "gmm":
        if ending == "min":
            solver, opts, nfe = REFERENCE
            return generate(bed, solver, opts, nfe, x_T, cond, guidance, "min")
        x = cached_reference(name, bed, x_T, cond, guidance, "min") if name else reference(bed, x_T, cond, guidance,
                                                                                             "min")
        assert bed.prediction == "epsilon"
        sched = bed.schedule
        t = torch.tensor([sched.t_min], dtype=torch.float64)
        alpha, sigma = (float(v) for v in sched.alpha_sigma(t))
        step = sched.model_time(t).float().reshape(())  # a 0-d timestep: the testbed doubles CFG batches
        with torch.no_grad():
            eps = torch.cat([bed.denoise(x[i:i + bed.batch_size], step, cond[i:i + bed.batch_size], guidance).float()
                             for i in range(0, x.shape[0], bed.batch_size)])
        return (x.double() - sigma * eps.double()).div(alpha).float()
    if ending == "zero":
        return torch.cat([bed.reference(x_T[i:i + bed.batch_size], cond[i:i + bed.batch_size], guidance, None,
                                        None, None, None) for i in range(0, x_T.shape[0], bed.batch_size)])
    sched = bed.schedule
    a0, s0 = (float(v) for v in sched.alpha_sigma(torch.tensor(sched.t_max, dtype=torch.float64)))
    a1, s1 = (float(v) for v in sched.alpha_sigma(torch.tensor(sched.t_min, dtype=torch.float64)))
    guided = guidance is not None and guidance > 1
    return torch.cat([bed.mixture.ode_solution(x_T[i:i + bed.batch_size].double(), (a0, s0), (a1, s1),
                                               labels=cond[i:i + bed.batch_size],
                                               guidance=guidance if guided else None, steps=500).float()
                      for i in range(0, x_T.shape[0], bed.batch_size)])


def testbed_inputs(setting: str, beds: dict, seed: int = 0, n: int | None = None):
    """(bed, x_T, labels, cond) of a setting: seeds seed .. seed + n - 1."""
    from fewstep.eval.testbeds import DigitsTestbed, GMMTestbed

    model, guidance, _ = SETTINGS[setting]
    if model not in beds:
        beds[model] = DigitsTestbed() if model == "digits" else GMMTestbed()
    bed = beds[model]
    x_T, labels = bed.initial_noise(NUM_SAMPLES[model] if n is None else n, seed)
    null = bed.null_label if model == "digits" else -1
    return bed, x_T, labels, labels if guidance is not None else torch.full_like(labels, null)


def cached_reference(name: str, bed, x_T, cond, guidance, ending: str) -> torch.Tensor:
    from fewstep.infra.io import load_tensors, save_tensors

    path = REF_DIR / f"{name}{'' if ending == 'zero' else '-' + ending}.safetensors"
    if path.exists():
        ref = load_tensors(path)["x"]
        if ref.shape[0] != x_T.shape[0]:
            raise SystemExit(f"{path} holds {ref.shape[0]} samples, not {x_T.shape[0]}: delete it")
        return ref
    ref = reference(bed, x_T, cond, guidance, ending, name)
    save_tensors(path, {"x": ref})
    return ref


def _slug(*parts) -> str:
    return "__".join(str(p).replace(" ", "_").replace("=", "-") for p in parts)


def main(only: list[str]) -> None:
    if only == ["--report"]:
        _update(paired_intervals)
        REPORT.write_text(report(read_results()))
        return
    from fewstep.infra.io import save_tensors

    torch.set_num_threads(1)
    refs_only = "--references" in only
    # method=LABEL / ending=NAME: run only those rows (to spread one setting over several processes)
    pick = {k: {a.split("=", 1)[1] for a in only if a.startswith(k + "=")} for k in ("method", "ending")}
    only = [s for s in only if s != "--references" and "=" not in s]
    done = {(e["setting"], e.get("ending", "zero"), e["method"], e["nfe"])
            for e in read_results()["entries"]} if RESULTS.exists() else set()
    beds, ems_cache, cases = {}, {}, []
    for setting, (model, guidance, order) in SETTINGS.items():
        if only and setting not in only:
            continue
        bed, x_T, labels, cond = testbed_inputs(setting, beds)
        for ending in ENDINGS:
            ref = cached_reference(setting, bed, x_T, cond, guidance, ending)
            cases += [(setting, ending, label, spec, bed, x_T, labels, cond, ref)
                      for label, spec in methods(setting, order).items() if ending in spec[2]]
    if refs_only:
        return
    cases.sort(key=lambda c: c[2] not in MAIN)  # the three-solver comparison first, then the ablations
    for setting, ending, label, (solver, options, _), bed, x_T, labels, cond, ref in cases:
        if (pick["method"] and label not in pick["method"]) or (pick["ending"] and ending not in pick["ending"]):
            continue
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
            if (setting, ending, label, nfe) in done:
                continue
            start = time.perf_counter()
            out = generate(bed, solver, options, nfe, x_T, cond, guidance, ending)
            seconds = time.perf_counter() - start
            err = (out.double() - ref.double()).pow(2).flatten(1).mean(1)
            save_tensors(ERR_DIR / f"{_slug(setting, ending, label, nfe)}.safetensors", {"mse": err})
            mse = err.mean().item()
            extra = bed.evaluate(out, labels) if guidance is not None and ending == "zero" else {}
            entry = {"setting": setting, "ending": ending, "method": label, "solver": solver, "nfe": nfe,
                     "order": order, "samples": x_T.shape[0], "mse": mse, "time_s": round(seconds, 2), **extra}
            _update(lambda results: results["entries"].append(entry))
            print(f"{setting:14s} {ending:4s} {label:34s} NFE {nfe:2d}  MSE {mse:.3e}", flush=True)
    _update(paired_intervals)
    REPORT.write_text(report(read_results()))


def paired_bootstrap(target: torch.Tensor, base: torch.Tensor, resamples: int = RESAMPLES) -> dict:
    """Ratio of mean errors and its 95% paired-bootstrap interval (the same resampled seeds for both)."""
    n = target.numel()
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(0))
    ratios = target[idx].mean(1) / base[idx].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ratio": (target.mean() / base.mean()).item(), "ci95": [lo, hi]}


def paired_intervals(results: dict) -> None:
    """dpmv3 / dpmpp and dpmv3 / unipc with intervals, for every (setting, ending, NFE) with per-sample errors."""
    from fewstep.infra.io import load_tensors

    paired = {(p["setting"], p["ending"], p["method"], p["versus"], p["nfe"]): p for p in results.get("paired", [])}
    keys = {(e["setting"], e.get("ending", "zero"), e["nfe"]) for e in results["entries"]}
    for setting, ending, nfe in sorted(keys):
        for target in PAIRED:
            for versus in ("dpmpp", "unipc"):
                paths = [ERR_DIR / f"{_slug(setting, ending, m, nfe)}.safetensors" for m in (target, versus)]
                if all(p.exists() for p in paths):
                    a, b = (load_tensors(p)["mse"] for p in paths)
                    paired[(setting, ending, target, versus, nfe)] = {
                        "setting": setting, "ending": ending, "method": target, "versus": versus, "nfe": nfe,
                        "samples": a.numel(), "resamples": RESAMPLES, **paired_bootstrap(a, b)}
    results["paired"] = [paired[k] for k in sorted(paired)]


def ems_roughness(name: str) -> dict | None:
    """Mean |second difference of s| over the grid and dimensions, and where |b| peaks, of an EMS file."""
    from fewstep import EMS

    path = EMS_DIR / f"{name}.safetensors"
    if not path.exists():
        return None
    ems = EMS.load(path)
    s, b = ems.s, ems.b.flatten(1).abs()
    j = int(b.max(1).values.argmax())
    return {"roughness_s": float((s[2:] - 2 * s[1:-1] + s[:-2]).abs().mean()), "max_abs_b": float(b.max()),
            "max_abs_b_at_lambda": float(ems.lambdas[j]), "median_abs_b": float(b.median()),
            "time_derivative": ems.meta.extra.get("time_derivative", "jvp")}


def report(results: dict) -> str:
    """Markdown: per setting and ending the comparison with intervals, the ablations and the K / N study."""
    from fewstep.infra.io import read_json

    times = read_json(EMS_TIMES) if EMS_TIMES.exists() else {}
    by: dict = {}
    fd: dict = {}  # digits-FD of the guided digits runs (the class labels make it meaningful)
    for e in results["entries"]:
        key = (e["setting"], e.get("ending", "zero"))
        by.setdefault(key, {}).setdefault(e["method"], {})[e["nfe"]] = e["mse"]
        if "fd" in e:
            fd.setdefault(key, {}).setdefault(e["method"], {})[e["nfe"]] = e["fd"]
    paired = {(p["setting"], p["ending"], p["method"], p["versus"], p["nfe"]): p for p in results.get("paired", [])}
    head = "| {} | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    rule = "|---|" + "---:|" * len(NFES)

    def row(label, cells, best=None):
        vals = []
        for n in NFES:
            v = cells.get(n)
            text = "-" if v is None else f"{v:.2e}"
            vals.append(f"**{text}**" if best is not None and v is not None and v == best[n] else text)
        return f"| {label} | " + " | ".join(vals) + " |"

    lines = ["MSE to the reference (mean over N samples of ||x - x_ref||^2 / D, N = 1000 on the mixture and 200 on "
             "digits; lower is better; bold: best of the three solvers). Ending `zero`: every solver's last step "
             "jumps to sigma = 0; `min`: every solver stops at t_min (the official v3 ending), against a reference "
             "that stops there too. Ratio rows: MSE(dpmv3) / MSE(baseline) [95% paired-bootstrap interval over the "
             "seeds]; below 1 means dpmv3 is better.", ""]
    rough = {name: ems_roughness(name) for name in ("digits-uncond", "digits-cfg3", "digits-cfg7.5",
                                                     "digits-uncond-jvp", "digits-uncond-K256-N100",
                                                     "digits-cfg3-K256-N100", "gmm-uncond", "gmm-uncond-fd")}
    rough = {k: v for k, v in rough.items() if v is not None}
    if rough:
        lines += ["EMS roughness (mean |s_{j+1} - 2 s_j + s_{j-1}| over grid points and pixels) and |b|:", "",
                  "| EMS | time derivative | roughness of s | max abs b (at lambda) | median abs b |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {v['time_derivative']} | {v['roughness_s']:.3f} | {v['max_abs_b']:.1f} "
                  f"({v['max_abs_b_at_lambda']:.2f}) | {v['median_abs_b']:.3f} |" for k, v in rough.items()]
        lines.append("")
    for setting in SETTINGS:
        for ending in ENDINGS:
            rows = by.get((setting, ending))
            if not rows:
                continue
            model, guidance, order = SETTINGS[setting]
            what = "unconditional" if guidance is None else f"CFG {guidance:g}"
            main = [m for m in MAIN if m in rows]
            best = {n: min(rows[m][n] for m in main if n in rows[m]) for n in NFES if any(n in rows[m] for m in main)}
            lines += [f"### {model}, {what}, ending `{ending}` (order {order}; EMS `{setting}`)", "",
                      head.format("solver"), rule]
            lines += [row(m, rows[m], best) for m in main]
            for target in PAIRED:
                for versus in ("dpmpp", "unipc"):
                    cells = [paired.get((setting, ending, target, versus, n)) for n in NFES]
                    if any(cells):
                        lines.append(f"| {target} / {versus} | " + " | ".join(
                            "-" if c is None else f"{c['ratio']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
                            for c in cells) + " |")
            if (setting, ending) in fd:
                lines += ["", head.format(f"{'digits-' if model == 'digits' else ''}FD (lower is better)"), rule]
                lines += [f"| {m} | " + " | ".join(f"{fd[setting, ending][m][n]:.3f}"
                                                   if n in fd[setting, ending].get(m, {}) else "-"
                                                   for n in NFES) + " |" for m in main]
            ablations = [m for m in rows if m not in main and not _is_study(m)]
            if ablations:
                lines += ["", head.format("dpmv3 ablation"), rule] + [row(m[len("dpmv3 "):], rows[m])
                                                                      for m in ablations]
            study = [m for m in rows if _is_study(m)]
            if study:
                base = main_ems_kn(setting)
                lines += ["", "| EMS (K datapoints, N intervals) | CPU s | " + " | ".join(f"NFE {n}" for n in NFES)
                          + " |", "|---|---:|" + "---:|" * len(NFES)]
                entries = [(setting, "dpmv3")] + [(f"{setting}-{m.split()[-1]}", m) for m in study]
                for name, method in sorted(entries, key=lambda e: _kn(base, e[0])):
                    k, n = _kn(base, name)
                    entry = times.get(name, {})
                    cpu = None if entry.get("resumed") else entry.get("cpu_seconds")  # a resumed run timed its rest
                    vals = " | ".join(f"{rows[method][x]:.2e}" if x in rows[method] else "-" for x in NFES)
                    lines.append(f"| K={k}, N={n} | {'-' if cpu is None else f'{cpu:.0f}'} | {vals} |")
            lines.append("")
    return "\n".join(lines)


def _is_study(method: str) -> bool:
    tag = method.split()[-1]
    return method.startswith("dpmv3 ") and tag[0] in "KN" and tag[1:].split("-")[0].isdigit()


def main_ems_kn(setting: str) -> tuple[int, int]:
    """(K, N) of the main EMS of a setting."""
    return {"digits": (64, 50), "gmm": (1024, 200)}[SETTINGS[setting][0]]


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
