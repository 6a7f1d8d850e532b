"""USF: a per-step solver schedule compiled into plan rows (Liu et al., ICLR 2024).

Each step s -> t of a :class:`~fewstep.samplers.solver_schedule.SolverSchedule` is the
exponential-integrator Taylor update of its prediction type F (x0 for ``data``, eps for
``noise``) around the start point s, with h = lambda_t - lambda_s:

    data:   x_t = (sigma_t/sigma_s) x_s + alpha_t sum_{m<p} h^{m+1} phi_{m+1}(-h) F^(m)
    noise:  x_t = (alpha_t/alpha_s) x_s - sigma_t sum_{m<p} h^{m+1} phi_{m+1}(h)  F^(m)

where phi_1(z) = expm1(z)/z, phi_{k+1}(z) = (phi_k(z) - 1/k!)/z and F^(0) = F_s. The m-th
derivative is estimated from k earlier outputs as USF does: the Taylor expansions of
F_j - F_s around lambda_s (j in the stencil) form a k x k system whose solution picks
F^(m) (k = ``points`` for the first derivative, order - 1 for the others); the first
derivative may be relaxed (times 1 + c h, or UniPC's B(h) factors). The pseudo corrector
redoes the step with order p + 1 once the model has been evaluated at the new point, adding
that output to every stencil (UniC when the stencils are full), at no extra evaluation.

Everything is linear, so each step compiles to the executor's predict/correct rows once,
in float64. A schedule that mixes data and noise steps keeps x0 in the history and writes
eps_j = (x_j - alpha_j x0_j)/sigma_j; the past samples x_j are tracked as linear
combinations of x_T and the history and re-expressed through the current sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..plan import SolverPlan
from ..registry import get_solver, register_solver
from ..solver_schedule import SolverSchedule, StepStrategy
from ..timesteps import TimeGrid
from .base import Solver, StepGeometry, ei_coefficients, empty_tables
from .dpmpp import dpmpp_orders
from .unipc import unipc_orders

__all__ = ["USFSolver", "spell_out", "phi"]


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j + k)!, the exponential-integrator weights (k >= 1)."""
    if abs(z) < 0.5:  # the recursion cancels catastrophically near 0: sum the series
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 30):
            term *= z / (j + k)
            total += term
        return total
    value = math.expm1(z) / z
    for q in range(1, k):
        value = (value - 1.0 / math.factorial(q)) / z
    return value


def _relaxation(form: float | str, h: float, hh: float) -> float:
    """Factor on the first-derivative estimate: 1 + c h, or UniPC's order-2 choice of B(hh)."""
    if isinstance(form, str):
        e = math.expm1(hh)
        b = hh if form == "bh1" else e
        return 0.5 * hh * b / (e - hh)
    return 1.0 + form * h


def _difference_weights(lam: list[float], s: int, points: list[int], m: int) -> np.ndarray:
    """w with F^(m)(lambda_s) ~ sum_j w_j (F_j - F_s): the Taylor system of USF's difference estimate."""
    deltas = np.array([lam[j] - lam[s] for j in points])
    taylor = np.array([deltas**q / math.factorial(q) for q in range(1, len(points) + 1)])
    target = np.zeros(len(points))
    target[m - 1] = 1.0
    return np.linalg.solve(taylor, target)


def _update(grid: TimeGrid, lam: list[float], s: int, order: int, space: str, first: list[int], rest: list[int],
            relaxation: float | str) -> tuple[float, dict[int, float]]:
    """(a, {j: c_j}) with x_{s+1} = a x_s + sum_j c_j F_j: one Taylor update of ``order`` from point s."""
    g = StepGeometry.of(grid, s)
    a, c0 = ei_coefficients(g, space)  # exact limits at sigma_t = 0 and alpha_s = 0
    coefs = {s: c0}
    if order == 1:
        return a, coefs
    h = g.h
    hh, scale = (-h, g.alpha_t) if space == "data" else (h, -g.sigma_t)
    for m in range(1, order):
        stencil = first if m == 1 else rest
        c = scale * h ** (m + 1) * phi(m + 1, hh)
        if m == 1:
            c *= _relaxation(relaxation, h, hh)
        for j, w in zip(stencil, _difference_weights(lam, s, stencil, m)):
            coefs[j] = coefs.get(j, 0.0) + c * w
            coefs[s] -= c * w
    return a, coefs


