"""DDIM: the first-order exponential integrator every other solver starts from."""

from __future__ import annotations

import torch

from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from .base import Solver, StepGeometry, empty_tables


@register_solver
class DDIMSolver(Solver):
    """DDIM, deterministic (eta = 0) (Song et al., ICLR 2021)."""

    name = "ddim"
    paper = "Song, Meng & Ermon. Denoising Diffusion Implicit Models. ICLR 2021"
    summary = "first-order deterministic sampler: x_t = alpha_t x0 + sigma_t eps (= Euler on flow models)"
    options = {}
    diffusers_convention = "ddim"

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        # x_t = alpha_t x0 + sigma_t eps, with eps taken from the raw output rather than from
        # the (possibly clipped/thresholded) x0, exactly as DDIMScheduler does. Writing
        # eps = (x - alpha_s x0_raw) / sigma_s and x0_raw = c_x x + c_out out makes it
        # x_t = alpha_t D + (sigma_t/sigma_s)(1 - alpha_s c_x) x - (sigma_t/sigma_s) alpha_s c_out out,
        # which without thresholding equals (sigma_t/sigma_s) x - alpha_t expm1(-h) x0.
        tables = empty_tables(grid, 1, prediction)
        predict, x0 = tables["predict"], tables["x0_coef"]
        raw = torch.zeros(grid.n, dtype=torch.float64)
        for i in range(grid.n):
            g = StepGeometry.of(grid, i)
            ratio = g.sigma_t / g.sigma_s
            cx, co = float(x0[i, 0]), float(x0[i, 1])
            predict[i, 0] = ratio * (1 - g.alpha_s * cx)
            predict[i, 1] = g.alpha_t
            raw[i] = -ratio * g.alpha_s * co
        return SolverPlan(grid, "data", 1, x0, predict, predict_raw=raw, orders=[1] * grid.n)
