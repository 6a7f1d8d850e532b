"""DDIM: the first-order exponential integrator every other solver starts from."""

from __future__ import annotations

import torch

from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from .base import Solver, StepGeometry, ei_coefficients, empty_tables


@register_solver
class DDIMSolver(Solver):
    """DDIM, deterministic (eta = 0) (Song et al., ICLR 2021)."""

    name = "ddim"
    paper = "Song, Meng & Ermon. Denoising Diffusion Implicit Models. ICLR 2021"
    summary = "first-order deterministic sampler: x_t = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) x0"
    options = {}
    diffusers_convention = "ddim"

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        tables = empty_tables(grid, 1, prediction)
        predict = tables["predict"]
        for i in range(grid.n):
            predict[i] = torch.tensor(ei_coefficients(StepGeometry.of(grid, i), "data"), dtype=torch.float64)
        return SolverPlan(grid, "data", 1, tables["x0_coef"], predict, orders=[1] * grid.n)
