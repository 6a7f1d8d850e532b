"""Time-Shift on the digits model, both modes: digits-FD of DDIM and UniPC at 10 steps, a window/cutoff sweep,
the constant-offset controls, where the shifted time lands, and paired-bootstrap intervals.

    python benchmarks/timeshift_digits.py --solver ddim     # one process per solver; rerun to resume
    python benchmarks/timeshift_digits.py --solver unipc
    python benchmarks/timeshift_digits.py --report          # tables from what is done

Guidance 1.5 (the model's default), the common ``linspace`` grid, evaluation seeds 0..N-1 (as
``fewstep compare --seed 0``; nothing is fitted on them: the rule has no parameters besides the
window and cutoff, which are swept here, not chosen). Modes (``fewstep.TimeShift(mode=...)``):
``target`` (the official form: network on the grid timestep, the step's target level moves by
t_s - t) and ``input`` (the network gets t_s). Controls without variance matching: the network
always gets t + window/2 (``const-input``), or every step's target moves by +window/2 after the
first step (``const-target``). FD differences against the plain solver carry a paired bootstrap
over the evaluation samples (same seeds in both arms; 1000 resamples, 95% percentile interval).
Results: ``benchmarks/results/timeshift/digits-modes.json`` and ``digits-modes.md``; samples are
kept under ``runs/timeshift-bench/`` for the bootstrap.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fewstep  # noqa: E402
from fewstep.eval.metrics.fd import feature_statistics, frechet_distance  # noqa: E402
from fewstep.infra.io import load_tensors, read_json, save_tensors, write_json, atomic_write_bytes  # noqa: E402
from fewstep.eval.testbeds import DigitsTestbed, common_grid  # noqa: E402
from fewstep.samplers.timeshift import TargetMove  # noqa: E402

GUIDANCE, NFE = 1.5, 10
SOLVERS = ("ddim", "unipc")
MODES = ("target", "input")
CELLS = ((20, 0), (40, 0), (80, 0), (40, 300), (80, 300))  # (window, cutoff)
CONST = 40  # the constant controls shift by CONST // 2 = +20
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "timeshift"
WORK = ROOT.parent / "runs" / "timeshift-bench"


class ConstantShift(fewstep.TimeShift):
    """Control: the rule's top window edge at every shifted step (a constant +window/2), no variance matching."""

    def for_grid(self, grid, device):
        return [None if s is None else (s[0][-1:], s[1][-1:]) for s in super().for_grid(grid, device)]

    def target_moves(self, grid, device, dtype=torch.float32, start=0):
        return [None if m is None else TargetMove(m.var[-1:], m.p[-1:], m.q[-1:])
                for m in super().target_moves(grid, device, dtype, start)]


class EdgeRecorder(fewstep.TimeShift):
    """Records, per step, which window index each sample chose (first / last index = a window edge)."""

    chosen: dict

    def for_grid(self, grid, device):
        out = super().for_grid(grid, device)
        self.steps_of = {id(s[1]): i for i, s in enumerate(out) if s is not None}  # input mode: var -> step
        return out

    def target_moves(self, grid, device, dtype=torch.float32, start=0):
        out = super().target_moves(grid, device, dtype, start)
        return [None if m is None else _RecordedMove(self.chosen, i, m) for i, m in enumerate(out)]


class _RecordedMove:
    def __init__(self, chosen, i, move):
        self.chosen, self.i, self.move = chosen, i, move

    def apply(self, x, x_next, x0):
        self.chosen.setdefault(self.i, []).append(fewstep.TimeShift.select_index(x, self.move.var))
        return self.move.apply(x, x_next, x0)


def generate(tb, solver, rule, x, cond, recorder=None):
    out = []
    select = fewstep.TimeShift.select
    if recorder is not None and rule is not None and rule.mode == "input":
        def select_recording(xx, tau, var):  # input mode: the choice is made in sampling's select
            recorder.chosen.setdefault(recorder.steps_of[id(var)], []).append(fewstep.TimeShift.select_index(xx, var))
            return select(xx, tau, var)
        fewstep.TimeShift.select = staticmethod(select_recording)
    try:
        for i in range(0, len(x), tb.batch_size):
            xb, cb = x[i:i + tb.batch_size], cond[i:i + tb.batch_size]
            out.append(fewstep.sample(tb.model, xb, schedule=tb.schedule, solver=solver, nfe=NFE,
                                      spacing=common_grid(None, tb.schedule), guidance=GUIDANCE, cond=cb,
                                      uncond=torch.full_like(cb, tb.null_label), time_shift=rule).float())
    finally:
        fewstep.TimeShift.select = staticmethod(select)
    return torch.cat(out)


def fd_of(tb, feats, idx=None):
    f = feats if idx is None else feats[idx]
    return frechet_distance(*feature_statistics(f), *tb._real_stats)


