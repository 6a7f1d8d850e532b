"""DPM-Solver++ (multistep) and its noise-space sibling multistep DPM-Solver."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from .base import SPACE_OPTION, Option, Solver, StepGeometry, ei_coefficients, empty_tables, usable_order


def dpmpp_orders(
    grid: TimeGrid, order: int, lower_order_final: bool, euler_at_final: bool
) -> list[int]:
    """Per-step orders with diffusers' DPMSolverMultistepScheduler warm-up and final-step rules."""
    n = grid.n
    to_zero = float(grid.sigma[n]) == 0.0
    # diffusers lowers the last two orders only for short runs (< 15 steps), counted over the
    # whole schedule even when img2img starts part-way; a step into sigma = 0 is always
    # first order because lambda = +inf there.
    short = grid.start + n < 15
    orders = []
    for i in range(n):
        last = i == n - 1 and (euler_at_final or (lower_order_final and short) or to_zero)
        second_last = i == n - 2 and lower_order_final and short
        if order == 1 or i < 1 or last:
            p = 1
        elif order == 2 or i < 2 or second_last:
            p = 2
        else:
            p = 3
        orders.append(usable_order(grid, i, p))
    return orders


def dpmpp_row(grid: TimeGrid, i: int, order: int, space: str, variant: str, third_order: str = "reference"
              ) -> np.ndarray:
    """Coefficients over (x, m0, m1, m2) of one multistep DPM-Solver(++) step (Lu et al. 2022, Alg. 2)."""
    g = StepGeometry.of(grid, i)
    a, c0 = ei_coefficients(g, space)
    row = np.zeros(4)
    row[0], row[1] = a, c0
    if order == 1:
        return row
    h = g.h
    lam = grid.lambda_
    r0 = float(lam[i] - lam[i - 1]) / h
    d1_0 = np.array([1 / r0, -1 / r0, 0.0])
    if order == 2:
        d1, d2 = d1_0, np.zeros(3)
    else:
        r1 = float(lam[i - 1] - lam[i - 2]) / h
        d1_1 = np.array([0.0, 1 / r1, -1 / r1])
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        # d2 ~ h^2 x0''/2, but the phi_3 term needs h^2 x0'': the reference code (and diffusers,
        # k-diffusion) use half of it, which makes 3M second order; "taylor" restores the factor.
        d2 = (d1_0 - d1_1) / (r0 + r1) * (2.0 if third_order == "taylor" else 1.0)
    if space == "data":
        em1 = math.expm1(-h)
        phi2 = g.alpha_t * (em1 / h + 1.0)
        phi3 = g.alpha_t * ((em1 + h) / h**2 - 0.5)
        if order == 2 and variant == "midpoint":
            row[1:] += 0.5 * c0 * d1
        else:
            row[1:] += phi2 * d1 - phi3 * d2
    else:
        em1 = math.expm1(h)
        phi2 = g.sigma_t * (em1 / h - 1.0)
        phi3 = g.sigma_t * ((em1 - h) / h**2 - 0.5)
        if order == 2 and variant == "midpoint":
            row[1:] += 0.5 * c0 * d1
        else:
            row[1:] -= phi2 * d1 + phi3 * d2
    return row


@register_solver
class DPMSolverPP(Solver):
    """Multistep DPM-Solver++ (Lu et al., 2022, arXiv:2211.01095); ``space="noise"`` gives multistep DPM-Solver."""

    name = "dpmpp"
    diffusers_convention = "dpmsolver"
    paper = "Lu et al. DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models. 2022"
    summary = "multistep exponential integrator on x0 (or eps), orders 1-3; diffusers' DPMSolverMultistepScheduler"
    options = {
        "order": Option(2, "multistep order", bounds=(1, 3), kind="int"),
        "variant": Option("midpoint", "second-order update: 'midpoint' or 'heun'", choices=("midpoint", "heun")),
        "space": SPACE_OPTION,
        "lower_order_final": Option(True, "lower the last orders for runs under 15 steps", kind="bool"),
        "euler_at_final": Option(False, "first-order last step", kind="bool"),
        "third_order": Option(
            "reference", "order-3 update: 'reference' (DPM-Solver/diffusers; converges at order 2) or "
            "'taylor' (full second-difference term; order 3)", choices=("reference", "taylor")),
    }

    @property
    def history_size(self) -> int:
        return self.config["order"]

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        cfg = self.config
        orders = dpmpp_orders(grid, cfg["order"], cfg["lower_order_final"], cfg["euler_at_final"])
        h = self.history_size
        tables = empty_tables(grid, h, prediction)
        predict = tables["predict"]
        for i, p in enumerate(orders):
            row = dpmpp_row(grid, i, p, cfg["space"], cfg["variant"], cfg["third_order"])
            predict[i] = torch.from_numpy(row[: 1 + h])
        return SolverPlan(grid, cfg["space"], h, tables["x0_coef"], predict, orders=orders)
