"""S3's learned predictor: a small MLP from a solver-schedule encoding to its (log) fitness.

Liu et al. (ICLR 2024) rank candidate schedules with a predictor trained on the schedules
evaluated so far, so that only the promising ones are sampled in full. Here the encoding
is a fixed-length vector (per step: position, gap to the next point, prediction type, order,
difference points, relaxation, corrector; plus the analytical-first-step and end-point flags), the target
is the standardised log of the metric, and a small ensemble is retrained from scratch, with
seeded initialisation, whenever it is used.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fewstep.infra.seeds import derived_seed
from fewstep.tuning.search.space import Candidate

__all__ = ["encode", "FitnessPredictor"]

_PER_STEP = 13


def encode(c: Candidate, max_steps: int) -> list[float]:
    """Fixed-length features of a candidate (steps padded to ``max_steps``)."""
    out: list[float] = []
    u = list(c.u) + [1.0]
    for i in range(max_steps):
        if i >= len(c.steps):
            out += [0.0] * _PER_STEP
            continue
        s = c.steps[i]
        relax = s.relaxation
        out += [1.0, u[i], u[i + 1] - u[i], float(s.space == "data"),
                *[float(s.order == k) for k in range(1, 5)], s.points / 3.0,
                relax if isinstance(relax, float) else 0.0, float(relax == "bh1"), float(relax == "bh2"),
                float(s.corrector == "pseudo")]
    return out + [float(c.afs), float(c.final == "min")]


class FitnessPredictor:
    """Ensemble of small MLPs predicting log-fitness; used to rank, not to score.

    The members are trained together as batched weights with a plain Adam loop (no
    ``torch.optim``: its import and per-step overhead would dominate these tiny fits).

    Args:
        max_steps: Longest candidate (NFE + 1 with the analytical first step).
        members: Ensemble size (the prediction is the mean).
        hidden: Width of the two hidden layers.
        iterations: Full-batch Adam steps per training.
        seed: Base seed of the weight initialisation.
    """

    def __init__(self, max_steps: int, members: int = 3, hidden: int = 64, iterations: int = 300, seed: int = 0):
        self.max_steps, self.members, self.hidden = max_steps, members, hidden
        self.iterations, self.seed = iterations, seed
        self.params: list[torch.Tensor] = []
        self.mean = self.std = 0.0

    def _features(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        return torch.tensor([encode(c, self.max_steps) for c in candidates], dtype=torch.float32)

    def _forward(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        h = x.expand(self.members, *x.shape)
        for i in range(0, len(params) - 2, 2):
            h = torch.nn.functional.silu(torch.baddbmm(params[i + 1], h, params[i]))
        return torch.baddbmm(params[-1], h, params[-2])  # [members, N, 1]

    def fit(self, candidates: Sequence[Candidate], fitness: Sequence[float], round_: int = 0) -> "FitnessPredictor":
        """Train from scratch on (candidate, fitness) pairs; diverged ones count as worse than the worst."""
        finite = [math.log(f) for f in fitness if math.isfinite(f) and f > 0]
        worst = max(finite, default=0.0) + 1.0
        y = torch.tensor([math.log(f) if math.isfinite(f) and f > 0 else worst for f in fitness])
        self.mean, self.std = float(y.mean()), float(y.std()) if len(y) > 1 else 1.0
        y = ((y - self.mean) / max(self.std, 1e-8)).reshape(1, -1, 1)
        x = self._features(candidates)
        g = torch.Generator().manual_seed(derived_seed(self.seed, round_))
        sizes = [x.shape[1], self.hidden, self.hidden, 1]
        params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            params.append(torch.randn(self.members, fan_in, fan_out, generator=g) / math.sqrt(fan_in))
            params.append(torch.zeros(self.members, 1, fan_out))
        for p in params:
            p.requires_grad_(True)
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        lr, b1, b2, wd = 3e-3, 0.9, 0.999, 1e-4
        for step in range(1, self.iterations + 1):
            loss = (self._forward(x, params) - y).pow(2).mean() * self.members
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr, mi, vi in zip(params, grads, m, v):
                    gr = gr + wd * p
                    mi.mul_(b1).add_(gr, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(gr, gr, value=1 - b2)
                    denom = (vi / (1 - b2**step)).sqrt_().add_(1e-8)
                    p.addcdiv_(mi, denom, value=-lr / (1 - b1**step))
        self.params = [p.detach() for p in params]
        return self

    @torch.no_grad()
    def predict(self, candidates: Sequence[Candidate]) -> list[float]:
        """Predicted log-fitness of each candidate (lower is better)."""
        if not self.params:
            raise RuntimeError("the predictor has not been trained")
        z = self._forward(self._features(candidates), self.params).mean(0).squeeze(1)
        return (z * self.std + self.mean).tolist()
