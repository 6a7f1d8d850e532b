"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

import importlib

__version__ = "0.1.0"

# Everything is loaded on first use: the solver core imports torch (about a second), the diffusers
# adapter imports diffusers (slow), the subpackages pull in models and evaluation code; the
# command line (``fewstep --help``) needs none of it.
_SCHEDULERS = ["FewstepScheduler", "DDIMSolverScheduler", "DPMSolverPPScheduler", "UniPCScheduler", "USFScheduler",
               "DCSolverScheduler", "DPMSolverV3Scheduler"]
_SUBMODULES = ["config", "eval", "zoo", "search", "samplers"]
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
    if name == "__all__":  # ``from fewstep import *`` asks for it here (PEP 562): stays lazy too
        return _all()
    if name.startswith("__"):  # dunder probes (copy, pickle, doctest) must not import torch
        raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
    from . import samplers

    if name in samplers.__all__:
        return getattr(samplers, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def _all() -> list:
    from . import samplers

    return list(samplers.__all__) + _SCHEDULERS + _SEARCHES


def __dir__():
    return sorted(set(globals()) | set(_all()) | set(_SUBMODULES))

