"""The S3 search space: solver schedules as candidates, with USF's mutation and crossover.

A candidate is the per-step decision list of Liu et al. (ICLR 2024): timesteps, and per step
the prediction type, Taylor order, difference points and relaxation of the first derivative,
and the pseudo corrector, plus the analytical first step. The NFE is fixed: switching the
analytical first step on inserts a timestep (it costs no evaluation), switching it off
removes one. The end point is clean data or, as the released code's t_end, the schedule's
t_min. Timesteps move in gap logits along the log-SNR axis (:class:`LogSNRAxis`), so every
move keeps them ordered. New decisions follow the released search's probabilities (orders
1-4 with weights 0.2/0.4/0.3/0.1, first-derivative points 1 or 2, relaxation noise 0.03);
a mutation changes a few decisions (1 + geometric, mean 2) rather than each with
probability 0.3, which suits budgets of hundreds, not thousands, of evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any, Sequence

import numpy as np
import torch

from fewstep.samplers import NoiseSchedule, SolverSchedule, StepStrategy
from fewstep.samplers.solver_schedule import MAX_ORDER, RELAXATION_FORMS

__all__ = ["LogSNRAxis", "Candidate", "SearchSpace", "positions_from_logits", "logits_from_positions"]

_ORDER_WEIGHTS = (0.2, 0.4, 0.3, 0.1)  # P(order = 1..4) of a new decision, as in the released search
_MIN_GAP = 1e-3  # smallest distance between timesteps in u


def positions_from_logits(z: Sequence[float], free_start: bool = False) -> list[float]:
    """Ordered positions in [0, 1) from gap logits (the logit of the last gap, up to 1, is 0).

    The gaps are a softmax, so every logit vector gives valid, ordered timesteps: these are the
    coordinates timestep moves use. With ``free_start`` the k logits set k points, the first
    one at the first gap; otherwise the first point stays at 0 and k - 1 logits set the rest.
    """
    logits = np.append(np.asarray(z, dtype=np.float64), 0.0)
    gaps = np.exp(logits - logits.max())
    cum = np.cumsum(gaps / gaps.sum())[:-1].tolist()
    return cum if free_start else [0.0, *cum]


def logits_from_positions(u: Sequence[float], free_start: bool = False, min_gap: float = 1e-4) -> np.ndarray:
    """Inverse of :func:`positions_from_logits` (gaps below ``min_gap`` are raised to it)."""
    ends = np.concatenate([[0.0] if free_start else [], np.asarray(u, dtype=np.float64), [1.0]])
    gaps = np.maximum(np.diff(ends), min_gap)
    return np.log(gaps[:-1]) - np.log(gaps[-1])


class LogSNRAxis:
    """Timesteps <-> u in [0, 1]: u = 0 at the noisiest time, 1 at the schedule's t_min, linear in log-SNR."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        f64 = torch.float64
        lam = schedule.lambda_(torch.tensor([schedule.t_max, schedule.grid_end], dtype=f64))
        # Flow models start from pure noise (alpha = 0, log-SNR -inf): the axis then starts at
        # sigma = 1 - 1/N, and u = 0 is the pure-noise point itself.
        self.pure_noise_start = not math.isfinite(float(lam[0]))
        if self.pure_noise_start:
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
    """One point of the search space: positions u (0 = the noisiest time), a strategy per step, the end point."""

    u: tuple[float, ...]
    steps: tuple[StepStrategy, ...]
    afs: bool = False
    final: str = "zero"

    def key(self) -> str:
        """Identity for de-duplication (positions rounded to 1e-6)."""
        return json.dumps([[round(v, 6) for v in self.u], [s.to_dict() for s in self.steps], self.afs, self.final])

    def to_dict(self) -> dict[str, Any]:
        return {"u": list(self.u), "steps": [s.to_dict() for s in self.steps], "afs": self.afs, "final": self.final}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(tuple(float(v) for v in d["u"]), tuple(StepStrategy.from_dict(s) for s in d["steps"]),
                   bool(d["afs"]), d["final"])


