"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

import importlib
import sys
import types

from ._version import __version__  # noqa: F401  (fewstep.__version__)

# Everything is loaded on first use: the solver core imports torch (about a second), the diffusers
# adapter imports diffusers (slow), the subpackages pull in models and evaluation code; the
# command line (``fewstep --help``) needs none of it.
_SCHEDULERS = ["FewstepScheduler", "DDIMSolverScheduler", "DPMSolverPPScheduler", "UniPCScheduler", "USFScheduler",
               "DCSolverScheduler", "DPMSolverV3Scheduler", "OneStepScheduler"]
_SUBMODULES = ["config", "eval", "zoo", "tuning", "samplers", "distill"]
# Tuning entry points, by the module that defines them (imported on first use).
_TUNING = {"search_usf": "fewstep.tuning.search", "search_timesteps": "fewstep.tuning.search",
           "calibrate_dc": "fewstep.tuning.dc.calibrate", "compute_ems": "fewstep.tuning.ems.compute"}
# Saved pipelines name their fewstep scheduler by module path in model_index.json, and diffusers'
# from_pretrained only resolves modules already in sys.modules: register a stand-in there, so
# `import fewstep` suffices and diffusers is still imported on first use only.
_SCHEDULER_MODULE = f"{__name__}.samplers.scheduler"


class _DeferredModule(types.ModuleType):
    """Stands in sys.modules for a module until a public attribute is read, then imports it.

    Dunder look-ups (``__file__``, ``__wrapped__``: what sys.modules scanners such as
    ``inspect.getmodule`` probe) never trigger the import, so it cannot run half-way through
    another package's import.
    """

    def _load(self):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
            try:
                importlib.import_module(name)
            except BaseException:
                sys.modules.setdefault(name, self)  # a later access retries (and reports) again
                raise
        return sys.modules[name]

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __setattr__(self, attr, value):
        if attr.startswith("__") and attr.endswith("__"):
            return super().__setattr__(attr, value)
        setattr(self._load(), attr, value)

    def __delattr__(self, attr):
        delattr(self._load(), attr)


if _SCHEDULER_MODULE not in sys.modules:
    sys.modules[_SCHEDULER_MODULE] = _DeferredModule(_SCHEDULER_MODULE)


def __getattr__(name):
    if name in _SCHEDULERS:
        from .samplers import scheduler

        return getattr(scheduler, name)
    if name in _TUNING:
        return getattr(importlib.import_module(_TUNING[name]), name)
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

    return list(samplers.__all__) + _SCHEDULERS + list(_TUNING)


def __dir__():
    return sorted(set(globals()) | set(_all()) | set(_SUBMODULES))

