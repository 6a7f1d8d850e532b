"""Per-step scheduler overhead: fewstep's diffusers adapter vs the equivalent diffusers scheduler.

    python benchmarks/scheduler_overhead.py                  # CPU, 1 thread -> results/scheduler_overhead_cpu.md
    python benchmarks/scheduler_overhead.py --device cuda    # -> results/scheduler_overhead_cuda.md
    python benchmarks/scheduler_overhead.py --quick          # a few configurations, fewer repeats

What is timed is what a pipeline does for every image, with the model replaced by the
identity (the model output is the sample itself), so only the scheduler is measured::

    scheduler.set_timesteps(nfe)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample

Both schedulers are built from the same Stable Diffusion config and get identical tensors
(SD latents [B, 4, H/8, W/8]). The two loops run interleaved in one process (A B B A A B ...),
repeated; the table reports the medians and the median of the per-repeat ratios
fewstep/diffusers (robust to a shared machine's drift); each sample repeats the loop for ~5 ms.
Allocations per step are counted
with a dispatch mode (every op output that got new storage), on a separate untimed run.
On CUDA each loop ends with a synchronize.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
# Stable Diffusion 1.5's scheduler config (the keys that matter here).
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
             "set_alpha_to_one": False}


@dataclass(frozen=True)
class Solver:
    label: str
    fewstep: str
    diffusers: str
    options: dict
    diffusers_options: dict
    goal: bool  # the goal (fewstep <= 0.5x diffusers) applies


SOLVERS = [
    Solver("UniPC-2 (bh2)", "UniPCScheduler", "UniPCMultistepScheduler", {"order": 2}, {"solver_order": 2}, True),
    Solver("UniPC-3 (bh2)", "UniPCScheduler", "UniPCMultistepScheduler", {"order": 3}, {"solver_order": 3}, True),
    Solver("DPM-Solver++(2M)", "DPMSolverPPScheduler", "DPMSolverMultistepScheduler", {"order": 2},
           {"solver_order": 2}, True),
    Solver("DPM-Solver++(3M)", "DPMSolverPPScheduler", "DPMSolverMultistepScheduler", {"order": 3},
           {"solver_order": 3}, True),
    Solver("DDIM", "DDIMSolverScheduler", "DDIMScheduler", {}, {}, False),
]


class AllocationCounter(TorchDispatchMode):
    """Counts op outputs with storage that none of the op's inputs had (new allocations)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = set()
        for a in [*args, *kwargs.values()]:
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    seen.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.count += 1
                self.bytes += t.untyped_storage().nbytes()
        return out


def run_loop(scheduler, x, nfe: int, sync) -> torch.Tensor:
    scheduler.set_timesteps(nfe, device=x.device)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    sync()
    return x


def measure(solver: Solver, batch: int, size: int, nfe: int, repeats: int, device, dtype) -> dict:
    import diffusers

    import fewstep

    fs = getattr(fewstep, solver.fewstep).from_config(SD_CONFIG, **solver.options)
    df = getattr(diffusers, solver.diffusers).from_config(SD_CONFIG, **solver.diffusers_options)
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loops = {"fewstep": fs, "diffusers": df}
    outputs = {k: run_loop(s, x, nfe, sync) for k, s in loops.items()}  # warm-up, and the results to compare
    # Each sample repeats the loop until it lasts ~5 ms, so one preemption on a shared machine
    # spoils a fraction of a sample rather than a whole one.
    t0 = time.perf_counter()
    run_loop(fs, x, nfe, sync)
    inner = max(1, round(5e-3 / (time.perf_counter() - t0)))
    times: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(repeats):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                run_loop(loops[k], x, nfe, sync)
            times[k].append((time.perf_counter() - t0) / inner)
    allocs = {}
    for k, s in loops.items():
        counter = AllocationCounter()
        with counter:
            run_loop(s, x, nfe, sync)
        allocs[k] = (counter.count / nfe, counter.bytes / nfe / x.nbytes)
    a, b = outputs["fewstep"].double(), outputs["diffusers"].double()
    ratios = [f / d for f, d in zip(times["fewstep"], times["diffusers"])]
    return {
        "fewstep_ms": statistics.median(times["fewstep"]) / nfe * 1e3,
        "diffusers_ms": statistics.median(times["diffusers"]) / nfe * 1e3,
        "ratio": statistics.median(ratios),
        "best_ratio": min(times["fewstep"]) / min(times["diffusers"]),
        "allocs": allocs,
        "rel_diff": float((a - b).norm() / b.norm().clamp_min(1e-30)),
    }


