"""DC-Solver: dynamic compensation of the newest model output (UniPC, and DPM-Solver++ as a plug-in).

At step i, after the corrector and before the predictor, the newest converted output D_i is
replaced by the Lagrange interpolation of the last ``dc_order + 1`` outputs at

    t' = t_{i-1} + rho_i (t_i - t_{i-1})

and the compensated value stays in the history (the next corrector and compensation read
it), as in the official code (wl-zhao/DC-Solver). The time variable is the model timestep;
Lagrange weights and t' are invariant under affine maps of time, so the schedule time gives
the same weights. rho_i = 1 reproduces the base solver exactly (the weights are then exactly
(1, 0, ..., 0) and the executor skips the stage). The weights are torch functions of the
ratios, so a plan built from a ratio tensor that requires grad is differentiable end to end
(what :func:`fewstep.calibrate_dc` relies on).

The compensation is one mixin, :class:`DynamicCompensation`, on top of an existing plan
builder: ``dc`` is UniPC with it (the paper's DC-Solver), ``dc_dpmpp`` is multistep
DPM-Solver++ with it (the paper's plug-and-play use on a predictor-only solver; DDIM is
``dc_dpmpp`` with ``order=1``). Ratios are tied to the solver they were calibrated with, so
each combination has its own name and an artifact made for one is refused by the other.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..artifacts import ArtifactError
from ..dc_artifacts import DEFAULT_DC_ORDER, MAX_DC_ORDER, DCCPR, DCRatios, load_dc_file
from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from fewstep.infra.validation import check_guidance
from .base import Option
from .dpmpp import DPMSolverPP
from .unipc import UniPCSolver

__all__ = ["DynamicCompensation", "DCSolver", "DCDPMSolverPP", "lagrange_weights", "compensation_table",
           "DC_PAPER"]

DC_PAPER = ("Zhao, Wang, Zhou & Lu. DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic "
            "Compensation. ECCV 2024")


def lagrange_weights(nodes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Weights w with sum_j w_j f(nodes_j) = p(at), p the polynomial through the nodes.

    Torch ops only, so the weights are differentiable in ``at``; when ``at`` equals a node
    the weights are exactly one-hot (each factor is x / x or 0 / x).
    """
    ws = []
    for j in range(nodes.numel()):
        w = torch.ones((), dtype=torch.float64)
        for k in range(nodes.numel()):
            if k != j:
                w = w * ((at - nodes[k]) / (nodes[j] - nodes[k]))
        ws.append(w)
    return torch.stack(ws)


def compensation_table(grid: TimeGrid, ratios: torch.Tensor, dc_order: int, history: int) -> torch.Tensor:
    """The plan's ``compensate`` table [n, history] for per-step ratios over the whole run.

    Args:
        grid: The grid (``grid.start`` > 0 for a run that starts part-way, e.g. img2img).
        ratios: float64 [grid.start + grid.n], indexed by absolute step; may require grad.
        dc_order: Interpolation order (``dc_order + 1`` points).
        history: Width of the plan's history (>= dc_order + 1).

    Raises:
        ValueError: a ratio other than 1 at a step whose stencil has repeated timesteps.
    """
    t = grid.t
    eye = torch.zeros(history, dtype=torch.float64)
    eye[0] = 1.0
    rows = []
    for i in range(grid.n):
        rho = ratios[grid.start + i]
        if i < dc_order or (not rho.requires_grad and float(rho) == 1.0):
            rows.append(eye)  # too few outputs yet (a run restarts its warm-up), or no compensation
            continue
        stencil = t[i - dc_order: i + 1].flip(0)  # t_i, t_{i-1}, ..., t_{i-dc_order}
        if len(set(stencil.tolist())) < stencil.numel():
            raise ValueError(f"DC compensation at step {grid.start + i} needs distinct timesteps, got "
                             f"{stencil.tolist()}; use ratio 1 there")
        # Nodes in units of the last step: t_i -> 1, t_{i-1} -> 0 exactly, so rho = 1 is exact.
        nodes = (stencil - t[i - 1]) / (t[i] - t[i - 1])
        nodes[0], nodes[1] = 1.0, 0.0
        w = lagrange_weights(nodes, rho)
        rows.append(torch.cat([w, torch.zeros(history - w.numel(), dtype=torch.float64)]))
    return torch.stack(rows)


_DC_OPTIONS = {
    "ratios": Option(None, "compensation ratio rho_i per step (a list, a dc_ratios file or artifact); 1 = none",
                     kind="artifact", artifact=DCRatios),
    "cpr": Option(None, "cascade-polynomial-regression coefficients (a dc_cpr file or artifact): ratios for any "
                        "NFE and guidance", kind="artifact", artifact=DCCPR),
    "guidance": Option(None, "CFG scale the cpr ratios are evaluated at (fewstep.sample passes its own)"),
    "dc_file": Option(None, "a dc_ratios or dc_cpr file, loaded into ratios or cpr"),
    "dc_order": Option(DEFAULT_DC_ORDER, "Lagrange interpolation order (dc_order + 1 outputs)",
                       bounds=(1, MAX_DC_ORDER), kind="int"),
}


