"""Time-Shift on a diffusers pipeline: ``fewstep.time_shift(pipe, window, cutoff)`` (Li et al., ICLR 2024).

The rule itself (:class:`~fewstep.samplers.timeshift.TimeShift`) lives with the solver core; this
module attaches it to a pipeline, above the diffusers adapter it may wrap.
"""

from __future__ import annotations

from typing import Any

import torch

from .plan import compute_dtype
from .schedules import DiscreteVPSchedule, NoiseSchedule
from .timeshift import TimeShift, _lambda_table, _model_time_range

__all__ = ["TimeShiftHook", "time_shift"]


class TimeShiftHook:
    """Time-Shift on a pipeline (see :func:`time_shift`); ``remove()`` undoes it.

    ``"input"`` rules: a forward pre-hook on the denoiser. ``"target"`` rules: a wrapper around
    ``scheduler.step`` (an instance attribute, deleted again by ``remove()``) that moves each
    step's result to the shifted target level.
    """

    def __init__(self, denoiser: torch.nn.Module, schedule: NoiseSchedule, rule: TimeShift, scheduler: Any = None):
        if getattr(denoiser, "_fewstep_time_shift", None) is not None:
            raise ValueError("this denoiser is already time-shifted; call .remove() on that hook first")
        if rule.mode == "target" and scheduler is None:
            raise ValueError("time_shift mode='target' moves the scheduler's step targets: pass the pipeline "
                             "(with a fewstep scheduler), or use mode='input' on a bare denoiser")
        self.denoiser, self.schedule, self.rule, self.scheduler = denoiser, schedule, rule, scheduler
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._bounds = _model_time_range(schedule)
        self._handle = None
        self._moves: tuple[Any, tuple, list] | None = None
        if rule.mode == "input":
            self._handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)
        else:
            self._plain_step, self._wrapped = scheduler.step, self._step  # one bound method, to find it again
            scheduler.step = self._wrapped
        denoiser._fewstep_time_shift = self

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.rule.active:
            return args, kwargs
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        in_args = len(args) > 1
        t = args[1] if in_args else kwargs.get("timestep")
        if not isinstance(x, torch.Tensor) or t is None:
            raise TypeError("time_shift: the denoiser must be called as (sample, timestep, ...) or with "
                            "sample=/hidden_states= and timestep= keywords")
        t = torch.as_tensor(t, device=x.device)
        nominal = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        lambdas = None
        if isinstance(self.schedule, DiscreteVPSchedule):
            if x.device not in self._tables:
                self._tables[x.device] = _lambda_table(self.schedule, x.device)
            lambdas = self._tables[x.device]
        tau, var = self.rule.candidates(self.schedule, nominal, lambdas, self._bounds)
        shifted = torch.where(nominal.double() > self.rule.cutoff, TimeShift.select(x, tau, var), nominal.double())
        shifted = shifted.to(t.dtype if t.is_floating_point() else torch.float32)
        if in_args:
            return (args[0], shifted, *args[2:]), kwargs
        return args, {**kwargs, "timestep": shifted}

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        """The scheduler's step, then the target move of that step (by its index on the scheduler's grid)."""
        out = self._plain_step(model_output, timestep, sample, *args, **kwargs)
        sch = self.scheduler
        if not self.rule.active:
            return out
        i = sch.step_index - 1  # the step just taken, on the whole grid (img2img runs start part-way)
        key = (sample.device, compute_dtype(sample.dtype), sch.begin_index or 0)
        if self._moves is None or self._moves[0] is not sch.grid or self._moves[1] != key:
            # a new grid (set_timesteps) or run: the tables once, then only lookups
            self._moves = (sch.grid, key, self.rule.target_moves(sch.grid, key[0], key[1], start=key[2]))
        move = self._moves[2][i]
        if move is None:
            return out
        prev, x0 = out if isinstance(out, tuple) else (out.prev_sample, out.pred_original_sample)
        prev = move.apply(sample, prev, x0)
        return (prev, x0) if isinstance(out, tuple) else type(out)(prev_sample=prev, pred_original_sample=x0)

    def remove(self) -> None:
        """Undo the shift (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
        if self.scheduler is not None and self.scheduler.__dict__.get("step") is self._wrapped:
            del self.scheduler.step  # the class's own step again
        if getattr(self.denoiser, "_fewstep_time_shift", None) is self:
            self.denoiser._fewstep_time_shift = None

    def __enter__(self) -> "TimeShiftHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def time_shift(pipe: Any, window: int, cutoff: float = 0.0, *, mode: str = "target",
               schedule: NoiseSchedule | None = None) -> TimeShiftHook:
    """Make a diffusers pipeline sample with the Time-Shift rule (per-sample noise levels).

    ``mode="target"`` (default): the network keeps the grid timestep; the pipeline's fewstep
    scheduler's ``step`` is wrapped so that each step lands on the sample's shifted target level
    (as ``fewstep.sample(..., time_shift=TimeShift(window, cutoff))``). ``mode="input"``: the
    UNet (or transformer) gets a forward pre-hook that replaces the batch's timestep by each
    sample's shifted one; the scheduler (any scheduler) keeps its own coefficients.

    Args:
        pipe: A diffusers pipeline with ``unet`` or ``transformer`` (or, for ``mode="input"``, the
            denoiser module itself, then ``schedule`` is required).
        window: Search window width in model timesteps (candidates ``t +- window // 2``).
        cutoff: Only timesteps above it are shifted.
        mode: ``"target"`` or ``"input"`` (see :class:`TimeShift`).
        schedule: The noise schedule; default: read from ``pipe.scheduler``'s config.

    Returns:
        The hook: call ``.remove()`` to undo, or use it as a context manager.

    Raises:
        ValueError: no denoiser or schedule can be found, the denoiser is already shifted, or
            ``mode="target"`` without a fewstep scheduler.
    """
    rule = TimeShift(window, cutoff, mode)
    denoiser = pipe if isinstance(pipe, torch.nn.Module) else (
        getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
    if not isinstance(denoiser, torch.nn.Module):
        raise ValueError(f"time_shift needs a pipeline with a unet or transformer, got {type(pipe).__name__}")
    from .scheduler import FewstepScheduler  # imports diffusers: only when a pipeline is shifted
    scheduler = None if isinstance(pipe, torch.nn.Module) else getattr(pipe, "scheduler", None)
    if rule.mode == "target" and not isinstance(scheduler, FewstepScheduler):
        what = "a bare denoiser" if scheduler is None else f"scheduler {type(scheduler).__name__}"
        raise ValueError(f"time_shift mode='target' moves the step targets of a fewstep scheduler, got {what}: "
                         "use a fewstep scheduler (e.g. fewstep.UniPCScheduler.from_config(pipe.scheduler.config)) "
                         "or mode='input'")
    if schedule is None:
        if scheduler is None:
            raise ValueError("time_shift: pass schedule= (the noise schedule) when wrapping a bare denoiser")
        schedule = getattr(scheduler, "schedule", None) if isinstance(scheduler, FewstepScheduler) else None
        schedule = schedule or FewstepScheduler.from_config(scheduler.config).schedule
    return TimeShiftHook(denoiser, schedule, rule, scheduler if rule.mode == "target" else None)
