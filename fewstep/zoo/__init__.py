"""Built-in offline models and data sets (the "zoo"): ``gmm``, ``digits``, ``tiny``.

The submodules load on first use (``fewstep.zoo.digits`` imports diffusers).
"""

import importlib

_SUBMODULES = ["digits", "digits_train", "gmm", "tiny"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fewstep.zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
