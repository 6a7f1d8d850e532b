"""Offline, model-agnostic calibration of DC-Solver's compensation ratios: ``fewstep.calibrate_dc``.

Two objectives, neither of which dominates (docs/guide/dc-solver.md):

- ``"trajectory"``, the official method (:mod:`.calibrate_trajectory`): one ratio per step,
  greedily, against the DDIM trajectory at the next grid point.
- ``"final"``: the ratios of steps ``dc_order .. NFE-1`` jointly, by gradient descent on the
  MSE between the final samples of a DC run and reference samples from the same noise (a
  200-step DDIM run by default), backpropagating through the whole sampling run, model calls
  included (the plan's compensation weights are torch functions of the ratios). Adam (lr 0.1,
  no weight decay) from rho = 1; the iterate with the lowest calibration loss is returned.
  ``lr_schedule="cosine"`` anneals the rate to 0 and ``bounds`` projects every step into a
  ratio range; on the 16 digits (NFE, guidance) pairs with 10 samples the annealed, bounded
  optimiser did not lower the calibration loss, so the default stays the constant rate.

``"auto"`` (the default) fits both on the first samples and keeps the one with the lower MSE on
the last ones (``validation``), which also decide whether compensation helps at all: ratios
that do not beat the base solver there are replaced by 1 (no compensation) unless
``keep_worse``. A ``checkpoint`` file (JSON, rewritten atomically after every iteration or
fitted step) makes a run resumable: rerun the same call after a crash and it continues where
it stopped, ending with bitwise the same ratios (a plain float64 Adam whose state is saved
exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from fewstep.samplers.artifacts import ArtifactMeta, model_fingerprint
from fewstep.samplers.dc_artifacts import DCRatios
from fewstep.eval.holdout import describe as describe_validation
from fewstep.eval.holdout import validation_record
from fewstep.samplers.registry import get_solver
from fewstep.samplers.sampling import make_plan, sample
from fewstep.samplers.schedules import NoiseSchedule, make_schedule
from fewstep.samplers.solvers.dc import DynamicCompensation
from fewstep.samplers.timesteps import GridSpec
from fewstep.tuning.dc.trajectory import adam_step, fit_trajectory, ground_truth_trajectory
from fewstep.infra.validation import check_guidance, check_int, check_nfe, check_real

__all__ = ["calibrate_dc", "OBJECTIVES", "DEFAULT_OBJECTIVE", "DEFAULT_ITERATIONS", "DEFAULT_LR", "DEFAULT_LR_SCHEDULE", "DEFAULT_BOUNDS",
           "DEFAULT_REFERENCE_NFE"]

DEFAULT_ITERATIONS = 40
DEFAULT_LR = 0.1
DEFAULT_LR_SCHEDULE = "constant"
DEFAULT_BOUNDS = None
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_REFERENCE_NFE = 200
OBJECTIVES = ("auto", "trajectory", "final")
DEFAULT_OBJECTIVE = "auto"
_DC_KEYS = ("ratios", "cpr", "dc_file", "guidance")


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
    objective: str = DEFAULT_OBJECTIVE,
    validation: int | None = None,
    keep_worse: bool = False,
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
        reference: Target samples (``x_T``'s shape) of the ``"final"`` objective and of the
            validation; default: DDIM with ``reference_nfe`` steps from ``x_T`` on the same spacing.
        objective: ``"trajectory"`` (the official method: one ratio per step, greedily, against
            the DDIM trajectory at the next grid point), ``"final"`` (all ratios jointly on the
            final-sample MSE) or ``"auto"`` (both; the one with the lower MSE on the validation
            samples is kept).
        validation: How many of the last samples of ``x_T`` (and rows of ``cond``/``uncond``/
            ``reference``) are held out of the fit to choose the objective and to check the
            result against no compensation (the base solver); None: a third of them
            (at least 1) with ``"auto"``, none otherwise.
        keep_worse: Return the calibrated ratios even when they do not beat the base solver
            on the validation samples (otherwise all ratios are 1 then: the base solver).
        iterations: Adam steps (each one sampling run forward and backward; with
            ``"trajectory"``, per step, each one model call forward and backward).
        lr: Adam learning rate (the initial one with ``lr_schedule="cosine"``).
        lr_schedule: ``"cosine"`` (annealed from ``lr`` to 0 over ``iterations``) or ``"constant"``
            (``"final"`` only).
        bounds: None (unbounded) or ``(low, high)`` with low < 1 < high: every Adam step is
            projected into it.
        solver: ``"dc"`` (UniPC + compensation) or ``"dc_dpmpp"`` (DPM-Solver++ + compensation).
        reference_nfe: Steps of the default DDIM reference and of the ground-truth trajectory.
        batch_size: Samples per forward/backward pass (gradients are accumulated); None: all.
        checkpoint: JSON file holding the optimiser state after every iteration (``"final"``)
            or fitted step (``"trajectory"``; with ``"auto"`` ``NAME-trajectory.json`` beside
            it); an existing one made by the same call is resumed.
        progress: Show a progress bar.
        **solver_options: Options of the base solver (e.g. ``order=3``, ``dc_order=3``).

    Returns:
        A :class:`DCRatios` (NFE ratios, the first ``dc_order`` equal to 1) whose ``meta``
        records the model fingerprint, schedule, NFE, guidance, solver, the objective, the
        losses and, with validation samples, ``validation`` (both MSEs, their ratio with a
        paired-bootstrap interval, and whether the base solver was written instead).

    Raises:
        ValueError: bad arguments, a non-compensating solver, a checkpoint of another
            calibration, or a model that is not differentiable.
    """
    schedule = make_schedule(schedule)
    _check_noise(x_T)
    nfe = check_nfe(nfe)
    iterations = check_int("iterations", iterations, 0)
    lr = check_real("lr", lr, 0.0, open_min=True)
    reference_nfe = check_nfe(reference_nfe, "reference_nfe")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective == "trajectory" and lr_schedule != "constant":
        raise ValueError("lr_schedule='cosine' applies to objective='final' only (the official per-step search "
                         "uses a constant rate)")
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
    n_all = x_T.shape[0]
    held = _validation_count(validation, objective, n_all)
    for name, a in (("cond", cond), ("uncond", uncond)):
        if a is not None and not isinstance(a, torch.Tensor) and (held or (batch_size or n_all) < n_all):
            raise TypeError(f"{name} must be a tensor with one row per sample to split into validation samples and "
                            f"batches (validation={held}, batch_size={batch_size}), got {type(a).__name__}")
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
    fit, val = slice(0, n_all - held), slice(n_all - held, n_all)
    # non-tensor conditions pass whole (refused above where samples are split)
    rows = lambda a, s: a[s] if isinstance(a, torch.Tensor) else a  # noqa: E731

    def watched(x: torch.Tensor, *args: Any) -> torch.Tensor:
        out = model(x, *args)
        if x.requires_grad and isinstance(out, torch.Tensor) and not out.requires_grad:
            raise ValueError("the model's output does not depend differentiably on its input: it must not run under "
                             "torch.no_grad / inference_mode (calibration backpropagates through it)")
        return out

    job = _Job(dc, base, dc_order, watched, x_T[fit], rows(cond, fit), rows(uncond, fit), guidance, batch_size)
    identity = _identity(model, x_T, reference, solver, dc.config, schedule, nfe, prediction, spacing, guidance,
                         (lr, lr_schedule, bounds, iterations if lr_schedule != "constant" else None))
    objectives = ("trajectory", "final") if objective == "auto" else (objective,)
    fitted: dict[str, tuple[list[float], dict[str, Any]]] = {}
    for name in objectives:
        ck = checkpoint
        if ck is not None and objective == "auto" and name == "trajectory":
            ck = Path(ck).with_name(Path(ck).stem + "-trajectory" + (Path(ck).suffix or ".json"))
        if name == "final":
            fitted[name] = _fit_final(job, reference[fit], iterations, lr, lr_schedule, bounds, identity, ck, progress)
        else:
            fitted[name] = _fit_trajectory(job, run, reference_nfe, iterations, lr, bounds, identity, ck, progress)

    extra: dict[str, Any] = {
        "reference": reference_what, "num_samples": n_all - held,
        "iterations": iterations, "lr": lr, "lr_schedule": lr_schedule, "bounds": None if bounds is None else list(bounds),
        "solver_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.config.items()
                           if k not in _DC_KEYS},
        "spacing": _describe(spacing),
        # the grid the ratios are per step of (checked at each use: fewstep/samplers/artifact_checks.py)
        "grid": {"timesteps": base.grid.model_timesteps.tolist(), "final_sigma": float(base.grid.sigma[-1])},
    }
    chosen = objectives[0]
    if held:
        errs = {name: job.errors(r, x_T[val], rows(cond, val), rows(uncond, val), reference[val])
                for name, (r, _) in fitted.items()}
        errs["none"] = job.errors([1.0] * nfe, x_T[val], rows(cond, val), rows(uncond, val), reference[val])
        chosen = min(objectives, key=lambda k: float(errs[k].mean()))
        base_name = "unipc" if solver == "dc" else "dpmpp"
        record = validation_record(errs[chosen], errs["none"], tuned_label=f"{dc.name} ({chosen})",
                                   baseline_label=f"{base_name} (ratios 1)", seeds=[],  # the CLI knows the seeds
                                   keep_worse=keep_worse, objectives={k: float(v.mean()) for k, v in errs.items()
                                                                       if k != "none"})
        record["samples_held_out"] = [n_all - held, n_all]
        extra["validation"] = record
    ratios, losses = fitted[chosen]
    extra.update(objective=chosen, objective_requested=objective, **losses)
    if len(fitted) > 1:
        extra["ratios_by_objective"] = {k: r for k, (r, _) in fitted.items()}
    if held and extra["validation"]["written"] == "baseline":
        ratios = [1.0] * nfe
        warnings.warn(describe_validation(extra["validation"]), stacklevel=2)
    meta = ArtifactMeta(fingerprint=model_fingerprint(model), schedule=schedule.to_dict(), nfe=nfe,
                        guidance=guidance, solver=dc.name, extra=extra)
    return DCRatios(ratios, dc_order, meta)


