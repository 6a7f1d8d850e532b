"""Published optimised schedules, built in as solver-schedule artifacts (``solver_schedule="ays:sd15"``).

Each file under ``published/`` is an ordinary :class:`~fewstep.samplers.solver_schedule.SolverSchedule`
record (timesteps only, so every solver runs it) whose ``meta.extra["published"]`` records the
method, the source (paper, table, page), the model family it was tuned for, the published
numbers as printed, and how to reach other step counts. Align Your Steps (Sabour, Fidler and
Kreis, ICML 2024) publishes 10-step schedules; for other step counts its authors interpolate
the noise levels log-linearly (:func:`loglinear_interp`), which :func:`load_published` does when
asked for another number of steps.

Names are ``method:family`` (``fewstep list schedules`` prints them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from .schedules import make_schedule
from .validation import check_int

__all__ = ["PUBLISHED_DIR", "list_published", "load_published", "is_published_name", "loglinear_interp"]

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
_NAME = re.compile(r"^[a-z][a-z0-9]*:[a-z][a-z0-9_-]*$")


def is_published_name(value: Any) -> bool:
    """Whether ``value`` looks like a built-in schedule name (``method:family``) rather than a path."""
    return isinstance(value, str) and bool(_NAME.match(value))


@lru_cache(maxsize=None)
def _files() -> dict[str, Path]:
    return {p.stem.replace("-", ":", 1): p for p in sorted(PUBLISHED_DIR.glob("*.json"))}


def list_published() -> list[dict[str, Any]]:
    """Name, method, model family, native NFE and source of every built-in schedule."""
    out = []
    for name in _files():
        sched = _native(name)
        info = sched.published
        out.append({"name": name, "method": info["method"], "model_family": info["model_family"],
                    "nfe": sched.nfe, "source": info["source"], "interpolation": info["interpolation"]})
    return out


@lru_cache(maxsize=None)
def _native(name: str):
    from .solver_schedule import SolverSchedule

    return SolverSchedule.load(_files()[name])


def load_published(name: str, steps: int | None = None):
    """A built-in schedule, at its native step count or interpolated to ``steps`` steps.

    Args:
        name: ``method:family``, e.g. ``"ays:sd15"`` (see :func:`list_published`).
        steps: Number of evaluated timesteps (NFE); None: the published count.

    Returns:
        A timesteps-only :class:`~fewstep.samplers.solver_schedule.SolverSchedule`.

    Raises:
        ValueError: an unknown name (naming the known ones) or a bad step count.
    """
    files = _files()
    if name not in files:
        raise ValueError(f"unknown built-in schedule {name!r}; known: {', '.join(files) or 'none'} "
                         "(fewstep list schedules)")
    sched = _native(name)
    if steps is None or check_int("steps", steps, 1, 1000) == sched.nfe:
        return sched
    info = sched.published
    sigmas = loglinear_interp(info["sigmas"], steps + 1)[:-1]  # the last level is the terminal point
    schedule = make_schedule(sched.meta.schedule)
    lam = -torch.tensor(sigmas, dtype=torch.float64).log()  # sigma here is sigma / alpha = exp(-lambda)
    timesteps = schedule.model_time(schedule.t_from_lambda(lam)).tolist()
    knots = info.get("timesteps") or sched.timesteps
    n = len(info["sigmas"]) - 1
    for k in range(steps):  # points that fall on a published level keep its published timestep exactly
        if (k * n) % steps == 0 and k * n // steps < len(knots):
            timesteps[k] = float(knots[k * n // steps])
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"{name} interpolated to {steps} steps gives repeated timesteps on the "
                         f"{info['model_family']} schedule; use fewer steps")
    extra = {**sched.meta.extra, "published": {**info, "interpolated_to": steps}}
    return sched.replace(timesteps=timesteps, meta=dataclasses.replace(sched.meta, nfe=steps, extra=extra))


def loglinear_interp(levels: Sequence[float], num: int) -> list[float]:
    """Noise levels (decreasing, positive) resampled to ``num`` points, linearly in log level.

    The published levels sit at equal spacing on [0, 1]; the new ones at ``num`` equal steps
    (the interpolation Align Your Steps' authors give for other step counts).
    """
    num = check_int("num", num, 2)
    logs = [math.log(v) for v in levels]
    n = len(logs) - 1
    out = []
    for k in range(num):
        pos = k * n / (num - 1)
        j = min(int(pos), n - 1)
        w = pos - j
        out.append(math.exp(logs[j] + w * (logs[j + 1] - logs[j])))
    return out
