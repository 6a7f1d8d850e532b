"""Reading other diffusers schedulers' configs: what carries over, what is renamed, what cannot be honoured.

``FewstepScheduler.from_config`` accepts the config of the diffusers schedulers listed in
:data:`COMPATIBLE_SCHEDULERS` (VP schedulers with betas, and flow matching). Keys that describe
the noise schedule and the grid keep their meaning, and every key of the source stays in
the config (diffusers keeps the ones FewstepScheduler does not take as hidden entries), so a
diffusers scheduler built from a fewstep config again runs as from the source; the flow
flags of the multistep schedulers also set the flow schedule and its shift; solver settings
(``solver_order``, ``solver_type``, ``algorithm_type``, ...) carry over when the new solver
has the same option, and are written back under diffusers' names; and keys that would
change the model's noise levels in a way fewstep does not implement raise instead of being
dropped. Configs of other model families (Wuerstchen, LTX's rectified
flow sampler, LCM, EDM, inversion schedulers, ...) are refused by name, or, for a live
config without ``_class_name``, by the keys they carry.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from .solvers.base import Solver
from fewstep.infra.validation import check_bool

__all__ = [
    "COMPATIBLE_SCHEDULERS",
    "DIFFUSERS_SOLVER_KEYS",
    "SIGMA_FLAG_SPACINGS",
    "diffusers_solver_keys",
    "translate_schedule_flags",
    "check_foreign_source",
    "check_flag_types",
    "foreign_solver_options",
    "SCHEDULE_KEYS_IN_KWARGS",
    "init_keys_of",
    "is_flow_config",
]

# diffusers schedulers whose configs describe a VP (betas) or flow-matching model that fewstep's
# solvers sample exactly; stochastic ones map to their probability-flow ODE.
COMPATIBLE_SCHEDULERS = (
    "DDIMScheduler", "DDIMParallelScheduler", "DDPMScheduler", "DDPMParallelScheduler", "PNDMScheduler",
    "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "SASolverScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)

# Keys whose non-neutral values change the noise levels or the model's inputs.
_UNSUPPORTED = {
    "lambda_min_clipped": (lambda v: v is None or v == -math.inf, "clipping the log-SNR range (lambda_min_clipped)"),
    "snr_shift_scale": (lambda v: v in (None, 1.0), "CogVideoX's SNR-shifted schedule (snr_shift_scale)"),
    "use_beta_sigmas": (lambda v: not v, "beta-distributed sigmas (use_beta_sigmas)"),
    "invert_sigmas": (lambda v: not v, "inverted sigmas (invert_sigmas)"),
    "stochastic_sampling": (lambda v: not v, "stochastic flow sampling (stochastic_sampling)"),
    "timestep_type": (lambda v: v in (None, "discrete"), "continuous (log-sigma) timesteps (timestep_type)"),
    "sigma_data": (lambda v: v is None, "EDM-preconditioned schedulers (sigma_data); use the functional API"),
    "sigma_min": (lambda v: v is None, "custom sigma_min"),
    "sigma_max": (lambda v: v is None, "custom sigma_max"),
    "solver_p": (lambda v: v is None, "UniPC's solver_p"),
}

# diffusers' grid flags and the fewstep spacing each one selects (the flag is what a config stores).
SIGMA_FLAG_SPACINGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
                       "use_lu_lambdas": "logsnr"}
_SIGMA_FLAGS = tuple(SIGMA_FLAG_SPACINGS)
# Keys a user may also pass as keyword arguments of from_config, next to a fewstep config.
SCHEDULE_KEYS_IN_KWARGS = (*_SIGMA_FLAGS, "use_flow_sigmas", "flow_shift", *_UNSUPPORTED)
# Boolean keys of diffusers configs read here: a string such as "false" is truthy, so refuse it.
_BOOL_KEYS = (*_SIGMA_FLAGS, "use_flow_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling",
              "lower_order_final", "euler_at_final", "predict_x0")
# diffusers' multistep names for solver options (FewstepScheduler keeps them in its config).
DIFFUSERS_SOLVER_KEYS = ("solver_order", "solver_type", "algorithm_type", "lower_order_final", "predict_x0")

# Keys of the compatible schedulers that fewstep reads or may safely ignore (a live config
# carrying any other key belongs to a scheduler fewstep does not understand).
_IGNORABLE = {
    "skip_prk_steps", "interpolation_type", "solver_order", "solver_type", "algorithm_type", "lower_order_final",
    "euler_at_final", "disable_corrector", "predict_x0", "predictor_order", "corrector_order", "tau_func",
    "noise_sampler_seed",
}


def is_flow_config(config: dict[str, Any]) -> bool:
    """Whether a diffusers scheduler config describes a flow-matching model (not VP betas)."""
    return (
        str(config.get("_class_name") or "").startswith("FlowMatch")
        or config.get("use_flow_sigmas") is True
        or config.get("prediction_type") in ("flow_prediction", "flow")
        # Live configs carry no _class_name: a shift but no betas means flow matching.
        or ("shift" in config and "beta_schedule" not in config and "trained_betas" not in config)
    )


def check_flag_types(config: dict[str, Any]) -> None:
    """Refuse non-boolean values of diffusers' boolean keys (None means unset).

    Raises:
        TypeError: naming the key and the value.
    """
    for key in _BOOL_KEYS:
        if config.get(key) is not None:
            check_bool(key, config[key])


def check_foreign_source(config: dict[str, Any], init_keys: set[str]) -> None:
    """Refuse configs of schedulers fewstep cannot sample (by class name, or by unknown keys).

    Raises:
        ValueError: naming the scheduler or the keys.
    """
    name = config.get("_class_name")
    if name is not None:
        if name not in COMPATIBLE_SCHEDULERS:
            raise ValueError(
                f"cannot build a fewstep scheduler from a {name} config: it is not one of the VP or "
                f"flow-matching schedulers fewstep reads ({', '.join(COMPATIBLE_SCHEDULERS)})"
            )
        return
    known = init_keys | _IGNORABLE | set(SCHEDULE_KEYS_IN_KWARGS)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(
            f"cannot build a fewstep scheduler from a config with keys {unknown}: they belong to no VP or "
            "flow-matching scheduler fewstep reads (pass the config of one of: "
            f"{', '.join(COMPATIBLE_SCHEDULERS)})"
        )


def translate_schedule_flags(config: dict[str, Any], init_keys: set[str], given: set[str] = frozenset()
                             ) -> dict[str, Any]:
    """Map diffusers' schedule and grid flags onto FewstepScheduler's keys.

    Applies to any source config (a diffusers one, or a fewstep one given diffusers flags as
    keywords), so a flag means the same whichever scheduler it is given to. ``given`` names
    the flags passed as keywords: they override what the config already says.

    Raises:
        ValueError: naming the key, for settings fewstep cannot reproduce.
        TypeError: a boolean key holding a string or number.
    """
    check_flag_types(config)
    for key, (neutral, what) in _UNSUPPORTED.items():
        if key in config and not neutral(config[key]):
            raise ValueError(f"{what} = {config[key]!r} is not supported by fewstep's schedulers")
    out = dict(config)
    defaults = set(out.get("_use_default_values", ())) - set(given)  # a keyword is no default
    set_keys = set(given)
    sigma_flags = [k for k in _SIGMA_FLAGS if config.get(k) and k not in defaults]
    if len(sigma_flags) > 1:
        raise ValueError(f"{' and '.join(sigma_flags)} are mutually exclusive (each picks a different grid)")
    if given & set(_SIGMA_FLAGS) and config.get("timestep_spacing") in SIGMA_FLAG_SPACINGS.values():
        # a flag given as keyword replaces the grid the config's spacing named
        out["timestep_spacing"] = None
        set_keys.add("timestep_spacing")
    if is_flow_config(config):
        if sigma_flags and config.get("use_flow_sigmas"):
            # diffusers' UniPC/DPM build this grid from the VP betas the flow config never uses.
            raise ValueError(f"{sigma_flags[0]} together with use_flow_sigmas is not supported; "
                             "use the flow model's own grid or timestep_spacing='karras'/'exponential'")
        out["prediction_type"] = "flow_prediction"
        set_keys.add("prediction_type")
        if "flow_shift" in config and ("shift" not in config or "flow_shift" in given
                                       or config.get("use_flow_sigmas")):
            out["shift"] = config["flow_shift"]
            set_keys.add("shift")
        if config.get("use_flow_sigmas") and config.get("timestep_spacing") in ("linspace", "leading", "trailing"):
            out["timestep_spacing"] = "linspace"  # diffusers ignores the spacing with use_flow_sigmas
            set_keys.add("timestep_spacing")
    if "_use_default_values" in out:
        # A key given as keyword or derived from a flag is no default: keep diffusers from dropping it.
        out["_use_default_values"] = sorted(defaults - set_keys)
    # Every other key stays, with its meaning: diffusers keeps the keys FewstepScheduler does
    # not take as hidden config entries, so a diffusers scheduler built from this config
    # again (pipe.scheduler = UniPCMultistepScheduler.from_config(...)) runs as from the source.
    # _use_default_values lets diffusers drop keys the source only had as defaults, as it
    # does between its own schedulers, so both sides fall back to their own defaults.
    return out


def diffusers_solver_keys(solver: Solver, given: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names for ``solver``'s options where ``given`` (the config's values) does not already say so.

    A given value that means nothing to this solver (a DPM ``solver_type`` on UniPC) stays, as
    diffusers keeps it between its own schedulers; one that means something else is replaced.
    """
    names, cfg = solver.options, solver.config
    wanted: dict[str, tuple[Any, Any]] = {}  # key -> (value in force, predicate: does a given value mean it?)
    if "order" in names:
        wanted["solver_order"] = (cfg["order"], lambda g: g == cfg["order"])
    if "variant" in names:
        choices = names["variant"].choices or ()
        wanted["solver_type"] = (cfg["variant"], lambda g: g == cfg["variant"] or g not in choices)
    if "lower_order_final" in names:
        wanted["lower_order_final"] = (cfg["lower_order_final"], lambda g: g == cfg["lower_order_final"])
    if "space" in names and solver.diffusers_convention == "dpmsolver":
        data = cfg["space"] == "data"  # the SDE variants have the same ODE: keep them as given
        wanted["algorithm_type"] = ("dpmsolver++" if data else "dpmsolver",
                                    lambda g: g in (("dpmsolver++", "sde-dpmsolver++") if data
                                                    else ("dpmsolver", "sde-dpmsolver")))
    if "space" in names and solver.diffusers_convention == "multistep":
        wanted["predict_x0"] = (cfg["space"] == "data", lambda g: g == (cfg["space"] == "data"))
    return {k: v for k, (v, same) in wanted.items() if given.get(k) is None or not same(given[k])}


