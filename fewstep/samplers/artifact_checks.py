"""Tuned artifacts checked against the run that uses them, at its first step.

A solver checks what it sees when it builds its plan (NFE, noise schedule, solver:
:meth:`Artifact.check`). What only the run knows is checked here, once, before the first
model call, on every path (``fewstep.sample``, a prebuilt plan, the diffusers scheduler):

* guidance: DC ratios and DPM-Solver-v3 statistics describe one model function, the
  CFG-combined output at the scale they were made for (calibrated unguided means "no
  guidance"); another scale, or guided against unguided, is an :class:`ArtifactError`.
  Guidance 1 (and, in a diffusers pipeline, any scale <= 1, which runs no CFG) is "no guidance".
* grid: DC ratios are per step of the grid they were calibrated on (files written since
  ``meta.extra["grid"]`` exists record its model timesteps); another spacing is an error.
* model: a different fingerprint warns (a fine-tune may legitimately reuse a file).

Through a diffusers pipeline the scheduler reads the guidance from the pipeline whose
``__call__`` is stepping it (``pipe.guidance_scale`` / ``do_classifier_free_guidance``);
where no pipeline is found it warns once that it cannot check.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Iterable

from .artifacts import Artifact, ArtifactError

__all__ = ["artifacts_of", "check_run", "check_scheduler_run", "GUIDANCE_BOUND_KINDS"]

# Artifacts that describe the guided model function (a CPR file takes the guidance as an input).
GUIDANCE_BOUND_KINDS = ("dc_ratios", "dpmv3_ems")
_GRID_RTOL = 1e-6
_FRAMES = 12  # how far up the stack a scheduler looks for the pipeline that steps it


def artifacts_of(solver: Any) -> list[Artifact]:
    """The artifacts among a solver's options."""
    return [v for v in solver.config.values() if isinstance(v, Artifact)]


def _unguided(guidance: float | None) -> float | None:
    return None if guidance is None or guidance == 1.0 else float(guidance)


def _describe(guidance: float | None) -> str:
    return "no guidance" if guidance is None else f"guidance {guidance:g}"


def _same(a: float | None, b: float | None) -> bool:
    return (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=1e-9))


def _guidance_bound(a: Artifact) -> bool:
    # A bare ratio list (no schedule, no model, no guidance recorded) says nothing about its use.
    m = a.meta
    return a.kind in GUIDANCE_BOUND_KINDS and (m.guidance is not None or m.schedule is not None
                                                or m.fingerprint is not None)


def _check_guidance(artifacts: Iterable[Artifact], guidance: float | None, where: str) -> None:
    guidance = _unguided(guidance)
    for a in artifacts:
        if not _guidance_bound(a):
            continue
        made = _unguided(a.meta.guidance)
        if not _same(made, guidance):
            raise ArtifactError(f"{a.kind} artifact was made for {_describe(made)}, but {where} uses "
                                f"{_describe(guidance)}; make one for {_describe(guidance)}")


def _check_grid(artifacts: Iterable[Artifact], grid: Any) -> None:
    for a in artifacts:
        recorded = a.meta.extra.get("grid") if a.kind == "dc_ratios" else None
        if not isinstance(recorded, dict) or not isinstance(recorded.get("timesteps"), list):
            continue  # files from before grids were recorded: the NFE check is all there is
        made = [float(v) for v in recorded["timesteps"]]
        here = [float(v) for v in grid.model_timesteps.tolist()]
        made = made[len(made) - len(here):] if grid.start and len(made) > len(here) else made  # img2img: the tail
        close = len(made) == len(here) and all(math.isclose(x, y, rel_tol=_GRID_RTOL, abs_tol=_GRID_RTOL)
                                               for x, y in zip(made, here))
        if not close:
            spacing = a.meta.extra.get("spacing")
            raise ArtifactError(
                f"{a.kind} artifact was calibrated on the grid {_short(made)}"
                f"{f' ({spacing})' if spacing and '=' in str(spacing) else f' (spacing {spacing})' if spacing else ''}, but this run's grid is {_short(here)}; "
                "calibrate for this grid (ratios are per step)")


