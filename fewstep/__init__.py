"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

import importlib
import sys
import types

from .samplers import *  # noqa: F401,F403
from .samplers import __all__ as _samplers_all

__version__ = "0.1.0"

# Loaded on first use: the diffusers adapter imports diffusers (slow), the subpackages pull
# in models and evaluation code that plain sampling does not need.
_SCHEDULERS = ["FewstepScheduler", "DDIMSolverScheduler", "DPMSolverPPScheduler", "UniPCScheduler", "USFScheduler",
               "DCSolverScheduler", "DPMSolverV3Scheduler"]
_SUBMODULES = ["config", "eval", "zoo", "search"]
_SEARCHES = ["search_usf", "search_timesteps"]
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
    if name in _SEARCHES:
        from . import search

        return getattr(search, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SCHEDULERS) | set(_SUBMODULES) | set(_SEARCHES))


__all__ = list(_samplers_all) + _SCHEDULERS + _SEARCHES
