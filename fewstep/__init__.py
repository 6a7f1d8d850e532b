"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

import importlib

from .samplers import *  # noqa: F401,F403
from .samplers import __all__ as _samplers_all

__version__ = "0.1.0"

# Loaded on first use: the diffusers adapter imports diffusers (slow), the subpackages pull
# in models and evaluation code that plain sampling does not need.
_SCHEDULERS = ["FewstepScheduler", "DDIMSolverScheduler", "DPMSolverPPScheduler", "UniPCScheduler", "USFScheduler",
               "DCSolverScheduler", "DPMSolverV3Scheduler"]
_SUBMODULES = ["config", "eval", "zoo", "search"]
_SEARCHES = ["search_usf", "search_timesteps"]


def __getattr__(name):
    if name in _SCHEDULERS:
        from .samplers import scheduler

        return getattr(scheduler, name)
    if name in _SEARCHES:
        from . import search

        return getattr(search, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SCHEDULERS) | set(_SUBMODULES) | set(_SEARCHES))


__all__ = list(_samplers_all) + _SCHEDULERS + _SEARCHES
