"""Analytic Gaussian-mixture "models": exact denoisers and exact-to-1e-10 ODE solutions.

For data x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)), the noisy marginal at (alpha, sigma) is
sum_k pi_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)), so the ideal denoiser
E[x0 | x_t], the noise prediction and the score are closed-form. That makes the mixture
the ground truth for solver benchmarks: no training error, and the probability-flow
ODE can be integrated to near machine precision for reference solutions.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from ..samplers.prediction import check_prediction
from ..samplers.schedules import NoiseSchedule, make_schedule

__all__ = ["GaussianMixture", "GMMModel"]


class GaussianMixture:
    """A diagonal Gaussian mixture in R^D, optionally with a class per component.

    Args:
        weights: [K] mixture weights (normalised here).
        means: [K, D] component means.
        stds: [K, D] component standard deviations (> 0).
        classes: [K] class index of each component (enables class-conditional models;
            the conditional of class c is the sub-mixture of its components).
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        means: Sequence[Sequence[float]] | torch.Tensor,
        stds: Sequence[Sequence[float]] | torch.Tensor,
        classes: Sequence[int] | torch.Tensor | None = None,
    ):
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if self.means.dim() != 2 or self.stds.shape != self.means.shape or w.shape != self.means.shape[:1]:
            raise ValueError(
                f"need weights [K], means [K, D], stds [K, D]; got {tuple(w.shape)}, "
                f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}"
            )
        if not bool((w > 0).all()) or not bool((self.stds > 0).all()):
            raise ValueError("mixture weights and standard deviations must be positive")
        self.log_weights = torch.log(w / w.sum())
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if self.classes is not None and self.classes.shape != w.shape:
            raise ValueError(f"classes must have one entry per component ({w.numel()}), got {tuple(self.classes.shape)}")

    @classmethod
    def random(
        cls,
        dim: int = 8,
        components: int = 6,
        num_classes: int | None = None,
        seed: int = 0,
        spread: float = 1.0,
        std_range: tuple[float, float] = (0.1, 0.4),
    ) -> "GaussianMixture":
        """A reproducible random mixture; components are dealt round-robin to classes."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        classes = None if num_classes is None else torch.arange(components) % num_classes
        return cls(weights, means, stds, classes)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else int(self.classes.max()) + 1

    def _component_logits(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, K] log prior of each component; label -1 (or None) means unconditional."""
        logits = self.log_weights.expand(batch, -1)
        if labels is None:
            return logits
        if self.classes is None:
            raise ValueError("this mixture has no classes; build it with num_classes to condition on labels")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} labels for a batch of {batch}")
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in -1..{self.num_classes - 1} (-1 = unconditional)")
        keep = (self.classes[None, :] == labels[:, None]) | (labels[:, None] < 0)
        return logits.masked_fill(~keep, -math.inf)

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``n`` data points [n, D] (float64) from the (conditional) mixture."""
        logits = self._component_logits(labels, n)
        k = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def _posterior(self, x: torch.Tensor, alpha, sigma, labels):
        x = x.reshape(x.shape[0], -1).double()
        if x.shape[1] != self.dim:
            raise ValueError(f"samples have {x.shape[1]} dimensions, the mixture {self.dim}")
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = alpha**2 * self.stds**2 + sigma**2  # [B|1, K, D]
        diff = x[:, None, :] - alpha * self.means  # [B, K, D]
        log_n = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        logits = self._component_logits(labels, x.shape[0]) + log_n
        return x, alpha, sigma, var, diff, logits

    def log_prob(self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x) of the noisy marginal at (alpha, sigma); [B]."""
        return self._posterior(x, alpha, sigma, labels)[-1].logsumexp(-1)

    def denoise(self, x: torch.Tensor, alpha, sigma, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (E[x0 | x_t], E[eps | x_t]) at (alpha, sigma), float64, shaped like ``x``.

        Both are finite at the ends: at alpha = 0 eps = x / sigma, at sigma = 0 x0 = x / alpha.
        """
        shape = x.shape
        x, alpha, sigma, var, diff, logits = self._posterior(x, alpha, sigma, labels)
        w = logits.softmax(-1)[..., None]  # [B, K, 1]
        eps = (w * sigma * diff / var).sum(1)
        x0 = (w * (self.means + alpha * self.stds**2 * diff / var)).sum(1)
        return x0.reshape(shape), eps.reshape(shape)

    def score(self, x: torch.Tensor, alpha, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log p_t(x) = -eps / sigma."""
        _, eps = self.denoise(x, alpha, sigma, labels)
        return -eps / torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))

    def ode_solution(
        self,
        x_start: torch.Tensor,
        start: tuple[float, float],
        end: tuple[float, float],
        labels: torch.Tensor | None = None,
        steps: int = 2000,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from (alpha, sigma) = ``start`` to ``end``.

        The state is moved to the variance-preserving frame x / sqrt(alpha^2 + sigma^2) and
        integrated with classic RK4 in the angle phi = atan2(sigma, alpha), where
        dx/dphi = cos(phi) eps - sin(phi) x0 is smooth from pure noise to data. Every
        schedule with the same log-SNR path gives the same solution, so one reference
        serves VP, flow and VE. With ``guidance`` the CFG-combined eps/x0 drive the ODE.

        Returns:
            float64 sample at ``end``, shaped like ``x_start``.
        """
        (a0, s0), (a1, s1) = start, end
        phi0, phi1 = math.atan2(s0, a0), math.atan2(s1, a1)
        x = x_start.double() / math.hypot(a0, s0)

        def velocity(x: torch.Tensor, phi: float) -> torch.Tensor:
            a, s = math.cos(phi), math.sin(phi)
            x0, eps = self.denoise(x, a, s, labels)
            if guidance is not None:
                ux0, ueps = self.denoise(x, a, s, None if labels is None else torch.full_like(labels, -1))
                x0, eps = ux0 + guidance * (x0 - ux0), ueps + guidance * (eps - ueps)
            return math.cos(phi) * eps - math.sin(phi) * x0

        dphi = (phi1 - phi0) / steps
        for k in range(steps):
            phi = phi0 + k * dphi
            k1 = velocity(x, phi)
            k2 = velocity(x + 0.5 * dphi * k1, phi + 0.5 * dphi)
            k3 = velocity(x + 0.5 * dphi * k2, phi + 0.5 * dphi)
            k4 = velocity(x + dphi * k3, phi + dphi)
            x = x + dphi / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x * math.hypot(a1, s1)


class GMMModel:
    """A :class:`GaussianMixture` posing as a trained network on a given schedule.

    ``model(x, t)`` / ``model(x, t, labels)`` returns the exact output for the chosen
    parameterisation at model timesteps ``t``; labels of -1 mean unconditional, so
    classifier-free guidance works on a doubled batch as with real models.

    Args:
        mixture: The data distribution.
        schedule: Noise schedule (or a name for :func:`make_schedule`).
        prediction: ``epsilon``, ``sample``, ``v_prediction`` or ``flow``.
    """

    #: exact at every real t (not trained at integer timesteps): EMS keep the pure JVP in time
    continuous_time = True

    def __init__(self, mixture: GaussianMixture, schedule: "str | NoiseSchedule" = "linear",
                 prediction: str = "epsilon"):
        self.mixture = mixture
        self.schedule = make_schedule(schedule)
        self.prediction = check_prediction(prediction, self.schedule)
        self.calls = 0

    def fingerprint(self) -> str:
        """Identifies the mixture and parameterisation (used by tuned artifacts)."""
        h = hashlib.sha256(self.prediction.encode())
        for t in (self.mixture.log_weights, self.mixture.means, self.mixture.stds):
            h.update(t.numpy().tobytes())
        if self.mixture.classes is not None:
            h.update(self.mixture.classes.numpy().tobytes())
        return "gmm:" + h.hexdigest()[:20]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        st = self.schedule.time_from_model(torch.as_tensor(t).reshape(-1).cpu())
        alpha, sigma = self.schedule.alpha_sigma(st)
        x0, eps = self.mixture.denoise(x.cpu(), alpha, sigma, labels)
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
        out = {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": alpha * eps - sigma * x0,
            "flow": eps - x0,
        }[self.prediction]
        return out.to(device=x.device, dtype=x.dtype)