def _short(values: list[float]) -> str:
    text = "[" + ", ".join(f"{v:.4g}" for v in values[:6]) + (", ...]" if len(values) > 6 else "]")
    return text


def check_run(artifacts: Iterable[Artifact], *, grid: Any, guidance: float | None, model: Any = None,
              where: str = "this run") -> None:
    """Check a run's artifacts against its grid and guidance (errors) and model (a warning).

    Raises:
        ArtifactError: naming the artifact's value and the run's.
    """
    artifacts = list(artifacts)
    if not artifacts:
        return
    _check_guidance(artifacts, guidance, where)
    _check_grid(artifacts, grid)
    if model is not None:
        for a in artifacts:
            a.check_model(model, stacklevel=3)  # the warning names the caller of fewstep.sample


def _stepping_pipeline(scheduler: Any) -> Any:
    """The diffusers pipeline up the call stack whose scheduler is ``scheduler`` (None if none)."""
    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        # Only a pipeline's __call__ frame is read: before Python 3.13, reading f_locals snapshots
        # the frame's locals, which would keep a caller's deleted objects alive while it runs.
        if frame.f_code.co_name == "__call__" and frame.f_code.co_argcount and frame.f_code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if owner is not scheduler and getattr(owner, "scheduler", None) is scheduler:
                return owner
        frame = frame.f_back
    return None


def _pipeline_guidance(pipe: Any) -> tuple[bool, float | None]:
    """(known, guidance) of a pipeline's current call: CFG scale, or None when it runs no CFG."""
    scale = getattr(pipe, "_guidance_scale", None)
    if scale is None or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return False, None
    try:
        guided = bool(getattr(pipe, "do_classifier_free_guidance", scale > 1))
    except Exception:  # a property that needs state this pipeline does not have
        guided = scale > 1
    return True, (float(scale) if guided else None)


def check_scheduler_run(scheduler: Any) -> None:
    """The first-step check of a diffusers scheduler's run (see the module docstring).

    Raises:
        ArtifactError: the run's guidance or grid is not the one an artifact was made for.
    """
    artifacts = artifacts_of(scheduler.solver)
    if not artifacts:
        return
    pipe = _stepping_pipeline(scheduler)
    known, guidance = _pipeline_guidance(pipe) if pipe is not None else (False, None)
    where = f"the pipeline ({type(pipe).__name__}, guidance_scale={getattr(pipe, '_guidance_scale', None)})"
    option = scheduler.solver.config.get("guidance")  # DC's: the scale its CPR ratios are evaluated at
    if option is not None:
        if known and not _same(_unguided(option), guidance):
            raise ArtifactError(f"the scheduler's guidance option is {option:g}, but {where} uses "
                                f"{_describe(guidance)}; pass guidance={guidance} to from_config, or leave it out")
        known, guidance, where = True, option, "the scheduler's guidance option"
    bound = [a for a in artifacts if _guidance_bound(a)]
    if known:
        _check_guidance(bound, guidance, where)
    elif bound and not getattr(scheduler, "_guidance_unchecked_warned", False):
        scheduler._guidance_unchecked_warned = True
        made = ", ".join(f"{a.kind} for {_describe(_unguided(a.meta.guidance))}" for a in bound)
        warnings.warn(f"{type(scheduler).__name__} cannot see this run's guidance scale (no diffusers pipeline is "
                      f"stepping it), so it cannot check its tuned files ({made}) against it", UserWarning,
                      stacklevel=5)
    _check_grid(artifacts, scheduler.grid)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) if pipe is not None else None
    if denoiser is not None:
        for a in artifacts:
            a.check_model(denoiser, stacklevel=5)  # the caller of step (the pipeline)
