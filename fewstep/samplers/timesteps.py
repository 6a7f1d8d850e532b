"""Timestep grids: where the model is evaluated and where sampling ends.

A grid for ``n`` model evaluations holds ``n + 1`` points of schedule time, from the
noisiest point to the terminal one. The last point is never evaluated; with
``final_sigma="zero"`` it is the clean data (sigma = 0, lambda = +inf), with
``final_sigma="min"`` it is the least-noisy time the model knows.

Spacings:
    logsnr, time_uniform, time_quadratic, karras: spaced uniformly in lambda, in t, in
        sqrt(t) (DPM-Solver), or in sigma^(1/rho) (Karras et al. 2022) between t_start and
        t_end. With ``final_sigma="zero"`` the ``n`` evaluations span [t_start, t_end]
        and a last step goes to sigma = 0 (EDM's and diffusers' ``use_karras_sigmas``
        convention); with ``"min"`` the ``n + 1`` points span it and the run ends at
        t_end (DPM-Solver's convention).
    linspace, leading, trailing: diffusers' integer spacings for discrete VP models
        (Table 2 of Lin et al. 2023); on flow schedules ``linspace`` is linear in sigma.
        diffusers' schedulers disagree on their details, so each solver names the
        scheduler it reproduces (``convention``): ``ddim`` (DDIMScheduler; on flow,
        FlowMatchEulerDiscreteScheduler), ``multistep`` (UniPCMultistepScheduler) or
        ``dpmsolver`` (DPMSolverMultistepScheduler).
    explicit ``timesteps`` (model timesteps) or ``sigmas`` (diffusers sigmas).
On flow schedules a static ``shift`` or a dynamic ``mu`` warps the generated grid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedules import DiscreteVPSchedule, FlowSchedule, NoiseSchedule

__all__ = ["GridSpec", "TimeGrid", "build_grid", "SPACINGS", "flow_shift"]

SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras", "linspace", "leading", "trailing")
_DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_SIGMAS = ("zero", "min")
_CONVENTIONS = ("multistep", "dpmsolver", "ddim")


@dataclass(frozen=True)
class GridSpec:
    """How to place the timesteps.

    Args:
        spacing: One of :data:`SPACINGS`; ignored when ``timesteps`` or ``sigmas`` is given.
        final_sigma: ``"zero"`` ends on clean data, ``"min"`` on the schedule's smallest time.
        rho: Karras exponent.
        steps_offset: diffusers' offset added to ``leading`` timesteps.
        shift: Static flow shift s: sigma -> s sigma / (1 + (s - 1) sigma).
        mu: Dynamic flow shift (Flux/SD3 resolution shift); overrides ``shift``.
        time_shift_type: ``"exponential"`` (e^mu) or ``"linear"`` (mu) dynamic shift.
        shift_terminal: Stretch flow sigmas so the last one equals this value.
        timesteps: Explicit model timesteps, noisiest first (one per evaluation).
        sigmas: Explicit diffusers sigmas (sigma/alpha for VP, flow sigma for flow).
        t_start: Override the noisiest schedule time (default: the schedule's t_max).
        t_end: Override the terminal schedule time (default: the schedule's t_min).
        convention: Which diffusers scheduler's linspace/leading/trailing grids to
            reproduce: ``"multistep"`` (UniPC), ``"dpmsolver"`` (DPMSolverMultistep) or
            ``"ddim"`` (DDIMScheduler / FlowMatchEulerDiscreteScheduler); None lets the
            solver decide.
    """

    spacing: str = "linspace"
    final_sigma: str = "zero"
    rho: float = 7.0
    steps_offset: int = 0
    shift: float = 1.0
    mu: float | None = None
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    timesteps: tuple[float, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    t_start: float | None = None
    t_end: float | None = None
    convention: str | None = None

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {SPACINGS}")
        if self.final_sigma not in _FINAL_SIGMAS:
            raise ValueError(f"final_sigma={self.final_sigma!r} is not one of {_FINAL_SIGMAS}")
        if self.convention is not None and self.convention not in _CONVENTIONS:
            raise ValueError(f"convention={self.convention!r} is not one of {_CONVENTIONS}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={self.time_shift_type!r} is not 'exponential' or 'linear'")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("pass either timesteps or sigmas, not both")
        for name in ("timesteps", "sigmas"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in np.asarray(value, dtype=np.float64).ravel()))

    def replace(self, **changes) -> "GridSpec":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TimeGrid:
    """The ``n + 1`` points of a sampling run, all float64 on the CPU.

    Attributes:
        schedule: The noise schedule the points live on.
        t: Schedule times, noisiest first; ``t[n]`` is the terminal point.
        alpha, sigma, lambda_: The schedule at each point (terminal sigma may be 0,
            then lambda is +inf).
        model_timesteps: What the network is conditioned on at the ``n`` evaluated points.
        start: Index of the first point in the grid this one was cut from (img2img).
    """

    schedule: NoiseSchedule
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    lambda_: torch.Tensor
    model_timesteps: torch.Tensor
    start: int = 0

    @property
    def n(self) -> int:
        """Number of model evaluations (steps)."""
        return self.t.numel() - 1

    @property
    def integer_timesteps(self) -> bool:
        """Whether every model timestep is a whole number (diffusers passes them as int64)."""
        ts = self.model_timesteps
        return isinstance(self.schedule, DiscreteVPSchedule) and bool((ts == ts.round()).all())

    def subgrid(self, start: int) -> "TimeGrid":
        """The grid from evaluation ``start`` on (img2img starts part-way down the grid)."""
        if not 0 <= start < self.n:
            raise ValueError(f"start index {start} is outside 0..{self.n - 1}")
        return dataclasses.replace(
            self,
            t=self.t[start:],
            alpha=self.alpha[start:],
            sigma=self.sigma[start:],
            lambda_=self.lambda_[start:],
            model_timesteps=self.model_timesteps[start:],
            start=self.start + start,
        )

    def diffusers_sigmas(self) -> torch.Tensor:
        """The ``n + 1`` sigmas as diffusers schedulers expose them (``scheduler.sigmas``)."""
        s = self.schedule.diffusers_sigma(self.t)
        return torch.where(self.sigma == 0, torch.zeros_like(s), s)


def flow_shift(sigmas: np.ndarray, spec: GridSpec) -> np.ndarray:
    """Apply the static/dynamic resolution shift and terminal stretch of diffusers' flow schedulers.

    ``sigmas`` are the evaluated points only: the stretch pins the last of them to
    ``shift_terminal``.
    """
    if spec.mu is not None:
        scale = math.exp(spec.mu) if spec.time_shift_type == "exponential" else spec.mu
        with np.errstate(divide="ignore"):
            sigmas = np.where(sigmas > 0, scale / (scale + (1 / np.maximum(sigmas, 1e-300) - 1)), 0.0)
    elif spec.shift != 1.0:
        sigmas = spec.shift * sigmas / (1 + (spec.shift - 1) * sigmas)
    if spec.shift_terminal and sigmas[-1] < 1:  # a lone evaluation at sigma = 1 has nothing to stretch
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - spec.shift_terminal))
    return sigmas


def _trailing(n: int, num_train: int) -> np.ndarray:
    # diffusers writes np.arange(N, 0, -N / n), which can yield n + 1 points through
    # float rounding (e.g. n = 499); this gives the same values with exactly n points.
    return np.round(num_train - np.arange(n) * (num_train / n)) - 1


def _diffusers_integer_timesteps(n: int, num_train: int, spec: GridSpec) -> np.ndarray:
    """The ``n`` model timesteps diffusers' schedulers produce for an integer spacing."""
    if spec.convention == "ddim":
        # DDIMScheduler: n points including t = 0 for linspace/leading.
        if spec.spacing == "linspace":
            ts = np.linspace(0, num_train - 1, n).round()[::-1]
        elif spec.spacing == "leading":
            ts = (np.arange(0, n) * (num_train // n)).round()[::-1] + spec.steps_offset
        else:
            ts = _trailing(n, num_train)
    else:
        # DPMSolverMultistep/UniPC: n + 1 points, the last (t = 0) replaced by the final sigma.
        if spec.spacing == "linspace":
            ts = np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1]
        elif spec.spacing == "leading":
            ts = (np.arange(0, n + 1) * (num_train // (n + 1))).round()[::-1][:-1] + spec.steps_offset
        else:
            ts = _trailing(n, num_train)
    return np.ascontiguousarray(ts, dtype=np.float64)


def _flow_linspace(n: int, schedule: FlowSchedule, t_hi: float, spec: GridSpec) -> np.ndarray:
    """The ``n`` (unshifted) flow sigmas of diffusers' flow schedulers."""
    inv_n = 1.0 / schedule.num_train_timesteps
    if spec.convention == "ddim":
        # FlowMatchEulerDiscreteScheduler: n points from 1 to its sigma_min, which diffusers
        # already shifted once at init when the shift is static (so it is shifted twice).
        sigma_min = np.array([inv_n])
        if spec.mu is None:
            sigma_min = flow_shift(sigma_min, spec.replace(shift_terminal=None))
        return np.linspace(t_hi, float(sigma_min[0]), n)
    if spec.convention == "dpmsolver":
        return np.linspace(t_hi - inv_n, 0.0, n + 1)[:-1]  # flip(1 - linspace(1, 1/N, n+1))[:-1]
    return np.linspace(t_hi, inv_n, n + 1)[:-1]  # UniPCMultistepScheduler


def _unipc_nudge(sigmas: np.ndarray, spec: GridSpec) -> np.ndarray:
    """UniPCMultistepScheduler starts flow grids at sigma = 1 - 1e-6 rather than 1.

    A finite first log-SNR lets the multistep stencil use that point (fewstep's exact
    alpha = 0 limits would drop it); reproduced for the ``multistep`` convention only.
    """
    if spec.convention == "multistep" and abs(sigmas[0] - 1) < 1e-6:
        sigmas = sigmas.copy()
        sigmas[0] -= 1e-6
    return sigmas


def _spaced(schedule: NoiseSchedule, count: int, t_hi: float, t_lo: float, spec: GridSpec) -> np.ndarray:
    """``count`` schedule times from t_hi to t_lo (both included) for the continuous spacings."""
    f64 = torch.float64
    if spec.spacing == "time_uniform":
        return np.linspace(t_hi, t_lo, count)
    if spec.spacing == "time_quadratic":
        return np.linspace(math.sqrt(t_hi), math.sqrt(t_lo), count) ** 2
    if spec.spacing == "logsnr":
        lam_ends = schedule.lambda_(torch.tensor([t_hi, t_lo], dtype=f64))
        if isinstance(schedule, FlowSchedule):
            # lambda = -inf at flow's pure-noise end: space from sigma = 1 - 1/N instead.
            inv_n = 1.0 / schedule.num_train_timesteps
            lam_ends = lam_ends.clamp(min=float(schedule.lambda_(torch.tensor(1 - inv_n, dtype=f64))))
        lam = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), count, dtype=f64)
        ts = schedule.t_from_lambda(lam).numpy()
    else:  # karras
        s_hi, s_lo = schedule.diffusers_sigma(torch.tensor([t_hi, t_lo], dtype=f64)).tolist()
        ramp = np.linspace(0, 1, count)
        root_hi, root_lo = s_hi ** (1 / spec.rho), s_lo ** (1 / spec.rho)
        ts = schedule.t_from_diffusers_sigma(torch.from_numpy((root_hi + ramp * (root_lo - root_hi)) ** spec.rho)).numpy()
    ts[0] = t_hi  # exact ends, free of round trips (a single point is the start)
    if count > 1:
        ts[-1] = t_lo
    return ts


def _grid_times(schedule: NoiseSchedule, n: int, spec: GridSpec) -> np.ndarray:
    """The ``n + 1`` schedule times of the grid (the last one is the terminal point)."""
    t_hi = schedule.t_max if spec.t_start is None else spec.t_start
    t_lo = schedule.grid_end if spec.t_end is None else spec.t_end
    if spec.t_start is not None or spec.t_end is not None:
        schedule.check_time(torch.tensor([t_hi, t_lo], dtype=torch.float64), "t_start/t_end")
        if not t_hi > t_lo:
            raise ValueError(f"t_start={t_hi:g} must be larger than t_end={t_lo:g}")
    is_flow = isinstance(schedule, FlowSchedule)

    if spec.timesteps is not None:
        ts = schedule.time_from_model(torch.tensor(spec.timesteps, dtype=torch.float64)).numpy()
        return np.append(ts, t_lo)
    if spec.sigmas is not None:
        s = np.asarray(spec.sigmas, dtype=np.float64)
        if is_flow:
            s = _unipc_nudge(flow_shift(s, spec), spec)
        return np.append(schedule.t_from_diffusers_sigma(torch.from_numpy(s)).numpy(), t_lo)

    if spec.spacing in _DIFFUSERS_SPACINGS:
        if isinstance(schedule, DiscreteVPSchedule):
            num_train = schedule.num_train_timesteps
            if n > num_train:
                raise ValueError(f"nfe={n} is larger than the model's num_train_timesteps={num_train}")
            return np.append(_diffusers_integer_timesteps(n, num_train, spec), t_lo)
        if is_flow and spec.spacing == "linspace":
            return np.append(_unipc_nudge(flow_shift(_flow_linspace(n, schedule, t_hi, spec), spec), spec), t_lo)
        raise ValueError(
            f"spacing={spec.spacing!r} needs a discrete-time VP schedule (or 'linspace' on flow); "
            f"use logsnr, time_uniform, time_quadratic or karras for a {schedule.kind} schedule"
        )

    if spec.final_sigma == "zero":
        evals, terminal = _spaced(schedule, n, t_hi, t_lo, spec), t_lo
    else:
        ts = _spaced(schedule, n + 1, t_hi, t_lo, spec)
        evals, terminal = ts[:-1], ts[-1]
    if is_flow:
        evals = flow_shift(evals, spec)
    return np.append(evals, terminal)


def build_grid(schedule: NoiseSchedule, nfe: int | None, spec: GridSpec | None = None) -> TimeGrid:
    """Place ``nfe`` model evaluations on ``schedule`` following ``spec``.

    Args:
        schedule: The noise schedule.
        nfe: Number of model evaluations; may be None when ``spec`` lists explicit
            timesteps or sigmas (then it must match their count if given).
        spec: Grid options (default: ``GridSpec()``).

    Returns:
        The grid, with float64 alpha/sigma/lambda at each point.

    Raises:
        ValueError: on ``nfe < 1``, explicit lists of the wrong length, times outside the
            schedule, or timesteps that are not strictly decreasing in noise.
    """
    spec = spec or GridSpec()
    explicit = spec.timesteps if spec.timesteps is not None else spec.sigmas
    if explicit is not None:
        if nfe is not None and nfe != len(explicit):
            raise ValueError(f"nfe={nfe} does not match the {len(explicit)} explicit timesteps/sigmas")
        nfe = len(explicit)
    if nfe is None or isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a whole number >= 1, got {nfe!r}")
    nfe = int(nfe)

    if spec.convention is None:
        spec = spec.replace(convention="multistep")
    t = torch.from_numpy(np.ascontiguousarray(_grid_times(schedule, nfe, spec), dtype=np.float64))
    schedule.check_time(t[:-1], "timestep")
    if not bool((schedule.alpha_sigma(t[:-1])[1] > 0).all()):
        raise ValueError("the model cannot be evaluated at sigma = 0; only the terminal point may be noise-free")

    alpha, sigma = schedule.alpha_sigma(t)
    if spec.final_sigma == "zero":
        alpha, sigma = alpha.clone(), sigma.clone()
        alpha[-1], sigma[-1] = 1.0, 0.0
    lam = torch.log(alpha) - torch.log(sigma)

    steps = lam[1:] - lam[:-1]
    # Evaluated points must get strictly cleaner; the terminal point may coincide with the
    # last one (diffusers' DDIM grids do this), which makes the last step the identity.
    if not bool((steps[:-1] > 0).all()) or not bool(steps[-1] >= 0):
        bad = int(torch.nonzero(~(steps > 0))[0])
        raise ValueError(
            f"timesteps must strictly decrease in noise level; step {bad} goes from "
            f"t={t[bad].item():g} to t={t[bad + 1].item():g} (nfe={nfe}, spacing={spec.spacing!r})"
        )
    return TimeGrid(
        schedule=schedule,
        t=t,
        alpha=alpha,
        sigma=sigma,
        lambda_=lam,
        model_timesteps=schedule.model_time(t[:-1]),
    )
