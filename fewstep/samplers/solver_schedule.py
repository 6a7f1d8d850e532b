"""Solver schedules: tuned timesteps for any solver, plus USF's per-step strategies.

A :class:`SolverSchedule` is the artifact behind the ``solver_schedule=`` option that every
registered solver accepts. It always fixes the grid: the model timesteps of its evaluated
points and the terminal point (``final_sigma``). That part is grid-level and works with any
solver (``fewstep.sample(..., solver="unipc", solver_schedule="steps.json")``); it enters
through :func:`apply_solver_schedule`, the one place where a schedule turns into a
:class:`~fewstep.samplers.timesteps.GridSpec`.

Published optimised schedules (Align Your Steps, ...) are built in as such artifacts and load
by name, ``solver_schedule="ays:sd15"`` (:mod:`fewstep.samplers.published`, read by :func:`load_published`): they interpolate to
other step counts as their authors recommend, and on another model family they warn once
instead of refusing.

A schedule may also carry one :class:`StepStrategy` per step (Liu et al., ICLR 2024, the
USF decision space: prediction type, Taylor order, derivative estimation, corrector) and an
analytical first step; only the ``usf`` solver runs those (``solvers/usf.py``).

The file is an artifact record (``fewstep/samplers/artifacts.py``), JSON or YAML::

    {"fewstep_artifact": "solver_schedule", "version": 1,
     "meta": {"nfe": 5, "fingerprint": "...", "schedule": {...}, "solver": "usf", ...},
     "timesteps": [999.0, 601.3, 322.8, 141.2, 40.7], "final_sigma": "zero",
     "analytic_first_step": false,
     "steps": [{"space": "data", "order": 1, "corrector": "pseudo"}, ...]}
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Mapping, Sequence

from functools import lru_cache

import torch

from .artifacts import Artifact, ArtifactError, ArtifactMeta
from .published import is_published_name, loglinear_interp, published_files
from .schedules import make_schedule
from .timesteps import GridSpec, TimeGrid
from fewstep.infra.validation import check_choice, check_int

__all__ = [
    "StepStrategy", "SolverSchedule", "load_solver_schedule", "apply_solver_schedule", "RELAXATION_FORMS",
    "MAX_ORDER", "list_published", "load_published",
]

MAX_ORDER = 4
#: Named relaxations of a first-derivative estimate (USF's "unipc-bh1" / "unipc-bh2"; the latter is also
#: DPM-Solver++(2M)'s midpoint rule); a number c means the linear relaxation 1 + c h.
RELAXATION_FORMS = ("bh1", "bh2")
_MAX_RELAXATION = 100.0
_WARNED: set[tuple[str, str]] = set()  # (published schedule, model schedule) pairs already warned about
_STEP_FIELDS = ("space", "order", "points", "relaxation", "corrector", "corrector_relaxation")


def _relaxation(name: str, value: Any) -> float | str:
    if isinstance(value, str):
        return check_choice(name, value, RELAXATION_FORMS)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number c (derivative scaled by 1 + c h) or one of "
                        f"{RELAXATION_FORMS}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > _MAX_RELAXATION:
        raise ValueError(f"{name}={value!r} must be a finite number in [-{_MAX_RELAXATION:g}, {_MAX_RELAXATION:g}]")
    return value


@dataclasses.dataclass(frozen=True)
class StepStrategy:
    """How one step of a USF solver schedule integrates (Liu et al., ICLR 2024, Sec. 3).

    Attributes:
        space: ``"data"`` (expand x0 in log-SNR) or ``"noise"`` (expand eps).
        order: Taylor order 1-4 of the exponential-integrator update.
        points: Difference points (earlier outputs) that estimate the first derivative,
            1..order-1 (None: order - 1); higher derivatives use order - 1 points.
        relaxation: The first-derivative estimate is multiplied by ``1 + c h`` for a number
            c, or by the factor of ``"bh1"`` / ``"bh2"`` (UniPC's B(h) = h / expm1(h); ``bh2``
            is also DPM-Solver++(2M)'s midpoint rule).
        corrector: ``"none"`` or ``"pseudo"``: redo the step with order + 1, adding the model
            output at the new point as a difference point (no extra evaluation; UniC-style).
        corrector_relaxation: Relaxation of the corrector's first derivative (as ``relaxation``).
    """

    space: str = "data"
    order: int = 1
    points: int | None = None
    relaxation: float | str = 0.0
    corrector: str = "none"
    corrector_relaxation: float | str = 0.0

    def __post_init__(self) -> None:
        check_choice("space", self.space, ("data", "noise"))
        order = check_int("order", self.order, 1, MAX_ORDER)
        object.__setattr__(self, "order", order)
        points = order - 1 if self.points is None else check_int("points", self.points, 0, MAX_ORDER - 1)
        if order > 1 and not 1 <= points <= order - 1:
            raise ValueError(f"points={points} is not allowed for order {order}; use 1 to {order - 1}")
        if order == 1 and points != 0:
            raise ValueError(f"points={points}: an order-1 step estimates no derivative (use 0 or leave it out)")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "relaxation", _relaxation("relaxation", self.relaxation))
        check_choice("corrector", self.corrector, ("none", "pseudo"))
        object.__setattr__(self, "corrector_relaxation",
                           _relaxation("corrector_relaxation", self.corrector_relaxation))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "StepStrategy":
        if not isinstance(d, Mapping):
            raise TypeError(f"a step strategy must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_STEP_FIELDS))
        if unknown:
            raise ValueError(f"unknown strategy field(s) {unknown}; allowed: {', '.join(_STEP_FIELDS)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "StepStrategy":
        if "order" in changes and "points" not in changes:
            changes["points"] = None if self.points == self.order - 1 else min(self.points, changes["order"] - 1)
        return dataclasses.replace(self, **changes)


class SolverSchedule(Artifact):
    """Timesteps (for any solver) and optionally USF per-step strategies, as a versioned artifact.

    Args:
        timesteps: Model timesteps of the evaluated points, noisiest first, strictly decreasing.
        final_sigma: Terminal point: ``"zero"`` (clean data) or ``"min"`` (the schedule's t_min).
        steps: One :class:`StepStrategy` (or mapping) per timestep, or None for a
            timesteps-only schedule (tuned timesteps for any solver).
        analytic_first_step: USF's analytical first step: at the first point x0 = 0
            (eps = x / sigma) replaces the model, saving one evaluation.
        meta: Provenance; ``meta.nfe`` is set from the timesteps when missing.

    Raises:
        ValueError / TypeError: naming the bad field (wrong lengths, non-monotone or
            non-finite timesteps, unknown strategies, an NFE that does not match).
    """

    kind = "solver_schedule"
    version = 1

    def __init__(self, timesteps: Sequence[float], final_sigma: str = "zero",
                 steps: Sequence[StepStrategy | Mapping[str, Any]] | None = None,
                 analytic_first_step: bool = False, meta: ArtifactMeta | None = None):
        ts = _timesteps(timesteps)
        check_choice("final_sigma", final_sigma, ("zero", "min"))
        if not isinstance(analytic_first_step, bool):
            raise TypeError(f"analytic_first_step={analytic_first_step!r} must be true or false")
        if steps is not None:
            if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
                raise TypeError(f"steps must be a list with one strategy per timestep, got {type(steps).__name__}")
            if len(steps) != len(ts):
                raise ValueError(f"steps has {len(steps)} strategies but there are {len(ts)} timesteps; "
                                 "give one strategy per timestep")
            parsed = []
            for i, s in enumerate(steps):
                try:
                    parsed.append(s if isinstance(s, StepStrategy) else StepStrategy.from_dict(s))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"steps[{i}]: {exc}") from None
            steps = tuple(parsed)
            _check_step_sequence(steps, final_sigma)
        elif analytic_first_step:
            raise ValueError("analytic_first_step is a USF strategy: it needs per-step strategies (steps)")
        if analytic_first_step and len(ts) < 2:
            raise ValueError("an analytic first step needs at least two timesteps")
        nfe = len(ts) - int(analytic_first_step)
        meta = meta or ArtifactMeta()
        if meta.nfe is None:
            meta = dataclasses.replace(meta, nfe=nfe)
        elif meta.nfe != nfe:
            extra = " (one of them analytic)" if analytic_first_step else ""
            raise ValueError(f"meta.nfe={meta.nfe} does not match the {len(ts)} timesteps{extra}, "
                             f"which make {nfe} model evaluations")
        if steps is not None and meta.solver not in (None, "usf"):
            raise ValueError(f"meta.solver={meta.solver!r}: per-step strategies belong to solver 'usf'")
        super().__init__(meta)
        self.timesteps = ts
        self.final_sigma = final_sigma
        self.steps = steps
        self.analytic_first_step = analytic_first_step

    # ------------------------------------------------------------------ properties
    @property
    def nfe(self) -> int:
        """Model evaluations per sample (the analytical first step costs none)."""
        return self.meta.nfe

    @property
    def num_steps(self) -> int:
        """Solver steps (timesteps): ``nfe``, plus one with the analytical first step."""
        return len(self.timesteps)

    @property
    def has_strategies(self) -> bool:
        return self.steps is not None

    @property
    def published(self) -> dict[str, Any] | None:
        """For a built-in published schedule, its provenance (``meta.extra["published"]``), else None."""
        info = self.meta.extra.get("published")
        return info if isinstance(info, Mapping) else None

    @classmethod
    def coerce(cls, value: Any, what: str = "artifact") -> "SolverSchedule":
        """As :meth:`Artifact.coerce`, plus built-in schedule names such as ``"ays:sd15"``."""
        if is_published_name(value) and not os.path.exists(value):
            return load_published(value)
        return super().coerce(value, what)

    # ------------------------------------------------------------------ artifact interface
    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timesteps": list(self.timesteps), "final_sigma": self.final_sigma}
        if self.steps is not None:
            out["analytic_first_step"] = self.analytic_first_step
            out["steps"] = [s.to_dict() for s in self.steps]
        return out

    @classmethod
    def from_payload(cls, payload: dict[str, Any], meta: ArtifactMeta, tensors=None) -> "SolverSchedule":
        allowed = ("timesteps", "final_sigma", "steps", "analytic_first_step")
        unknown = sorted(set(payload) - set(allowed))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
        if "timesteps" not in payload:
            raise ValueError("missing field 'timesteps'")
        return cls(payload["timesteps"], payload.get("final_sigma", "zero"), payload.get("steps"),
                   payload.get("analytic_first_step", False), meta)

    @classmethod
    def from_grid(cls, grid: TimeGrid, steps: Sequence[StepStrategy] | None = None,
                  analytic_first_step: bool = False, meta: ArtifactMeta | None = None) -> "SolverSchedule":
        """The schedule whose grid is ``grid`` (a full grid, not an img2img cut)."""
        if grid.start != 0:
            raise ValueError("a solver schedule describes a whole run; got a grid cut at step "
                             f"{grid.start}")
        final = "zero" if float(grid.sigma[-1]) == 0.0 else "min"
        if final == "min" and abs(float(grid.t[-1]) - grid.schedule.grid_end) > 1e-9 * max(1.0, grid.schedule.t_max):
            raise ValueError("the grid ends neither on sigma = 0 nor on the schedule's t_min; a solver schedule "
                             "cannot express that terminal point")
        meta = meta or ArtifactMeta()
        if meta.schedule is None:
            meta = dataclasses.replace(meta, schedule=grid.schedule.to_dict())
        return cls(grid.model_timesteps.tolist(), final, steps, analytic_first_step, meta)

    def replace(self, **changes: Any) -> "SolverSchedule":
        """A copy with some of ``timesteps``, ``final_sigma``, ``steps``, ``analytic_first_step``, ``meta`` changed."""
        fields = dict(timesteps=self.timesteps, final_sigma=self.final_sigma, steps=self.steps,
                      analytic_first_step=self.analytic_first_step, meta=self.meta)
        fields.update(changes)
        if "meta" not in changes and ("timesteps" in changes or "analytic_first_step" in changes):
            fields["meta"] = dataclasses.replace(self.meta, nfe=None)
        return SolverSchedule(**fields)

    # ------------------------------------------------------------------ grid
    def grid_spec(self, spec: GridSpec, schedule: Any, solver: str, *, nfe: int | None = None,
                  steps: int | None = None) -> GridSpec:
        """``spec`` with this schedule's timesteps and terminal point, after checking the request.

        Args:
            spec: The grid settings otherwise in force (spacing and t_start/t_end are replaced).
            schedule: The noise schedule of the run (checked against ``meta.schedule``).
            solver: The solver's name (checked against ``meta.solver``).
            nfe: Model evaluations requested (the functional API), or None.
            steps: Steps requested (``num_inference_steps`` of a diffusers pipeline), or None.

        Raises:
            ArtifactError: another NFE, step count, noise schedule or solver than the schedule's.
            ValueError: explicit timesteps or sigmas given as well.
        """
        if self.published is not None:
            return self._published_spec(spec, schedule, solver, nfe=nfe, steps=steps)
        self.check(schedule=schedule, solver=solver)
        if spec.timesteps is not None or spec.sigmas is not None:
            raise ValueError("a solver schedule fixes the timesteps; do not pass timesteps or sigmas as well")
        afs = " (its first step is analytic: no model evaluation)" if self.analytic_first_step else ""
        if nfe is not None and nfe != self.nfe:
            raise ArtifactError(f"the solver schedule was made for NFE {self.nfe}{afs}, but nfe={nfe} was requested")
        if steps is not None and steps != self.num_steps:
            raise ArtifactError(
                f"the solver schedule has {self.num_steps} steps (NFE {self.nfe}){afs}, but num_inference_steps="
                f"{steps} was requested; pass num_inference_steps={self.num_steps}")
        return spec.replace(timesteps=tuple(self.timesteps), sigmas=None, final_sigma=self.final_sigma,
                            t_start=None, t_end=None)

    def _published_spec(self, spec: GridSpec, schedule: Any, solver: str, *, nfe: int | None,
                        steps: int | None) -> GridSpec:
        """A published schedule: any solver, any step count (interpolated), another model family with a warning."""
        info = self.published
        if spec.timesteps is not None or spec.sigmas is not None:
            raise ValueError("a solver schedule fixes the timesteps; do not pass timesteps or sigmas as well")
        try:
            self.check(schedule=schedule)
        except ArtifactError:
            key = (info["name"], repr(schedule.to_dict() if hasattr(schedule, "to_dict") else schedule))
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"solver schedule {info['name']} was tuned for {info['model_family']}; this model has "
                              "another noise schedule, so its timesteps are used as they are and may not help",
                              UserWarning, stacklevel=4)
        wanted = steps if steps is not None else nfe
        sched = self if wanted is None or wanted == self.num_steps else load_published(info["name"], wanted)
        return spec.replace(timesteps=tuple(sched.timesteps), sigmas=None, final_sigma=sched.final_sigma,
                            t_start=None, t_end=None)

    def __repr__(self) -> str:
        what = "strategies" if self.steps is not None else "timesteps only"
        return f"SolverSchedule(nfe={self.nfe}, {what}, timesteps={[round(t, 2) for t in self.timesteps]})"


def _timesteps(value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"timesteps must be a list of numbers, got {type(value).__name__}")
    out = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"timesteps[{i}]={t!r} must be a finite number >= 0")
        out.append(float(t))
    if not out:
        raise ValueError("timesteps is empty")
    for i in range(1, len(out)):
        if not out[i] < out[i - 1]:
            raise ValueError(f"timesteps must strictly decrease (noisiest first): timesteps[{i}]={out[i]!r} "
                             f"follows {out[i - 1]!r}")
    return tuple(out)


def _check_step_sequence(steps: Sequence[StepStrategy], final_sigma: str) -> None:
    """What a strategy may ask for at its position: points that exist, an evaluation to correct with."""
    last = len(steps) - 1
    for i, s in enumerate(steps):
        if s.order > i + 1:
            raise ValueError(f"steps[{i}]: order {s.order} needs {s.order} points but step {i} has only {i + 1} "
                             f"(the current and earlier outputs)")
        if i == last and s.corrector != "none":
            raise ValueError(f"steps[{i}]: the last step cannot have a corrector (no model evaluation follows it)")
        if i == last and final_sigma == "zero" and s.order != 1:
            raise ValueError(f"steps[{i}]: a step into sigma = 0 is first order (log-SNR is infinite there), "
                             f"got order {s.order}")


def load_solver_schedule(path: str | os.PathLike) -> SolverSchedule:
    """Read and validate a solver schedule file (JSON or YAML).

    Raises:
        ArtifactError: naming the file and the field that is wrong.
    """
    return SolverSchedule.load(path)


def apply_solver_schedule(solver: Any, spec: GridSpec, schedule: Any, *, nfe: int | None = None,
                          steps: int | None = None) -> GridSpec:
    """The grid spec of a run: ``spec`` itself, or the one the solver's ``solver_schedule`` fixes.

    The single entry of solver schedules into the grid layer, used by :func:`fewstep.make_plan`
    and by the diffusers adapter's ``set_timesteps``.
    """
    sched = solver.config.get("solver_schedule")
    if sched is None:
        return spec
    spec = sched.grid_spec(spec, schedule, solver.name, nfe=nfe, steps=steps)
    tuned = sched.meta.extra.get("solver_options")
    if isinstance(tuned, Mapping):
        differs = sorted(k for k, v in tuned.items() if k in solver.config and solver.config[k] != v
                         and not isinstance(solver.config[k], (list, tuple)))
        if differs:
            warnings.warn(f"the solver schedule's timesteps were tuned for {solver.name} with "
                          f"{ {k: tuned[k] for k in differs} }, not { {k: solver.config[k] for k in differs} }",
                          UserWarning, stacklevel=3)
    return spec


# ---------------------------------------------------------------------- built-in published schedules
def list_published() -> list[dict[str, Any]]:
    """Name, method, model family, native NFE and source of every built-in schedule."""
    out = []
    for name in published_files():
        sched = _native(name)
        info = sched.published
        out.append({"name": name, "method": info["method"], "model_family": info["model_family"],
                    "nfe": sched.nfe, "source": info["source"], "interpolation": info["interpolation"]})
    return out


@lru_cache(maxsize=None)
def _native(name: str):
    return SolverSchedule.load(published_files()[name])


def load_published(name: str, steps: int | None = None):
    """A built-in schedule, at its native step count or interpolated to ``steps`` steps.

    Args:
        name: ``method:family``, e.g. ``"ays:sd15"`` (see :func:`list_published`).
        steps: Number of evaluated timesteps (NFE); None: the published count.

    Returns:
        A timesteps-only :class:`~fewstep.samplers.solver_schedule.SolverSchedule`.

    Raises:
        ValueError: an unknown name (naming the known ones) or a bad step count.
    """
    files = published_files()
    if name not in files:
        raise ValueError(f"unknown built-in schedule {name!r}; known: {', '.join(files) or 'none'} "
                         "(fewstep list schedules)")
    sched = _native(name)
    if steps is None or check_int("steps", steps, 1, 1000) == sched.nfe:
        return sched
    info = sched.published
    sigmas = loglinear_interp(info["sigmas"], steps + 1)[:-1]  # the last level is the terminal point
    schedule = make_schedule(sched.meta.schedule)
    lam = -torch.tensor(sigmas, dtype=torch.float64).log()  # sigma here is sigma / alpha = exp(-lambda)
    timesteps = schedule.model_time(schedule.t_from_lambda(lam)).tolist()
    knots = info.get("timesteps") or sched.timesteps
    n = len(info["sigmas"]) - 1
    for k in range(steps):  # points that fall on a published level keep its published timestep exactly
        if (k * n) % steps == 0 and k * n // steps < len(knots):
            timesteps[k] = float(knots[k * n // steps])
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"{name} interpolated to {steps} steps gives repeated timesteps on the "
                         f"{info['model_family']} schedule; use fewer steps")
    extra = {**sched.meta.extra, "published": {**info, "interpolated_to": steps}}
    return sched.replace(timesteps=timesteps, meta=dataclasses.replace(sched.meta, nfe=steps, extra=extra))
