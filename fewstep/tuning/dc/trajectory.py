"""DC-Solver's official calibration objective: one ratio per step, greedily, against the trajectory.

Zhao et al. (ECCV 2024; wl-zhao/DC-Solver ``search_dc``): for each step i >= dc_order in turn,
with the earlier ratios fixed, rho_i is fitted by AdamW (lr 0.1, weight decay 0.01, 40
iterations, the last iterate kept) on the MSE between the sample at the next grid point,
after the predictor and the corrector (which reuses the new model output), and the
ground-truth trajectory there. The ground truth is DDIM with ``reference_nfe`` steps in all,
subdividing each interval of the sampling grid evenly in time, so it passes through every
grid point. Each iteration costs one model call forward and backward (the model outputs up
to step i do not depend on rho_i and are replayed); the joint ``"final"`` objective
(:mod:`fewstep.tuning.dc.calibrate`) backpropagates through the whole run instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from fewstep.samplers.plan import SolverPlan
from fewstep.samplers.registry import get_solver
from fewstep.samplers.sampling import sample
from fewstep.samplers.timesteps import TimeGrid

__all__ = ["trajectory_grid", "ground_truth_trajectory", "fit_trajectory", "WEIGHT_DECAY"]

WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, as the official search uses


_ADAM = (0.9, 0.999, 1e-8)  # Adam betas and eps of both calibration objectives


def adam_step(state: dict[str, Any], params: torch.Tensor, grad: torch.Tensor, lr: float,
              bounds: tuple[float, float] | None, weight_decay: float = 0.0) -> None:
    """One float64 Adam(W) update of ``state``, projected into ``bounds``. The joint objective
    uses no weight decay (decay towards rho = 0 means nothing here); the trajectory objective
    keeps the official AdamW's decoupled 0.01."""
    b1, b2, eps = _ADAM
    k = state["iteration"] + 1
    m = b1 * torch.tensor(state["m"], dtype=torch.float64) + (1 - b1) * grad
    v = b2 * torch.tensor(state["v"], dtype=torch.float64) + (1 - b2) * grad.square()
    step = lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    params = params * (1 - lr * weight_decay) if weight_decay else params
    new = params - step if bounds is None else (params - step).clamp(*bounds)
    state.update(iteration=k, params=new.tolist(), m=m.tolist(), v=v.tolist())


