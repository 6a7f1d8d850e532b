"""Time-Shift sampler: per-sample noise levels matched to each sample's variance (Li et al., ICLR 2024).

Exposure bias leaves a sample at step i noisier or cleaner than the grid says. Per sample, the
rule finds the timestep t_s in a window around the grid's t_i whose noise variance sigma(t_s)^2
(1 - alphā for VP models) is closest to the sample's own variance (over all its elements), for
t_i above a cutoff, and then (``mode``):

* ``"target"`` (default, the official codes' form, e.g. ``ddim_sample`` of TS-DPM-ADM): the
  network stays on the grid timestep t_i and the step's *target* noise level moves by the same
  offset, to t_{i+1} + (t_s - t_i); the first step (no history yet) and the last step (into the
  terminal point) are never shifted. Any solver's step lands on the grid's t_{i+1}, then a DDIM
  move along its own data prediction x0 takes it to the shifted level,
  x' = (sigma'/sigma) x + (alpha' - sigma' alpha/sigma) x0,
  one linear combination with per-sample coefficients gathered from float64 tables computed once
  per step (exactly the official step for DDIM; UniPC's folded corrector rebuilds its previous
  sample from the moved one, so the move also reaches the corrected sample).
* ``"input"`` (fewstep <= 0.x): the network gets t_s instead of t_i and the solver keeps its own
  coefficients and targets.

docs/guide/timeshift.md has the measured effect of both on the built-in digits model.

Two ways in, one rule (:class:`TimeShift`):

* ``fewstep.sample(..., time_shift=TimeShift(window=20, cutoff=300))`` with any solver: the
  candidates of every step are computed once, the choice is tensor ops (no host sync).
* ``fewstep.time_shift(pipe, window=20, cutoff=300)`` for diffusers pipelines (:mod:`.timeshift_hook`): ``"target"``
  wraps the pipeline's fewstep scheduler's ``step`` (the target move); ``"input"`` adds a
  forward pre-hook on the UNet/transformer that replaces the batch's timestep by the per-sample
  shifted ones (any scheduler). ``.remove()`` (or leaving a ``with`` block) undoes either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from .schedules import DiscreteVPSchedule, NoiseSchedule
from .timesteps import TimeGrid
from fewstep.infra.validation import check_choice, check_int, check_real

__all__ = ["TimeShift", "TargetMove", "MODES"]

MODES = ("target", "input")


@dataclasses.dataclass(frozen=True)
class TimeShift:
    """The Time-Shift rule.

    Attributes:
        window: Width of the search window in model timesteps: the candidates are
            ``t + k`` for ``|k| <= window // 2`` (the official ``--window_size``; 0 or 1: no shift),
            clipped to the schedule's range.
        cutoff: Only grid timesteps above it are shifted (the official ``--cut_off_value``), in
            model-timestep units (0..999 for SD-style models, sigma * 1000 for flow models).
        mode: ``"target"`` (default: network on the grid timestep, the step's target noise
            level moves) or ``"input"`` (the network gets the shifted timestep); see the module.
    """

    window: int = 0
    cutoff: float = 0.0
    mode: str = "target"

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_int("time_shift window", self.window, 0, 100_000))
        object.__setattr__(self, "cutoff", check_real("time_shift cutoff", self.cutoff))
        object.__setattr__(self, "mode", check_choice("time_shift mode", self.mode, MODES))

    @classmethod
    def coerce(cls, value: Any) -> "TimeShift | None":
        """A TimeShift from itself, ``{"window": W, "cutoff": C[, "mode": M]}``, ``[W, C]``, ``[W, C, M]`` or None.

        Raises:
            TypeError, ValueError: anything else, naming the value.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"window", "cutoff", "mode"})
            if unknown:
                raise ValueError(f"time_shift has unknown key(s) {unknown}; allowed: window, cutoff, mode")
            return cls(**value)
        if isinstance(value, (list, tuple)) and len(value) in (2, 3):
            return cls(*value)
        raise TypeError(f"time_shift={value!r} must be fewstep.TimeShift(window=, cutoff=, mode=), "
                        "{'window': W, 'cutoff': C, 'mode': M}, [W, C] or [W, C, M]")

    @property
    def active(self) -> bool:
        return self.window // 2 > 0

    def candidates(self, schedule: NoiseSchedule, t: torch.Tensor, lambdas: torch.Tensor | None = None,
                   bounds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate model timesteps around ``t`` and their noise variances sigma^2 (float64).

        Args:
            schedule: The model's noise schedule.
            t: Model timesteps, any shape S, on any device.
            lambdas: For discrete VP schedules, lambda at the integer timesteps on ``t``'s
                device (see :func:`_lambda_table`); computed here if omitted.
            bounds: The schedule's model-timestep range (see :func:`_model_time_range`).

        Returns:
            (tau, var), both [*S, 2 * (window // 2) + 1]. Tensor ops only, given ``lambdas``
            and ``bounds``.
        """
        half = self.window // 2
        offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=t.device)
        lo, hi = bounds or _model_time_range(schedule)
        tau = (t.double()[..., None] + offsets).clamp(lo, hi)
        _, sigma2 = _alpha2_sigma2(schedule, tau, lambdas)
        return tau, sigma2

    @staticmethod
    def select_index(x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Per sample, the index of the candidate variance closest to the sample's (unbiased, over all elements).

        Args:
            x: Samples [B, ...].
            var: Candidate variances [K] (shared) or [B, K].

        Returns:
            Indices [B] (first candidate on ties, as ``argmin`` in the official code).
        """
        v = x.detach().flatten(1).float().var(dim=1)
        return (v[:, None] - var.to(v.dtype)).abs().argmin(dim=-1)

    @staticmethod
    def select(x: torch.Tensor, tau: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Per sample, the candidate timestep whose variance is closest to the sample's.

        Args:
            x: Samples [B, ...].
            tau, var: Candidates [K] (shared) or [B, K].

        Returns:
            Model timesteps [B] in ``tau``'s dtype (see :meth:`select_index`).
        """
        idx = TimeShift.select_index(x, var)
        return tau[idx] if tau.dim() == 1 else tau.gather(-1, idx[:, None])[:, 0]

    def for_grid(self, grid: TimeGrid, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """``"input"`` mode: per step of ``grid``, float32 candidates (timesteps, variances) on ``device``, or None.

        Raises:
            ValueError: for a ``"target"`` rule (see :meth:`target_moves`).
        """
        if self.mode != "input":
            raise ValueError("for_grid is the input-mode table; a mode='target' rule uses target_moves")
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        ts = grid.model_timesteps
        for i in range(grid.n):
            if not self.active or float(ts[i]) <= self.cutoff:
                out.append(None)
                continue
            tau, var = self.candidates(grid.schedule, ts[i])
            out.append((tau.to(device, torch.float32), var.to(device, torch.float32)))
        return out

    def target_moves(self, grid: TimeGrid, device: torch.device | str, dtype: torch.dtype = torch.float32,
                     start: int = 0) -> list["TargetMove | None"]:
        """``"target"`` mode: per step of ``grid``, the move of its result to the shifted target, or None.

        Step i is moved when ``start < i < n - 1`` (``start``: the first step of the run; the last
        step goes to the terminal point) and its grid timestep is above the cutoff.

        Raises:
            ValueError: for an ``"input"`` rule (see :meth:`for_grid`).
        """
        if self.mode != "target":
            raise ValueError("target_moves is the target-mode table; a mode='input' rule uses for_grid")
        out: list[TargetMove | None] = []
        ts, schedule = grid.model_timesteps.double(), grid.schedule
        bounds = _model_time_range(schedule)
        for i in range(grid.n):
            if (not self.active or i <= start or i + 1 >= grid.n or float(ts[i]) <= self.cutoff
                    or float(grid.sigma[i + 1]) <= 0):
                out.append(None)
                continue
            tau, var = self.candidates(schedule, ts[i], bounds=bounds)
            # The step to t_{i+1} becomes one to t_{i+1} + (t_s - t_i) (clipped to the schedule's range).
            target = (ts[i + 1] + (tau - ts[i])).clamp(*bounds)
            a2, s2 = _alpha2_sigma2(schedule, target)
            a_new, s_new = a2.sqrt(), s2.sqrt()
            a, s = grid.alpha[i + 1].double(), grid.sigma[i + 1].double()
            p, q = s_new / s, a_new - s_new * a / s
            same = target == ts[i + 1]  # exactly the plain step where the target does not move
            p, q = torch.where(same, torch.ones_like(p), p), torch.where(same, torch.zeros_like(q), q)
            out.append(TargetMove(var.to(device, torch.float32), p.to(device, dtype), q.to(device, dtype)))
        return out


@dataclasses.dataclass(frozen=True)
class TargetMove:
    """One step's target move: per candidate k, x' = p[k] x_next + q[k] x0 (the DDIM move to the shifted level)."""

    var: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor

    def apply(self, x: torch.Tensor, x_next: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Move ``x_next`` (the step's result from ``x``) to each sample's shifted target; tensor ops only."""
        idx = TimeShift.select_index(x, self.var)
        shape = (-1,) + (1,) * (x_next.dim() - 1)
        p, q = self.p[idx].view(shape), self.q[idx].view(shape)
        return (x_next * p + x0 * q).to(x_next.dtype)


def _alpha2_sigma2(schedule: NoiseSchedule, tau: torch.Tensor, lambdas: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha^2 and sigma^2 at model timesteps ``tau`` (float64), by the schedule's own rule."""
    if isinstance(schedule, DiscreteVPSchedule):
        # lambda linear between integer timesteps, on tau's device (no host reads).
        table = _lambda_table(schedule, tau.device) if lambdas is None else lambdas
        base = tau.floor().clamp(max=schedule.t_max - 1)
        lam = torch.lerp(table[base.long()], table[base.long() + 1], tau - base)
        return torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)
    alpha, sigma = schedule.alpha_sigma(schedule.time_from_model(tau))
    return alpha.double().square(), sigma.double().square()


def _model_time_range(schedule: NoiseSchedule) -> tuple[float, float]:
    return tuple(float(schedule.model_time(torch.tensor(v))) for v in (schedule.t_min, schedule.t_max))


def _lambda_table(schedule: DiscreteVPSchedule, device: torch.device) -> torch.Tensor:
    return schedule.lambda_(torch.arange(schedule.num_train_timesteps, dtype=torch.float64)).to(device)