def foreign_solver_options(config: dict[str, Any], solver: type[Solver]) -> dict[str, Any]:
    """Solver settings of a diffusers multistep config that mean the same for ``solver``."""
    check_flag_types(config)
    defaults = set(config.get("_use_default_values", ()))
    given = {k: v for k, v in config.items() if k not in defaults}
    names = solver.options
    opts: dict[str, Any] = {}
    if "order" in names and "solver_order" in given:
        opts["order"] = given["solver_order"]
    variant = names.get("variant")
    if variant is not None and given.get("solver_type") in (variant.choices or ()):
        opts["variant"] = given["solver_type"]
    for key in ("lower_order_final", "euler_at_final", "disable_corrector"):
        if key in names and key in given:
            opts[key] = given[key]
    # The space is read from the key the solver's diffusers twin reads, as diffusers does
    # (a DPM config's algorithm_type does not make diffusers' UniPC integrate eps).
    if "space" in names and solver.diffusers_convention == "multistep" and given.get("predict_x0") is False:
        opts["space"] = "noise"
    if "space" in names and solver.diffusers_convention == "dpmsolver" and "algorithm_type" in given:
        # The SDE variants' drift is the same ODE; choosing a fewstep solver drops the noise.
        opts["space"] = "noise" if given["algorithm_type"] in ("dpmsolver", "sde-dpmsolver") else "data"
    return opts


def init_keys_of(cls: type) -> set[str]:
    """Constructor keyword names of a scheduler class."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}