def set_timesteps_cost(repeats: int) -> list[tuple[str, float, float, float]]:
    """(solver, fewstep warm, fewstep cold, diffusers) median set_timesteps times in ms at NFE 20."""
    import diffusers

    import fewstep

    rows = []
    for solver in SOLVERS:
        cls = getattr(fewstep, solver.fewstep)
        warm = cls.from_config(SD_CONFIG, **solver.options)
        df = getattr(diffusers, solver.diffusers).from_config(SD_CONFIG, **solver.diffusers_options)
        t_warm, t_cold, t_df = [], [], []
        for _ in range(repeats):
            cold = cls.from_config(SD_CONFIG, **solver.options)
            for s, acc in ((warm, t_warm), (cold, t_cold), (df, t_df)):
                t0 = time.perf_counter()
                s.set_timesteps(20)
                acc.append(time.perf_counter() - t0)
        rows.append((solver.label, *(statistics.median(v) * 1e3 for v in (t_warm, t_cold, t_df))))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="latent sizes (64: SD 512px)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--quick", action="store_true", help="batch 1/16, latents 64, NFE 5/20, 7 repeats")
    parser.add_argument("--out", default=None, help="results file (default: results/scheduler_overhead_<device>.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.sizes, args.nfe, args.repeats = [1, 16], [64], [5, 20], 7
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import diffusers

    lines = []
    results = []
    for solver in SOLVERS:
        for size in args.sizes:
            for batch in args.batches:
                for nfe in args.nfe:
                    r = measure(solver, batch, size, nfe, args.repeats, device, dtype)
                    results.append((solver, size, batch, nfe, r))
                    print(f"{solver.label:18s} {batch:2d}x4x{size}x{size} NFE {nfe:2d}: fewstep {r['fewstep_ms']:.3f} "
                          f"ms/step, diffusers {r['diffusers_ms']:.3f} ms/step, ratio {r['ratio']:.2f}", flush=True)
    cold = set_timesteps_cost(args.repeats)

    goal = [r["ratio"] for s, *_, r in results if s.goal]
    goal_best = [r["best_ratio"] for s, *_, r in results if s.goal]
    threads = torch.get_num_threads()
    lines.append(f"# Scheduler overhead per step: fewstep vs diffusers ({device.type}, {args.dtype})\n")
    lines.append(
        f"`python benchmarks/scheduler_overhead.py --device {args.device} --dtype {args.dtype}"
        f"{'' if args.threads == 1 else f' --threads {args.threads}'}`: {platform.machine()} "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, {threads} thread(s), OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.repeats} interleaved repeats per configuration.\n")
    lines.append("Per-step time = (set_timesteps + all steps) / NFE with an identity model, median over repeats; "
                 "ratio = median of the per-repeat ratios fewstep/diffusers (goal for UniPC and DPM-Solver++: "
                 "<= 0.5); best = ratio of the fastest repeat of each (the least disturbed on a shared machine). "
                 "Allocations: tensors with new storage per step (MB-size ones and scalars alike), and "
                 "their bytes in units of one latent. rel. diff: ||x_fewstep - x_diffusers|| / ||x_diffusers|| "
                 "after the run.\n")
    if goal:
        geo = statistics.geometric_mean(goal)
        lines.append(f"**UniPC and DPM-Solver++: geometric-mean ratio {geo:.2f}, worst {max(goal):.2f}, "
                     f"{sum(g > 0.5 for g in goal)} of {len(goal)} configurations above 0.5 (best-of ratios: "
                     f"geometric mean {statistics.geometric_mean(goal_best):.2f}, worst {max(goal_best):.2f}).**\n")
    lines.append("| solver | latents | NFE | fewstep ms/step | diffusers ms/step | ratio | best | allocs/step fewstep | "
                 "allocs/step diffusers | rel. diff |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for solver, size, batch, nfe, r in results:
        (fa, fb), (da, db) = r["allocs"]["fewstep"], r["allocs"]["diffusers"]
        lines.append(f"| {solver.label} | {batch}x4x{size}x{size} | {nfe} | {r['fewstep_ms']:.3f} | "
                     f"{r['diffusers_ms']:.3f} | {r['ratio']:.2f} | {r['best_ratio']:.2f} | {fa:.1f} ({fb:.1f}) | "
                     f"{da:.1f} ({db:.1f}) | "
                     f"{r['rel_diff']:.1e} |")
    lines.append("\n`set_timesteps(20)` alone, median ms: fewstep with its cache warm (the pipeline case: the same "
                 "arguments for every image), fewstep on a fresh scheduler (grid + plan built), diffusers.\n")
    lines.append("| solver | fewstep (cached) | fewstep (cold) | diffusers |")
    lines.append("|---|---:|---:|---:|")
    for label, warm, cold_ms, df in cold:
        lines.append(f"| {label} | {warm:.3f} | {cold_ms:.3f} | {df:.3f} |")
    out = Path(args.out) if args.out else RESULTS / f"scheduler_overhead_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