def run(solver: str, n: int) -> None:
    tb = DigitsTestbed()
    x, cond = tb.initial_noise(n, 0)
    path = RESULTS / f"digits-modes-{solver}.json"
    store = read_json(path) if path.exists() else {}
    units = [("plain", None)]
    units += [(f"{m}/w{w}/c{c}", fewstep.TimeShift(w, c, m)) for m in MODES for w, c in CELLS]
    units += [(f"const-{m}/+{CONST // 2}", ConstantShift(CONST, 0, m)) for m in MODES]
    for key, rule in units:
        if key in store:
            continue
        t0 = time.perf_counter()
        samples = generate(tb, solver, rule, x, cond)
        save_tensors(WORK / f"{solver}-{key.replace('/', '_')}-n{n}.safetensors", {"x": samples})
        store[key] = {**tb.evaluate(samples, cond), "seconds": round(time.perf_counter() - t0, 1)}
        write_json(path, store)
        print(f"{solver} {key}: fd {store[key]['fd']:.3f} ({store[key]['seconds']:.0f} s)", flush=True)
    for mode in MODES:  # where the chosen time lands (window 40, cutoff 0; first 200 samples)
        key = f"edges/{mode}/w40/c0"
        if key in store:
            continue
        rec = EdgeRecorder(40, 0, mode)
        rec.chosen = {}
        generate(tb, solver, rec, x[:200], cond[:200], recorder=rec)
        K = 41
        rows = []
        for step, idx in sorted(rec.chosen.items()):
            idx = torch.cat(idx)
            rows.append({"step": step, "lower": float((idx == 0).double().mean()),
                         "upper": float((idx == K - 1).double().mean()), "n": len(idx)})
        store[key] = rows
        write_json(path, store)
        print(f"{solver} {key}: {rows}", flush=True)


def bootstrap(tb, a, b, resamples=1000, seed=0):
    """FD(a) - FD(b) on the same resampled evaluation indices: (estimate, 2.5%, 97.5%)."""
    fa, fb = tb._features(a.clamp(-1, 1)), tb._features(b.clamp(-1, 1))
    g = torch.Generator().manual_seed(seed)
    n = len(fa)
    diffs = []
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        diffs.append(fd_of(tb, fa, idx) - fd_of(tb, fb, idx))
    d = torch.tensor(diffs)
    return fd_of(tb, fa) - fd_of(tb, fb), float(d.quantile(0.025)), float(d.quantile(0.975))


def report(n: int) -> None:
    tb = DigitsTestbed()
    lines = [f"# Time-Shift on digits, both modes: {NFE} steps, guidance {GUIDANCE:g}, {n} samples (seeds 0..{n - 1})",
             "", "digits-FD; in brackets the paired-bootstrap 95% interval of FD(row) - FD(plain solver), "
             "1000 resamples of the evaluation samples.", ""]
    edge_lines = []
    for solver in SOLVERS:
        path = RESULTS / f"digits-modes-{solver}.json"
        if not path.exists():
            continue
        store = read_json(path)
        samples = {k: load_tensors(WORK / f"{solver}-{k.replace('/', '_')}-n{n}.safetensors")["x"]
                   for k in store if not k.startswith("edges") and
                   (WORK / f"{solver}-{k.replace('/', '_')}-n{n}.safetensors").exists()}
        if "plain" not in samples:
            continue
        lines += [f"## {solver} (plain: FD {store['plain']['fd']:.3f})", "",
                  "| window | cutoff | target mode | input mode |", "|---:|---:|---|---|"]
        cache = {}

        def cell(key):
            if key not in samples:
                return "-"
            if key not in cache:
                cache[key] = bootstrap(tb, samples[key], samples["plain"])
            d, lo, hi = cache[key]
            return f"{store[key]['fd']:.3f} [{lo:+.3f}, {hi:+.3f}]"

        for w, c in CELLS:
            lines.append(f"| {w} | {c} | {cell(f'target/w{w}/c{c}')} | {cell(f'input/w{w}/c{c}')} |")
        lines.append(f"| const +{CONST // 2} | 0 | {cell(f'const-target/+{CONST // 2}')} | "
                     f"{cell(f'const-input/+{CONST // 2}')} |")
        lines.append("")
        for mode in MODES:
            rows = store.get(f"edges/{mode}/w40/c0")
            if rows:
                edge_lines.append(f"| {solver} | {mode} | " + " | ".join(
                    f"{r['step']}: {100 * (r['lower'] + r['upper']):.0f}% ({100 * r['upper']:.0f}% up)"
                    for r in rows) + " |")
    if edge_lines:
        lines += ["## Where the chosen t_s lands (window 40, cutoff 0, first 200 samples)", "",
                  "Per shifted step: share of samples whose t_s is a window edge (of it, the upper edge).", "",
                  "| solver | mode | steps |", "|---|---|---|", *edge_lines, ""]
    atomic_write_bytes(RESULTS / "digits-modes.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", choices=SOLVERS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--eval-samples", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.solver:
        run(args.solver, args.eval_samples)
    if args.report or not args.solver:
        report(args.eval_samples)


if __name__ == "__main__":
    main()
