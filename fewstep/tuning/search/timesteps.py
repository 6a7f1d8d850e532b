"""``fewstep search timesteps``: tuned timesteps for any registered solver (the baseline S3 must beat).

In the spirit of DMN / LD3 (optimise the timesteps against a high-NFE teacher on a few
samples), derivative-free: the evaluated points are a softmax of gaps along the log-SNR axis
(the first point may leave the noisiest time, as diffusers' ``leading`` spacing does, unless
``free_start=False``), the search starts from the best of the standard spacings, each ending
on clean data or at t_min, and moves one logit at a time (compass search with a halving step),
keeping that end point. The result is a solver schedule holding only timesteps, for the
solver it was tuned with: ``fewstep.sample(..., solver="unipc", solver_schedule=PATH)``.
Every evaluation is logged; a rerun replays the log, so a killed search resumes where it
stopped and ends with the same timesteps.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, List

import numpy as np

from fewstep.eval.compare import Method
from fewstep.infra.io import write_json
from fewstep.eval.testbeds import Testbed, common_grid
from fewstep.samplers import GridSpec, SolverSchedule, make_plan, solver_class
from fewstep.tuning.search.fitness import Fitness, noise_schedule_of
from fewstep.tuning.search.guard import validate_against_baseline
from fewstep.tuning.search.run import open_search_run
from fewstep.tuning.search.runlog import SearchLog, save_state
from fewstep.tuning.search.settings import SearchSettings, settings_from_api
from fewstep.tuning.search.space import LogSNRAxis, logits_from_positions, positions_from_logits

__all__ = ["TimestepSearchConfig", "search_timesteps", "run_timestep_search", "START_SPACINGS"]

START_SPACINGS = ("linspace", "leading", "trailing", "logsnr", "time_uniform", "time_quadratic", "karras")


@dataclass
class TimestepSearchConfig(SearchSettings):
    """Settings of ``fewstep search timesteps`` (also the schema of ``configs/search/timesteps*.yaml``).

    Besides those of :class:`~fewstep.tuning.search.settings.SearchSettings` (the budget counts the
    start spacings; the default search batch is 128 samples):

    Attributes:
        solver: Solver spec whose timesteps are tuned (``unipc:order=3,variant=bh1``).
        step: First step of the compass search, in logits of the gaps.
        min_step: The search stops when the step falls below this.
        starts: Spacings the search may start from.
        finals: End points the starts may use: ``zero`` (clean data) and/or ``min`` (t_min).
        free_start: Let the first timestep move below the noisiest time too (as diffusers'
            ``leading`` spacing does); False tunes only the interior timesteps.
    """

    budget: int = 150
    out: str = "runs/timesteps.json"
    solver: str = "unipc"
    step: float = 0.5
    min_step: float = 0.02
    starts: List[str] = field(default_factory=lambda: list(START_SPACINGS))
    finals: List[str] = field(default_factory=lambda: ["zero", "min"])
    free_start: bool = True

    default_samples: ClassVar[int] = 128

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if not self.finals or any(f not in ("zero", "min") for f in self.finals):
            raise ValueError(f"finals must be among zero, min, got {self.finals}")

    @property
    def method(self) -> Method:
        return self._method

    def check_model(self, testbed: Testbed) -> None:
        super().check_model(testbed)
        try:  # the solver on its own grid: an artifact of another NFE fails here, with its own message
            make_plan(noise_schedule_of(testbed), self.method.solver, nfe=self.nfe, **self.method.option_dict)
        except ValueError as exc:
            raise ValueError(f"solver {self.solver!r} at NFE {self.nfe}: {exc}") from None


class _Objective:
    """Fitness of timesteps, answered from the log first (a rerun replays it)."""

    def __init__(self, fitness: Fitness, method: Method, axis: LogSNRAxis, records: SearchLog, budget: int, bar):
        self.fitness, self.method, self.axis, self.records = fitness, method, axis, records
        self.cached = {e["key"]: e for e in records.entries}
        self.budget, self.bar, self.calls = budget, bar, 0
        self.best = (math.inf, None, None)

    def __call__(self, u: list[float], final: str, phase: str) -> float:
        if self.calls >= self.budget:
            raise _BudgetSpent
        ts = self.axis.timesteps(u)
        key = json.dumps([[round(t, 6) for t in ts], final])
        self.calls += 1
        if key in self.cached:
            value = math.inf if self.cached[key]["fitness"] is None else float(self.cached[key]["fitness"])
        else:
            start = time.perf_counter()
            sched = SolverSchedule(ts, final)
            value = self.fitness(self.method.solver, {**self.method.option_dict, "solver_schedule": sched})
            entry = {"i": len(self.records), "phase": phase, "fitness": value, "seconds": time.perf_counter() - start,
                     "timesteps": ts, "final": final, "key": key}
            self.records.append(entry)
            self.cached[key] = entry
        self.bar.update()  # calls, as the budget counts them (a revisited point is answered from the log)
        if value < self.best[0]:
            self.best = (value, ts, final)
            self.bar.set_postfix_str(f"best {value:.4g}")
        return value


class _BudgetSpent(Exception):
    pass


def _compass(objective: _Objective, z: np.ndarray, final: str, free_start: bool, value: float, step: float,
             min_step: float) -> None:
    while step >= min_step:
        improved = False
        for k in range(len(z)):
            for sign in (1.0, -1.0):
                trial = z.copy()
                trial[k] += sign * step
                v = objective(positions_from_logits(trial, free_start), final, f"step {step:g}")
                if v < value:
                    z, value, improved = trial, v, True
                    break
        if not improved:
            step /= 2


def run_timestep_search(cfg: TimestepSearchConfig, testbed: Testbed | None = None,
                        log: Callable[[str], None] = print) -> SolverSchedule:
    """Run (or resume) the timestep search and write ``cfg.out``; returns the tuned schedule."""
    with open_search_run(cfg, testbed, log, solver=cfg.method.label) as run:
        testbed, guidance, run_dir, fitness, records = run.testbed, run.guidance, run.run_dir, run.fitness, run.records
        if run.state is None:
            save_state(run_dir / "state.json", {"identity": run.identity})
        axis = LogSNRAxis(fitness.schedule)
        if len(records):
            log(f"resuming: replaying {len(records)} logged evaluations from {records.path}")
        from tqdm.auto import tqdm

        with tqdm(total=cfg.budget, desc=f"timesteps NFE {cfg.nfe}", unit="eval", disable=not cfg.progress) as bar:
            objective = _Objective(fitness, cfg.method, axis, records, cfg.budget, bar)
            starts = {}
            try:
                for spacing, final in itertools.product(cfg.starts, cfg.finals):
                    try:
                        grid = make_plan(fitness.schedule, cfg.method.solver, nfe=cfg.nfe, spacing=GridSpec(
                            spacing=spacing, final_sigma=final, convention="multistep"), **cfg.method.option_dict).grid
                    except ValueError:  # a spacing this schedule does not have
                        continue
                    u = axis.positions(grid.model_timesteps.tolist())
                    if u[0] > 0 and not cfg.free_start:  # leading: starts below the noisiest time
                        continue
                    starts[f"{spacing}/{final}"] = (objective(u, final, f"start {spacing}/{final}"), u, final)
                if not starts:
                    raise ValueError(f"none of the start spacings {cfg.starts} applies to this model's schedule")
                name = min(starts, key=lambda k: starts[k][0])
                if cfg.nfe > 1 or cfg.free_start:
                    value, u, final = starts[name]
                    _compass(objective, logits_from_positions(u, cfg.free_start), final, cfg.free_start, value,
                             cfg.step, cfg.min_step)
            except _BudgetSpent:
                pass
            if bar.n < bar.total:  # the compass step fell below min_step before the budget was spent
                bar.total = bar.n
                bar.refresh()
        if objective.calls <= len(starts):
            log(f"note: the budget ({cfg.budget}) was spent on the start spacings ({len(starts)} evaluated): the "
                "result is the best hand-set spacing, no timestep was tuned (raise --budget)")
        name = min(starts, key=lambda k: starts[k][0])
        value, ts, final = objective.best
        if ts is None or not math.isfinite(value):
            raise ValueError("no finite evaluation: every timestep choice diverged (check the model and guidance)")
        summary = {"best_fitness": value, "metric": cfg.metric, "evaluations": objective.calls,
                   "start": name, "start_fitness": starts[name][0],
                   "starts": {k: v for k, (v, _, _) in starts.items()},
                   "seconds": sum(e["seconds"] for e in records.entries),
                   "search_seeds": [cfg.data_seed, cfg.data_seed + cfg.samples]}
        untuned = make_plan(fitness.schedule, cfg.method.solver, nfe=cfg.nfe, spacing=common_grid(None, fitness.schedule),
                            **cfg.method.option_dict).grid
        record = validate_against_baseline(
            cfg, testbed, guidance, run_dir, (cfg.method.solver, {**cfg.method.option_dict, "solver_schedule":
                                                                  SolverSchedule(ts, final)}),
            (cfg.method.solver, cfg.method.option_dict), f"{cfg.method.label} tuned timesteps",
            f"{cfg.method.label} on the model's grid", log)
        if record["written"] == "baseline":  # the untuned grid, as a timesteps-only schedule
            ts, final = untuned.model_timesteps.tolist(), "zero" if float(untuned.sigma[-1]) == 0 else "min"
        sched = SolverSchedule(ts, final, meta=fitness.meta(cfg.method.solver, search=summary, validation=record,
                                                              solver_options=cfg.method.option_dict))
        sched.save(cfg.out)
        write_json(run_dir / "result.json", {**summary, "validation": record, "schedule": str(cfg.out),
                                             "timesteps": ts})
        log(f"{cfg.method.label} NFE {cfg.nfe}: best {cfg.metric} {value:.5g} (start {name}: "
            f"{starts[name][0]:.5g}) after {objective.calls} evaluations; wrote {cfg.out}"
            + (" (the untuned grid)" if record["written"] == "baseline" else ""))
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
    cfg = settings_from_api(TimestepSearchConfig, "search_timesteps", model=name, solver=solver, nfe=nfe,
                            guidance=guidance, budget=budget, out=str(out), **settings)
    return run_timestep_search(cfg, testbed, log)
