"""The S3 search space: solver schedules as candidates, with USF's mutation and crossover.

A candidate is the per-step decision list of Liu et al. (ICLR 2024): timesteps, and per step
the prediction type, Taylor order, difference points and relaxation of the first derivative,
and the pseudo corrector, plus the analytical first step. The NFE is fixed: switching the
analytical first step on inserts a timestep (it costs no evaluation), switching it off
removes one. Timesteps move in the normalised log-SNR coordinate ``u`` of :class:`LogSNRAxis`.
The released search's decision probabilities are kept where they apply (orders 1-4 with
weights 0.2/0.4/0.3/0.1, first-derivative points 1 or 2, relaxation noise 0.03, each decision
mutated with probability 0.3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any, Sequence

import numpy as np
import torch

from ..samplers import NoiseSchedule, SolverSchedule, StepStrategy
from ..samplers.solver_schedule import MAX_ORDER, RELAXATION_FORMS

__all__ = ["LogSNRAxis", "Candidate", "SearchSpace", "positions_from_logits", "logits_from_positions"]

_ORDER_WEIGHTS = (0.2, 0.4, 0.3, 0.1)  # P(order = 1..4) of a new decision, as in the released search
_MIN_GAP = 1e-3  # smallest distance between timesteps in u


def positions_from_logits(z: Sequence[float]) -> list[float]:
    """Positions 0 = u_0 < u_1 < ... < u_{k-1} < 1 from k - 1 gap logits (the slack gap's logit is 0).

    The k gaps (the last one from u_{k-1} to the end of the axis) are a softmax, so every
    logit vector is a valid, ordered set of timesteps: the coordinates the timestep moves use.
    """
    logits = np.append(np.asarray(z, dtype=np.float64), 0.0)
    gaps = np.exp(logits - logits.max())
    gaps /= gaps.sum()
    return [0.0, *np.cumsum(gaps)[:-1].tolist()]


def logits_from_positions(u: Sequence[float], min_gap: float = 1e-4) -> np.ndarray:
    """Inverse of :func:`positions_from_logits` (gaps below ``min_gap`` are raised to it)."""
    gaps = np.maximum(np.diff(np.append(np.asarray(u, dtype=np.float64), 1.0)), min_gap)
    return np.log(gaps[:-1]) - np.log(gaps[-1])


class LogSNRAxis:
    """Timesteps <-> u in [0, 1]: u = 0 at the noisiest time, 1 at the schedule's t_min, linear in log-SNR."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        f64 = torch.float64
        lam = schedule.lambda_(torch.tensor([schedule.t_max, schedule.grid_end], dtype=f64))
        if not math.isfinite(float(lam[0])):  # flow: pure noise at t_max; start the axis at sigma = 1 - 1/N
            n = getattr(schedule, "num_train_timesteps", 1000)
            lam[0] = schedule.lambda_(torch.tensor(schedule.t_max - 1.0 / n, dtype=f64))
        self.lo, self.hi = float(lam[0]), float(lam[1])

    def timesteps(self, u: Sequence[float]) -> list[float]:
        """Model timesteps at positions ``u`` (u = 0 is exactly t_max)."""
        u = np.asarray(u, dtype=np.float64)
        t = self.schedule.t_from_lambda(torch.from_numpy(self.lo + u * (self.hi - self.lo)))
        t = torch.where(torch.from_numpy(u) <= 0, torch.tensor(self.schedule.t_max, dtype=torch.float64), t)
        return self.schedule.model_time(t).tolist()

    def positions(self, timesteps: Sequence[float]) -> list[float]:
        """Inverse of :meth:`timesteps`."""
        t = self.schedule.time_from_model(torch.tensor(list(timesteps), dtype=torch.float64))
        lam = self.schedule.lambda_(t).clamp(min=self.lo)
        return ((lam - self.lo) / (self.hi - self.lo)).clamp(0, 1).tolist()


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space: positions (u, first one 0) and a strategy per step."""

    u: tuple[float, ...]
    steps: tuple[StepStrategy, ...]
    afs: bool = False

    def key(self) -> str:
        """Identity for de-duplication (positions rounded to 1e-6)."""
        return json.dumps([[round(v, 6) for v in self.u], [s.to_dict() for s in self.steps], self.afs])

    def to_dict(self) -> dict[str, Any]:
        return {"u": list(self.u), "steps": [s.to_dict() for s in self.steps], "afs": self.afs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(tuple(float(v) for v in d["u"]), tuple(StepStrategy.from_dict(s) for s in d["steps"]),
                   bool(d["afs"]))


class SearchSpace:
    """Random draws, mutation, crossover and repair of candidates with a fixed NFE.

    Args:
        axis: The log-SNR axis of the model's schedule.
        nfe: Model evaluations (the analytical first step adds a timestep, not an evaluation).
        final_sigma: The terminal point of every candidate.
        allow_afs: Whether candidates may use the analytical first step.
        max_order: Highest Taylor order.
        mutation_rate: Probability that each decision of a parent changes.
    """

    def __init__(self, axis: LogSNRAxis, nfe: int, final_sigma: str = "zero", allow_afs: bool = True,
                 max_order: int = MAX_ORDER, mutation_rate: float = 0.3):
        self.axis, self.nfe, self.final_sigma = axis, nfe, final_sigma
        self.allow_afs = allow_afs and nfe >= 1
        self.max_order, self.rate = max_order, mutation_rate

    # ------------------------------------------------------------------ conversions
    def schedule(self, c: Candidate, meta=None) -> SolverSchedule:
        return SolverSchedule(self.axis.timesteps(c.u), self.final_sigma, list(c.steps), c.afs, meta)

    def candidate(self, s: SolverSchedule) -> Candidate:
        if s.steps is None:
            raise ValueError("a search candidate needs per-step strategies")
        return self.repair(tuple(self.axis.positions(s.timesteps)), s.steps, s.analytic_first_step)

    # ------------------------------------------------------------------ decisions
    def _order(self, rng: random.Random, i: int) -> int:
        orders = list(range(1, self.max_order + 1))
        return min(rng.choices(orders, weights=_ORDER_WEIGHTS[: self.max_order])[0], i + 1)

    def _relaxation(self, rng: random.Random, current: float | str = 0.0) -> float | str:
        r = rng.random()
        if r < 0.15:
            return rng.choice(RELAXATION_FORMS)
        base = current if isinstance(current, float) else 0.0
        return round(base + rng.gauss(0.0, 0.03), 6) if r < 0.85 else 0.0

    def random_step(self, rng: random.Random, i: int) -> StepStrategy:
        order = self._order(rng, i)
        return StepStrategy(rng.choice(["data", "noise"]), order, min(rng.choice([1, 2]), order - 1) or None,
                            self._relaxation(rng) if order > 1 else 0.0, rng.choice(["none", "pseudo"]))

    def random(self, rng: random.Random) -> Candidate:
        afs = self.allow_afs and rng.random() < 0.3
        k = self.nfe + afs
        u = (0.0, *sorted(rng.uniform(0.02, 0.98) for _ in range(k - 1)))
        return self.repair(u, [self.random_step(rng, i) for i in range(k)], afs)

    # ------------------------------------------------------------------ repair
    def repair(self, u: Sequence[float], steps: Sequence[StepStrategy], afs: bool) -> Candidate:
        """Sorted positions at least _MIN_GAP apart; strategies valid at their position."""
        u = sorted(min(max(float(v), 0.0), 1.0) for v in u)
        u[0] = 0.0
        for i in range(1, len(u)):
            u[i] = max(u[i], u[i - 1] + _MIN_GAP)
        if u[-1] > 1.0:  # pushed past the end: pack the tail backwards
            for i in range(len(u) - 1, 0, -1):
                u[i] = min(u[i], 1.0 - (len(u) - 1 - i) * _MIN_GAP)
        out, last = [], len(steps) - 1
        for i, s in enumerate(steps):
            if s.order > min(i + 1, self.max_order):
                s = s.replace(order=min(i + 1, self.max_order))
            if i == last:
                if s.corrector != "none":
                    s = s.replace(corrector="none")
                if self.final_sigma == "zero" and s.order != 1:
                    s = s.replace(order=1)
            if s.order == 1 and s.relaxation != 0.0:
                s = s.replace(relaxation=0.0)
            if s.corrector == "none" and s.corrector_relaxation != 0.0:
                s = s.replace(corrector_relaxation=0.0)
            out.append(s)
        return Candidate(tuple(round(v, 9) for v in u), tuple(out), afs)

    # ------------------------------------------------------------------ variation
    def mutate(self, rng: random.Random, c: Candidate) -> Candidate:
        """A changed copy of ``c`` (each decision changes with probability ``mutation_rate``)."""
        for _ in range(20):
            out = self._mutate_once(rng, c)
            if out.key() != c.key():
                return out
        return out

    def _mutate_once(self, rng: random.Random, c: Candidate) -> Candidate:
        u, steps, afs = list(c.u), list(c.steps), c.afs
        if self.allow_afs and rng.random() < 0.1:
            if afs and len(u) > 2:
                k = rng.randrange(1, len(u))
                del u[k], steps[k]
            elif not afs:
                k = rng.randrange(1, len(u) + 1)
                lo, hi = u[k - 1], (u[k] if k < len(u) else 1.0)
                u.insert(k, rng.uniform(lo, hi))
                steps.insert(k, self.random_step(rng, k))
            afs = not afs
        z = logits_from_positions(u)
        moved = False
        for k in range(len(z)):
            if rng.random() < self.rate:
                z[k] += rng.gauss(0.0, 0.4)
                moved = True
        if moved:
            u = positions_from_logits(z)
        for i in range(len(steps)):
            s = steps[i]
            if rng.random() < self.rate:
                s = s.replace(order=self._order(rng, i), points=None)
            if rng.random() < self.rate:
                s = s.replace(space=rng.choice(["data", "noise"]))
            if s.order > 1 and rng.random() < self.rate:
                s = s.replace(relaxation=self._relaxation(rng, s.relaxation))
            if s.order > 1 and rng.random() < self.rate:
                s = s.replace(points=min(rng.choice([1, 2]), s.order - 1))
            if rng.random() < self.rate:
                s = s.replace(corrector=rng.choice(["none", "pseudo"]))
            steps[i] = s
        return self.repair(u, steps, afs)

    def crossover(self, rng: random.Random, a: Candidate, b: Candidate) -> Candidate:
        """Per-step strategies from either parent, timesteps from one of them (or a per-point mix)."""
        if len(a.u) != len(b.u) or a.afs != b.afs:
            return rng.choice([a, b])
        steps = [rng.choice([x, y]) for x, y in zip(a.steps, b.steps)]
        if rng.random() < 0.5:
            u = list(rng.choice([a, b]).u)
        else:
            u = [rng.choice([x, y]) for x, y in zip(a.u, b.u)]
        return self.repair(u, steps, a.afs)

    def polish_moves(self, c: Candidate, step: float) -> list[Candidate]:
        """The compass stencil of ``c``'s timesteps: each gap logit moved by +-step, strategies kept."""
        z = logits_from_positions(c.u)
        out = []
        for k in range(len(z)):
            for sign in (1.0, -1.0):
                trial = z.copy()
                trial[k] += sign * step
                out.append(self.repair(positions_from_logits(trial), c.steps, c.afs))
        return out
