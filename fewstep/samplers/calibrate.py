"""Offline, model-agnostic calibration of DC-Solver's compensation ratios: ``fewstep.calibrate_dc``.

The ratios of steps ``dc_order .. NFE-1`` are found by gradient descent on the MSE between
the final samples of a DC run and reference samples from the same noise (a 200-step DDIM
run by default), backpropagating through the whole sampling run, model calls included
(the plan's compensation weights are torch functions of the ratios). The official code
instead searches one ratio at a time, greedily, against the reference trajectory at the
next step (see the README); optimising the end result directly is what the evaluation
measures. Adam (lr 0.1, no weight decay) from rho = 1; the iterate with the lowest
calibration loss is returned. ``lr_schedule="cosine"`` anneals the rate to 0 and ``bounds``
projects every step into a ratio range; on the 16 digits (NFE, guidance) pairs with 10
samples the annealed, bounded optimiser did not lower the calibration loss (the annealed rate
travels half as far in the same iterations; README, "DC-Solver"), so the default stays the
constant rate, unbounded.

A ``checkpoint`` file (JSON, rewritten atomically after every iteration) makes a run
resumable: rerun the same call after a crash and it continues where it stopped, ending
with bitwise the same ratios (the optimiser is a plain float64 Adam whose state is saved
exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .artifacts import ArtifactMeta, model_fingerprint
from .dc_artifacts import DCRatios
from .registry import get_solver
from .sampling import check_guidance, make_plan, sample
from .schedules import NoiseSchedule, make_schedule
from .solvers.dc import DynamicCompensation
from .timesteps import GridSpec
from .validation import check_int, check_real

__all__ = ["calibrate_dc", "DEFAULT_ITERATIONS", "DEFAULT_LR", "DEFAULT_LR_SCHEDULE", "DEFAULT_BOUNDS",
           "DEFAULT_REFERENCE_NFE"]

DEFAULT_ITERATIONS = 40
DEFAULT_LR = 0.1
DEFAULT_LR_SCHEDULE = "constant"
DEFAULT_BOUNDS = None
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_REFERENCE_NFE = 200
_DC_KEYS = ("ratios", "cpr", "dc_file", "guidance")
_ADAM = (0.9, 0.999, 1e-8)


def calibrate_dc(
    model: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    *,
    schedule: "str | NoiseSchedule",
    nfe: int,
    prediction: str = "epsilon",
    spacing: "str | GridSpec | None" = None,
    guidance: float | None = None,
    cond: Any = None,
    uncond: Any = None,
    reference: torch.Tensor | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    lr: float = DEFAULT_LR,
    lr_schedule: str = DEFAULT_LR_SCHEDULE,
    bounds: tuple[float, float] | None = DEFAULT_BOUNDS,
    solver: str = "dc",
    reference_nfe: int = DEFAULT_REFERENCE_NFE,
    batch_size: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    **solver_options: Any,
) -> DCRatios:
    """Calibrate DC-Solver's per-step ratios for one NFE (and guidance scale) on a few samples.

    Args:
        model, x_T, schedule, nfe, prediction, spacing, guidance, cond, uncond: As in
            :func:`fewstep.sample`; ``model`` must be differentiable (no ``no_grad`` inside).
            The ratios are only valid for this grid, so sample with the same ``spacing``.
        reference: Target samples (``x_T``'s shape); default: DDIM with ``reference_nfe``
            steps from ``x_T`` on the same spacing.
        iterations: Adam steps (each one sampling run forward and backward).
        lr: Adam learning rate (the initial one with ``lr_schedule="cosine"``).
        lr_schedule: ``"cosine"`` (annealed from ``lr`` to 0 over ``iterations``) or ``"constant"``.
        bounds: None (unbounded) or ``(low, high)`` with low < 1 < high: every Adam step is
            projected into it.
        solver: ``"dc"`` (UniPC + compensation) or ``"dc_dpmpp"`` (DPM-Solver++ + compensation).
        reference_nfe: Steps of the default DDIM reference.
        batch_size: Samples per forward/backward pass (gradients are accumulated); None: all.
        checkpoint: JSON file holding the optimiser state after every iteration; an existing
            one made by the same call is resumed.
        progress: Show a progress bar.
        **solver_options: Options of the base solver (e.g. ``order=3``, ``dc_order=3``).

    Returns:
        A :class:`DCRatios` (NFE ratios, the first ``dc_order`` equal to 1) whose ``meta``
        records the model fingerprint, schedule, NFE, guidance, solver and the losses.

    Raises:
        ValueError: bad arguments, a non-compensating solver, a checkpoint of another
            calibration, or a model that is not differentiable.
    """
    schedule = make_schedule(schedule)
    _check_noise(x_T)
    nfe = check_int("nfe", nfe, 1)
    iterations = check_int("iterations", iterations, 0)
    lr = check_real("lr", lr, 0.0, open_min=True)
    reference_nfe = check_int("reference_nfe", reference_nfe, 1)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
    bounds = _check_bounds(bounds)
    if guidance is not None:
        guidance = check_guidance(guidance)
    if not isinstance(solver, str):
        raise TypeError(f"solver must be the name of a compensating solver ('dc' or 'dc_dpmpp'), got {solver!r}")
    given = sorted(k for k in _DC_KEYS if k in solver_options)
    if given:
        raise ValueError(f"calibrate_dc finds the ratios itself; do not pass {given}")
    dc = get_solver(solver, **solver_options)
    if not isinstance(dc, DynamicCompensation):
        raise ValueError(f"solver {solver!r} has no dynamic compensation; use 'dc' or 'dc_dpmpp'")
    dc_order = dc.config["dc_order"]
    if nfe <= dc_order:
        raise ValueError(f"NFE {nfe} leaves no step to compensate: the first dc_order={dc_order} steps have too "
                         f"few outputs; use nfe > {dc_order}")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    run = dict(schedule=schedule, prediction=prediction, spacing=spacing, guidance=guidance, cond=cond, uncond=uncond)
    if reference is None:
        with torch.no_grad():
            reference = sample(model, x_T, solver="ddim", nfe=reference_nfe, **run)
        reference_what = f"ddim, {reference_nfe} steps"
    else:
        reference_what = "given"
        if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != tuple(x_T.shape):
            shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise ValueError(f"reference must be a tensor of x_T's shape {tuple(x_T.shape)}, got {shape}")
    if not bool(torch.isfinite(reference).all()):
        raise ValueError("the reference samples contain NaN or Inf")
    base = make_plan(schedule, dc, nfe, prediction, spacing)
    reference = reference.detach().to(x_T.device)

    n = x_T.shape[0]
    chunks = [slice(i, i + (batch_size or n)) for i in range(0, n, batch_size or n)]
    for name, a in (("cond", cond), ("uncond", uncond)):
        if a is not None and len(chunks) > 1 and not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a tensor with one row per sample to split into batches "
                            f"(batch_size={batch_size}), got {type(a).__name__}")
    conds, unconds = ([a if a is None or len(chunks) == 1 else a[c] for c in chunks] for a in (cond, uncond))

    def watched(x: torch.Tensor, *args: Any) -> torch.Tensor:
        out = model(x, *args)
        if x.requires_grad and isinstance(out, torch.Tensor) and not out.requires_grad:
            raise ValueError("the model's output does not depend differentiably on its input: it must not run under "
                             "torch.no_grad / inference_mode (calibration backpropagates through it)")
        return out

    def loss_and_grad(free: torch.Tensor, grad: bool) -> tuple[float, torch.Tensor | None]:
        free = free.detach().requires_grad_(grad)
        total = 0.0
        for c, cc, uc in zip(chunks, conds, unconds):
            with torch.set_grad_enabled(grad):
                # One plan per chunk: a backward pass frees the graph from the ratios to the coefficients.
                try:
                    plan = dc.compensated(base, torch.cat([torch.ones(dc_order, dtype=torch.float64), free]))
                except FloatingPointError:  # ratios so large that the coefficients overflow: diverged
                    return math.inf, torch.zeros_like(free)
                x = sample(watched, x_T[c], plan=plan, guidance=guidance, cond=cc, uncond=uc)
                loss = (x.double() - reference[c].double()).pow(2).sum() / (n * x[0].numel())
            if grad:
                loss.backward()
            total += float(loss.detach())
        return total, (free.grad if grad else None)

    identity = _identity(model, x_T, reference, solver, dc.config, schedule, nfe, prediction, spacing, guidance,
                         (lr, lr_schedule, bounds, iterations if lr_schedule != "constant" else None))
    state = _load_checkpoint(checkpoint, identity, nfe - dc_order)
    from tqdm.auto import tqdm

    with tqdm(total=iterations, initial=min(state["iteration"], iterations), desc=f"calibrate dc NFE {nfe}",
              disable=not progress, leave=False) as bar:
        while state["iteration"] < iterations:
            params = torch.tensor(state["params"], dtype=torch.float64)
            loss, g = loss_and_grad(params, grad=True)
            _record(state, params, loss)
            _adam_step(state, params, g, _rate(lr, lr_schedule, state["iteration"], iterations), bounds)
            state["final_loss"] = None
            if checkpoint is not None:
                _save_checkpoint(checkpoint, state)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3e}", best=f"{state['best_loss']:.3e}")
    if state.get("final_loss") is None:  # the last update's point, which no iteration evaluated
        params = torch.tensor(state["params"], dtype=torch.float64)
        state["final_loss"] = loss_and_grad(params, grad=False)[0]
        _record(state, params, state["final_loss"], final=True)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, state)

    history = state["history"]
    extra = {
        "objective": "final-sample MSE, backpropagated through the whole run",
        "reference": reference_what, "num_samples": n, "iterations": iterations, "lr": lr,
        "lr_schedule": lr_schedule, "bounds": None if bounds is None else list(bounds),
        "solver_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.config.items()
                           if k not in _DC_KEYS},
        "spacing": _describe(spacing),
        # the grid the ratios are per step of (checked at each use: fewstep/samplers/artifact_checks.py)
        "grid": {"timesteps": base.grid.model_timesteps.tolist(), "final_sigma": float(base.grid.sigma[-1])},
        "loss_uncompensated": history[0] if history else state["final_loss"],
        "loss": state["best_loss"], "best_iteration": state["best_iteration"],
    }
    meta = ArtifactMeta(fingerprint=model_fingerprint(model), schedule=schedule.to_dict(), nfe=nfe,
                        guidance=guidance, solver=dc.name, extra=extra)
    return DCRatios([1.0] * dc_order + state["best_params"], dc_order, meta)


def _check_noise(x_T: Any) -> None:
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor of initial noise, got {type(x_T).__name__}")
    if x_T.dim() < 1 or x_T.shape[0] == 0 or x_T.numel() == 0:
        raise ValueError(f"x_T must hold at least one sample (shape [n, ...] with n >= 1), got shape {tuple(x_T.shape)}")
    if x_T.requires_grad:
        raise ValueError("x_T requires grad: calibrate_dc differentiates with respect to the ratios only; "
                         "pass x_T.detach()")
    if not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")


def _identity(model, x_T, reference, solver, config, schedule, nfe, prediction, spacing, guidance, lr) -> str:
    h = hashlib.sha256()
    for t in (x_T, reference):
        h.update(t.detach().double().cpu().numpy().tobytes())
    settings = dict(model=model_fingerprint(model), solver=solver, schedule=schedule.to_dict(), nfe=nfe,
                    prediction=prediction, spacing=repr(spacing), guidance=guidance, lr=lr,
                    options={k: repr(v) for k, v in config.items() if k not in _DC_KEYS})
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _load_checkpoint(path: str | os.PathLike | None, identity: str, free: int) -> dict[str, Any]:
    fresh = {"identity": identity, "iteration": 0, "params": [1.0] * free, "m": [0.0] * free, "v": [0.0] * free,
             "history": [], "best_loss": math.inf, "best_params": [1.0] * free, "best_iteration": None,
             "final_loss": None}
    if path is None or not Path(path).exists():
        return fresh
    from ..eval.io import read_json

    state = read_json(path)
    if not isinstance(state, dict) or set(state) != set(fresh):
        raise ValueError(f"{path} is not a calibrate_dc checkpoint; delete it to start over")
    if state["identity"] != identity:
        raise ValueError(f"{path} is the checkpoint of another calibration (model, noise, reference, solver or "
                         "settings differ); delete it or choose another checkpoint file")
    state["best_loss"] = math.inf if state["best_loss"] is None else state["best_loss"]
    return state


def _save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    from ..eval.io import write_json

    write_json(path, state)  # float64 values round-trip exactly through JSON's shortest repr


def _record(state: dict[str, Any], params: torch.Tensor, loss: float, final: bool = False) -> None:
    if not final:
        state["history"].append(loss)
    if math.isfinite(loss) and loss < state["best_loss"]:
        state["best_loss"], state["best_params"] = loss, params.tolist()
        state["best_iteration"] = state["iteration"]


def _check_bounds(bounds: Any) -> tuple[float, float] | None:
    if bounds is None:
        return None
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds must be None or (low, high) with low < 1 < high, got {bounds!r}")
    low, high = (check_real("bounds", b) for b in bounds)
    if not low < 1.0 < high:
        raise ValueError(f"bounds must be None or (low, high) with low < 1 < high (rho = 1 is no compensation), "
                         f"got {bounds!r}")
    return (low, high)


def _rate(lr: float, schedule: str, iteration: int, iterations: int) -> float:
    """Step size of Adam step ``iteration`` (0-based): constant, or cosine-annealed from lr to 0.

    With a constant rate the normalised Adam step keeps moving every ratio by about lr, so the
    loss goes up and down around the minimum; annealing lets the last iterates settle.
    """
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * iteration / max(iterations, 1)))


def _adam_step(state: dict[str, Any], params: torch.Tensor, grad: torch.Tensor, lr: float,
               bounds: tuple[float, float] | None) -> None:
    """One float64 Adam update of ``state``, projected into ``bounds`` (no weight decay: decay
    towards rho = 0 means nothing here)."""
    b1, b2, eps = _ADAM
    k = state["iteration"] + 1
    m = b1 * torch.tensor(state["m"], dtype=torch.float64) + (1 - b1) * grad
    v = b2 * torch.tensor(state["v"], dtype=torch.float64) + (1 - b2) * grad.square()
    step = lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    new = params - step if bounds is None else (params - step).clamp(*bounds)
    state.update(iteration=k, params=new.tolist(), m=m.tolist(), v=v.tolist())


def _describe(spacing: "str | GridSpec | None") -> str | None:
    if not isinstance(spacing, GridSpec):
        return spacing
    changed = {f.name: getattr(spacing, f.name) for f in dataclasses.fields(spacing)
               if f.name == "spacing" or getattr(spacing, f.name) != f.default}
    return ", ".join(f"{k}={v}" for k, v in changed.items())