class _Lowering:
    """Turns updates over (x_s, F_j) into executor rows over (register, history), tracking samples.

    Samples are vectors over the basis (x_T, D_0, ..., D_{n-1}) (D = the plan-space history);
    only steps in the other space than the plan's need them, to rebuild eps_j from x0_j.
    """

    def __init__(self, grid: TimeGrid, space: str):
        self.grid, self.space = grid, space
        n = grid.n
        self.alpha = grid.alpha.tolist()
        self.sigma = grid.sigma.tolist()
        basis = np.zeros(1 + n)
        basis[0] = 1.0
        self.evaluated = [basis] + [None] * n  # the sample the model saw at each point
        self.current = [basis] + [None] * n  # the sample after that point's correction
        self.corrected = [False] * (n + 1)

    def row(self, s: int, a: float, coefs: dict[int, float], step_space: str) -> tuple[float, dict[int, float]]:
        """(register coefficient, {point: history coefficient}); the register holds the sample at s."""
        x_coef, hist, samples = a, {}, {}
        for j, c in coefs.items():
            if step_space == self.space:
                hist[j] = hist.get(j, 0.0) + c
            else:  # a noise step in a data-space plan: eps_j = (x_j - alpha_j x0_j) / sigma_j
                hist[j] = hist.get(j, 0.0) - c * self.alpha[j] / self.sigma[j]
                samples[j] = samples.get(j, 0.0) + c / self.sigma[j]
        reg = self.current[s]
        for j, c in samples.items():
            if j == s and not self.corrected[s]:
                x_coef += c  # the model saw the register itself
                continue
            v = c * self.evaluated[j]
            k = v[0] / reg[0]  # x_T = (register - sum reg_D D) / reg_T
            x_coef += k
            for p in range(len(v) - 1):
                delta = v[1 + p] - k * reg[1 + p]
                if delta != 0.0:
                    hist[p] = hist.get(p, 0.0) + delta
        return x_coef, hist

    def vector(self, s: int, x_coef: float, hist: dict[int, float]) -> np.ndarray:
        v = x_coef * self.current[s]
        for j, c in hist.items():
            v[1 + j] += c
        return v

    def advance(self, s: int, predicted: np.ndarray, corrected: np.ndarray | None) -> None:
        self.evaluated[s + 1] = predicted
        self.current[s + 1] = predicted if corrected is None else corrected
        self.corrected[s + 1] = corrected is not None


@register_solver
class USFSolver(Solver):
    """USF per-step solver schedules (Liu et al., ICLR 2024, arXiv:2312.07243)."""

    name = "usf"
    paper = ("Liu et al. A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models. "
             "ICLR 2024")
    summary = ("runs a per-step solver schedule: timesteps, data/noise prediction, Taylor order 1-4, "
               "derivative estimation, pseudo corrector, analytical first step (fewstep search usf finds one)")
    runs_step_strategies = True
    options = {}

    def _check_config(self) -> None:
        sched = self.config["solver_schedule"]
        if sched is None:
            raise ValueError("solver 'usf' needs solver_schedule= (a solver schedule file, its record, or a "
                             "SolverSchedule with per-step strategies; `fewstep search usf` writes one)")
        if not sched.has_strategies:
            raise ValueError("solver 'usf' needs per-step strategies, but this solver schedule holds only timesteps; "
                             f"run it with the solver it was tuned for ({sched.meta.solver or 'any solver'})")

    @property
    def schedule(self) -> SolverSchedule:
        return self.config["solver_schedule"]

    def strategies(self, grid: TimeGrid) -> list[StepStrategy]:
        """The strategies of ``grid``'s steps; a run cut part-way (img2img) restarts the warm-up."""
        sched = self.schedule
        start, n = grid.start, grid.n
        if start + n != sched.num_steps:
            raise ValueError(f"usf runs its solver schedule's own grid ({sched.num_steps} steps), got a grid of "
                             f"{start + n}; build it through fewstep.make_plan / the scheduler")
        expected = torch.tensor(sched.timesteps[start:], dtype=torch.float64)
        if not torch.allclose(grid.model_timesteps, expected, rtol=1e-9, atol=1e-9):
            raise ValueError("the grid's timesteps are not the solver schedule's")
        if (float(grid.sigma[-1]) == 0.0) != (sched.final_sigma == "zero"):
            raise ValueError(f"the grid's terminal point is not the solver schedule's (final_sigma={sched.final_sigma!r})")
        lam = grid.lambda_.tolist()
        out = []
        for i in range(n):
            st = sched.steps[start + i]
            if st.order > i + 1:  # only after a cut: the schedule itself was validated
                st = st.replace(order=i + 1, **_relaxations_of_order(sched.steps, i + 1))
            h = lam[i + 1] - lam[i]
            reach = [i - k for k in range(1, st.order)] + ([i + 1] if st.corrector == "pseudo" else [])
            if st.order > 1 and math.isinf(h):
                raise ValueError(f"step {start + i}: order {st.order} on a step of infinite log-SNR length; use order 1")
            if st.corrector == "pseudo" and math.isinf(h):
                raise ValueError(f"step {start + i}: cannot correct a step that starts at alpha = 0 (log-SNR -inf)")
            bad = [j for j in reach if not math.isfinite(lam[j])]
            if bad:
                raise ValueError(f"step {start + i}: its stencil reaches grid point {start + bad[0]}, where log-SNR "
                                 "is infinite (pure noise); use a lower order there")
            out.append(st)
        return out

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        sched = self.schedule
        sched.check(schedule=grid.schedule, solver=self.name)
        strategies = self.strategies(grid)
        n = grid.n
        lam = grid.lambda_.tolist()
        space = "noise" if all(st.space == "noise" for st in strategies) else "data"
        low = _Lowering(grid, space)
        predict_rows: list[tuple[float, dict[int, float]]] = []
        correct_rows: list[tuple[float, dict[int, float]] | None] = [None] * n
        corrector_orders = [0] * n
        for s, st in enumerate(strategies):
            past = list(range(s - 1, s - st.order, -1))
            a, coefs = _update(grid, lam, s, st.order, st.space, past[: st.points], past, st.relaxation)
            row = low.row(s, a, coefs, st.space)
            predict_rows.append(row)
            predicted, corrected = low.vector(s, *row), None
            if st.corrector == "pseudo":
                low.evaluated[s + 1] = predicted  # the corrector reads the output at the predicted sample
                p = st.order + 1
                a, coefs = _update(grid, lam, s, p, st.space, [s + 1, *past[: st.points]], [s + 1, *past],
                                   st.corrector_relaxation)
                correct_rows[s + 1] = low.row(s, a, coefs, st.space)
                corrected = low.vector(s, *correct_rows[s + 1])
                corrector_orders[s + 1] = p
            low.advance(s, predicted, corrected)

        depth = [s - j for s, (_, hist) in enumerate(predict_rows) for j in hist]
        depth += [s - j for s, r in enumerate(correct_rows) if r is not None for j in r[1]]
        history = max(depth, default=0) + 1
        tables = empty_tables(grid, history, prediction)
        if sched.analytic_first_step and grid.start == 0:
            tables["x0_coef"][0] = 0.0  # x0 = 0 (eps = x / sigma): the model is not evaluated
        for s, (x_coef, hist) in enumerate(predict_rows):
            tables["predict"][s, 0] = x_coef
            for j, c in hist.items():
                tables["predict"][s, 1 + s - j] += c
        for s, r in enumerate(correct_rows):
            if r is not None:
                tables["correct"][s, 0] = r[0]
                for j, c in r[1].items():
                    tables["correct"][s, 1 + s - j] += c
        return SolverPlan(grid, space, history, tables["x0_coef"], tables["predict"], correct=tables["correct"],
                          orders=[st.order for st in strategies],
                          info={"spaces": [st.space for st in strategies], "corrector_orders": corrector_orders})


