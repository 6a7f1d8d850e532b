"""The one diffusers adapter: any registered solver as a drop-in diffusers scheduler.

    pipe.scheduler = fewstep.UniPCScheduler.from_config(pipe.scheduler.config)

``FewstepScheduler`` picks its solver from the config; the named subclasses
(``DDIMSolverScheduler``, ``DPMSolverPPScheduler``, ``UniPCScheduler``) only fix the
default. Schedule, grid and prediction come from the pipeline's own scheduler config:
VP configs (betas) and flow-matching configs (FlowMatchEulerDiscreteScheduler's
``shift``/dynamic shifting, or UniPC/DPM ``use_flow_sigmas`` + ``flow_shift``) are
both understood. The solver's coefficient table is built once in ``set_timesteps``;
``step`` is the shared :class:`~fewstep.samplers.plan.PlanExecutor`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .artifact_checks import check_scheduler_run
from .artifacts import Artifact, is_file_reference, resolve_file_reference
from .diffusers_config import (
    COMPATIBLE_SCHEDULERS,
    DIFFUSERS_SOLVER_KEYS,
    SCHEDULE_KEYS_IN_KWARGS,
    SIGMA_FLAG_SPACINGS,
    check_foreign_source,
    diffusers_solver_keys,
    foreign_solver_options,
    init_keys_of,
    is_flow_config,
    translate_schedule_flags,
)
from .plan import PlanExecutor, SolverPlan
from .prediction import Clip, DynamicThreshold, check_prediction
from .registry import get_solver, solver_class
from .plan import compute_dtype
from .schedules import DiscreteVPSchedule, FlowSchedule, NoiseSchedule, diffusers_betas
from .solver_schedule import apply_solver_schedule
from .timesteps import SPACINGS, GridSpec, TimeGrid, build_grid, check_one_step_start
from fewstep.infra.validation import MAX_NFE, as_real_vector, check_bool, check_choice, check_int, check_nfe, check_real

__all__ = [
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "DDIMSolverScheduler",
    "DPMSolverPPScheduler",
    "UniPCScheduler",
    "USFScheduler",
    "DCSolverScheduler",
    "DPMSolverV3Scheduler",
]

# diffusers' names for solver options, accepted as keyword arguments of from_config.
_OPTION_ALIASES = {"solver_order": "order", "solver_type": "variant"}


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """Output of :meth:`FewstepScheduler.step`.

    Attributes:
        prev_sample: The sample at the next (less noisy) timestep.
        pred_original_sample: The data prediction x0 at the current timestep.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # BaseOutput's generic field walk, for these two fields (it runs once per step).
        OrderedDict.__setitem__(self, "prev_sample", self.prev_sample)
        if self.pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", self.pred_original_sample)


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any fewstep solver.

    Args:
        solver: Registered solver name (default: the class's solver).
        solver_options: Options of that solver, e.g. ``{"order": 3, "variant": "bh1"}``.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            rescale_betas_zero_snr: The VP noise schedule, as in diffusers.
        prediction_type: ``epsilon``, ``sample``, ``v_prediction`` or ``flow_prediction``
            (the latter selects the flow-matching schedule alpha = 1 - sigma).
        timestep_spacing: diffusers' ``linspace``/``leading``/``trailing`` or fewstep's
            ``logsnr``/``time_uniform``/``time_quadratic``/``karras``; None takes the default
            of the solver's diffusers twin (``leading`` for DDIM, ``linspace`` otherwise).
        steps_offset: Offset of ``leading`` timesteps.
        final_sigmas_type: ``"zero"`` (end on clean data) or ``"sigma_min"``.
        set_alpha_to_one: DDIMScheduler's name for the final step: with the DDIM solver,
            False ends on ``alphas_cumprod[0]`` (overrides ``final_sigmas_type``); other
            solvers ignore it, as diffusers' multistep schedulers do.
        variance_type: ``"learned"``/``"learned_range"`` for models that also output a
            variance (the extra channels are dropped), as in diffusers.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen dynamic thresholding of x0.
        clip_sample, clip_sample_range: Clamp x0 (DDPM-style pixel models).
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, time_shift_type, shift_terminal: Flow-matching grid shifts,
            as in FlowMatchEulerDiscreteScheduler.
        solver_order, solver_type, algorithm_type, lower_order_final, predict_x0: diffusers'
            multistep names for solver options; they fill ``solver_options`` where the solver
            has the same option (explicit ``solver_options`` win) and are kept in the config
            with the values in force, so a diffusers scheduler built from it runs the same.
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas: diffusers' grid flags
            (the same grids as ``timestep_spacing`` ``karras``/``exponential``/``logsnr``,
            which are stored as these flags).
        use_flow_sigmas, flow_shift: UniPC/DPM's flow-matching flags (Wan, Sana): a flow
            config whose shift is ``flow_shift``.
        schedule_overrides_sigmas: With a ``solver_schedule``: run the schedule's grid even when
            the caller's ``sigmas``/``timesteps`` give another one (by default that is an error).
    """

    # diffusers lists these in .compatibles (the schedulers whose configs translate).
    _compatibles: ClassVar[list[str]] = list(COMPATIBLE_SCHEDULERS)
    order = 1
    default_solver: ClassVar[str] = "unipc"

    @register_to_config
    def __init__(
        self,
        solver: str | None = None,
        solver_options: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | np.ndarray | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        set_alpha_to_one: bool | None = None,
        variance_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        solver_order: int | None = None,
        solver_type: str | None = None,
        algorithm_type: str | None = None,
        lower_order_final: bool | None = None,
        predict_x0: bool | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        schedule_overrides_sigmas: bool = False,
    ):
        if solver is not None and not isinstance(solver, str):
            raise TypeError(f"solver={solver!r} must be a registered solver name")
        name = solver or self.default_solver
        if type(self) is not FewstepScheduler and name != self.default_solver:
            raise ValueError(
                f"{type(self).__name__} runs solver {self.default_solver!r}, not {name!r}; "
                f"use FewstepScheduler(solver={name!r})"
            )
        if solver_options is not None and not isinstance(solver_options, dict):
            raise TypeError(f"solver_options must be a mapping of option names to values, got {solver_options!r}")
        diffusers_names = {k: v for k, v in locals().items() if k in DIFFUSERS_SOLVER_KEYS and v is not None}
        options = {**foreign_solver_options(diffusers_names, solver_class(name)), **(solver_options or {})}
        self.solver = get_solver(name, **options)
        # Record the resolved solver and its full option set, so saved configs are explicit.
        synced = diffusers_solver_keys(self.solver, diffusers_names)
        # diffusers' names that mean nothing here stay out of the config (diffusers would read a None)
        unset = tuple(k for k in DIFFUSERS_SOLVER_KEYS if k not in synced and k not in diffusers_names)
        _register_kept(self, drop=unset, solver=name, solver_options=_jsonable(self.solver), **synced)
        if use_flow_sigmas:
            if prediction_type not in ("flow", "flow_prediction"):
                raise ValueError(f"use_flow_sigmas=True needs prediction_type='flow_prediction', got {prediction_type!r}")
            check_real("flow_shift", flow_shift, 0.0, open_min=True)
            if shift not in (1.0, flow_shift):
                raise ValueError(f"shift={shift} and flow_shift={flow_shift} disagree (use_flow_sigmas=True reads "
                                 "flow_shift, as diffusers' UniPC/DPM do); give one value")
            if shift != flow_shift:
                _register_kept(self, shift=flow_shift)  # FlowMatchEuler reads the same shift from this config
                shift = flow_shift
        is_flow = prediction_type in ("flow", "flow_prediction")
        _check_config_values(locals(), is_flow)
        timestep_spacing = self._resolve_sigma_flags(timestep_spacing)
        if timestep_spacing is None:
            # Resolve the solver's diffusers default now, so saved configs load into diffusers'
            # schedulers too; it stays listed in _use_default_values, so a config chain to
            # another solver still takes that solver's own default.
            ddim = self.solver.diffusers_convention == "ddim"
            self.register_to_config(timestep_spacing=self._default_spacing(ddim, is_flow))
            self._spacing = self._spacing or self.config.timestep_spacing
        if set_alpha_to_one is None:
            self.register_to_config(set_alpha_to_one=final_sigmas_type == "zero")

        self.schedule: NoiseSchedule
        if is_flow:
            self.schedule = FlowSchedule(num_train_timesteps)
        else:
            self.schedule = DiscreteVPSchedule.from_betas(
                num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
            )
            # diffusers' attributes, for pipelines that read them (LEdits++, ...).
            self.alphas_cumprod = self.schedule.alphas_cumprod.float()
            self.betas = diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                         rescale_betas_zero_snr)
            self.alphas = 1.0 - self.betas
        self.prediction = check_prediction(prediction_type, self.schedule)
        if thresholding:
            self.transform = DynamicThreshold(dynamic_thresholding_ratio, sample_max_value)
        elif clip_sample:
            self.transform = Clip(clip_sample_range)
        else:
            self.transform = None
        # A plain attribute, not config: callers may switch the end-of-run NaN check off.
        self.check_finite = True
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.grid: TimeGrid | None = None
        self.plan: SolverPlan | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas: torch.Tensor | None = None
        self._index = -1  # next step; an int from the start, so torch.compile sees one changing int
        self._begin_index: int | None = None
        self._executor: PlanExecutor | None = None
        self._run: _CachedGrid | None = None
        self._cache: OrderedDict[tuple, _CachedGrid] = OrderedDict()

    @staticmethod
    def _default_spacing(ddim: bool, is_flow: bool) -> str:
        """diffusers' default timestep spacing of the solver's scheduler family."""
        return "leading" if ddim and not is_flow else "linspace"

    def _resolve_sigma_flags(self, timestep_spacing: str | None) -> str | None:
        """Store karras/exponential/logsnr as diffusers' flags; the spacing the grid uses is ``self._spacing``."""
        flags = [k for k in SIGMA_FLAG_SPACINGS if check_bool(k, self.config[k])]
        named = {v: k for k, v in SIGMA_FLAG_SPACINGS.items()}.get(timestep_spacing)
        if named is not None:
            if flags and flags != [named]:
                raise ValueError(f"timestep_spacing={timestep_spacing!r} conflicts with {flags[0]}=True")
            # diffusers rejects these spacing names: keep a spacing it reads and the flag it knows.
            _register_kept(self, **{named: True})
            self.register_to_config(timestep_spacing=None)
            flags, timestep_spacing = [named], None
        if len(flags) > 1:
            raise ValueError(f"{' and '.join(flags)} are mutually exclusive (each picks a different grid)")
        self._spacing = SIGMA_FLAG_SPACINGS[flags[0]] if flags else timestep_spacing
        return timestep_spacing

    # ------------------------------------------------------------------ config translation
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from any compatible diffusers scheduler config (VP or flow), routing solver options.

        Schedule and grid keys keep their meaning; UniPC/DPM's ``use_flow_sigmas`` +
        ``flow_shift`` and ``use_karras_sigmas``/``use_lu_lambdas``/``use_exponential_sigmas``
        are translated, whether they come with a diffusers config or as keywords next to a
        fewstep one; their ``solver_order``/``solver_type``/``algorithm_type``/... carry over
        where this solver has the same option (see :mod:`fewstep.samplers.diffusers_config`).
        Keyword arguments that are options of the solver (``order=3``, or diffusers'
        ``solver_order=3``) go into ``solver_options``; any other unknown keyword, configs of
        schedulers fewstep cannot sample, and settings it cannot reproduce raise ValueError.
        """
        if config is None:
            raise ValueError("from_config needs a scheduler config (e.g. pipe.scheduler.config)")
        if not isinstance(config, Mapping):
            raise TypeError(f"a scheduler config must be a mapping (a JSON object), got {type(config).__name__}")
        config = dict(config)
        kwargs = dict(kwargs)
        # diffusers' own schedule flags are accepted as keywords too, and translated alike.
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k in SCHEDULE_KEYS_IN_KWARGS}
        config.update(flags)
        init_keys = init_keys_of(cls)
        source_solver = config.get("solver")  # fewstep configs always record their solver
        if cls is FewstepScheduler:
            solver_name = kwargs.get("solver") or source_solver or cls.default_solver
        else:
            solver_name = cls.default_solver
        target = solver_class(solver_name)

        if source_solver is not None:
            # A fewstep config: same keys; a different solver does not inherit the old options.
            if source_solver != solver_name:
                config.pop("solver_options", None)
        else:
            check_foreign_source(config, init_keys)
            options = foreign_solver_options(config, target)
            if options:
                config["solver_options"] = options
        config = translate_schedule_flags(config, init_keys, given=set(flags))
        config["solver"] = solver_name

        option_names = set(target.options)
        routed = {}
        for key in list(kwargs):
            if key in init_keys or key.startswith("_"):
                continue
            name = _OPTION_ALIASES.get(key, key)
            if name in option_names:
                routed[name] = kwargs.pop(key)
            else:
                raise ValueError(
                    f"unknown keyword {key!r} for {cls.__name__}; scheduler keys: {', '.join(sorted(init_keys))}; "
                    f"options of solver {solver_name!r}: {', '.join(sorted(option_names)) or 'none'}"
                )
        if routed or "solver_options" in kwargs:
            given = kwargs.get("solver_options") or {}
            if not isinstance(given, Mapping):
                raise TypeError(f"solver_options must be a mapping of option names to values, got {given!r}")
            kwargs["solver_options"] = {**(config.get("solver_options") or {}), **given, **routed}
        if cls is not FewstepScheduler:
            config.pop("solver", None)  # fixed by the class; a conflicting solver= keyword raises in __init__
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """Load a saved scheduler (diffusers' ``from_pretrained``), with the artifact files saved beside it.

        Errors name the config's location.
        """
        where = str(pretrained_model_name_or_path) + (f"/{subfolder}" if subfolder else "")
        hub_kwargs = dict(kwargs)
        try:
            config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                             return_unused_kwargs=True, **kwargs)
            if isinstance(config, Mapping):
                config = _resolve_artifact_files(dict(config), str(pretrained_model_name_or_path), subfolder,
                                                 hub_kwargs)
            return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"scheduler config in {where}: {exc}") from None

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus the file-backed artifacts (e.g. EMS) next to the config."""
        for value in self.solver.config.values():
            if isinstance(value, Artifact) and value.file_backed:
                value.save(Path(save_directory) / value.filename)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ------------------------------------------------------------------ diffusers API
    @property
    def step_index(self) -> int | None:
        """Index of the next step to take (None before the first step)."""
        return None if self._index < 0 else self._index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by img2img pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at step ``begin_index`` (img2img / inpainting strength).

        Raises:
            TypeError, ValueError: for a non-integer index or one beyond the number of steps.
        """
        # n itself is allowed, as diffusers does: img2img at a low strength and step count cuts
        # every step (the pipeline then takes none).
        steps = self.grid.n if self.grid is not None else MAX_NFE
        self._begin_index = check_int("begin_index", begin_index, 0, steps)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """VP and flow models take the sample unscaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: list[float] | np.ndarray | None = None,
    ) -> None:
        """Place the timesteps and build the solver's coefficient table.

        Args:
            num_inference_steps: Number of model evaluations (with a ``solver_schedule``: its
                number of steps, or None).
            device: Where ``self.timesteps`` lives.
            sigmas: Custom diffusers sigmas (flow sigmas are shifted, as FlowMatchEuler does).
            mu: Dynamic shift, required when ``use_dynamic_shifting`` (Flux / SD3).
            timesteps: Custom model timesteps.

        Raises:
            ValueError: conflicting or missing arguments, or an invalid grid.
        """
        cfg = self.config
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass either sigmas or timesteps, not both")
        has_schedule = self.solver.config.get("solver_schedule") is not None
        if num_inference_steps is None and sigmas is None and timesteps is None and not has_schedule:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        if num_inference_steps is not None:
            num_inference_steps = check_nfe(num_inference_steps, "num_inference_steps")
        try:
            device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r} is not a torch device") from None
        is_flow = isinstance(self.schedule, FlowSchedule)
        if mu is not None and is_flow and not cfg.use_dynamic_shifting:
            mu = None  # Flux-family pipelines always pass mu; diffusers ignores it without dynamic shifting
        if mu is not None:
            if not is_flow:
                raise ValueError("mu (the dynamic shift) needs a flow-matching config with use_dynamic_shifting=True")
            mu = check_real("mu", mu)
        elif is_flow and cfg.use_dynamic_shifting:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
        if timesteps is not None and is_flow and (cfg.shift != 1.0 or cfg.use_dynamic_shifting or cfg.shift_terminal):
            # diffusers' FlowMatchEuler feeds the model these timesteps but integrates between the
            # *shifted* sigmas t / 1000 -> shift(t / 1000): the model sees other noise levels than the
            # sample has. fewstep keeps one time per point, so it refuses instead of guessing.
            raise ValueError(
                f"custom timesteps on a shifted flow-matching config (shift={cfg.shift}, use_dynamic_shifting="
                f"{cfg.use_dynamic_shifting}, shift_terminal={cfg.shift_terminal}): diffusers would shift the sigmas "
                "derived from them but not the timesteps, so model input and noise level disagree; pass sigmas= "
                "(they are shifted like the default grid) or use a config with shift=1")
        timesteps = None if timesteps is None else tuple(as_real_vector("timesteps", timesteps).tolist())
        sigmas = None if sigmas is None else tuple(as_real_vector("sigmas", sigmas).tolist())
        # Pipelines call set_timesteps with the same arguments for every image: the grid, its
        # plan and the executors built for it are kept (the config is fixed at construction).
        key = (num_inference_steps, mu, timesteps, sigmas)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._build_grid(num_inference_steps, mu, timesteps, sigmas)
            self._cache[key] = entry
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self._run = entry  # only once grid and plan succeeded: a failed call changes nothing
        self.grid, self.plan = entry.grid, entry.plan
        self.timesteps = entry.timesteps.to(device=device, copy=True)  # the caller's to keep or modify
        self.sigmas = entry.sigmas.clone()
        self.num_inference_steps = entry.grid.n
        self._index = -1
        self._begin_index = None
        self._executor = None

    def grid_spec(self, mu: float | None = None, timesteps: tuple[float, ...] | None = None,
                  sigmas: tuple[float, ...] | None = None) -> GridSpec:
        """The grid this scheduler's config asks for (spacing, end point, offset, shifts, convention).

        ``set_timesteps`` builds its grid from it (a solver schedule may then replace the points);
        tools that must run on the same grid outside a pipeline (``fewstep calibrate dc``) take it
        from here rather than re-deriving it from the config.

        Args:
            mu: The dynamic shift (flow-matching configs with ``use_dynamic_shifting``).
            timesteps: Custom model timesteps.
            sigmas: Custom diffusers sigmas.
        """
        cfg = self.config
        is_flow = isinstance(self.schedule, FlowSchedule)
        final = cfg.final_sigmas_type
        if self.solver.diffusers_convention == "ddim":
            final = "zero" if cfg.set_alpha_to_one else "sigma_min"
        return GridSpec(
            spacing=self._spacing,
            final_sigma="zero" if final == "zero" else "min",
            steps_offset=cfg.steps_offset,
            shift=cfg.shift if is_flow else 1.0,
            mu=mu,
            time_shift_type=cfg.time_shift_type,
            shift_terminal=(cfg.shift_terminal or None) if is_flow else None,
            timesteps=timesteps,
            sigmas=sigmas,
            convention=self.solver.diffusers_convention,
        )

    def _build_grid(self, num_inference_steps, mu, timesteps, sigmas) -> "_CachedGrid":
        cfg = self.config
        spec = self.grid_spec(mu, timesteps, sigmas)
        if self.solver.config.get("solver_schedule") is not None:  # it fixes the grid (and checks the step count)
            if timesteps is not None or sigmas is not None:
                if not cfg.schedule_overrides_sigmas:
                    self._check_requested_grid(build_grid(self.schedule, None, spec))
                spec = spec.replace(timesteps=None, sigmas=None)
                num_inference_steps = None  # the request's length was checked against the schedule's
            spec = apply_solver_schedule(self.solver, spec, self.schedule, steps=num_inference_steps)
            num_inference_steps = None
        plan = self.solver.plan(build_grid(self.schedule, num_inference_steps, spec), self.prediction)
        grid = plan.grid  # a solver may move the points (DPM-Solver-v3 snaps them to its EMS grid)
        ts = grid.model_timesteps
        return _CachedGrid(grid, plan, ts.round().long() if grid.integer_timesteps else ts.float(),
                           grid.diffusers_sigmas().float(), ts.tolist())

    def _check_requested_grid(self, requested: TimeGrid) -> None:
        """A caller's sigmas/timesteps (Flux-family pipelines always pass them) must be the schedule's grid."""
        ours = self.solver.config["solver_schedule"].timesteps
        theirs = requested.model_timesteps.tolist()
        if len(theirs) == len(ours) and max(abs(a - b) for a, b in zip(theirs, ours)) <= _SCHEDULE_MATCH:
            return
        raise ValueError(
            f"the solver schedule runs its own {len(ours)} timesteps {[round(t, 3) for t in ours]}, but the "
            f"caller's sigmas/timesteps give {len(theirs)}: {[round(t, 3) for t in theirs]}; pass the schedule's "
            "grid (a pipeline's default sigmas at the schedule's step count and resolution give it), tune a "
            "schedule for this grid, or set schedule_overrides_sigmas=True to run the schedule's grid anyway")

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (looked up on the host, in float64).

        Raises:
            ValueError: if the timestep is not one of the scheduled timesteps.
        """
        if schedule_timesteps is None:
            if self.grid is None:
                raise ValueError("call set_timesteps before step")
            values = self._run.timestep_values  # the grid's float64 model timesteps, as Python floats
        elif schedule_timesteps.device.type == "meta":
            raise ValueError("cannot look up timesteps on the meta device; call set_begin_index first")
        else:
            values = schedule_timesteps.detach().cpu().double().tolist()
        value = _host_scalar("timestep", timestep)
        for i, v in enumerate(values):
            if abs(v - value) <= 1e-4:
                return i
        raise ValueError(f"timestep {value:g} is not one of the {len(values)} scheduled timesteps")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        use_clipped_model_output: bool | None = None,
        return_dict: bool = True,
    ) -> FewstepSchedulerOutput | tuple:
        """Advance ``sample`` one step with the solver.

        Args:
            model_output: Raw network output at (sample, timestep).
            timestep: The current timestep (used to find the position on the first call;
                on the meta device, where values cannot be read, the run starts at the
                begin index, or 0).
            sample: The current sample.
            eta: Must be 0: the solvers are deterministic ODE solvers (pipelines pass it).
            generator: Accepted for pipelines that pass one; ODE solvers draw no noise.
            use_clipped_model_output: Accepted as None/False (DDIMPipeline passes it).
            return_dict: Return a :class:`FewstepSchedulerOutput` rather than a tuple.

        Raises:
            ValueError: before set_timesteps, after the last step, on shape/device mismatch, or
                for eta != 0 / use_clipped_model_output=True.
            TypeError: for non-floating-point samples or model outputs.
            FloatingPointError: when a model output or the sample became NaN/Inf (see
                ``check_finite``), at the step where that is known without a device sync
                and at the latest after the last step.
        """
        if eta:
            raise ValueError(f"eta={eta}: fewstep solvers are deterministic ODE solvers (eta = 0)")
        if use_clipped_model_output:
            raise ValueError("use_clipped_model_output=True is not supported (DDIM takes eps from the raw output)")
        if self.grid is None:
            raise ValueError("call set_timesteps before step")
        if self.config.variance_type in ("learned", "learned_range") and isinstance(model_output, torch.Tensor):
            if sample.dim() < 2:
                raise ValueError("variance_type='learned*' needs samples with a channel dimension [B, C, ...]")
            if model_output.shape[1] == 2 * sample.shape[1]:
                model_output = model_output[:, : sample.shape[1]]  # drop the predicted variance channels
        if torch.compiler.is_compiling():
            ex, local = self._begin_step_outside_graph(timestep, sample)
        else:
            ex, local = self._begin_step(timestep, sample)
        prev_sample, x0 = ex.step(local, sample, model_output)
        if torch.compiler.is_compiling():
            self._end_step_outside_graph(ex, local)
        else:
            self._end_step(ex, local)
        if not return_dict:
            return (prev_sample, x0)
        return FewstepSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _begin_step(self, timestep: float | torch.Tensor, sample: torch.Tensor) -> tuple[PlanExecutor, int]:
        """The executor and the step index within its run (host bookkeeping)."""
        if self._index < 0:
            if self._begin_index is not None:
                self._index = self._begin_index
            elif isinstance(timestep, torch.Tensor) and timestep.device.type == "meta":
                self._index = 0  # meta tensors hold no values: assume a run from the start
            else:
                self._index = self.index_for_timestep(timestep)
        i = self._index
        if i >= self.grid.n:
            raise ValueError(f"all {self.grid.n} steps have been taken; call set_timesteps again")
        if not self._is_timestep(timestep, i):
            # diffusers' DDIM steps from whatever timestep it is given, its multistep schedulers
            # silently take their next step; a solver's plan is tied to its grid, so say so.
            raise ValueError(
                f"step() got timestep {_host_scalar('timestep', timestep):g}, but this run's next step is "
                f"{i} (timestep {self._run.timestep_values[i]:g}); fewstep steps along the grid set_timesteps "
                "made, in order: call set_timesteps (and set_begin_index) for another start")
        ex = self._executor
        if ex is None or (ex.next_step == 0 and ex.sample_dtype != sample.dtype) \
                or ex.device != sample.device or ex.dtype != compute_dtype(sample.dtype):
            if ex is not None and ex.next_step != 0:
                raise ValueError("the sample moved device or dtype in the middle of a run")
            ex = self._executor = self._start_run(i, sample)
        return ex, i - self._run_start

    def _is_timestep(self, timestep: float | torch.Tensor, i: int) -> bool:
        """Whether ``timestep`` is grid point i, where that is known without a device sync (else True)."""
        if isinstance(timestep, torch.Tensor):
            ts = self.timesteps
            if timestep.device.type == "meta" or timestep.numel() != 1:
                return True
            if (timestep.device == ts.device and ts.dim() == 1 and timestep.dim() == 0
                    and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
                # an element of self.timesteps (how pipelines loop): its position, from metadata alone
                return timestep.storage_offset() - ts.storage_offset() == i * ts.stride(0)
            if timestep.device.type != "cpu":
                return True  # reading it would wait for the device
        value = _host_scalar("timestep", timestep)
        return abs(value - self._run.timestep_values[i]) <= 1e-4 * max(1.0, abs(value))

    def _end_step(self, ex: PlanExecutor, local: int) -> None:
        self._index = self._run_start + local + 1
        ex.check_finite_upto(local + 1, wait=self._index == self.grid.n)

    # Under torch.compile the bookkeeping runs outside the graph: the traced step then only
    # sees tensors and the step index, and compiles twice (the index becomes dynamic) in all.
    _begin_step_outside_graph = torch.compiler.disable(_begin_step)
    _end_step_outside_graph = torch.compiler.disable(_end_step)

    def raise_if_nonfinite(self) -> None:
        """Check every step of the current run so far (one device sync).

        ``step`` checks on its own; call this after a run you stopped early (SDXL's
        ``denoising_end``, an interrupted pipeline) to be sure its last steps were finite.

        Raises:
            FloatingPointError: naming the first step whose model output or sample was NaN/Inf.
        """
        if self._executor is not None:
            self._executor.raise_if_nonfinite()

    def _start_run(self, start: int, sample: torch.Tensor) -> PlanExecutor:
        """The executor of this grid for a run from ``start`` on this device and dtype (built once, then reset)."""
        check_scheduler_run(self)  # tuned files against this run's guidance and grid (artifact_checks.py)
        dtype = compute_dtype(sample.dtype)
        key = (start, sample.device, sample.dtype, bool(self.check_finite))
        ex = self._run.executors.get(key)
        for other in (e for entry in self._cache.values() for e in entry.executors.values()):
            if other is not ex:
                other.release_buffers()  # only the running executor keeps sample-sized buffers
        if ex is None:
            # A run that starts part-way (img2img) has no history: rebuild the plan from there
            # so the warm-up orders restart, as diffusers' multistep schedulers do.
            plan = self.plan if start == 0 else self.solver.plan(self.grid.subgrid(start), self.prediction)
            ex = PlanExecutor(plan, sample.device, dtype, self.transform, self.check_finite, step_offset=start,
                              sample_dtype=sample.dtype)
            self._run.executors[key] = ex
        else:
            ex.reset()
        self._run_start = start
        return ex

    def _alpha_sigma_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.schedule.time_from_model(torch.from_numpy(as_real_vector("timesteps", torch.as_tensor(timesteps)
                                                                          .reshape(-1))))
        self.schedule.check_time(t)
        alpha, sigma = self.schedule.alpha_sigma(t)
        if like.dim() == 0 or alpha.numel() == 1:
            shape = (1,) * like.dim()  # one timestep for the whole batch
        elif alpha.numel() == like.shape[0]:
            shape = (-1,) + (1,) * (like.dim() - 1)
        else:
            raise ValueError(f"got {alpha.numel()} timesteps for a batch of {like.shape[0]} samples")
        return (alpha.to(like.device, like.dtype).reshape(shape), sigma.to(like.device, like.dtype).reshape(shape))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = alpha_t x_0 + sigma_t noise at the given model timesteps."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match the samples' {tuple(original_samples.shape)}")
        alpha, sigma = self._alpha_sigma_at(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise` (argument order as in diffusers)."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


_CACHE_SIZE = 8  # grids (with their plans and executors) kept per scheduler
# How far (in model timesteps, 0..1000) a caller's grid may be from a solver schedule's and still
# count as the same: float32 pipelines round sigmas to ~1e-7 relative.
_SCHEDULE_MATCH = 1e-3


@dataclass
class _CachedGrid:
    """One set_timesteps result: grid, plan, the public timesteps/sigmas, and executors per run kind."""

    grid: TimeGrid
    plan: SolverPlan
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    timestep_values: list[float]
    executors: dict = field(default_factory=dict)


def _register_kept(scheduler: ConfigMixin, drop: tuple[str, ...] = (), **values: Any) -> None:
    """Set config keys and drop them from ``_use_default_values``, so diffusers' from_config reads them.

    Keys in ``drop`` are removed. An emptied ``_use_default_values`` is removed, as diffusers leaves
    it out when every key was given (a saved and reloaded config then equals the one it was saved from).
    """
    config = {k: v for k, v in {**scheduler.config, **values}.items() if k not in drop}
    defaults = [k for k in config.get("_use_default_values", ()) if k not in values and k not in drop]
    config.pop("_use_default_values", None)
    if defaults:
        config["_use_default_values"] = defaults
    scheduler._internal_dict = FrozenDict(config)


def _host_scalar(name: str, value: Any) -> float:
    """A Python float from a number or a one-element tensor (one host read, before a run)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single value, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().cpu().double().item()
    return check_real(name, value)


