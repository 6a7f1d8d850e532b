"""Model-output conversion: raw network output -> data prediction x0 (and noise eps).

Every parameterisation is affine in (x, output) with per-step scalars, so the
conversion is one more row of the solver's coefficient table:
    epsilon:       x0 = (x - sigma * out) / alpha
    v_prediction:  x0 = alpha * x - sigma * out          (VP only)
    sample:        x0 = out
    flow:          x0 = x - sigma * out                  (alpha = 1 - sigma only)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import FlowSchedule, NoiseSchedule
from fewstep.infra.validation import check_real

__all__ = [
    "PREDICTIONS",
    "MIN_EPSILON_ALPHA",
    "canonical_prediction",
    "check_prediction",
    "x0_coefficients",
    "eps_coefficients",
    "DynamicThreshold",
    "Clip",
    "cfg_combine",
]

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")
# Below this alpha, x0 = (x - sigma eps) / alpha multiplies the model's error by more than 1e5.
MIN_EPSILON_ALPHA = 1e-5
# diffusers spells the flow target "flow_prediction".
_ALIASES = {"flow_prediction": "flow"}


def canonical_prediction(prediction: str) -> str:
    """Normalise a prediction-type name (accepts diffusers' ``flow_prediction``).

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction={prediction!r} must be a string, one of {PREDICTIONS + tuple(_ALIASES)}")
    name = _ALIASES.get(prediction, prediction)
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS + tuple(_ALIASES)}")
    return name


def check_prediction(prediction: str, schedule: NoiseSchedule) -> str:
    """Check that ``prediction`` is meaningful on ``schedule``; returns the canonical name.

    Raises:
        ValueError: v-prediction on a non-variance-preserving schedule, or a flow
            (velocity) target on a schedule other than flow matching.
    """
    name = canonical_prediction(prediction)
    if name == "v_prediction" and not schedule.variance_preserving:
        raise ValueError(f"prediction 'v_prediction' needs a variance-preserving schedule, not {schedule.kind!r}")
    if name == "flow" and not isinstance(schedule, FlowSchedule):
        raise ValueError(f"prediction 'flow' (velocity eps - x0) needs the flow schedule, not {schedule.kind!r}")
    return name


def x0_coefficients(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (c_x, c_out) with x0 = c_x * x + c_out * out, float64.

    Raises:
        ValueError: for epsilon prediction where alpha < ``MIN_EPSILON_ALPHA`` (x0 is undefined
            at alpha = 0 and amplifies the model's error by 1/alpha near it).
    """
    alpha, sigma = alpha.double(), sigma.double()
    if prediction == "epsilon":
        if bool((alpha < MIN_EPSILON_ALPHA).any()):
            raise ValueError(
                f"an epsilon-prediction model cannot be converted to x0 where alpha < {MIN_EPSILON_ALPHA:g} "
                f"(here alpha = {float(alpha.min()):.3g}: pure noise, e.g. the start of a flow or cosine schedule); "
                "use a flow/v-prediction model there or start the grid later (t_start)"
            )
        return 1 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        return alpha.clone(), -sigma
    if prediction == "sample":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction == "flow":
        return torch.ones_like(alpha), -sigma
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")


def eps_coefficients(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (e_x, e_out) with eps = e_x * x + e_out * out, written without cancellation.

    Works on any tensors (float64 or not, under autograd/forward AD).

    Raises:
        ValueError: for an unknown prediction type.
    """
    if prediction == "epsilon":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction == "v_prediction":  # v = alpha eps - sigma x0, x = alpha x0 + sigma eps (VP)
        return sigma, alpha
    if prediction == "sample":
        return 1 / sigma, -alpha / sigma
    if prediction == "flow":  # v = eps - x0, x = (1 - sigma) x0 + sigma eps
        return torch.ones_like(alpha), alpha
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")


@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding of x0 (Saharia et al. 2022), as in diffusers.

    Per sample, s = clamp(quantile(|x0|, ratio), 1, max_value); x0 <- clamp(x0, -s, s) / s.
    For pixel-space models only.
    """

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        # diffusers' ranges (s = clamp(q, 1, max_value) is max_value when max_value < 1)
        object.__setattr__(self, "ratio", check_real("dynamic thresholding ratio", self.ratio, 0.0, 1.0))
        object.__setattr__(self, "max_value", check_real("dynamic thresholding max_value", self.max_value, 0.0,
                                                         open_min=True))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.dim() < 1:
            raise ValueError(f"dynamic thresholding needs a batch of samples [B, ...], got shape {tuple(x0.shape)}")
        if x0.numel() == 0:
            return x0
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile's dtypes
        s = torch.quantile(work.abs(), self.ratio, dim=1).to(flat.dtype)
        s = s.clamp(min=1.0, max=self.max_value).unsqueeze(1)
        return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


@dataclass(frozen=True)
class Clip:
    """Clamp x0 to [-value, value] (diffusers' ``clip_sample``)."""

    value: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_real("clip value", self.value, 0.0, open_min=True))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.value, self.value)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond).

    Combining raw outputs equals combining x0 or eps because every conversion above is
    affine with the same coefficients for both halves.
    """
    return uncond + scale * (cond - uncond)
