"""Solver registry: register, look up and list solvers by name."""

from __future__ import annotations

from typing import Any

from .solvers.base import Solver

__all__ = ["register_solver", "get_solver", "solver_class", "list_solvers"]

_REGISTRY: dict[str, type[Solver]] = {}


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver under ``cls.name``.

    Raises:
        ValueError: if another class already uses the name.
    """
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"solver name {cls.name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def solver_class(name: str) -> type[Solver]:
    """The solver class registered as ``name``.

    Raises:
        ValueError: naming the valid solvers when ``name`` is unknown.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; available solvers: {', '.join(list_solvers())}") from None


def get_solver(name: "str | Solver", **options: Any) -> Solver:
    """Instantiate a registered solver with validated options (or pass an instance through)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError(f"options {sorted(options)} given together with an already built solver {name!r}")
        return name
    return solver_class(name)(**options)


def list_solvers(*, runnable: bool = False) -> list[str]:
    """Names of all registered solvers, sorted.

    Args:
        runnable: Keep only the solvers that run as themselves with their default options,
            leaving out those that need a tuned artifact first: ``usf`` (which cannot run
            without a solver schedule) and solvers marked ``requires_tuning`` (``dc`` without
            ratios is plain UniPC).
    """
    names = sorted(_REGISTRY)
    if not runnable:
        return names
    out = []
    for name in names:
        if _REGISTRY[name].requires_tuning:
            continue
        try:
            _REGISTRY[name]()
        except ValueError:
            continue
        out.append(name)
    return out
