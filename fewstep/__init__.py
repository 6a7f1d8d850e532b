"""fewstep: fast diffusion sampling with one solver core and drop-in diffusers schedulers."""

from .samplers import *  # noqa: F401,F403
from .samplers import __all__ as _samplers_all

__version__ = "0.1.0"


def __getattr__(name):
    # The diffusers adapter imports diffusers; load it only when asked for.
    from .samplers import scheduler

    if name in scheduler.__all__:
        return getattr(scheduler, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


__all__ = list(_samplers_all)
