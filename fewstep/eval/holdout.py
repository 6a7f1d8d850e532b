"""Held-out checks of tuned artifacts: is the tuned solver better than the one it modifies?

Every tuning tool (DC calibration, the solver-schedule searches, DPM-Solver-v3's EMS) fits on
some seeds and is checked here on other seeds, never the evaluation seeds 0..N-1: the
per-sample errors of the tuned solver and of its untuned baseline on the same noise give the
ratio of their means and a paired-bootstrap interval of that ratio (resampling samples, so
the pairing is kept). The verdict is recorded in the artifact's metadata under ``validation``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["paired_ratio", "validation_record", "describe", "recorded_validations", "BOOTSTRAP_RESAMPLES"]

BOOTSTRAP_RESAMPLES = 2000


def paired_ratio(tuned: torch.Tensor, baseline: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of mean errors tuned / baseline and its paired-bootstrap interval.

    Args:
        tuned, baseline: Per-sample errors on the same samples (1-D, same length).
        resamples: Bootstrap resamples.
        level: Coverage of the percentile interval.
        seed: Seed of the resampling (the interval is reproducible).

    Returns:
        (ratio, low, high); inf where the baseline's mean error is 0 or any error is not finite.
    """
    tuned, baseline = tuned.double().flatten().cpu(), baseline.double().flatten().cpu()
    if tuned.shape != baseline.shape or tuned.numel() == 0:
        raise ValueError(f"paired errors need two equal non-empty lengths, got {tuned.numel()} and {baseline.numel()}")
    if not (bool(torch.isfinite(tuned).all()) and bool(torch.isfinite(baseline).all())):
        return math.inf, math.inf, math.inf
    ratio = float(tuned.mean() / baseline.mean()) if float(baseline.mean()) > 0 else math.inf
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, tuned.numel(), (resamples, tuned.numel()), generator=g)
    boot = (tuned[idx].mean(1) / baseline[idx].mean(1)).sort().values
    tail = (1 - level) / 2
    lo, hi = boot[int(tail * (resamples - 1))], boot[int(math.ceil((1 - tail) * (resamples - 1)))]
    return ratio, float(lo), float(hi)


def validation_record(tuned: torch.Tensor, baseline: torch.Tensor, *, tuned_label: str, baseline_label: str,
                      seeds: list[int], metric: str = "mse", keep_worse: bool = False, **extra: Any
                      ) -> dict[str, Any]:
    """The ``validation`` metadata of a tuned artifact, and whether the baseline is written instead.

    Args:
        tuned, baseline: Per-sample errors on the validation samples.
        tuned_label, baseline_label: What was compared (e.g. ``"dc (trajectory)"``, ``"unipc"``).
        seeds: ``[first, end)`` of the validation noise seeds.
        metric: Name of the per-sample error.
        keep_worse: Write the tuned artifact even when it does not beat the baseline.
        **extra: More entries for the record.

    Returns:
        A JSON-able dict: both mean errors, their ratio with a 95% paired-bootstrap interval,
        ``beats_baseline`` and ``written`` (``"tuned"`` or ``"baseline"``).
    """
    ratio, lo, hi = paired_ratio(tuned, baseline)
    t_mean, b_mean = float(tuned.double().mean()), float(baseline.double().mean())
    beats = math.isfinite(t_mean) and t_mean < b_mean
    return {"metric": metric, "samples": int(tuned.numel()), "seeds": list(seeds),
            "tuned": tuned_label, "tuned_value": t_mean if math.isfinite(t_mean) else None,
            "baseline": baseline_label, "baseline_value": b_mean,
            "ratio": ratio if math.isfinite(ratio) else None,
            "interval95": [lo, hi] if math.isfinite(hi) else None,
            "beats_baseline": beats, "written": "tuned" if beats or keep_worse else "baseline", **extra}


def describe(record: dict[str, Any]) -> str:
    """One line saying what the validation found and what was written."""
    ratio = record["ratio"]
    told = (f"{record['tuned']} {record['metric']} {_num(record['tuned_value'])} vs {record['baseline']} "
            f"{_num(record['baseline_value'])} on {record['samples']} validation samples "
            f"({_where(record)}; ratio "
            + ("inf" if ratio is None else f"{ratio:.3f}x")
            + ("" if record["interval95"] is None else
               f", 95% CI {record['interval95'][0]:.3f}-{record['interval95'][1]:.3f}") + ")")
    if record["beats_baseline"]:
        return f"validation: {told}"
    if record["written"] == "baseline":
        return f"validation: the tuned artifact does not beat its baseline: {told}; writing the baseline instead " \
               "(--keep-worse writes the tuned one)"
    return f"validation: the tuned artifact does not beat its baseline: {told}; written anyway (keep_worse)"


def _where(record: dict[str, Any]) -> str:
    if record.get("seeds"):
        return f"seeds {record['seeds'][0]}..{record['seeds'][1] - 1}"
    lo, hi = record.get("samples_held_out", [0, record["samples"]])
    return f"samples {lo}..{hi - 1} of the batch"


def _num(v: float | None) -> str:
    return "inf" if v is None else f"{v:.4g}"


def recorded_validations(solver: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``validation`` records of the tuned artifacts a solver spec loads (none for plain solvers)."""
    from fewstep.samplers.artifacts import Artifact
    from fewstep.samplers.registry import get_solver

    try:
        config = get_solver(solver, **options).config
    except (ValueError, TypeError, KeyError, OSError):  # not a fewstep solver (diffusers:...) or unloadable
        return []
    return [v.meta.extra["validation"] for v in config.values()
            if isinstance(v, Artifact) and isinstance(v.meta.extra.get("validation"), dict)]
