"""Reading other diffusers schedulers' configs: what carries over, what is renamed, what cannot be honoured.

``FewstepScheduler.from_config`` accepts the config of any diffusers scheduler. Keys that
describe the noise schedule and the grid keep their meaning; the flow and sigma flags of
the multistep schedulers are renamed; solver settings (``solver_order``, ``solver_type``,
``algorithm_type``, ...) carry over when the new solver has the same option; and keys that
would change the model's noise levels in a way fewstep does not implement raise instead
of being dropped.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from .solvers.base import Solver

__all__ = ["translate_foreign_config", "foreign_solver_options", "SCHEDULE_KEYS_IN_KWARGS"]

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

# diffusers keys a user may also pass as keyword arguments of from_config.
SCHEDULE_KEYS_IN_KWARGS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_flow_sigmas",
                           "flow_shift", *_UNSUPPORTED)


def _is_flow(config: dict[str, Any], source_name: str | None) -> bool:
    return (
        (source_name or "").startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
        # Live configs carry no _class_name: a shift but no betas means flow matching.
        or ("shift" in config and "beta_schedule" not in config and "trained_betas" not in config)
    )


def translate_foreign_config(config: dict[str, Any], init_keys: set[str]) -> dict[str, Any]:
    """Map a non-fewstep scheduler config onto FewstepScheduler's keys.

    Raises:
        ValueError: naming the key, for settings fewstep cannot reproduce.
    """
    for key, (neutral, what) in _UNSUPPORTED.items():
        if key in config and not neutral(config[key]):
            raise ValueError(f"{what} = {config[key]!r} is not supported by fewstep's schedulers")
    out = dict(config)
    if _is_flow(config, config.get("_class_name")):
        out["prediction_type"] = "flow_prediction"
        if "flow_shift" in config and "shift" not in config:
            out["shift"] = config["flow_shift"]
    if config.get("use_karras_sigmas"):
        out["timestep_spacing"] = "karras"
    elif config.get("use_lu_lambdas") or config.get("use_exponential_sigmas"):
        out["timestep_spacing"] = "logsnr"  # both space the grid uniformly in log-SNR
    # _use_default_values lets diffusers drop keys the source only had as defaults, as it
    # does between its own schedulers, so both sides fall back to their own defaults.
    keep = init_keys | {"_class_name", "_diffusers_version", "_use_default_values"}
    return {k: v for k, v in out.items() if k in keep}


def foreign_solver_options(config: dict[str, Any], solver: type[Solver]) -> dict[str, Any]:
    """Solver settings of a diffusers multistep config that mean the same for ``solver``."""
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
    if "space" in names:
        if given.get("predict_x0") is False:
            opts["space"] = "noise"
        algorithm = given.get("algorithm_type")
        if algorithm is not None:
            # The SDE variants' drift is the same ODE; choosing a fewstep solver drops the noise.
            opts["space"] = "noise" if algorithm in ("dpmsolver", "sde-dpmsolver") else "data"
    return opts


def init_keys_of(cls: type) -> set[str]:
    """Constructor keyword names of a scheduler class."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}
