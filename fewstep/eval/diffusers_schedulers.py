"""diffusers' own schedulers as benchmark methods: ``diffusers:ClassName[:key=value,...]``.

A spec names a deterministic diffusers scheduler and constructor options; the scheduler is
built from the model's scheduler config (``from_config``, as a pipeline swaps schedulers) and
sampled with diffusers' standard loop. NFE counts model calls: each timestep of
``set_timesteps`` is one (batched, with CFG) model call, so schedulers that evaluate the model
twice per step (Heun, KDPM2) reach only the NFEs their timestep lists have (odd ones);
anything else is refused before sampling.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

import torch

from ..config import parse_spec
from ..samplers.diffusers_config import COMPATIBLE_SCHEDULERS, init_keys_of, is_flow_config

__all__ = ["DIFFUSERS_PREFIX", "DIFFUSERS_SCHEDULERS", "is_diffusers_spec", "parse_diffusers_spec",
           "build_diffusers_scheduler", "steps_for_nfe", "diffusers_sample"]

DIFFUSERS_PREFIX = "diffusers:"

# Stochastic schedulers draw their noise per batch (not per sample), which would make results
# depend on the batch size and the process count; the deterministic rest of the compatible ones.
_STOCHASTIC = ("DDPMScheduler", "DDPMParallelScheduler", "EulerAncestralDiscreteScheduler",
               "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler", "SASolverScheduler")
DIFFUSERS_SCHEDULERS = tuple(n for n in COMPATIBLE_SCHEDULERS if n not in _STOCHASTIC)

# Keys that describe the model (its training noise schedule and output), not the sampler:
# they come from the model's config and may not be overridden by a spec.
_MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type", "rescale_betas_zero_snr", "shift", "use_dynamic_shifting", "base_shift",
               "max_shift", "base_image_seq_len", "max_image_seq_len", "variance_type", "use_flow_sigmas",
               "flow_shift")


def is_diffusers_spec(solver: str) -> bool:
    """Whether a solver name / spec refers to a diffusers scheduler."""
    return str(solver).startswith(DIFFUSERS_PREFIX)


def _scheduler_class(name: str) -> type:
    if name not in DIFFUSERS_SCHEDULERS:
        hint = " (stochastic: its noise is drawn per batch, not per sample)" if name in _STOCHASTIC else ""
        raise ValueError(f"unknown diffusers scheduler {name!r}{hint}; choose one of {', '.join(DIFFUSERS_SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, name)


def parse_diffusers_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split and validate ``diffusers:DPMSolverMultistepScheduler:solver_order=3`` into (class name, options).

    Raises:
        ValueError: a non-diffusers spec, an unknown or stochastic class, an option the class does
            not take or that belongs to the model, or a value the class rejects.
    """
    if not is_diffusers_spec(spec):
        raise ValueError(f"{spec!r} is not a diffusers scheduler spec ({DIFFUSERS_PREFIX}ClassName[:key=value,...])")
    name, options = parse_spec(spec[len(DIFFUSERS_PREFIX):], "diffusers scheduler spec")
    cls = _scheduler_class(name)
    allowed = sorted(init_keys_of(cls) - set(_MODEL_KEYS))
    for key, value in options.items():
        if key in _MODEL_KEYS:
            raise ValueError(f"diffusers scheduler spec {spec!r}: {key!r} is the model's (read from its scheduler "
                             "config), not a sampler option")
        if key not in allowed:
            raise ValueError(f"diffusers scheduler spec {spec!r}: {name} has no option {key!r}; "
                             f"options: {', '.join(allowed)}")
        _check_type(spec, name, key, value, inspect.signature(cls.__init__).parameters[key].default)
    if str(options.get("algorithm_type", "")).startswith("sde-") or options.get("stochastic_sampling"):
        raise ValueError(f"diffusers scheduler spec {spec!r}: stochastic sampling draws noise per batch; "
                         "use a deterministic setting")
    try:
        cls(**options)  # diffusers' own checks of the values, now rather than mid-run
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"diffusers scheduler spec {spec!r}: {name} rejects it: {exc}".splitlines()[0]) from None
    return name, options


def _check_type(spec: str, name: str, key: str, value: Any, default: Any) -> None:
    # diffusers does not type-check its constructors: a string order fails deep inside a step.
    if default is None or default is inspect.Parameter.empty:
        return
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), tuple: (list,)}
    allowed = kinds.get(type(default))
    if allowed and not (isinstance(value, allowed) and (isinstance(value, bool) == isinstance(default, bool))):
        raise ValueError(f"diffusers scheduler spec {spec!r}: {name}'s {key}={value!r} must be of the type of its "
                         f"default ({type(default).__name__}, e.g. {key}={json.dumps(default)})")


def build_diffusers_scheduler(solver: str, options: dict[str, Any], model_config: dict[str, Any],
                              spacing: str | None):
    """``solver`` (``diffusers:ClassName``) built from the model's scheduler config with ``options``.

    ``spacing`` (None: the config's own) sets ``timestep_spacing``.

    Raises:
        ValueError: an invalid spec, or a flow-matching scheduler for a VP model (or the reverse).
    """
    name, _ = parse_diffusers_spec(solver)
    # from_config would happily build a flow sampler for a VP model (and the reverse): wrong noise levels.
    flow_model, flow_scheduler = is_flow_config(model_config), name.startswith("FlowMatch")
    if flow_model != flow_scheduler:
        fit = [n for n in DIFFUSERS_SCHEDULERS if n.startswith("FlowMatch") == flow_model]
        raise ValueError(f"{solver} is a {'flow-matching' if flow_scheduler else 'VP (betas)'} scheduler but the "
                         f"model's scheduler config is {'flow matching' if flow_model else 'VP (betas)'}; "
                         f"choose one of {', '.join(fit)}")
    config = dict(model_config) if spacing is None else {**model_config, "timestep_spacing": spacing}
    return _scheduler_class(name).from_config(config, **options)


def steps_for_nfe(scheduler, nfe: int, label: str = "") -> int:
    """The ``num_inference_steps`` whose timestep list has exactly ``nfe`` entries (model calls).

    Raises:
        ValueError: no step count gives ``nfe`` model calls (e.g. an even NFE for Heun), naming the
            NFEs that are reachable.
    """
    calls = {}
    for steps in [nfe, *range(1, nfe)]:
        try:
            scheduler.set_timesteps(steps)
        except (ValueError, IndexError):  # e.g. PNDM needs a few steps for its warm-up
            continue
        calls[steps] = len(scheduler.timesteps)
        if calls[steps] == nfe:
            return steps
    reachable = sorted(set(c for c in calls.values() if c <= nfe))
    raise ValueError(f"{label or type(scheduler).__name__} calls the model {calls.get(nfe, '?')} times for {nfe} "
                     f"steps: NFE {nfe} is not reachable (model calls reachable up to {nfe}: "
                     f"{', '.join(map(str, reachable)) or 'none'})")


@torch.inference_mode()
def diffusers_sample(scheduler, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor,
                     nfe: int) -> torch.Tensor:
    """diffusers' standard loop with ``nfe`` model calls; ``denoise(x, t)`` is the (guided) model output."""
    scheduler.set_timesteps(steps_for_nfe(scheduler, nfe), device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x