def _check_config_values(values: dict[str, Any], is_flow: bool) -> None:
    """Type and range checks of the config keys not validated by the schedule/solver they feed."""
    for key in ("thresholding", "clip_sample", "use_dynamic_shifting", "rescale_betas_zero_snr",
                "schedule_overrides_sigmas"):
        check_bool(key, values[key])
    if values["set_alpha_to_one"] is not None:
        check_bool("set_alpha_to_one", values["set_alpha_to_one"])
    if values["timestep_spacing"] is not None:
        check_choice("timestep_spacing", values["timestep_spacing"], SPACINGS)
    check_choice("final_sigmas_type", values["final_sigmas_type"], ("zero", "sigma_min"))
    check_choice("variance_type", values["variance_type"], (None, "learned", "learned_range", "fixed_small",
                                                              "fixed_small_log", "fixed_large", "fixed_large_log"))
    check_choice("time_shift_type", values["time_shift_type"], ("exponential", "linear"))
    check_int("steps_offset", values["steps_offset"], 0, 100_000)
    # diffusers' ranges: ratio 0 takes the minimum |x0|, a max value below 1 caps s below 1.
    check_real("dynamic_thresholding_ratio", values["dynamic_thresholding_ratio"], 0.0, 1.0)
    check_real("sample_max_value", values["sample_max_value"], 0.0, open_min=True)
    check_real("clip_sample_range", values["clip_sample_range"], 0.0, open_min=True)
    check_real("shift", values["shift"], 0.0, open_min=True)
    for key in ("base_shift", "max_shift"):
        check_real(key, values[key])
    for key in ("base_image_seq_len", "max_image_seq_len"):
        check_int(key, values[key], 1)
    if values["shift_terminal"]:
        check_real("shift_terminal", values["shift_terminal"], 0.0, 1.0, open_min=True, open_max=True)
    if is_flow:
        if values["trained_betas"] is not None:
            raise ValueError("trained_betas describe a VP schedule; this is a flow-matching config")
    else:
        flow_only = [k for k, bad in (("shift", values["shift"] != 1.0),
                                      ("use_dynamic_shifting", values["use_dynamic_shifting"]),
                                      ("shift_terminal", bool(values["shift_terminal"]))) if bad]
        if flow_only:
            raise ValueError(f"{', '.join(flow_only)} only appl{'y' if len(flow_only) > 1 else 'ies'} to flow-matching configs "
                             "(prediction_type='flow_prediction'), not to this VP config")