class SearchSpace:
    """Random draws, mutation, crossover and repair of candidates with a fixed NFE.

    Args:
        axis: The log-SNR axis of the model's schedule.
        nfe: Model evaluations (the analytical first step adds a timestep, not an evaluation).
        allow_afs: Whether candidates may use the analytical first step.
        max_order: Highest Taylor order.
        finals: End points candidates may choose: ``"zero"`` (clean data; the last step is
            first order) and/or ``"min"`` (the schedule's t_min, like the released code's t_end).
        free_start: Whether the first timestep may move below the noisiest time (as diffusers'
            ``leading`` spacing does); the released search keeps it at T.
        changes: Mean number of decisions a mutation changes (at least one).
    """

    def __init__(self, axis: LogSNRAxis, nfe: int, allow_afs: bool = True, max_order: int = MAX_ORDER,
                 finals: Sequence[str] = ("zero", "min"), free_start: bool = True, changes: float = 2.0):
        self.axis, self.nfe, self.free_start = axis, nfe, free_start
        self.allow_afs = allow_afs
        self.max_order, self.finals, self.changes = max_order, tuple(finals), changes
        self.decisions = ["timestep", "order", "space", "points", "relaxation", "corrector"]
        self.decisions += ["afs"] * allow_afs + ["final"] * (len(self.finals) > 1)

    # ------------------------------------------------------------------ conversions
    def schedule(self, c: Candidate, meta=None) -> SolverSchedule:
        return SolverSchedule(self.axis.timesteps(c.u), c.final, list(c.steps), c.afs, meta)

    def candidate(self, s: SolverSchedule) -> Candidate:
        if s.steps is None:
            raise ValueError("a search candidate needs per-step strategies")
        return self.repair(tuple(self.axis.positions(s.timesteps)), s.steps, s.analytic_first_step, s.final_sigma)

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
        first = rng.choice([0.0, rng.uniform(0.0, 0.2)]) if self.free_start else 0.0
        u = (first, *sorted(rng.uniform(first + 0.02, 0.98) for _ in range(k - 1)))
        return self.repair(u, [self.random_step(rng, i) for i in range(k)], afs, rng.choice(self.finals))

    # ------------------------------------------------------------------ repair
    def repair(self, u: Sequence[float], steps: Sequence[StepStrategy], afs: bool, final: str) -> Candidate:
        """Sorted positions at least _MIN_GAP apart and short of the axis end; strategies valid at their position."""
        u = sorted(min(max(float(v), 0.0), 1.0) for v in u)
        if not self.free_start:
            u[0] = 0.0
        for i in range(1, len(u)):
            u[i] = max(u[i], u[i - 1] + _MIN_GAP)
        for i in range(len(u) - 1, 0, -1):  # pushed to or past the end: pack the tail backwards
            u[i] = min(u[i], 1.0 - (len(u) - i) * _MIN_GAP)
        out, last = [], len(steps) - 1
        # From pure noise no stencil may reach back to the first point (its log-SNR is -inf),
        # and only a data-space step without a corrector can leave it.
        noise_first = self.axis.pure_noise_start and u[0] == 0.0
        for i, s in enumerate(steps):
            usable = min(i + 1 - noise_first if i else 1, self.max_order)
            if s.order > usable:
                s = s.replace(order=usable)
            if i == 0 and noise_first and (s.space != "data" or s.corrector != "none"):
                s = s.replace(space="data", corrector="none")
            if i == last:
                if s.corrector != "none":
                    s = s.replace(corrector="none")
                if final == "zero" and s.order != 1:
                    s = s.replace(order=1)
            if s.order == 1 and s.relaxation != 0.0:
                s = s.replace(relaxation=0.0)
            if s.corrector == "none" and s.corrector_relaxation != 0.0:
                s = s.replace(corrector_relaxation=0.0)
            out.append(s)
        return Candidate(tuple(round(v, 9) for v in u), tuple(out), afs, final)

    # ------------------------------------------------------------------ variation
    def mutate(self, rng: random.Random, c: Candidate) -> Candidate:
        """A changed copy of ``c``: 1 + Geometric more decisions (mean ``changes``) drawn at random."""
        for _ in range(20):
            out = c
            k = 1
            while rng.random() < 1.0 - 1.0 / self.changes:
                k += 1
            for _ in range(k):
                out = self._change(rng, out, rng.choice(self.decisions))
            if out.key() != c.key():
                return out
        return out

    def _change(self, rng: random.Random, c: Candidate, what: str) -> Candidate:
        u, steps, afs, final = list(c.u), list(c.steps), c.afs, c.final
        i = rng.randrange(len(steps))
        s = steps[i]
        if what == "timestep":
            z = logits_from_positions(u, self.free_start)
            z[rng.randrange(len(z))] += rng.gauss(0.0, 0.4)
            u = positions_from_logits(z, self.free_start)
        elif what == "order":
            steps[i] = s.replace(order=self._order(rng, i), points=None)
        elif what == "space":
            steps[i] = s.replace(space="noise" if s.space == "data" else "data")
        elif what == "points" and s.order > 2:
            steps[i] = s.replace(points=1 if s.points > 1 else min(2, s.order - 1))
        elif what == "relaxation" and s.order > 1:
            steps[i] = s.replace(relaxation=self._relaxation(rng, s.relaxation))
        elif what == "corrector":
            steps[i] = s.replace(corrector="none" if s.corrector == "pseudo" else "pseudo")
        elif what == "afs":
            if afs and len(u) > 2:  # the first step evaluates the model again: one timestep less
                k = rng.randrange(1, len(u))
                del u[k], steps[k]
                afs = False
            elif not afs:  # the first evaluation is saved: one timestep more
                k = rng.randrange(1, len(u) + 1)
                lo, hi = u[k - 1], (u[k] if k < len(u) else 1.0)
                u.insert(k, rng.uniform(lo, hi))
                steps.insert(k, self.random_step(rng, k))
                afs = True
        elif what == "final":
            final = rng.choice([f for f in self.finals if f != final])
        return self.repair(u, steps, afs, final)

    def crossover(self, rng: random.Random, a: Candidate, b: Candidate) -> Candidate:
        """Per-step strategies from either parent; timesteps and end point from one of them (or mixed)."""
        if len(a.u) != len(b.u) or a.afs != b.afs:
            return rng.choice([a, b])
        steps = [rng.choice([x, y]) for x, y in zip(a.steps, b.steps)]
        if rng.random() < 0.5:
            u = list(rng.choice([a, b]).u)
        else:
            u = [rng.choice([x, y]) for x, y in zip(a.u, b.u)]
        return self.repair(u, steps, a.afs, rng.choice([a.final, b.final]))

    def polish_moves(self, c: Candidate, step: float) -> list[Candidate]:
        """The compass stencil of ``c``'s timesteps: each gap logit moved by +-step, strategies kept."""
        z = logits_from_positions(c.u, self.free_start)
        out = []
        for k in range(len(z)):
            for sign in (1.0, -1.0):
                trial = z.copy()
                trial[k] += sign * step
                out.append(self.repair(positions_from_logits(trial, self.free_start), c.steps, c.afs, c.final))
        return out