class _Stop(Exception):
    """Ends a run early, carrying the sample the model was about to be called on."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def trajectory_grid(grid: TimeGrid, total_steps: int) -> tuple[TimeGrid, list[int]]:
    """A fine grid through every point of ``grid`` (about ``total_steps`` steps, evenly in time
    within each interval) and the fine index of each coarse point."""
    sub = max(1, math.ceil(total_steps / grid.n))
    pieces, marks = [], [0]
    for k in range(grid.n):
        a, b = float(grid.t[k]), float(grid.t[k + 1])
        m = sub if b != a else 1  # a terminal point on the last evaluated time: one (identity) step
        pieces.append(torch.linspace(a, b, m + 1, dtype=torch.float64)[:-1])
        marks.append(marks[-1] + m)
    t = torch.cat([*pieces, grid.t[-1:]])
    alpha, sigma = grid.schedule.alpha_sigma(t)
    alpha, sigma = alpha.clone(), sigma.clone()
    alpha[-1], sigma[-1] = grid.alpha[-1], grid.sigma[-1]  # the coarse terminal point (clean data or t_min)
    fine = TimeGrid(schedule=grid.schedule, t=t, alpha=alpha, sigma=sigma, lambda_=torch.log(alpha) - torch.log(sigma),
                    model_timesteps=grid.schedule.model_time(t[:-1]))
    return fine, marks


def ground_truth_trajectory(model: Callable[..., torch.Tensor], x_T: torch.Tensor, grid: TimeGrid, prediction: str,
                            total_steps: int, **run: Any) -> list[torch.Tensor]:
    """DDIM states at every point of ``grid`` (``grid.n + 1`` tensors, the first is ``x_T``)."""
    fine, marks = trajectory_grid(grid, total_steps)
    plan = get_solver("ddim").plan(fine, prediction)
    states: dict[int, torch.Tensor] = {0: x_T}
    with torch.no_grad():
        sample(model, x_T, plan=plan, callback=lambda info: states.__setitem__(info.i + 1, info.x.clone()),
               **run)
    return [states[m].detach() for m in marks]


def _stop_after_correction(plan: SolverPlan, i: int) -> SolverPlan:
    """``plan`` whose step ``i`` predicts nothing: its output is the corrected sample at point i."""
    predict = plan.predict.clone()
    predict[i] = 0
    predict[i, 0] = 1
    zero_row = lambda t: None if t is None else torch.cat([t[:i], torch.zeros_like(t[i:i + 1]), t[i + 1:]])  # noqa: E731
    return dataclasses.replace(plan, predict=predict, predict_bias=zero_row(plan.predict_bias),
                               predict_raw=zero_row(plan.predict_raw))


def _has_corrector(plan: SolverPlan, i: int) -> bool:
    return plan.correct is not None and bool((plan.correct[i] != 0).any())


def fit_trajectory(compensated: Callable[[torch.Tensor], SolverPlan], base: SolverPlan, dc_order: int,
                   model: Callable[..., torch.Tensor], x_T: torch.Tensor, gt: list[torch.Tensor],
                   run: dict[str, Any], chunks: list[slice], iterations: int, lr: float,
                   bounds: tuple[float, float] | None, done: list[float],
                   on_step: Callable[[list[float]], None], bar: Any) -> list[float]:
    """Greedy per-step ratios (all ``base.n``, the first ``dc_order`` equal to 1).

    Args:
        compensated: ratios (float64, may require grad) -> the compensated plan.
        base: The uncompensated plan (its grid and corrector rows).
        dc_order: Steps without compensation at the start.
        model: The differentiable model.
        x_T, gt: Noise and the ground-truth states at every grid point (``base.n + 1``).
        run: ``guidance``, ``cond``, ``uncond`` as for :func:`sample` (cond/uncond per sample).
        chunks: Sample slices run one at a time (gradients accumulated).
        iterations, lr, bounds: AdamW iterations and rate per step; ratio range or None.
        done: Ratios of the steps already fitted (a resumed run), at least the first dc_order.
        on_step: Called with the ratios so far after every fitted step (checkpointing).
        bar: A progress bar updated once per iteration.
    """

    n = base.n
    ratios = list(done) if done else [1.0] * dc_order
    numel = x_T.shape[0] * x_T[0].numel()
    for i in range(len(ratios), n):
        fixed = torch.tensor(ratios, dtype=torch.float64)
        ones = torch.ones(n - i - 1, dtype=torch.float64)
        prefix_plan = compensated(torch.cat([fixed, torch.ones(n - i, dtype=torch.float64)]))
        correct_next = i + 1 < n and _has_corrector(base, i + 1)
        outputs = [_replay_outputs(model, x_T[c], prefix_plan, i, _rows(run, c)) for c in chunks]

        def loss_and_grad(p: torch.Tensor) -> tuple[float, torch.Tensor]:
            p = p.detach().requires_grad_(True)
            total = 0.0
            for c, outs in zip(chunks, outputs):
                # One plan per chunk: a backward pass frees the graph from the ratio to the coefficients.
                try:
                    plan = compensated(torch.cat([fixed, p, ones]))
                except FloatingPointError:  # a ratio so large that the coefficients overflow: diverged
                    return math.inf, torch.zeros_like(p)
                if correct_next:
                    plan = _stop_after_correction(plan, i + 1)
                x = _run_to(model, x_T[c], plan, i, outs, correct_next, _rows(run, c))
                loss = (x.double() - gt[i + 1][c].double()).pow(2).sum() / numel
                loss.backward()
                total += float(loss.detach())
            return total, p.grad

        state = {"iteration": 0, "params": [1.0], "m": [0.0], "v": [0.0]}
        usable = 1.0  # the last ratio with a finite loss (a diverging learning rate must not leave a broken one)
        for _ in range(iterations):
            params = torch.tensor(state["params"], dtype=torch.float64)
            loss, g = loss_and_grad(params)
            if math.isfinite(loss):
                usable = float(params[0])
            adam_step(state, params, g, lr, bounds, weight_decay=WEIGHT_DECAY)
            bar.update()
            bar.set_postfix(step=i, loss=f"{loss:.3e}")
        last = float(state["params"][0])  # the official search keeps the last iterate ...
        if iterations and not math.isfinite(loss_and_grad(torch.tensor([last], dtype=torch.float64))[0]):
            last = usable  # ... unless it diverged
        ratios.append(last)
        on_step(list(ratios))
    return ratios


def _rows(run: dict[str, Any], c: slice) -> dict[str, Any]:
    return {k: (v[c] if k in ("cond", "uncond") and v is not None else v) for k, v in run.items()}


def _replay_outputs(model: Callable[..., torch.Tensor], x_T: torch.Tensor, plan: SolverPlan, i: int,
                    run: dict[str, Any]) -> list[torch.Tensor]:
    """The raw model outputs of steps 0..i (they do not depend on rho_i or later ratios)."""
    outs: list[torch.Tensor] = []

    def recording(x: torch.Tensor, *args: Any) -> torch.Tensor:
        if len(outs) > i:
            raise _Stop(x)
        outs.append(model(x, *args).detach())
        return outs[-1]

    with torch.no_grad():
        try:
            sample(recording, x_T, plan=plan, check_finite=False, **run)
        except _Stop:
            pass
    return outs


def _run_to(model: Callable[..., torch.Tensor], x_T: torch.Tensor, plan: SolverPlan, i: int,
            outs: list[torch.Tensor], correct_next: bool, run: dict[str, Any]) -> torch.Tensor:
    """The (corrected) sample at point i + 1: steps 0..i replay ``outs``; with ``correct_next``
    the model is called at i + 1 and ``plan``'s step i + 1 only corrects."""
    calls = [0]
    half = x_T.shape[0]

    def replay(x: torch.Tensor, *args: Any) -> torch.Tensor:
        k = calls[0]
        calls[0] += 1
        if k <= i:
            return outs[k]
        if k == i + 1 and correct_next:
            return model(x, *args)
        raise _Stop(x[:half])  # with guidance the model sees (x, x)

    try:
        return sample(replay, x_T, plan=plan, check_finite=False, **run)
    except _Stop as stop:
        return stop.x
