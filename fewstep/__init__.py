"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

from .samplers import *  # noqa: F401,F403
from .samplers import __all__ as _samplers_all

__version__ = "0.1.0"


def __getattr__(name):
    # The diffusers adapter imports diffusers (slow); load it only when asked for.
    if name not in _SCHEDULERS:
        raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
    from .samplers import scheduler

    return getattr(scheduler, name)


_SCHEDULERS = ["FewstepScheduler", "DDIMSolverScheduler", "DPMSolverPPScheduler", "UniPCScheduler"]
__all__ = list(_samplers_all) + _SCHEDULERS
