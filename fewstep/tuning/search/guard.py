"""Never worse than the untuned solver: the held-out check every search ends with.

A search fits its schedule on the search batch (seeds ``data_seed ..``); the check samples the
next ``validation_samples`` seeds (still >= 100000, never the evaluation seeds 0..N-1) with the
searched schedule and with its baseline -- the solver it modifies (``search timesteps``), or the
best hand-set solver of the search space (``search usf``) -- against the same kind of reference.
Both figures and a paired-bootstrap interval of their ratio go into the written file's
``meta.extra.validation``; when the searched schedule does not beat the baseline there, the
search says so in one line and writes the baseline instead, unless ``keep_worse``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from fewstep.eval.testbeds import Testbed
from fewstep.eval.holdout import describe, validation_record
from fewstep.tuning.search.fitness import Fitness
from fewstep.tuning.search.settings import SearchSettings

__all__ = ["validate_against_baseline"]


def validate_against_baseline(cfg: SearchSettings, testbed: Testbed, guidance: float | None, run_dir: Path,
                              tuned: tuple[str, dict[str, Any]], baseline: tuple[str, dict[str, Any]],
                              tuned_label: str, baseline_label: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Sample both (solver, options) on the validation seeds; the ``validation`` record (see
    :func:`fewstep.eval.holdout.validation_record`)."""
    first = cfg.data_seed + cfg.samples
    fitness = Fitness(testbed, cfg.nfe, guidance, cfg.validation_samples, first, cfg.metric, run_dir / "validation",
                      cfg.reference, cfg.reference_nfe, cfg.cache_dir, log)
    errors = [fitness.errors(*tuned), fitness.errors(*baseline)]
    if cfg.metric == "fd":  # a set statistic: no per-sample errors, so no interval; the decision uses the FD
        values = [torch.tensor([fitness(*tuned)]), torch.tensor([fitness(*baseline)])]
    else:
        values = errors
    record = validation_record(*values, tuned_label=tuned_label, baseline_label=baseline_label,
                               seeds=[first, first + cfg.validation_samples], metric=cfg.metric,
                               keep_worse=cfg.keep_worse)
    if cfg.metric == "fd":
        record.update(samples=cfg.validation_samples, interval95=None)
    log(describe(record))
    return record