class DynamicCompensation:
    """Mixin adding DC-Solver's compensation stage to a plan-building solver (see the module docstring)."""

    config: dict[str, Any]
    name: str
    requires_tuning = True  # without ratios it is its base solver

    def _check_config(self) -> None:
        super()._check_config()
        cfg = self.config
        if cfg["dc_file"] is not None:
            if not isinstance(cfg["dc_file"], (str, os.PathLike)):
                raise TypeError(f"option dc_file={cfg['dc_file']!r} of solver {self.name!r} must be a path")
            loaded = load_dc_file(cfg["dc_file"])
            key = "ratios" if isinstance(loaded, DCRatios) else "cpr"
            if cfg[key] is not None:
                raise ValueError(f"solver {self.name!r} got both {key} and dc_file (which holds {key}); pass one")
            cfg[key], cfg["dc_file"] = loaded, None
        if cfg["ratios"] is not None and cfg["cpr"] is not None:
            raise ValueError(f"solver {self.name!r} takes ratios or cpr, not both")
        if cfg["guidance"] is not None:
            cfg["guidance"] = check_guidance(cfg["guidance"])
        ratios = cfg["ratios"]
        if ratios is not None and ratios.meta.solver is None and ratios.dc_order != cfg["dc_order"]:
            try:  # a bare list takes the solver's dc_order
                cfg["ratios"] = DCRatios(ratios.ratios, cfg["dc_order"], ratios.meta)
            except ValueError as exc:
                raise ValueError(f"option ratios of solver {self.name!r}: {exc}") from None
        artifact = cfg["ratios"] or cfg["cpr"]
        if artifact is not None and artifact.dc_order != cfg["dc_order"]:
            raise ValueError(f"the {artifact.kind} were made with dc_order={artifact.dc_order}, but solver "
                             f"{self.name!r} has dc_order={cfg['dc_order']}; pass dc_order={artifact.dc_order}")

    def ratio_tensor(self, grid: TimeGrid) -> torch.Tensor:
        """float64 ratios of every step of the whole run (``grid.start + grid.n``), checked against the grid."""
        cfg = self.config
        total = grid.start + grid.n
        ratios, cpr, guidance = cfg["ratios"], cfg["cpr"], cfg["guidance"]
        if ratios is not None:
            ratios.check(nfe=total, schedule=grid.schedule, solver=self.name)
            made_for = ratios.meta.guidance
            if made_for is not None and guidance is not None and made_for != guidance:
                raise ArtifactError(f"dc_ratios were calibrated for guidance {made_for:g}, this run uses {guidance:g}; "
                                    "calibrate for it, or use cpr")
            values = ratios.ratios
            if len(values) != total:
                raise ArtifactError(f"dc_ratios has {len(values)} ratios, but this grid has {total} steps")
        elif cpr is not None:
            if guidance is None:  # checked here, not in the options: fewstep.sample passes its guidance late
                raise ValueError(f"solver {self.name!r} with cpr needs guidance=<CFG scale>: the ratios depend on it "
                                 "(fewstep.sample passes its guidance; a scheduler needs it in from_config)")
            cpr.check(schedule=grid.schedule, solver=self.name)
            values = cpr.ratios(total, guidance)
        else:
            values = [1.0] * total
        return torch.tensor(values, dtype=torch.float64)

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        return self.compensated(super().plan(grid, prediction), self.ratio_tensor(grid))

    def compensated(self, plan: SolverPlan, ratios: torch.Tensor) -> SolverPlan:
        """``plan`` (built by the base solver) with the compensation stage for ``ratios``.

        Args:
            plan: The base solver's plan (no compensation).
            ratios: float64 [plan.grid.start + plan.n]; may require grad (calibration).
        """
        hist = max(plan.history, self.config["dc_order"] + 1)
        widen = lambda t: None if t is None else torch.cat(  # noqa: E731
            [t, t.new_zeros(t.shape[0], 1 + hist - t.shape[1], *t.shape[2:])], 1)
        table = compensation_table(plan.grid, ratios, self.config["dc_order"], hist)
        return dataclasses.replace(plan, history=hist, predict=widen(plan.predict), correct=widen(plan.correct),
                                   compensate=table, info={**plan.info, "dc_ratios": ratios.detach().tolist()})


@register_solver
class DCSolver(DynamicCompensation, UniPCSolver):
    """DC-Solver: UniPC with dynamic compensation (Zhao et al., ECCV 2024)."""

    name = "dc"
    paper = DC_PAPER
    summary = "UniPC + dynamic compensation: the newest output is interpolated at t_{i-1} + rho_i (t_i - t_{i-1})"
    options = {**UniPCSolver.options, **_DC_OPTIONS}


@register_solver
class DCDPMSolverPP(DynamicCompensation, DPMSolverPP):
    """DPM-Solver++ with DC-Solver's plug-and-play dynamic compensation (Zhao et al., ECCV 2024)."""

    name = "dc_dpmpp"
    paper = DC_PAPER
    summary = "multistep DPM-Solver++ + dynamic compensation (order=1: DDIM with compensation)"
    options = {**DPMSolverPP.options, **_DC_OPTIONS}
