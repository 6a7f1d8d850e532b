"""Time-Shift sampler: per-sample model timesteps matched to each sample's variance (Li et al., ICLR 2024).

Exposure bias leaves a sample at step i noisier or cleaner than the grid says. The
Time-Shift sampler feeds the network, instead of the grid's timestep t_i, the timestep t_s
in a window around t_i whose noise variance sigma(t_s)^2 (1 - alphā for VP models) is
closest to the sample's own variance (over all its elements), for t_i above a cutoff; the
solver keeps its own coefficients. The README ("Time-Shift sampler") has the rule's
measured effect on the built-in digits model.

Two ways in, one rule (:class:`TimeShift`):

* ``fewstep.sample(..., time_shift=TimeShift(window=20, cutoff=300))`` with any solver: the
  candidate timesteps of every step are computed once, the choice is tensor ops (no host sync).
* ``fewstep.time_shift(pipe, window=20, cutoff=300)`` for diffusers pipelines, which pass one
  timestep per batch: a forward pre-hook on the UNet/transformer replaces it by the
  per-sample shifted timesteps; ``.remove()`` (or leaving a ``with`` block) undoes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from .schedules import DiscreteVPSchedule, NoiseSchedule
from .timesteps import TimeGrid
from .validation import check_int, check_real

__all__ = ["TimeShift", "TimeShiftHook", "time_shift"]


@dataclasses.dataclass(frozen=True)
class TimeShift:
    """The Time-Shift rule.

    Attributes:
        window: Width of the search window in model timesteps: the candidates are
            ``t + k`` for ``|k| <= window // 2`` (the official ``--window_size``; 0 or 1: no shift),
            clipped to the schedule's range.
        cutoff: Only timesteps above it are shifted (the official ``--cut_off_value``), in
            model-timestep units (0..999 for SD-style models, sigma * 1000 for flow models).
    """

    window: int = 0
    cutoff: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", check_int("time_shift window", self.window, 0, 100_000))
        object.__setattr__(self, "cutoff", check_real("time_shift cutoff", self.cutoff))

    @classmethod
    def coerce(cls, value: Any) -> "TimeShift | None":
        """A TimeShift from itself, ``{"window": W, "cutoff": C}``, ``[W, C]``, or None (off).

        Raises:
            TypeError, ValueError: anything else, naming the value.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"window", "cutoff"})
            if unknown:
                raise ValueError(f"time_shift has unknown key(s) {unknown}; allowed: window, cutoff")
            return cls(**value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(*value)
        raise TypeError(f"time_shift={value!r} must be fewstep.TimeShift(window=, cutoff=), "
                        "{'window': W, 'cutoff': C} or [W, C]")

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
        if isinstance(schedule, DiscreteVPSchedule):
            # The schedule's own rule (lambda linear between integer timesteps), on the device.
            table = _lambda_table(schedule, t.device) if lambdas is None else lambdas
            base = tau.floor().clamp(max=schedule.t_max - 1)
            lam = torch.lerp(table[base.long()], table[base.long() + 1], tau - base)
            return tau, torch.sigmoid(-2 * lam)
        _, sigma = schedule.alpha_sigma(schedule.time_from_model(tau))
        return tau, sigma.square()

    @staticmethod
    def select(x: torch.Tensor, tau: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Per sample, the candidate whose variance is closest to the sample's (unbiased, over all elements).

        Args:
            x: Samples [B, ...].
            tau, var: Candidates [K] (shared) or [B, K].

        Returns:
            Model timesteps [B] in ``tau``'s dtype (first candidate on ties, as ``argmin`` in the official code).
        """
        v = x.detach().flatten(1).float().var(dim=1)
        idx = (v[:, None] - var.to(v.dtype)).abs().argmin(dim=-1)
        return tau[idx] if tau.dim() == 1 else tau.gather(-1, idx[:, None])[:, 0]

    def for_grid(self, grid: TimeGrid, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per step of ``grid``, the float32 candidates (timesteps, variances) on ``device``, or None (no shift)."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        ts = grid.model_timesteps
        for i in range(grid.n):
            if not self.active or float(ts[i]) <= self.cutoff:
                out.append(None)
                continue
            tau, var = self.candidates(grid.schedule, ts[i])
            out.append((tau.to(device, torch.float32), var.to(device, torch.float32)))
        return out


def _model_time_range(schedule: NoiseSchedule) -> tuple[float, float]:
    return tuple(float(schedule.model_time(torch.tensor(v))) for v in (schedule.t_min, schedule.t_max))


def _lambda_table(schedule: DiscreteVPSchedule, device: torch.device) -> torch.Tensor:
    return schedule.lambda_(torch.arange(schedule.num_train_timesteps, dtype=torch.float64)).to(device)


class TimeShiftHook:
    """A Time-Shift forward pre-hook on a denoiser (see :func:`time_shift`); ``remove()`` undoes it."""

    def __init__(self, denoiser: torch.nn.Module, schedule: NoiseSchedule, rule: TimeShift):
        if getattr(denoiser, "_fewstep_time_shift", None) is not None:
            raise ValueError("this denoiser is already time-shifted; call .remove() on that hook first")
        self.denoiser, self.schedule, self.rule = denoiser, schedule, rule
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._bounds = _model_time_range(schedule)
        self._handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)
        denoiser._fewstep_time_shift = self

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.rule.active:
            return args, kwargs
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        in_args = len(args) > 1
        t = args[1] if in_args else kwargs.get("timestep")
        if not isinstance(x, torch.Tensor) or t is None:
            raise TypeError("time_shift: the denoiser must be called as (sample, timestep, ...) or with "
                            "sample=/hidden_states= and timestep= keywords")
        t = torch.as_tensor(t, device=x.device)
        nominal = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        lambdas = None
        if isinstance(self.schedule, DiscreteVPSchedule):
            if x.device not in self._tables:
                self._tables[x.device] = _lambda_table(self.schedule, x.device)
            lambdas = self._tables[x.device]
        tau, var = self.rule.candidates(self.schedule, nominal, lambdas, self._bounds)
        shifted = torch.where(nominal.double() > self.rule.cutoff, TimeShift.select(x, tau, var), nominal.double())
        shifted = shifted.to(t.dtype if t.is_floating_point() else torch.float32)
        if in_args:
            return (args[0], shifted, *args[2:]), kwargs
        return args, {**kwargs, "timestep": shifted}

    def remove(self) -> None:
        """Undo the shift (idempotent)."""
        self._handle.remove()
        if getattr(self.denoiser, "_fewstep_time_shift", None) is self:
            self.denoiser._fewstep_time_shift = None

    def __enter__(self) -> "TimeShiftHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def time_shift(pipe: Any, window: int, cutoff: float = 0.0, *, schedule: NoiseSchedule | None = None
               ) -> TimeShiftHook:
    """Make a diffusers pipeline sample with the Time-Shift rule (per-sample model timesteps).

    The pipeline's UNet (or transformer) gets a forward pre-hook that replaces the batch's
    timestep by each sample's shifted one; the scheduler is untouched and keeps its own
    coefficients. Works with any scheduler.

    Args:
        pipe: A diffusers pipeline with ``unet`` or ``transformer`` (or the denoiser module itself,
            then ``schedule`` is required).
        window: Search window width in model timesteps (candidates ``t +- window // 2``).
        cutoff: Only timesteps above it are shifted.
        schedule: The noise schedule; default: read from ``pipe.scheduler``'s config.

    Returns:
        The hook: call ``.remove()`` to undo, or use it as a context manager.

    Raises:
        ValueError: no denoiser or schedule can be found, or the denoiser is already shifted.
    """
    rule = TimeShift(window, cutoff)
    denoiser = pipe if isinstance(pipe, torch.nn.Module) else (
        getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
    if not isinstance(denoiser, torch.nn.Module):
        raise ValueError(f"time_shift needs a pipeline with a unet or transformer, got {type(pipe).__name__}")
    if schedule is None:
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError("time_shift: pass schedule= (the noise schedule) when wrapping a bare denoiser")
        from .scheduler import FewstepScheduler

        schedule = getattr(scheduler, "schedule", None) if isinstance(scheduler, FewstepScheduler) else None
        schedule = schedule or FewstepScheduler.from_config(scheduler.config).schedule
    return TimeShiftHook(denoiser, schedule, rule)
