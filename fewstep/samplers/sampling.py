"""The functional sampling loop: ``fewstep.sample(model, x_T, ...)``, no diffusers needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .artifact_checks import artifacts_of, check_run
from .plan import PlanExecutor, SolverPlan, compute_dtype
from .prediction import Clip, DynamicThreshold, check_prediction
from .registry import get_solver, solver_class
from .schedules import NoiseSchedule, make_schedule
from .solver_schedule import apply_solver_schedule
from .solvers.base import Solver
from .timeshift import TimeShift
from .timesteps import GridSpec, TimeGrid, build_grid, check_one_step_start
from fewstep.infra.validation import check_bool, check_guidance

__all__ = ["sample", "make_plan", "StepInfo", "DEFAULT_NFE"]

DEFAULT_NFE = 10


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each step."""

    i: int
    t: float
    sigma: float
    x: torch.Tensor
    denoised: torch.Tensor


def _grid_spec(spacing: "str | GridSpec | None", solver: Solver, schedule: NoiseSchedule, **overrides: Any) -> GridSpec:
    """A GridSpec from a spacing name or spec; the solver fills in its diffusers convention."""
    if isinstance(spacing, GridSpec):
        spec = spacing
    else:
        spec = GridSpec(spacing=spacing or schedule.default_spacing)
    changes = {k: v for k, v in overrides.items() if v is not None}
    if spec.convention is None:
        changes["convention"] = solver.diffusers_convention
    return spec.replace(**changes) if changes else spec


def make_plan(
    schedule: "str | NoiseSchedule" = "linear",
    solver: "str | Solver" = "unipc",
    nfe: int | None = None,
    prediction: str = "epsilon",
    spacing: "str | GridSpec | None" = None,
    *,
    final_sigma: str | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    shift: float | None = None,
    mu: float | None = None,
    **solver_options: Any,
) -> SolverPlan:
    """Build the coefficient plan of ``solver`` (arguments as in :func:`sample`); reuse it with ``plan=``."""
    schedule = make_schedule(schedule)
    solver = get_solver(solver, **solver_options)
    prediction = check_prediction(prediction, schedule)
    spec = _grid_spec(spacing, solver, schedule, final_sigma=final_sigma, timesteps=timesteps, sigmas=sigmas,
                      shift=shift, mu=mu)
    if solver.config.get("solver_schedule") is not None:
        spec, nfe = apply_solver_schedule(solver, spec, schedule, nfe=nfe), None
    elif nfe is None and spec.timesteps is None and spec.sigmas is None:
        nfe = DEFAULT_NFE
    plan = solver.plan(build_grid(schedule, nfe, spec), prediction)
    plan.info["artifacts"] = artifacts_of(solver)  # checked against the run by sample()
    return plan