def _validation_count(validation: int | None, objective: str, n: int) -> int:
    if validation is None:
        return max(1, n // 3) if objective == "auto" and n >= 2 else 0
    held = check_int("validation", validation, 0)
    if held >= n:
        raise ValueError(f"validation={held} leaves no sample to fit: x_T has {n} samples")
    if objective == "auto" and held == 0:
        raise ValueError("objective='auto' chooses between the objectives on validation samples; pass validation >= 1 "
                         "(or objective='trajectory' / 'final')")
    return held


@dataclasses.dataclass
class _Job:
    """The fit samples of one calibration and how to sample them with given ratios."""

    dc: DynamicCompensation
    base: Any
    dc_order: int
    model: Callable[..., torch.Tensor]
    x_T: torch.Tensor
    cond: Any
    uncond: Any
    guidance: float | None
    batch_size: int | None

    @property
    def chunks(self) -> list[slice]:
        n = self.x_T.shape[0]
        return [slice(i, i + (self.batch_size or n)) for i in range(0, n, self.batch_size or n)]

    def plan(self, ratios: torch.Tensor):
        return self.dc.compensated(self.base, ratios)

    def errors(self, ratios: list[float], x_T: torch.Tensor, cond: Any, uncond: Any, reference: torch.Tensor
               ) -> torch.Tensor:
        """Per-sample MSE to ``reference`` of DC with ``ratios`` (no gradients; inf where they overflow)."""
        try:
            plan = self.plan(torch.tensor(ratios, dtype=torch.float64))
        except FloatingPointError:  # coefficients overflow: these ratios lose to any finite result
            return torch.full((x_T.shape[0],), math.inf, dtype=torch.float64)
        n, bs = x_T.shape[0], self.batch_size or x_T.shape[0]
        out = []
        with torch.no_grad():
            for i in range(0, n, bs):
                c = slice(i, i + bs)
                x = sample(self.model, x_T[c], plan=plan, guidance=self.guidance,
                           cond=None if cond is None else cond[c], uncond=None if uncond is None else uncond[c])
                out.append((x.double() - reference[c].double()).pow(2).flatten(1).mean(1))
        return torch.cat(out).cpu()


def _fit_final(job: _Job, reference: torch.Tensor, iterations: int, lr: float, lr_schedule: str,
               bounds: tuple[float, float] | None, identity: str, checkpoint: Any, progress: bool
               ) -> tuple[list[float], dict[str, Any]]:
    """All ratios jointly on the final-sample MSE (Adam through the whole run)."""
    n, nfe, dc_order = job.x_T.shape[0], job.base.n, job.dc_order
    chunks = job.chunks
    conds, unconds = ([None if a is None else a[c] for c in chunks] for a in (job.cond, job.uncond))

    def loss_and_grad(free: torch.Tensor, grad: bool) -> tuple[float, torch.Tensor | None]:
        free = free.detach().requires_grad_(grad)
        total = 0.0
        for c, cc, uc in zip(chunks, conds, unconds):
            with torch.set_grad_enabled(grad):
                # One plan per chunk: a backward pass frees the graph from the ratios to the coefficients.
                try:
                    plan = job.plan(torch.cat([torch.ones(dc_order, dtype=torch.float64), free]))
                except FloatingPointError:  # ratios so large that the coefficients overflow: diverged
                    return math.inf, torch.zeros_like(free)
                x = sample(job.model, job.x_T[c], plan=plan, guidance=job.guidance, cond=cc, uncond=uc)
                loss = (x.double() - reference[c].double()).pow(2).sum() / (n * x[0].numel())
            if grad:
                loss.backward()
            total += float(loss.detach())
        return total, (free.grad if grad else None)

    state = _load_checkpoint(checkpoint, identity, nfe - dc_order)
    from tqdm.auto import tqdm

    with tqdm(total=iterations, initial=min(state["iteration"], iterations), desc=f"calibrate dc NFE {nfe} (final)",
              disable=not progress, leave=False) as bar:
        while state["iteration"] < iterations:
            params = torch.tensor(state["params"], dtype=torch.float64)
            loss, g = loss_and_grad(params, grad=True)
            _record(state, params, loss)
            adam_step(state, params, g, _rate(lr, lr_schedule, state["iteration"], iterations), bounds)
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
    losses = {"loss_uncompensated": history[0] if history else state["final_loss"],
              "loss": state["best_loss"], "best_iteration": state["best_iteration"]}
    return [1.0] * dc_order + state["best_params"], losses


def _fit_trajectory(job: _Job, run: dict[str, Any], reference_nfe: int, iterations: int, lr: float,
                    bounds: tuple[float, float] | None, identity: str, checkpoint: Any, progress: bool
                    ) -> tuple[list[float], dict[str, Any]]:
    """One ratio per step, greedily, against the DDIM trajectory (:mod:`.calibrate_trajectory`)."""

    nfe, dc_order = job.base.n, job.dc_order
    key = f"{identity}/trajectory/{iterations}/{reference_nfe}"  # every fitted step used these
    done: list[float] = []
    if checkpoint is not None and Path(checkpoint).exists():
        from fewstep.infra.io import read_json

        state = read_json(checkpoint)
        if not isinstance(state, dict) or set(state) != {"identity", "ratios"}:
            raise ValueError(f"{checkpoint} is not a calibrate_dc trajectory checkpoint; delete it to start over")
        if state["identity"] != key:
            raise ValueError(f"{checkpoint} is the checkpoint of another calibration (model, noise, reference, solver "
                             "or settings differ); delete it or choose another checkpoint file")
        done = state["ratios"]

    def save(ratios: list[float]) -> None:
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {"identity": key, "ratios": ratios})

    fit_run = dict(guidance=job.guidance, cond=job.cond, uncond=job.uncond)
    gt = ground_truth_trajectory(job.model, job.x_T, job.base.grid, run["prediction"], reference_nfe, **fit_run) \
        if len(done) < nfe else None
    from tqdm.auto import tqdm

    total = iterations * (nfe - dc_order)
    with tqdm(total=total, initial=iterations * max(0, len(done) - dc_order), leave=False, disable=not progress,
              desc=f"calibrate dc NFE {nfe} (trajectory)") as bar:
        ratios = done if len(done) >= nfe else fit_trajectory(
            job.plan, job.base, dc_order, job.model, job.x_T, gt, fit_run, job.chunks, iterations, lr, bounds,
            done, save, bar)
    losses = {"loss_uncompensated": None, "loss": None, "best_iteration": None,
              "trajectory_reference": f"ddim, {reference_nfe} steps through the grid points"}
    return ratios, losses


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
    from fewstep.infra.io import read_json

    state = read_json(path)
    if not isinstance(state, dict) or set(state) != set(fresh):
        raise ValueError(f"{path} is not a calibrate_dc checkpoint; delete it to start over")
    if state["identity"] != identity:
        raise ValueError(f"{path} is the checkpoint of another calibration (model, noise, reference, solver or "
                         "settings differ); delete it or choose another checkpoint file")
    state["best_loss"] = math.inf if state["best_loss"] is None else state["best_loss"]
    return state


def _save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    from fewstep.infra.io import write_json

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


def _describe(spacing: "str | GridSpec | None") -> str | None:
    if not isinstance(spacing, GridSpec):
        return spacing
    changed = {f.name: getattr(spacing, f.name) for f in dataclasses.fields(spacing)
               if f.name == "spacing" or getattr(spacing, f.name) != f.default}
    return ", ".join(f"{k}={v}" for k, v in changed.items())
