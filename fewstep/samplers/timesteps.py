"""Timestep grids: where the model is evaluated and where sampling ends.

A grid for ``n`` model evaluations holds ``n + 1`` points of schedule time, from the
noisiest point to the terminal one. The last point is never evaluated; with
``final_sigma="zero"`` it is the clean data (sigma = 0, lambda = +inf), with
``final_sigma="min"`` it is the least-noisy time the model knows.

Spacings:
    logsnr, time_uniform, time_quadratic, karras, exponential: spaced uniformly in lambda,
        in t, in sqrt(t) (DPM-Solver), in sigma^(1/rho) (Karras et al. 2022) or in log sigma
        (diffusers' ``use_exponential_sigmas``), sigma being diffusers' sigma (sigma/alpha on
        VP, where ``exponential`` equals ``logsnr``; the flow time itself on flow models),
        between t_start and t_end. With ``final_sigma="zero"`` the ``n`` evaluations span
        [t_start, t_end] and a last step goes to sigma = 0 (EDM's and diffusers'
        ``use_karras_sigmas`` convention); with ``"min"`` the ``n + 1`` points span it and
        the run ends at t_end (DPM-Solver's convention).
    linspace, leading, trailing: diffusers' integer spacings for discrete VP models
        (Table 2 of Lin et al. 2023); on flow schedules ``linspace`` is linear in sigma.
        diffusers' schedulers disagree on their details, so each solver names the
        scheduler it reproduces (``convention``): ``ddim`` (DDIMScheduler; on flow,
        FlowMatchEulerDiscreteScheduler), ``multistep`` (UniPCMultistepScheduler) or
        ``dpmsolver`` (DPMSolverMultistepScheduler).
    explicit ``timesteps`` (model timesteps) or ``sigmas`` (diffusers sigmas).
On flow schedules a static ``shift`` or a dynamic ``mu`` warps the generated grid: the
points themselves for the linspace/time/log-SNR spacings, only the two ends for karras and
exponential, which are then spaced between the shifted ends (what diffusers'
FlowMatchEulerDiscreteScheduler does with ``use_karras_sigmas`` / ``use_exponential_sigmas``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .schedules import DiscreteVPSchedule, FlowSchedule, NoiseSchedule
from fewstep.infra.validation import as_real_vector, check_choice, check_int, check_nfe, check_real

__all__ = ["GridSpec", "TimeGrid", "build_grid", "SPACINGS", "flow_shift"]

SPACINGS = ("logsnr", "time_uniform", "time_quadratic", "karras", "exponential", "linspace", "leading", "trailing")
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
        check_choice("spacing", self.spacing, SPACINGS)
        check_choice("final_sigma", self.final_sigma, _FINAL_SIGMAS)
        if self.convention is not None:
            check_choice("convention", self.convention, _CONVENTIONS)
        check_choice("time_shift_type", self.time_shift_type, ("exponential", "linear"))
        fields = {
            "rho": check_real("rho", self.rho, 0.1, 100.0),
            "steps_offset": check_int("steps_offset", self.steps_offset, 0, 100_000),
            "shift": check_real("shift", self.shift, 0.0, open_min=True),
        }
        if self.mu is not None:
            fields["mu"] = check_real("mu", self.mu, *((0.0, None) if self.time_shift_type == "linear" else ()),
                                      open_min=True)
        if self.shift_terminal is not None:
            fields["shift_terminal"] = check_real("shift_terminal", self.shift_terminal, 0.0, 1.0,
                                                  open_min=True, open_max=True)
        for name in ("t_start", "t_end"):
            if getattr(self, name) is not None:
                fields[name] = check_real(name, getattr(self, name))
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("pass either timesteps or sigmas, not both")
        for name in ("timesteps", "sigmas"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = tuple(as_real_vector(name, value).tolist())
        for name, value in fields.items():
            object.__setattr__(self, name, value)

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
        with np.errstate(divide="ignore", over="ignore"):
            if spec.time_shift_type == "exponential":
                # e^mu / (e^mu + 1/sigma - 1) = sigmoid(mu + logit(sigma)): no overflow for any mu.
                logit = np.log(sigmas) - np.log1p(-sigmas)
                sigmas = np.where(sigmas > 0, 1 / (1 + np.exp(-(spec.mu + logit))), 0.0)
            else:
                sigmas = np.where(sigmas > 0, spec.mu / (spec.mu + (1 / np.maximum(sigmas, 1e-300) - 1)), 0.0)
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
    else:  # karras, exponential: in diffusers' sigma
        log_hi, log_lo = schedule.diffusers_sigma(torch.tensor([t_hi, t_lo], dtype=f64)).log().tolist()
        ramp = np.linspace(0, 1, count)
        if spec.spacing == "exponential":
            log_s = log_hi + ramp * (log_lo - log_hi)
        else:
            # sigma = (hi^(1/rho) + ramp (lo^(1/rho) - hi^(1/rho)))^rho, factored through hi so that
            # no power of a large sigma is ever formed (rho near 0 would overflow).
            q = math.exp((log_lo - log_hi) / spec.rho)
            log_s = log_hi + spec.rho * np.log1p(ramp * (q - 1))
        ts = schedule.t_from_diffusers_sigma(torch.from_numpy(np.exp(log_s))).numpy()
    ts[0] = t_hi  # exact ends, free of round trips (a single point is the start)
    if count > 1:
        ts[-1] = t_lo
    return ts


def _custom_sigmas(schedule: NoiseSchedule, sigmas: np.ndarray, spec: GridSpec) -> np.ndarray:
    """Schedule times of explicit diffusers sigmas, refusing (never clamping) values out of range."""
    if isinstance(schedule, FlowSchedule):
        sigmas = _unipc_nudge(flow_shift(sigmas, spec), spec)  # FlowMatchEuler shifts custom sigmas too
        what = "shifted flow sigma" if (spec.mu is not None or spec.shift != 1.0) else "flow sigma"
    else:
        what = "sigma"
    lo, hi = schedule.diffusers_sigma(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)).tolist()
    tol = 1e-6 * hi
    bad = (sigmas < lo - tol) | (sigmas > hi + tol) | (sigmas <= 0)
    if bad.any():
        raise ValueError(
            f"custom {what} {sigmas[bad][0]:g} is outside this {schedule.kind} schedule's range "
            f"({max(lo, 0):g}, {hi:g}]; custom sigmas are never clamped (the terminal sigma 0 is appended for you)"
        )
    return schedule.t_from_diffusers_sigma(torch.from_numpy(np.clip(sigmas, lo, hi))).numpy()


def _flow_ends(schedule: FlowSchedule, t_hi: float, t_lo: float, spec: GridSpec) -> tuple[float, float]:
    """The shifted ends between which flow karras/exponential grids are spaced.

    FlowMatchEulerDiscreteScheduler (the ``ddim`` convention) ends its grid on a sigma_min
    it already shifted at init when the shift is static; diffusers shifts that again.
    """
    if spec.convention == "ddim" and spec.t_end is None:
        t_lo = float(_flow_linspace(2, schedule, t_hi, spec)[-1])
    hi, lo = flow_shift(np.array([t_hi, t_lo]), spec)
    return float(hi), float(lo)


def _grid_times(schedule: NoiseSchedule, n: int, spec: GridSpec) -> np.ndarray:
    """The ``n + 1`` schedule times of the grid (the last one is the terminal point)."""
    t_hi = schedule.t_max if spec.t_start is None else spec.t_start
    t_lo = schedule.grid_end if spec.t_end is None else spec.t_end
    if spec.t_start is not None or spec.t_end is not None:
        schedule.check_time(torch.tensor([t_hi, t_lo], dtype=torch.float64), "t_start/t_end")
        if not t_hi > t_lo:
            raise ValueError(f"t_start={t_hi:g} must be larger than t_end={t_lo:g}")
    is_flow = isinstance(schedule, FlowSchedule)
    if not is_flow:
        given = [k for k, v in (("mu", spec.mu), ("shift", None if spec.shift == 1.0 else spec.shift),
                                ("shift_terminal", spec.shift_terminal)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to flow-matching "
                             f"schedules, not to this "
                             f"{schedule.kind} schedule")

    if spec.timesteps is not None:
        ts = schedule.time_from_model(torch.tensor(spec.timesteps, dtype=torch.float64)).numpy()
        return np.append(ts, t_lo)
    if spec.sigmas is not None:
        return np.append(_custom_sigmas(schedule, np.asarray(spec.sigmas, dtype=np.float64), spec), t_lo)

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
            f"use logsnr, time_uniform, time_quadratic, karras or exponential for a {schedule.kind} schedule"
        )

    shift_points = is_flow
    if is_flow and spec.spacing in ("karras", "exponential"):
        t_hi, t_lo = _flow_ends(schedule, t_hi, t_lo, spec)
        shift_points = False
    if spec.final_sigma == "zero":
        evals, terminal = _spaced(schedule, n, t_hi, t_lo, spec), t_lo
    else:
        ts = _spaced(schedule, n + 1, t_hi, t_lo, spec)
        evals, terminal = ts[:-1], ts[-1]
    if shift_points:
        evals = flow_shift(evals, spec)
    return np.append(evals, terminal)


def _describe(spec: GridSpec, nfe: int, schedule: NoiseSchedule) -> str:
    """The grid settings that decide where points land, for error messages."""
    if spec.timesteps is not None or spec.sigmas is not None:
        parts = [f"{'timesteps' if spec.timesteps is not None else 'sigmas'} given explicitly"]
    else:
        parts = [f"nfe={nfe}", f"spacing={spec.spacing!r}"]
        if spec.spacing == "karras":
            parts.append(f"rho={spec.rho:g}")
    if isinstance(schedule, FlowSchedule):
        parts += [f"shift={spec.shift:g}"] if spec.mu is None else [f"mu={spec.mu:g}"]
    return ", ".join(parts)


def check_one_step_start(grid: TimeGrid, setting: str, fix: str) -> None:
    """Refuses a one-step VP grid whose only model call is not at pure noise (its sample would be garbage).

    diffusers' DDIM ``linspace``/``leading`` one-step grids are t = 0 (multistep ``leading``: t = 500).
    """
    if grid.n != 1 or not isinstance(grid.schedule, DiscreteVPSchedule):
        return
    t, top = float(grid.model_timesteps[0]), grid.schedule.num_train_timesteps - 1
    if t < top:
        raise ValueError(f"{setting} calls the model only at t={t:g}, not at pure noise (t={top}): the one-step "
                         f"sample would not be the x0 prediction from the noise; {fix}")


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
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {schedule!r}")
    if spec is not None and not isinstance(spec, GridSpec):
        raise TypeError(f"spec must be a GridSpec, got {spec!r}")
    spec = spec or GridSpec()
    explicit = spec.timesteps if spec.timesteps is not None else spec.sigmas
    if explicit is not None:
        if nfe is not None and nfe != len(explicit):
            raise ValueError(f"nfe={nfe} does not match the {len(explicit)} explicit timesteps/sigmas")
        nfe = len(explicit)
    if nfe is None:
        raise ValueError("nfe (the number of model evaluations) is required without explicit timesteps/sigmas")
    nfe = check_nfe(nfe)

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
            f"t={t[bad].item():g} to t={t[bad + 1].item():g} ({_describe(spec, nfe, schedule)})"
        )
    return TimeGrid(
        schedule=schedule,
        t=t,
        alpha=alpha,
        sigma=sigma,
        lambda_=lam,
        model_timesteps=schedule.model_time(t[:-1]),
    )
