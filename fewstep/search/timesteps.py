"""``fewstep search timesteps``: tuned timesteps for any registered solver (the baseline S3 must beat).

In the spirit of DMN / LD3 (optimise the timesteps against a high-NFE teacher on a few
samples), derivative-free: the ``nfe - 1`` interior points are a softmax of gaps along the
log-SNR axis (the first point stays at the noisiest time, the run ends on clean data), the
search starts from the best of the standard spacings and moves one logit at a time (compass
search with a halving step). The result is a solver schedule holding only timesteps, for the
solver it was tuned with: ``fewstep.sample(..., solver="unipc", solver_schedule=PATH)``.
Every evaluation is logged; a rerun replays the log, so a killed search resumes where it
stopped and ends with the same timesteps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np

from ..config import save_config
from ..eval.compare import DEFAULT_REFERENCE, Method
from ..eval.io import clean_temp_files, lock_directory, write_json
from ..eval.testbeds import Testbed, make_testbed
from ..samplers import GridSpec, SolverSchedule, make_plan, solver_class
from .fitness import SEARCH_SEED, Fitness
from .runlog import SearchLog, check_identity, save_state
from .s3 import _check_common, run_dir_of
from .space import LogSNRAxis, logits_from_positions, positions_from_logits

__all__ = ["TimestepSearchConfig", "search_timesteps", "run_timestep_search", "START_SPACINGS"]

START_SPACINGS = ("linspace", "logsnr", "time_uniform", "time_quadratic", "karras")


@dataclass
class TimestepSearchConfig:
    """Settings of ``fewstep search timesteps`` (also the schema of ``configs/search/timesteps*.yaml``).

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder.
        solver: Solver spec whose timesteps are tuned (``unipc:order=3,variant=bh1``).
        nfe: Model evaluations.
        guidance: CFG scale (None: the model's default).
        budget: Full evaluations (the start spacings included).
        out: The solver schedule file written at the end (.json or .yaml).
        run_dir: Log, state and reference (None: ``out`` without suffix + ``.run``).
        num_samples: Search batch size (None: 128).
        data_seed: Noise seed of the first search sample (>= 100000: apart from evaluation seeds).
        metric: ``mse`` (to the reference) or ``fd``.
        step: First step of the compass search, in logits of the gaps.
        min_step: The search stops when the step falls below this.
        reference, reference_nfe: The reference solver and its steps (the GMM's is exact).
        cache_dir: Reference cache (None: ``$FEWSTEP_CACHE/references``).
        device, threads, progress: How to run.
    """

    model: str = "digits"
    solver: str = "unipc"
    nfe: int = 5
    guidance: Optional[float] = None
    budget: int = 150
    out: str = "runs/timesteps.json"
    run_dir: Optional[str] = None
    num_samples: Optional[int] = None
    data_seed: int = SEARCH_SEED
    metric: str = "mse"
    step: float = 0.5
    min_step: float = 0.02
    starts: List[str] = field(default_factory=lambda: list(START_SPACINGS))
    reference: str = DEFAULT_REFERENCE
    reference_nfe: Optional[int] = None
    cache_dir: Optional[str] = None
    device: str = "cpu"
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        _check_common(self)
        name = str(self.solver).partition(":")[0].strip()
        if solver_class(name).runs_step_strategies:
            raise ValueError(f"solver {name!r} runs per-step strategies: search them with "
                             "`fewstep search usf`, which moves the timesteps too")
        self._method = Method.parse(self.solver)
        if not 0 < self.min_step <= self.step:
            raise ValueError(f"need 0 < min_step <= step, got min_step={self.min_step}, step={self.step}")
        bad = [s for s in self.starts if s not in START_SPACINGS]
        if bad or not self.starts:
            raise ValueError(f"starts must be spacings among {', '.join(START_SPACINGS)}, got {self.starts}")

    @property
    def method(self) -> Method:
        return self._method

    def identity(self, testbed: Testbed, guidance: float | None) -> dict[str, Any]:
        skip = {"budget", "out", "run_dir", "cache_dir", "device", "threads", "progress", "guidance", "model", "solver"}
        return {"model": testbed.fingerprint(), "guidance": guidance, "solver": self.method.label,
                **{k: v for k, v in dataclasses.asdict(self).items() if k not in skip}}


class _Objective:
    """Fitness of timesteps, answered from the log first (a rerun replays it)."""

    def __init__(self, fitness: Fitness, method: Method, axis: LogSNRAxis, records: SearchLog, budget: int, bar):
        self.fitness, self.method, self.axis, self.records = fitness, method, axis, records
        self.cached = {e["key"]: e for e in records.entries}
        self.budget, self.bar, self.calls = budget, bar, 0
        self.best = (math.inf, None)

    def __call__(self, u: list[float], phase: str) -> float:
        if self.calls >= self.budget:
            raise _BudgetSpent
        ts = self.axis.timesteps(u)
        key = json.dumps([round(t, 6) for t in ts])
        self.calls += 1
        if key in self.cached:
            value = math.inf if self.cached[key]["fitness"] is None else float(self.cached[key]["fitness"])
        else:
            start = time.perf_counter()
            sched = SolverSchedule(ts, "zero")
            value = self.fitness(self.method.solver, {**self.method.option_dict, "solver_schedule": sched})
            entry = {"i": len(self.records), "phase": phase, "fitness": value, "seconds": time.perf_counter() - start,
                     "timesteps": ts, "key": key}
            self.records.append(entry)
            self.cached[key] = entry
            self.bar.update()
        if value < self.best[0]:
            self.best = (value, ts)
            self.bar.set_postfix_str(f"best {value:.4g}")
        return value


class _BudgetSpent(Exception):
    pass


def _compass(objective: _Objective, z: np.ndarray, value: float, step: float, min_step: float) -> None:
    while step >= min_step:
        improved = False
        for k in range(len(z)):
            for sign in (1.0, -1.0):
                trial = z.copy()
                trial[k] += sign * step
                v = objective(positions_from_logits(trial), f"step {step:g}")
                if v < value:
                    z, value, improved = trial, v, True
                    break
        if not improved:
            step /= 2


def run_timestep_search(cfg: TimestepSearchConfig, testbed: Testbed | None = None,
                        log: Callable[[str], None] = print) -> SolverSchedule:
    """Run (or resume) the timestep search and write ``cfg.out``; returns the tuned schedule."""
    testbed = testbed or make_testbed(cfg.model, cfg.device)
    guidance = cfg.guidance if cfg.guidance is not None else testbed.default_guidance
    run_dir = run_dir_of(cfg)
    with lock_directory(run_dir, "another fewstep search"):
        clean_temp_files(run_dir, all_stale=True)
        identity = cfg.identity(testbed, guidance)
        if check_identity(run_dir / "state.json", identity) is None:
            save_state(run_dir / "state.json", {"identity": identity})
        save_config(cfg, run_dir)
        fitness = Fitness(testbed, cfg.nfe, guidance, cfg.num_samples or 128, cfg.data_seed, cfg.metric, run_dir,
                          cfg.reference, cfg.reference_nfe, cfg.cache_dir, log)
        axis = LogSNRAxis(fitness.schedule)
        records = SearchLog(run_dir / "search_log.jsonl")
        if len(records):
            log(f"resuming: replaying {len(records)} logged evaluations from {records.path}")
        from tqdm.auto import tqdm

        with tqdm(total=cfg.budget, initial=min(len(records), cfg.budget), desc=f"timesteps NFE {cfg.nfe}",
                  unit="eval", disable=not cfg.progress) as bar:
            objective = _Objective(fitness, cfg.method, axis, records, cfg.budget, bar)
            starts = {}
            try:
                for spacing in cfg.starts:
                    try:
                        grid = make_plan(fitness.schedule, cfg.method.solver, nfe=cfg.nfe,
                                         spacing=GridSpec(spacing=spacing, convention="multistep"),
                                         **cfg.method.option_dict).grid
                    except ValueError:  # a spacing this schedule does not have
                        continue
                    u = axis.positions(grid.model_timesteps.tolist())
                    starts[spacing] = (objective(u, f"start {spacing}"), u)
                if not starts:
                    raise ValueError(f"none of the start spacings {cfg.starts} applies to this model's schedule")
                name = min(starts, key=lambda k: starts[k][0])
                if cfg.nfe > 1:
                    _compass(objective, logits_from_positions(starts[name][1]), starts[name][0], cfg.step, cfg.min_step)
            except _BudgetSpent:
                pass
        name = min(starts, key=lambda k: starts[k][0])
        value, ts = objective.best
        if ts is None or not math.isfinite(value):
            raise ValueError("no finite evaluation: every timestep choice diverged (check the model and guidance)")
        summary = {"best_fitness": value, "metric": cfg.metric, "evaluations": objective.calls,
                   "start": name, "start_fitness": starts[name][0],
                   "starts": {k: v for k, (v, _) in starts.items()},
                   "seconds": sum(e["seconds"] for e in records.entries),
                   "search_seeds": [cfg.data_seed, cfg.data_seed + (cfg.num_samples or 128)]}
        sched = SolverSchedule(ts, "zero", meta=fitness.meta(cfg.method.solver, search=summary,
                                                              solver_options=cfg.method.option_dict))
        sched.save(cfg.out)
        write_json(run_dir / "result.json", {**summary, "schedule": str(cfg.out), "timesteps": ts})
        log(f"{cfg.method.label} NFE {cfg.nfe}: best {cfg.metric} {value:.5g} (start {name}: "
            f"{starts[name][0]:.5g}) after {objective.calls} evaluations; wrote {cfg.out}")
        return sched


def search_timesteps(model: "str | Testbed" = "digits", solver: str = "unipc", nfe: int = 5,
                     guidance: float | None = None, budget: int = 150, out: str = "runs/timesteps.json", *,
                     log: Callable[[str], None] = print, **settings: Any) -> SolverSchedule:
    """Tune the timesteps of ``solver`` on a few samples and write them to ``out``.

    Args:
        model: ``digits``, ``gmm``, ``gmm-flow``, a pipeline folder, or a testbed object.
        solver: Solver spec, e.g. ``"unipc"`` or ``"dpmpp:order=3,third_order=taylor"``.
        nfe: Model evaluations.
        guidance: CFG scale (None: the model's default).
        budget: Full evaluations.
        out: The schedule file (.json / .yaml).
        log: Where messages go.
        **settings: Any other field of :class:`TimestepSearchConfig`.

    Returns:
        A timesteps-only solver schedule (``fewstep.sample(..., solver=..., solver_schedule=...)``).
    """
    testbed = model if isinstance(model, Testbed) else None
    name = testbed.name if testbed is not None else str(model)
    cfg = TimestepSearchConfig(model=name, solver=solver, nfe=nfe, guidance=guidance, budget=budget, out=str(out),
                               **settings)
    return run_timestep_search(cfg, testbed, log)