def _jsonable(solver: Any) -> dict[str, Any]:
    def entry(v: Any) -> Any:
        if isinstance(v, Artifact):
            return v.to_config()  # inline record, or a reference to the file save_pretrained writes
        return list(v) if isinstance(v, tuple) else v

    # An unset artifact option (no tuned file) is the default: nothing to record.
    return {k: entry(v) for k, v in solver.config.items() if not (v is None and solver.options[k].kind == "artifact")}


def _resolve_artifact_files(config: dict[str, Any], source: str, subfolder: str | None,
                            hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Point the file references in ``solver_options`` at the folder the config came from."""
    options = config.get("solver_options")
    if not isinstance(options, Mapping):
        return config
    resolved = {}
    for key, value in options.items():
        if is_file_reference(value):  # a plain name beside the config, with its sha256 (checked on load)
            value = resolve_file_reference(value, lambda name: _artifact_path(source, subfolder, name, hub_kwargs),
                                           key)
        resolved[key] = value
    return {**config, "solver_options": resolved}


def _artifact_path(source: str, subfolder: str | None, filename: str, hub_kwargs: dict[str, Any]) -> str:
    folder = os.path.join(source, subfolder) if subfolder else source
    if os.path.isdir(source):
        return os.path.join(folder, filename)
    from huggingface_hub import hf_hub_download  # a hub id or cache: the same place diffusers read the config

    allowed = {k: v for k, v in hub_kwargs.items()
               if k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")}
    try:
        return hf_hub_download(source, filename, subfolder=subfolder, **allowed)
    except Exception:  # not on the hub/cache: the option loader reports the missing file by name
        return os.path.join(folder, filename)


class DDIMSolverScheduler(FewstepScheduler):
    """DDIM (eta = 0) as a drop-in scheduler; reproduces DDIMScheduler's timesteps."""

    default_solver = "ddim"


class DPMSolverPPScheduler(FewstepScheduler):
    """Multistep DPM-Solver++ as a drop-in scheduler (options: order, variant, space, ...)."""

    default_solver = "dpmpp"


class UniPCScheduler(FewstepScheduler):
    """UniPC as a drop-in scheduler (options: order, variant, corrector, disable_corrector, ...)."""

    default_solver = "unipc"


class USFScheduler(FewstepScheduler):
    """USF solver schedules as a drop-in scheduler: ``USFScheduler.from_config(cfg, solver_schedule=PATH)``."""

    default_solver = "usf"


class DCSolverScheduler(FewstepScheduler):
    """DC-Solver (UniPC + dynamic compensation) as a drop-in scheduler.

    ``from_config(config, ratios=[...])``, ``cpr=PATH, guidance=7.5`` or ``dc_file=PATH``; the
    ratios / CPR coefficients are stored inline in the config, so ``save_pretrained`` carries them.
    """

    default_solver = "dc"


class DPMSolverV3Scheduler(FewstepScheduler):
    """DPM-Solver-v3 as a drop-in scheduler; needs the model's EMS: ``from_config(cfg, ems=PATH)``.

    ``save_pretrained`` writes the EMS file next to the scheduler config and
    ``from_pretrained`` loads it back; timesteps are snapped to the EMS grid.
    """

    default_solver = "dpmv3"


# What set_timesteps sets: restored when OneStepScheduler refuses the grid it built.
_RUN_STATE = ("_run", "grid", "plan", "timesteps", "sigmas", "num_inference_steps", "_index", "_begin_index",
              "_executor")


class OneStepScheduler(FewstepScheduler):
    """One DDIM step from pure noise to clean data: returns the x0 prediction (one-step students, e.g. HiPA).

    ``from_config`` takes any compatible diffusers config (SD/SDXL epsilon, v-prediction, flow
    matching) and sets ``timestep_spacing="trailing"`` and the final step to sigma 0: with SD's
    ``leading`` (or ``linspace``) spacing a one-step grid would start at t = 1 (or 0), not at
    pure noise. The config's sigma-grid flags (Karras, exponential, ...) are dropped, since a
    one-step grid is its first timestep; ``set_alpha_to_one`` is dropped so DDIM ends at x0.
    """

    default_solver = "ddim"
    # Grid choices a one-step grid overrides (it is its first timestep, ending at sigma 0).
    _GRID_KEYS = ("set_alpha_to_one", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                  "use_lu_lambdas")

    @staticmethod
    def _default_spacing(ddim: bool, is_flow: bool) -> str:
        """From pure noise: ``trailing`` starts at t = T - 1 (flow grids start at sigma 1 with ``linspace``)."""
        return "linspace" if is_flow else "trailing"

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``, from pure noise (``trailing``; flow: ``linspace``) to sigma 0."""
        if isinstance(config, Mapping):
            config = {k: v for k, v in config.items() if k not in cls._GRID_KEYS}
            # Flow grids start at sigma = 1 with ``linspace``; VP needs ``trailing`` to start at t = T - 1.
            kwargs.setdefault("timestep_spacing", "linspace" if is_flow_config({**config, **kwargs}) else "trailing")
        kwargs.setdefault("final_sigmas_type", "zero")
        for key in cls._GRID_KEYS:
            kwargs.pop(key, None)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def set_timesteps(self, num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> None:
        """Sets the one-step grid; any other step count is refused."""
        if num_inference_steps != 1:
            raise ValueError(f"OneStepScheduler takes num_inference_steps=1, got {num_inference_steps!r}")
        state = {k: self.__dict__[k] for k in _RUN_STATE}
        super().set_timesteps(num_inference_steps, *args, **kwargs)
        given = dict(zip(("device", "sigmas", "mu", "timesteps"), args), **kwargs)
        if given.get("timesteps") is None and given.get("sigmas") is None:  # explicit grids are the caller's
            try:
                check_one_step_start(self.grid, f"OneStepScheduler with timestep_spacing="
                                     f"{self.config.timestep_spacing!r}",
                                     "use timestep_spacing='trailing' (OneStepScheduler.from_config sets it)")
            except ValueError:
                self.__dict__.update(state)  # a failed call changes nothing
                raise
