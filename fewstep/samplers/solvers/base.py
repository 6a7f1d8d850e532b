"""Solver base class, option validation and the exponential-integrator helpers all solvers share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..plan import SolverPlan
from ..prediction import x0_coefficients
from ..solver_schedule import SolverSchedule
from ..timesteps import TimeGrid
from fewstep.infra.validation import check_index_list

__all__ = ["Option", "Solver", "SPACE_OPTION", "SOLVER_SCHEDULE_OPTION", "StepGeometry", "ei_coefficients",
           "usable_order", "empty_tables"]


@dataclass(frozen=True)
class Option:
    """A solver option: default, one-line doc and what values are allowed."""

    default: Any
    doc: str
    choices: tuple | None = None
    bounds: tuple[float, float] | None = None
    kind: str = "any"  # "int", "float", "bool", "int_list", "artifact", "any"
    artifact: type | None = None  # the Artifact subclass of kind="artifact" options

    def validate(self, solver: str, name: str, value: Any) -> Any:
        """Return ``value`` normalised, or raise ValueError naming the option and what is allowed."""
        where = f"option {name}={value!r} of solver {solver!r}"
        if self.kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{where} must be True or False")
            value = bool(value)
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{where} must be a whole number")
            value = int(value)
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"{where} must be a number")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{where} must be finite")
        elif self.kind == "artifact":
            if value is None:
                return None
            return self.artifact.coerce(value, f"option {name} of solver {solver!r}")
        elif self.kind == "int_list":
            try:
                value = check_index_list(name, value)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} (option of solver {solver!r})") from None
        if self.choices is not None and not any(type(value) is type(c) and value == c for c in self.choices):
            raise ValueError(f"{where} is not one of {self.choices}")
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            lo, hi = self.bounds
            raise ValueError(f"{where} is out of range; allowed: {lo:g} to {hi:g}")
        return value


SOLVER_SCHEDULE_OPTION = Option(
    None, "solver schedule (file, built-in name such as ays:sd15, record or SolverSchedule) fixing the timesteps; "
          "usf also reads its strategies",
    kind="artifact", artifact=SolverSchedule)


class Solver(ABC):
    """A diffusion ODE solver: turns a time grid into a :class:`SolverPlan` once.

    Subclasses declare ``name``, ``paper``, ``summary`` and ``options`` and implement
    :meth:`plan`. Construct them through :func:`fewstep.get_solver`. Every solver also gets
    the ``solver_schedule`` option: tuned timesteps are a grid-level input that the grid
    layer applies for any solver (:func:`~fewstep.samplers.solver_schedule.apply_solver_schedule`);
    per-step strategies in a schedule are read only by solvers with ``runs_step_strategies``.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    # Which diffusers scheduler's integer timestep spacings this solver reproduces.
    diffusers_convention: ClassVar[str] = "multistep"
    # Whether plan() executes the per-step strategies of a solver schedule (USF).
    runs_step_strategies: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "solver_schedule" not in cls.options:
            cls.options = {**cls.options, "solver_schedule": SOLVER_SCHEDULE_OPTION}
    # True for solvers that need tuned artifacts to differ from a simpler solver (DC-Solver):
    # `fewstep compare` runs them only when asked for by name.
    requires_tuning: ClassVar[bool] = False

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"unknown option(s) {unknown} for solver {self.name!r}; allowed: {allowed}")
        self.config = {
            key: opt.validate(self.name, key, options.get(key, opt.default)) for key, opt in self.options.items()
        }
        schedule = self.config.get("solver_schedule")
        if schedule is not None and schedule.has_strategies and not self.runs_step_strategies:
            raise ValueError(f"the solver schedule holds per-step strategies, which only solver 'usf' runs; use "
                             f"solver='usf', or a schedule holding only timesteps for solver {self.name!r}")
        self._check_config()

    def _check_config(self) -> None:
        """Hook for cross-option checks."""

    @property
    def space(self) -> str:
        """``"data"`` or ``"noise"``: what the history stores (the ``space`` option if the solver has one)."""
        return self.config.get("space", "data")

    @property
    def history_size(self) -> int:
        """How many converted model outputs a step may read."""
        return 1

    @abstractmethod
    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        """Build the coefficient tables for ``grid`` (float64, once per set of timesteps)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({opts})"


SPACE_OPTION = Option("data", "integrate x0 ('data', e.g. DPM-Solver++) or eps ('noise', e.g. DPM-Solver)",
                      choices=("data", "noise"))


@dataclass(frozen=True)
class StepGeometry:
    """Float64 schedule values of one step from s = t_i to t = t_{i+1}."""

    alpha_s: float
    sigma_s: float
    alpha_t: float
    sigma_t: float
    lambda_s: float
    lambda_t: float

    @property
    def h(self) -> float:
        return self.lambda_t - self.lambda_s

    @property
    def exact_limit(self) -> bool:
        """True when h is infinite (a step into sigma = 0 or out of alpha = 0)."""
        return math.isinf(self.h)

    def expm1_neg_h_alpha(self) -> float:
        """alpha_t * expm1(-h), finite even when h = +inf."""
        if self.exact_limit:
            return self.sigma_t * self.alpha_s / self.sigma_s - self.alpha_t
        return self.alpha_t * math.expm1(-self.h)

    def expm1_h_sigma(self) -> float:
        """sigma_t * expm1(h), finite when sigma_t = 0 (needs alpha_s > 0)."""
        if self.exact_limit:
            return self.alpha_t * self.sigma_s / self.alpha_s - self.sigma_t
        return self.sigma_t * math.expm1(self.h)

    @classmethod
    def of(cls, grid: TimeGrid, s: int, t: int | None = None) -> "StepGeometry":
        t = s + 1 if t is None else t
        return cls(
            float(grid.alpha[s]), float(grid.sigma[s]), float(grid.alpha[t]), float(grid.sigma[t]),
            float(grid.lambda_[s]), float(grid.lambda_[t]),
        )


def usable_order(grid: TimeGrid, i: int, order: int) -> int:
    """Largest order <= ``order`` whose stencil (points i, i-1, ...) is usable at step i.

    Multistep extrapolation in lambda breaks down in three places, where we fall back
    to the first-order (exact-limit) update instead of producing inf/NaN: a step whose
    h is infinite (into sigma = 0), a zero-length step (the identity), and stencil
    points with lambda = -inf (flow matching's alpha = 0 start).
    """
    h = float(grid.lambda_[i + 1] - grid.lambda_[i])
    if math.isinf(h) or h == 0:
        return 1
    p = 1
    while p < min(order, i + 1) and math.isfinite(float(grid.lambda_[i - p])):
        p += 1
    return p


def ei_coefficients(geom: StepGeometry, space: str) -> tuple[float, float]:
    """First-order exponential-integrator step (DDIM): x_t = a x_s + c D_s.

    Data space: a = sigma_t/sigma_s, c = -alpha_t expm1(-h).
    Noise space: a = alpha_t/alpha_s, c = -sigma_t expm1(h).
    """
    if space == "data":
        return geom.sigma_t / geom.sigma_s, -geom.expm1_neg_h_alpha()
    if geom.alpha_s == 0:
        raise ValueError("noise-space solvers cannot step from alpha = 0 (pure noise); use a data-space solver")
    return geom.alpha_t / geom.alpha_s, -geom.expm1_h_sigma()


def empty_tables(grid: TimeGrid, history: int, prediction: str) -> dict[str, torch.Tensor]:
    """Zero predictor/corrector tables and the x0 conversion rows for ``grid``."""
    n = grid.n
    cx, co = x0_coefficients(prediction, grid.alpha[:n], grid.sigma[:n])
    return {
        "x0_coef": torch.stack([cx, co], 1),
        "predict": torch.zeros(n, 1 + history, dtype=torch.float64),
        "correct": torch.zeros(n, 1 + history, dtype=torch.float64),
    }