def _relaxations_of_order(steps: list[StepStrategy], order: int) -> dict[str, float | str]:
    """The relaxations the schedule's own warm-up uses at ``order`` (empty if it has no such step).

    A relaxation belongs to the order it was chosen for (UniPC's B(h) only at order 2), so a
    step whose order a cut lowers takes the one the uncut run uses at that order.
    """
    for st in steps:
        if st.order == order:
            return {"relaxation": st.relaxation, "corrector_relaxation": st.corrector_relaxation}
    return {}


def spell_out(solver: "str | Solver", grid: TimeGrid, **options: Any) -> list[StepStrategy]:
    """The per-step strategies with which ``usf`` reproduces ``solver`` on ``grid``.

    Supported: ``ddim``; ``dpmpp`` up to order 2 (midpoint = relaxation ``bh2``) and order 3
    with ``third_order="taylor"``; ``unipc`` (any order, bh1/bh2, data/noise, its corrector
    settings). DPM-Solver++(3M) as published halves its second-derivative term, which no
    Taylor update expresses.

    Raises:
        ValueError: for solvers or options outside that list.
    """
    solver = get_solver(solver, **options)
    cfg, n = solver.config, grid.n
    if solver.name == "ddim":
        return [StepStrategy() for _ in range(n)]
    if solver.name == "dpmpp":
        orders = dpmpp_orders(grid, cfg["order"], cfg["lower_order_final"], cfg["euler_at_final"])
        if max(orders) == 3 and cfg["third_order"] != "taylor":
            raise ValueError("dpmpp order 3 with third_order='reference' halves the second-derivative term; "
                             "only third_order='taylor' is a Taylor update usf can run")
        relax = "bh2" if cfg["variant"] == "midpoint" else 0.0
        return [StepStrategy(cfg["space"], p, relaxation=relax if p == 2 else 0.0) for p in orders]
    if solver.name == "unipc":
        orders = unipc_orders(grid, cfg["order"], cfg["lower_order_final"])
        disabled = {k - grid.start for k in cfg["disable_corrector"]}
        lam = grid.lambda_.tolist()
        out = []
        for s, p in enumerate(orders):
            correct = (cfg["corrector"] and s < n - 1 and s not in disabled
                       and not (math.isinf(lam[s + 1] - lam[s]) and cfg["variant"] == "bh1"))
            out.append(StepStrategy(cfg["space"], p, relaxation=cfg["variant"] if p == 2 else 0.0,
                                    corrector="pseudo" if correct else "none",
                                    corrector_relaxation=cfg["variant"] if p == 1 else 0.0))
        return out
    raise ValueError(f"usf cannot spell out solver {solver.name!r}; supported: ddim, dpmpp, unipc")