def sample(
    model: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    *,
    schedule: "str | NoiseSchedule | None" = None,
    solver: "str | Solver | None" = None,
    nfe: int | None = None,
    prediction: str | None = None,
    spacing: "str | GridSpec | None" = None,
    final_sigma: str | None = None,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    shift: float | None = None,
    mu: float | None = None,
    guidance: float | None = None,
    cond: Any = None,
    uncond: Any = None,
    thresholding: "DynamicThreshold | Clip | Callable[[torch.Tensor], torch.Tensor] | None" = None,
    time_shift: "TimeShift | dict | Sequence[float] | None" = None,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    progress: bool = False,
    plan: SolverPlan | None = None,
    compile: bool | dict = False,
    graph: bool = False,
    **solver_options: Any,
) -> torch.Tensor:
    """Solve the diffusion ODE from ``x_T`` with ``nfe`` model evaluations.

    Args:
        model: ``model(x, t)`` (or ``model(x, t, cond)`` when ``cond`` is given) returning
            the raw network output; ``t`` is a 1-D tensor of model timesteps, one per sample.
        x_T: Initial noise, already scaled for the schedule (standard normal for VP and flow,
            ``sigma_max * N(0, I)`` for VE).
        schedule: A :class:`NoiseSchedule` or a name accepted by :func:`make_schedule`
            (default ``"linear"``).
        solver: A registered solver name (see :func:`list_solvers`) or a solver instance
            (default ``"unipc"``).
        nfe: Number of model evaluations (default 10, or the number of explicit
            timesteps/sigmas, or the solver schedule's); each CFG step counts once.
        prediction: ``epsilon`` (default), ``sample``, ``v_prediction`` or ``flow``.
        spacing: A spacing name (see :data:`SPACINGS`; default: the schedule's) or a
            :class:`GridSpec`.
        final_sigma: ``"zero"`` (default) or ``"min"``; overrides the GridSpec.
        timesteps: Explicit model timesteps (overrides ``spacing``).
        sigmas: Explicit diffusers sigmas (overrides ``spacing``).
        shift: Static flow shift. mu: dynamic (resolution) flow shift.
        guidance: Classifier-free guidance scale; the model is called once per step on a
            doubled batch ``(x, x)`` with conditioning ``(uncond, cond)`` concatenated on dim 0.
        cond, uncond: Conditioning tensors for the model (``uncond`` only with guidance).
        thresholding: :class:`DynamicThreshold`, :class:`Clip` or any callable applied to x0.
        time_shift: :class:`TimeShift` (or ``{"window": W, "cutoff": C, "mode": M}``, ``[W, C]``):
            per-sample noise levels matched to each sample's variance (Li et al., ICLR 2024):
            by default each step's target level moves (the official form), with ``mode="input"``
            the model gets the shifted timesteps instead.
        callback: Called with a :class:`StepInfo` after every step.
        check_finite: Raise FloatingPointError naming the first step whose model output
            was NaN/Inf (checked once, at the end, without per-step host syncs).
        progress: Show a tqdm progress bar.
        plan: A prebuilt plan (from :func:`make_plan`); it fixes schedule, solver, grid and
            prediction, so none of those may be passed with it.
        compile: Run each step (model call, guidance and the fused solver update) through
            ``torch.compile``; True, or a dict of ``torch.compile`` keyword arguments. The step
            index is not baked in: a run compiles twice (first step, then one graph for all
            others), and later runs with the same shapes reuse it whatever their timesteps.
        graph: Capture the whole run as one CUDA graph (CUDA samples only) and replay it:
            the first call with a given model, shapes, NFE and solver structure runs eagerly
            and captures; later calls copy the new noise, conditioning, timesteps and solver
            coefficients into the captured buffers and replay. Limits: fixed shapes and NFE
            per captured graph, a model that CUDA graphs can capture (no host syncs), tensor
            ``cond``/``uncond``, no ``callback``; the graph and its memory stay cached per
            model (:func:`fewstep.samplers.capture.clear_graphs` frees them). The captured loop
            evaluates the model at every step, also at USF's analytical first step (whose
            plan ignores that output: same result, one evaluation more than eager).
        **solver_options: Options of the chosen solver (e.g. ``order=3``, ``variant="bh1"``, or
            ``solver_schedule="steps.json"``: tuned timesteps for any solver, strategies for ``usf``).
            A solver with a ``guidance`` option (``dc`` with ``cpr``) receives ``guidance``.

    Returns:
        The sample at the terminal point, in ``x_T``'s dtype.

    Raises:
        ValueError: unknown solver/option/prediction/spacing, bad nfe, shape mismatches,
            ``graph=True`` off CUDA or with a callback.
        FloatingPointError: non-finite model output.
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t[, cond]), got {type(model).__name__}")
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        what = x_T.dtype if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise TypeError(f"x_T must be a floating-point tensor, got {what}")
    if x_T.dim() < 1:
        raise ValueError("x_T must have a batch dimension (shape [B, ...]), got a 0-dim tensor")
    check_finite = check_bool("check_finite", check_finite)
    progress = check_bool("progress", progress)
    graph = check_bool("graph", graph)
    compile_options = _compile_options(compile)
    if graph and x_T.device.type != "cuda":
        raise ValueError(f"graph=True captures the run as a CUDA graph and needs a CUDA sample, got {x_T.device}")
    if graph and callback is not None:
        raise ValueError("graph=True replays the whole run at once: a per-step callback cannot run; drop one of them")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if guidance is not None:
        guidance = check_guidance(guidance)
    if guidance is not None and (cond is None or uncond is None):
        raise ValueError("guidance needs both cond and uncond (the unconditional conditioning)")
    if uncond is not None and guidance is None:
        raise ValueError("uncond is only used with guidance; pass guidance=<scale>")
    if thresholding is not None and (isinstance(thresholding, (bool, int, float)) or not callable(thresholding)):
        raise ValueError(
            f"thresholding must be fewstep.DynamicThreshold(...), fewstep.Clip(...) or a callable x0 -> x0, "
            f"got {thresholding!r}"
        )
    grid_args = dict(schedule=schedule, solver=solver, nfe=nfe, prediction=prediction, spacing=spacing,
                     final_sigma=final_sigma, timesteps=timesteps, sigmas=sigmas, shift=shift, mu=mu)
    time_shift = TimeShift.coerce(time_shift)
    if graph and time_shift is not None and time_shift.active:
        raise ValueError("graph=True replays the grid's timesteps; time_shift picks them per sample: drop one of them")
    if plan is None:
        defaults = dict(schedule="linear", solver="unipc", prediction="epsilon")
        grid_args = {k: (defaults[k] if v is None and k in defaults else v) for k, v in grid_args.items()}
        if isinstance(grid_args["solver"], str) and "guidance" in solver_class(grid_args["solver"]).options:
            solver_options = {"guidance": guidance, **solver_options}  # plans that depend on the CFG scale
        grid_args["solver"] = get_solver(grid_args["solver"], **solver_options)
        plan = make_plan(**grid_args)
        if timesteps is None and sigmas is None and "solver_schedule" not in solver_options:
            name = getattr(grid_args["spacing"], "spacing", grid_args["spacing"])
            setting = "the default spacing" if name is None else f"spacing={name!r}"
            check_one_step_start(plan.grid, f"nfe=1 with {setting}", "pass spacing='trailing'")
    else:
        given = sorted(k for k, v in {**grid_args, **solver_options}.items() if v is not None)
        if given:
            raise ValueError(f"{given} cannot be combined with a prebuilt plan, which already fixes them")

    if not isinstance(plan, SolverPlan):
        raise TypeError(f"plan must be a SolverPlan from fewstep.make_plan, got {type(plan).__name__}")
    grid: TimeGrid = plan.grid
    # Tuned files against this run: guidance and grid (errors), model (a warning: fine-tunes may reuse them).
    check_run(plan.info.get("artifacts", ()), grid=grid, guidance=guidance, model=model)
    device = x_T.device
    batch = x_T.shape[0]
    # Model timesteps for the whole run, moved to the device once.
    ts = grid.model_timesteps.to(device=device, dtype=torch.float32)
    shifts = moves = [None] * grid.n
    if time_shift is not None and time_shift.mode == "input":
        shifts = time_shift.for_grid(grid, device)
    elif time_shift is not None:
        moves = time_shift.target_moves(grid, device, compute_dtype(x_T.dtype))
    if guidance is not None:
        if _batch_of(cond) != batch or _batch_of(uncond) != batch:
            raise ValueError(f"cond/uncond batch sizes must equal the sample batch {batch}")
        cond = _cat(uncond, cond)
    step = model_step if compile_options is None else compiled_step(compile_options)
    if graph:
        from .capture import captured_sample

        return captured_sample(step, model, plan, x_T, ts, cond, guidance, thresholding, check_finite)

    # Guidance is folded into the solver update: the executor reads both halves of the output.
    runner = PlanExecutor(plan, device, compute_dtype(x_T.dtype), thresholding, check_finite, guidance=guidance,
                          sample_dtype=x_T.dtype)
    # A step whose plan ignores the model output (USF's analytical first step) costs no evaluation.
    skipped = _output_ignored(plan)
    out_shape = (batch if guidance is None else 2 * batch, *x_T.shape[1:])
    x = x_T
    steps = range(grid.n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        if skipped[i]:
            x, denoised = runner.advance(i, x, x.new_zeros(out_shape), callback is not None)
        else:
            t = ts[i].expand(batch) if shifts[i] is None else TimeShift.select(x, *shifts[i])
            x_next, denoised = step(model, runner, i, x, t, cond, callback is not None or moves[i] is not None)
            x = x_next if moves[i] is None else moves[i].apply(x, x_next, denoised)
        runner.check_finite_upto(i + 1)  # reads flags only when that needs no device sync
        if callback is not None:
            callback(StepInfo(i, float(grid.model_timesteps[i]), float(grid.sigma[i]), x, denoised))
    runner.raise_if_nonfinite()
    return x


def model_step(model: Callable[..., torch.Tensor], runner: PlanExecutor, i: int, x: torch.Tensor, t: torch.Tensor,
               cond: Any, want_x0: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the functional loop: the model call (on the doubled batch with guidance) and the update."""
    if runner.guidance is None:
        out = _model_output(model(x, t) if cond is None else model(x, t, cond), x.shape)
    else:
        out = _model_output(model(torch.cat([x, x]), t.repeat(2), cond), (2 * x.shape[0], *x.shape[1:]))
    return runner.advance(i, x, out, want_x0)


