"""Empirical convergence order of solvers against an exact Gaussian-mixture ODE solution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..samplers import GridSpec, make_schedule, sample
from ..zoo.gmm import GaussianMixture, GMMModel

__all__ = ["ConvergenceStudy", "fitted_order"]


def fitted_order(nfes: Sequence[int], errors: Sequence[float]) -> float:
    """Slope of -log(error) against log(NFE): the empirical global order."""
    return float(-np.polyfit(np.log(nfes), np.log(errors), 1)[0])


@dataclass
class ConvergenceStudy:
    """Errors at the final time of a logSNR grid against a near-exact reference.

    Args:
        schedule: Schedule name (``linear``, ``flow``, ...).
        prediction: Model parameterisation.
        t_start, t_end: Integration interval in schedule time (``final_sigma="min"``).
        num_samples, dim: Batch of starting points and data dimension.
        reference_steps: RK4 steps of the reference solution.
    """

    schedule: str = "linear"
    prediction: str = "epsilon"
    t_start: float | None = None
    t_end: float | None = None
    num_samples: int = 16
    dim: int = 4
    reference_steps: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        sched = make_schedule(self.schedule)
        self.mixture = GaussianMixture.random(dim=self.dim, components=4, seed=1, std_range=(0.3, 0.6))
        self.model = GMMModel(self.mixture, sched, self.prediction)
        self.spec = GridSpec(spacing="logsnr", final_sigma="min", t_start=self.t_start, t_end=self.t_end)
        g = torch.Generator().manual_seed(self.seed)
        self.x_T = torch.randn(self.num_samples, self.dim, generator=g, dtype=torch.float64)
        ends = self.endpoints()
        self.reference = self.mixture.ode_solution(self.x_T, *ends, steps=self.reference_steps)

    def endpoints(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(alpha, sigma) at the first and last grid point."""
        from ..samplers import build_grid

        g = build_grid(self.model.schedule, 1, self.spec)
        return (float(g.alpha[0]), float(g.sigma[0])), (float(g.alpha[-1]), float(g.sigma[-1]))

    def errors(self, solver: str, nfes: Sequence[int], **options: Any) -> np.ndarray:
        """RMS error to the reference at each NFE."""
        out = []
        for n in nfes:
            x = sample(self.model, self.x_T, schedule=self.model.schedule, prediction=self.prediction,
                       solver=solver, nfe=n, spacing=self.spec, **options)
            out.append((x - self.reference).pow(2).mean().sqrt().item())
        return np.array(out)
