"""Optional dependencies: a missing one names the ``pip install 'fewstep[extra]'`` that brings it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["MissingExtraError", "import_optional", "EXTRAS"]

# Optional package -> the extra of pyproject.toml that installs it.
EXTRAS = {"transformers": "pipelines", "matplotlib": "plot", "sklearn": "train", "peft": "distill"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: Top-level module name, a key of :data:`EXTRAS`.
        purpose: What needs it, for the message (``"text-encoder pipelines"``).
    """
    if importlib.util.find_spec(module) is None:
        extra = EXTRAS[module]
        raise MissingExtraError(f"{purpose} needs the optional package '{module}': pip install 'fewstep[{extra}]'")
    return importlib.import_module(module)