_COMPILED: dict[str, Callable] = {}


def compiled_step(options: dict) -> Callable:
    """:func:`model_step` through ``torch.compile(**options)``, one compiled function per option set."""
    key = repr(sorted(options.items()))  # options may hold dicts (torch.compile's ``options=``)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model_step, **options)
    return _COMPILED[key]


def _compile_options(compile: Any) -> dict | None:
    if isinstance(compile, bool):
        return {} if compile else None
    if isinstance(compile, dict) and all(isinstance(k, str) for k in compile):
        return dict(compile)
    raise TypeError(f"compile must be True/False or a dict of torch.compile keyword arguments, got {compile!r}")


def _output_ignored(plan: SolverPlan) -> list[bool]:
    """Per step: True where the plan reads nothing of the model output (decided once, on the host)."""
    ignored = (plan.x0_coef[:, 1] == 0).tolist()
    if plan.predict_raw is not None:
        ignored = [g and not bool(plan.predict_raw[i].ne(0).any()) for i, g in enumerate(ignored)]
    return ignored


def _model_output(out: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"model output shape {tuple(out.shape)} does not match sample shape {tuple(shape)}")
    return out


def _batch_of(c: Any) -> int:
    if isinstance(c, torch.Tensor):
        if c.dim() == 0:
            raise ValueError("cond/uncond must have a batch dimension, got a 0-dim tensor")
        return c.shape[0]
    try:
        return len(c)
    except TypeError:
        raise TypeError(f"cond/uncond must be a tensor or a list with one entry per sample, got {type(c).__name__}") from None


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return list(a) + list(b)
