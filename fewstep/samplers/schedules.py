"""Noise schedules: x_t = alpha_t * x_0 + sigma_t * eps over a schedule time t.

Every schedule answers the same questions in float64: alpha(t), sigma(t), the half
log-SNR lambda(t) = log(alpha/sigma) (decreasing in t) and its inverse t(lambda).
Solvers only ever see these numbers, so VP, flow-matching and VE models share one core.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch

from fewstep.infra.validation import as_real_vector, check_bool, check_choice, check_int, check_real

__all__ = [
    "NoiseSchedule",
    "DiscreteVPSchedule",
    "ContinuousVPSchedule",
    "FlowSchedule",
    "VESchedule",
    "BETA_SCHEDULES",
    "make_schedule",
    "diffusers_betas",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _f64(t: Any) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule(ABC):
    """A forward process x_t = alpha(t) x_0 + sigma(t) eps on a time interval [t_min, t_max].

    Attributes:
        t_min: Smallest time the model was trained on (least noise).
        t_max: Largest time (most noise); sampling starts here.
        timestep_scale: The model is called with ``t * timestep_scale`` (e.g. 1000 for
            flow-matching transformers that take sigma * 1000).
    """

    kind: ClassVar[str]
    t_min: float
    t_max: float
    timestep_scale: float = 1.0

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (alpha_t, sigma_t) in float64 for schedule times ``t``."""

    @abstractmethod
    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Invert lambda(t); the inverse of :meth:`lambda_`."""

    @property
    def variance_preserving(self) -> bool:
        """Whether alpha^2 + sigma^2 = 1 (required by v-prediction)."""
        return False

    @property
    def grid_end(self) -> float:
        """Where generated grids end by default (the least-noisy time worth evaluating)."""
        return self.t_min

    #: Spacing used when none is given (diffusers' default for discrete and flow models).
    default_spacing: ClassVar[str] = "linspace"

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR log(alpha_t / sigma_t), float64 (+inf where sigma = 0)."""
        alpha, sigma = self.alpha_sigma(_f64(t))
        return torch.log(alpha) - torch.log(sigma)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is conditioned on at schedule time ``t``."""
        return _f64(t) * self.timestep_scale

    def time_from_model(self, timestep: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`model_time`."""
        return _f64(timestep) / self.timestep_scale

    def diffusers_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level diffusers calls sigma (sigma/alpha, the EDM sigma); Karras grids are spaced in it."""
        alpha, sigma = self.alpha_sigma(_f64(t))
        return sigma / alpha

    def t_from_diffusers_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`diffusers_sigma`."""
        return self.t_from_lambda(-torch.log(_f64(s)))

    def check_time(self, t: torch.Tensor, what: str = "timestep") -> None:
        """Raise ValueError if any ``t`` lies outside [t_min, t_max]."""
        t = _f64(t)
        tol = 1e-9 * max(1.0, abs(self.t_max))
        bad = (t < self.t_min - tol) | (t > self.t_max + tol) | ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(
                f"{what} {t[bad][0].item():g} is outside this {self.kind} schedule's range "
                f"[{self.t_min:g}, {self.t_max:g}]"
            )

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; ``make_schedule(**d)`` rebuilds it."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def diffusers_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Betas exactly as diffusers builds them (float32), so alphas_cumprod matches training.

    The model was trained with diffusers' float32 ``alphas_cumprod``; reproducing that
    table bit for bit (and only then moving to float64) keeps the sampler on the
    model's own noise levels.

    Raises:
        TypeError, ValueError: naming the bad key (counts, ranges, lengths, types).
    """
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 2, 100_000)
    rescale_betas_zero_snr = check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
    if trained_betas is not None:
        given = as_real_vector("trained_betas", trained_betas)
        if given.size != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {given.size} entries but num_train_timesteps={num_train_timesteps}; "
                "they must agree"
            )
        betas = torch.tensor(given, dtype=torch.float32)
        source = "trained_betas"
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        beta_start = check_real("beta_start", beta_start, 0.0, 1.0, open_max=True)
        beta_end = check_real("beta_end", beta_end, 0.0, 1.0, open_min=True, open_max=True)
        betas = _beta_table(beta_schedule, beta_start, beta_end, num_train_timesteps)
        source = f"beta_start={beta_start:g}, beta_end={beta_end:g}"
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"{source} give betas outside (0, 1); every beta must be a probability strictly inside it")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _beta_table(beta_schedule: str, beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2

    def abar(t: float) -> float:  # squaredcos_cap_v2 (Nichol & Dhariwal 2021)
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(abar) so the last step has zero SNR."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))  # diffusers' rounding order
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class DiscreteVPSchedule(NoiseSchedule):
    """VP schedule of a discrete-time model (DDPM / Stable Diffusion), t in [0, N-1].

    Between integer timesteps lambda is interpolated linearly, the same convention
    diffusers uses to map a sigma back to a (fractional) timestep, so karras/logSNR
    grids give the model the timestep that matches its noise level exactly.
    """

    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: Sequence[float] | torch.Tensor, **meta: Any):
        ac = torch.from_numpy(as_real_vector("alphas_cumprod", alphas_cumprod))
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        lam = 0.5 * (torch.log(ac) - torch.log1p(-ac))
        # Zero-terminal-SNR schedules end on diffusers' stand-in alphas_cumprod[-1] = 2^-24, which
        # for steep betas (linear 1e-4..0.02) lies above alphas_cumprod[-2]: tolerated at the end only.
        body = lam[:-1] if meta.get("rescale_betas_zero_snr") else lam
        if not bool((body[1:] < body[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self._lambdas = lam
        # Monotone envelope for the inverse t(lambda); equal to lam except at such a zero-SNR end.
        self._lambdas_monotone = torch.cummin(lam, 0).values
        self._meta = meta
        self.t_min, self.t_max = 0.0, float(ac.numel() - 1)

    @classmethod
    def from_betas(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
    ) -> "DiscreteVPSchedule":
        """Build from diffusers' beta parameters (the scheduler config keys of the same names)."""
        betas = diffusers_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        ac = torch.cumprod(1.0 - betas, dim=0)
        if rescale_betas_zero_snr:
            # Zero terminal SNR makes lambda(N-1) = -inf; diffusers keeps it finite the same way.
            ac[-1] = 2.0**-24
        meta = dict(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if trained_betas is not None:
            meta["trained_betas"] = [float(b) for b in trained_betas]
        return cls(ac.double(), **meta)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def variance_preserving(self) -> bool:
        return True

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        t = _f64(t).clamp(self.t_min, self.t_max)
        lo = t.floor().clamp(max=self.t_max - 1)
        w = t - lo
        lo = lo.long()
        return torch.lerp(self._lambdas[lo], self._lambdas[lo + 1], w)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lambda_(t)
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        lam = _f64(lam)
        # lambdas decrease with t: search in the reversed (increasing) table.
        rev = self._lambdas_monotone.flip(0)
        lam = lam.clamp(rev[0], rev[-1]).contiguous()
        idx = torch.searchsorted(rev, lam).clamp(1, rev.numel() - 1)
        l0, l1 = rev[idx - 1], rev[idx]
        w = torch.where(l1 > l0, (lam - l0) / (l1 - l0), torch.zeros_like(lam))
        t_rev = (idx - 1).double() + w
        return (self.t_max - t_rev).clamp(self.t_min, self.t_max)

    def to_dict(self) -> dict[str, Any]:
        if self._meta:
            return {"kind": self.kind, **self._meta}
        return {"kind": self.kind, "alphas_cumprod": self.alphas_cumprod.tolist()}


class ContinuousVPSchedule(NoiseSchedule):
    """Continuous-time VP schedules of Song et al. (linear beta) and Nichol & Dhariwal (cosine)."""

    kind = "vp_continuous"

    def __init__(
        self,
        schedule: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        cosine_s: float = 0.008,
        t_min: float | None = None,
        t_max: float | None = None,
        timestep_scale: float = 1.0,
    ):
        check_choice("schedule", schedule, ("linear", "cosine"))
        self.schedule = schedule
        self.beta_min = check_real("beta_min", beta_min, 0.0)
        self.beta_max = check_real("beta_max", beta_max, self.beta_min, open_min=True)
        self.cosine_s = check_real("cosine_s", cosine_s, 0.0, 1.0, open_min=True)
        # The cosine schedule's log-SNR diverges at t = 1, so its t_max stays below (DPM-Solver uses 0.9946).
        t_hi_limit = 1.0 if schedule == "linear" else 1.0 - 1e-6
        default_max = 1.0 if schedule == "linear" else 0.9946
        self.t_min = check_real("t_min", 1e-3 if t_min is None else t_min, 0.0, 1.0, open_min=True, open_max=True)
        self.t_max = check_real("t_max", default_max if t_max is None else t_max, self.t_min, t_hi_limit,
                                open_min=True)
        self.timestep_scale = check_real("timestep_scale", timestep_scale, 0.0, open_min=True)
        self._cos_log_alpha_0 = math.log(math.cos(self.cosine_s / (1 + self.cosine_s) * math.pi / 2))

    @property
    def variance_preserving(self) -> bool:
        return True

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - self._cos_log_alpha_0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self._log_alpha(_f64(t))
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        lam = _f64(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        if self.schedule == "linear":
            tmp = 2 * (self.beta_max - self.beta_min) * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
            delta = self.beta_min**2 + tmp
            return tmp / (delta.sqrt() + self.beta_min) / (self.beta_max - self.beta_min)
        s = self.cosine_s
        return torch.arccos(torch.exp(log_alpha + self._cos_log_alpha_0)) * 2 * (1 + s) / math.pi - s

    default_spacing = "logsnr"  # DPM-Solver's choice for continuous-time VP models

    def to_dict(self) -> dict[str, Any]:
        return dict(
            kind=self.kind, schedule=self.schedule, beta_min=self.beta_min, beta_max=self.beta_max,
            cosine_s=self.cosine_s, t_min=self.t_min, t_max=self.t_max, timestep_scale=self.timestep_scale,
        )


class FlowSchedule(NoiseSchedule):
    """Rectified flow / flow matching (SD3, Flux): alpha = 1 - t, sigma = t, t in [0, 1].

    Resolution shifts (static ``shift`` or dynamic ``mu``) warp the sampling grid, not
    the schedule, exactly as in diffusers' FlowMatchEulerDiscreteScheduler.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, t_min: float = 0.0, t_max: float = 1.0):
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 1, 100_000)
        self.timestep_scale = float(self.num_train_timesteps)
        self.t_min = check_real("t_min", t_min, 0.0, 1.0, open_max=True)
        self.t_max = check_real("t_max", t_max, self.t_min, 1.0, open_min=True)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _f64(t)
        return 1.0 - t, t

    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-_f64(lam))

    @property
    def grid_end(self) -> float:
        # diffusers' flow schedulers never evaluate below sigma = 1 / num_train_timesteps.
        return max(self.t_min, 1.0 / self.num_train_timesteps)

    def diffusers_sigma(self, t: torch.Tensor) -> torch.Tensor:
        # For flow models diffusers calls the flow time itself sigma (finite at t = 1).
        return _f64(t)

    def t_from_diffusers_sigma(self, s: torch.Tensor) -> torch.Tensor:
        return _f64(s)

    def to_dict(self) -> dict[str, Any]:
        return dict(kind=self.kind, num_train_timesteps=self.num_train_timesteps, t_min=self.t_min, t_max=self.t_max)


class VESchedule(NoiseSchedule):
    """Variance exploding / EDM: alpha = 1, sigma = t (the model is called with sigma)."""

    kind = "ve"
    default_spacing = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min = check_real("sigma_min", sigma_min, 0.0, open_min=True)
        self.t_max = check_real("sigma_max", sigma_max, self.t_min, open_min=True)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _f64(t)
        return torch.ones_like(t), t

    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-_f64(lam))

    def to_dict(self) -> dict[str, Any]:
        return dict(kind=self.kind, sigma_min=self.t_min, sigma_max=self.t_max)


_SCHEDULE_NAMES = {
    "linear": lambda: DiscreteVPSchedule.from_betas(beta_schedule="linear"),
    "scaled_linear": lambda: DiscreteVPSchedule.from_betas(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ),
    "squaredcos_cap_v2": lambda: DiscreteVPSchedule.from_betas(beta_schedule="squaredcos_cap_v2"),
    "vp_linear": lambda: ContinuousVPSchedule("linear"),
    "vp_cosine": lambda: ContinuousVPSchedule("cosine"),
    "flow": FlowSchedule,
    "ve": VESchedule,
    "edm": VESchedule,
}
_KINDS = {c.kind: c for c in (DiscreteVPSchedule, ContinuousVPSchedule, FlowSchedule, VESchedule)}


def make_schedule(spec: "str | NoiseSchedule | dict[str, Any]" = "linear", **kwargs: Any) -> NoiseSchedule:
    """Build a schedule from a name, a ``to_dict()`` description, or pass one through.

    Names: ``linear`` (DDPM betas), ``scaled_linear`` (Stable Diffusion betas),
    ``squaredcos_cap_v2`` (improved-DDPM cosine), ``vp_linear`` / ``vp_cosine``
    (continuous time), ``flow`` (flow matching) and ``ve`` / ``edm``.

    Raises:
        ValueError: for an unknown name or kind.
    """
    if not isinstance(spec, (str, NoiseSchedule, dict)):
        raise TypeError(f"schedule={spec!r} must be a name, a NoiseSchedule or a to_dict() description")
    if isinstance(spec, NoiseSchedule):
        if kwargs:
            raise ValueError(f"unexpected options {sorted(kwargs)} for an already built schedule")
        return spec
    if isinstance(spec, dict):
        d = {**spec, **kwargs}
        kind = check_choice("schedule kind", d.pop("kind", None), sorted(_KINDS))
        if kind == DiscreteVPSchedule.kind:
            if "alphas_cumprod" in d:
                return DiscreteVPSchedule(d.pop("alphas_cumprod"))
            return DiscreteVPSchedule.from_betas(**d)
        return _KINDS[kind](**d)
    if spec not in _SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {spec!r}; choose one of {sorted(_SCHEDULE_NAMES)}")
    if kwargs:
        if spec in BETA_SCHEDULES:
            defaults = dict(beta_start=0.00085, beta_end=0.012) if spec == "scaled_linear" else {}
            return DiscreteVPSchedule.from_betas(beta_schedule=spec, **{**defaults, **kwargs})
        if spec in ("vp_linear", "vp_cosine"):
            return ContinuousVPSchedule(spec[3:], **kwargs)
        return {"flow": FlowSchedule, "ve": VESchedule, "edm": VESchedule}[spec](**kwargs)
    return _SCHEDULE_NAMES[spec]()
