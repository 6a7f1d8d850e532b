"""Published optimised schedules, built in as solver-schedule artifacts (``solver_schedule="ays:sd15"``).

This module is the catalogue (files, names, interpolation rule);
:func:`~fewstep.samplers.solver_schedule.load_published` reads a schedule from it. Each file
under ``published/`` is an ordinary :class:`~fewstep.samplers.solver_schedule.SolverSchedule`
record (timesteps only, so every solver runs it) whose ``meta.extra["published"]`` records the
method, the source (paper, table, page), the model family it was tuned for, the published
numbers as printed, and how to reach other step counts. Align Your Steps (Sabour, Fidler and
Kreis, ICML 2024) publishes 10-step schedules; for other step counts its authors interpolate
the noise levels log-linearly (:func:`loglinear_interp`), which :func:`~fewstep.samplers.solver_schedule.load_published` does when
asked for another number of steps.

Names are ``method:family`` (``fewstep list schedules`` prints them).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from fewstep.infra.validation import check_int

__all__ = ["PUBLISHED_DIR", "published_files", "is_published_name", "loglinear_interp"]

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
_NAME = re.compile(r"^[a-z][a-z0-9]*:[a-z][a-z0-9_-]*$")


def is_published_name(value: Any) -> bool:
    """Whether ``value`` looks like a built-in schedule name (``method:family``) rather than a path."""
    return isinstance(value, str) and bool(_NAME.match(value))


@lru_cache(maxsize=None)
def published_files() -> dict[str, Path]:
    """The built-in schedule files by name (``method:family``)."""
    return {p.stem.replace("-", ":", 1): p for p in sorted(PUBLISHED_DIR.glob("*.json"))}


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
