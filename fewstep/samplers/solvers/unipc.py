"""UniPC: unified predictor (UniP-p) and corrector (UniC-p) with B(h) = h or expm1(h)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from .base import SPACE_OPTION, Option, Solver, StepGeometry, ei_coefficients, empty_tables, usable_order


# Below this alpha at the grid's first point, the noise-space UniC correction of the first step
# is dominated by round-off-free but huge 1/alpha terms: max errors of 1e2-6e5 against the exact
# ODE solution at NFE 2-16 on flow (alpha = 1e-6) and zero-SNR (2.4e-4) grids, against 0.1-1 for
# the data-space corrector or no corrector (tests/test_hardening.py measures it).
NOISE_CORRECTOR_MIN_ALPHA = 1e-3


def unipc_rhos(rks: np.ndarray, hh: float, variant: str, corrector: bool) -> tuple[np.ndarray, float, float]:
    """Solve UniPC's order conditions (Zhao et al. 2023, Alg. 2 / eq. 10).

    Args:
        rks: Relative log-SNR offsets (r_1, ..., r_{p-1}, 1) of the stencil.
        hh: -h for data prediction, h for noise prediction.
        variant: ``"bh1"`` (B(h) = hh) or ``"bh2"`` (B(h) = expm1(hh)).
        corrector: UniC (uses the new output as the last point) or UniP.

    Returns:
        (rhos, h_phi_1, B_h). The order-2 predictor and order-1 corrector use the
        closed-form rho = 1/2 instead of the linear solve, as the reference code does.
    """
    p = len(rks)
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, rhs = [], []
    for k in range(1, p + 1):
        rows.append(rks ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r_mat, b_vec = np.array(rows), np.array(rhs)
    if corrector:
        rhos = np.array([0.5]) if p == 1 else np.linalg.solve(r_mat, b_vec)
    else:
        rhos = np.zeros(0) if p == 1 else np.array([0.5]) if p == 2 else np.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
    return rhos, h_phi_1, b_h


def unipc_orders(grid: TimeGrid, order: int, lower_order_final: bool) -> list[int]:
    """Per-step predictor orders: warm-up, diffusers' lower_order_final, and the exact-limit fallback."""
    n = grid.n
    orders = []
    for i in range(n):
        p = min(order, n - i) if lower_order_final else order
        orders.append(usable_order(grid, i, min(p, i + 1)))
    return orders


def unipc_row(grid: TimeGrid, s: int, order: int, space: str, variant: str, corrector: bool) -> np.ndarray:
    """One UniP (or UniC) update from point ``s`` to ``s + 1`` as coefficients over
    (x_s, m_s, m_{s-1}, ..., m_{s-order+1}[, m_{s+1}]); the last entry only for UniC."""
    g = StepGeometry.of(grid, s)
    data = space == "data"
    scale = g.alpha_t if data else g.sigma_t
    row = np.zeros(2 + order)
    row[0], row[1] = ei_coefficients(g, space)  # the first-order part, exact at sigma_t = 0 / alpha_s = 0
    if order == 1 and not corrector:
        return row[:2]
    h = g.h
    lam = grid.lambda_
    rks = np.array([float(lam[s - k] - lam[s]) / h for k in range(1, order)] + [1.0])
    rhos, _, b_h = unipc_rhos(rks, -h if data else h, variant, corrector)
    # sum_k rho_k (m_{s-k} - m_s) / r_k  (+ rho_last (m_{s+1} - m_s) for UniC)
    for k in range(1, len(rhos) + 1):
        if k < order:
            w = rhos[k - 1] / rks[k - 1]
            row[1 + k] -= scale * b_h * w
            row[1] += scale * b_h * w
    if corrector:
        row[1 + order] -= scale * b_h * rhos[-1]
        row[1] += scale * b_h * rhos[-1]
    return row if corrector else row[: 1 + order]


@register_solver
class UniPCSolver(Solver):
    """UniPC multistep predictor-corrector (Zhao et al., NeurIPS 2023)."""

    name = "unipc"
    paper = "Zhao et al. UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models. NeurIPS 2023"
    summary = "UniP-p predictor + UniC corrector reusing the new model output (no extra NFE); diffusers' UniPCMultistepScheduler"
    options = {
        "order": Option(2, "predictor order p (the corrector raises accuracy to p + 1)", bounds=(1, 3), kind="int"),
        "variant": Option("bh2", "B(h): 'bh1' = h, 'bh2' = expm1(h)", choices=("bh1", "bh2")),
        "space": SPACE_OPTION,
        "corrector": Option(True, "apply UniC after every predictor step (except the last)", kind="bool"),
        "disable_corrector": Option((), "predictor steps whose result is not corrected", kind="int_list"),
        "lower_order_final": Option(True, "order <= steps left at the end (diffusers' rule)", kind="bool"),
    }

    @property
    def history_size(self) -> int:
        # The corrector reads the new output plus the predictor's stencil.
        return self.config["order"] + 1

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        cfg = self.config
        n, hist = grid.n, self.history_size
        # disable_corrector holds absolute step indices, as in diffusers (img2img grids start part-way).
        disabled = {k - grid.start for k in cfg["disable_corrector"]}
        if (cfg["space"] == "noise" and cfg["corrector"] and n > 1 and 0 not in disabled
                and float(grid.alpha[0]) < NOISE_CORRECTOR_MIN_ALPHA):
            raise ValueError(
                f"unipc with space='noise' cannot correct a step that starts at alpha = {float(grid.alpha[0]):.2g} "
                f"(pure noise: flow matching or zero terminal SNR): the corrector's eps-space term grows like "
                f"1/alpha and the result is garbage; use space='data' (recommended), corrector=False, or "
                f"disable_corrector=[{grid.start}]"
            )
        orders = unipc_orders(grid, cfg["order"], cfg["lower_order_final"])
        tables = empty_tables(grid, hist, prediction)
        predict, correct = tables["predict"], tables["correct"]
        corrector_orders = [0] * n
        for i, p in enumerate(orders):
            row = unipc_row(grid, i, p, cfg["space"], cfg["variant"], corrector=False)
            predict[i, : row.size] = torch.from_numpy(row)
            # UniC corrects x_i (the result of step i - 1) with the output just evaluated at x_i.
            prev = i - 1
            if i == 0 or not cfg["corrector"] or prev in disabled:
                continue
            if math.isinf(float(grid.lambda_[i] - grid.lambda_[prev])) and cfg["variant"] == "bh1":
                # From alpha = 0 (flow's pure-noise start) B(h) = h is infinite; bh2's limit is
                # finite (B(h) = -1): the trapezoid rule in alpha/sigma, kept below.
                continue
            pc = orders[prev]
            c = unipc_row(grid, prev, pc, cfg["space"], cfg["variant"], corrector=True)
            # c is over (x_prev, m_prev, ..., m_{prev-pc+1}, m_i); history after the push is
            # (m_i, m_prev, m_{prev-1}, ...), so the new output moves to slot 0.
            correct[i, 0] = c[0]
            correct[i, 1] = c[-1]
            correct[i, 2 : 1 + pc + 1] = torch.from_numpy(c[1 : 1 + pc])
            corrector_orders[i] = pc
        return SolverPlan(
            grid, cfg["space"], hist, tables["x0_coef"], predict, correct=correct, orders=orders,
            info={"corrector_orders": corrector_orders},
        )
