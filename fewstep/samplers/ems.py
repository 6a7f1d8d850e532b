"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al., NeurIPS 2023): the artifact.

DPM-Solver-v3 writes the diffusion ODE in the half log-SNR lambda with three elementwise
coefficients per lambda, estimated once per model:

* ``l``: the linear part taken out of the noise prediction, N = sigma eps - l x, chosen to
  minimise E||d N / d x||_F^2, i.e. l = E[diag(sigma d eps / d x)] (Rademacher estimate);
* ``s``, ``b``: the best linear fit f' ~ s f + b of the total lambda-derivative of
  f = N / alpha along the ODE (closed-form least squares over the data).

An :class:`EMS` holds them on a grid of ``N + 1`` log-SNR points, float64, with the noise
schedule, model fingerprint and guidance scale they were computed for. It is a file-backed
artifact (safetensors + JSON header): ``save_pretrained`` writes it next to the scheduler
config, and loading validates it (shapes, finiteness, an increasing grid), naming the file
and the problem. :func:`fewstep.compute_ems` computes one for any model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .artifacts import Artifact, ArtifactError, ArtifactMeta
from .schedules import FlowSchedule, NoiseSchedule, make_schedule

__all__ = ["EMS", "ems_lambda_grid", "ems_from_moments", "MOMENTS"]

# Per grid point, the sums over datapoints that determine l, s and b (see ems_from_moments):
# lr = sigma z * (J_eps z) for a Rademacher z; a = sigma eps / alpha = e^{-lambda} eps; v = x / alpha;
# da = d a / d lambda along the ODE (d v / d lambda = -a needs no model call).
MOMENTS = ("lr", "a", "v", "da", "aa", "av", "vv", "ada", "vda")


def ems_lambda_grid(schedule: NoiseSchedule, n_grid: int, t_start: float | None = None,
                    t_end: float | None = None) -> torch.Tensor:
    """The ``n_grid + 1`` log-SNR points of an EMS, increasing (noisiest first).

    Point j is ``lam_0 + (lam_N - lam_0) * (j / N)``, so the grid for ``N / s`` points is
    exactly every s-th point of the grid for N.

    Args:
        schedule: The noise schedule.
        n_grid: N (intervals).
        t_start: Noisiest schedule time (default: ``t_max``; for flow models, whose lambda
            is -inf there, ``1 - 1 / num_train_timesteps``).
        t_end: Least noisy time (default: where the schedule's grids end, ``grid_end``).

    Raises:
        ValueError: for n_grid < 1, times outside the schedule, or an empty/infinite range.
    """
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid={n_grid!r} must be a whole number >= 1")
    if t_start is None:
        t_start = schedule.t_max
        if isinstance(schedule, FlowSchedule) and t_start >= 1.0:
            t_start = 1.0 - 1.0 / schedule.num_train_timesteps
    if t_end is None:
        t_end = schedule.grid_end
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    schedule.check_time(ends, "EMS grid end")
    lam0, lam1 = (float(v) for v in schedule.lambda_(ends))
    if not (math.isfinite(lam0) and math.isfinite(lam1) and lam1 > lam0):
        raise ValueError(f"the EMS grid needs finite log-SNRs that increase from t_start={t_start:g} to "
                         f"t_end={t_end:g}; got lambda {lam0:g} .. {lam1:g}")
    frac = torch.arange(n_grid + 1, dtype=torch.float64) / n_grid
    grid = lam0 + (lam1 - lam0) * frac
    grid[-1] = lam1  # exact ends
    return grid


def ems_from_moments(lambdas: torch.Tensor, sums: torch.Tensor, n_data: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l, s, b from the per-grid-point moment sums (float64).

    With f = a - l v and f' = da + l a - l' v (d v / d lambda = -a), every regression
    moment is a combination of the sums in :data:`MOMENTS`; l' is the derivative of l on
    the grid (central differences, second order at the ends). The estimates of
    neighbouring points share their data, noise and Rademacher vectors, so l is smooth in
    lambda and its differences need no smoothing.

    Args:
        lambdas: [N + 1] grid.
        sums: [N + 1, len(MOMENTS), *S] sums over ``n_data`` datapoints.
        n_data: K.

    Returns:
        (l, s, b), each [N + 1, *S].
    """
    m = {name: sums[:, i] / n_data for i, name in enumerate(MOMENTS)}
    l = m["lr"]
    if lambdas.numel() > 2:
        dl = torch.gradient(l, spacing=(lambdas,), dim=0, edge_order=2)[0]
    else:
        dl = ((l[1] - l[0]) / (lambdas[1] - lambdas[0])).expand_as(l) if lambdas.numel() == 2 else torch.zeros_like(l)
    mean_f = m["a"] - l * m["v"]
    mean_df = m["da"] + l * m["a"] - dl * m["v"]
    ff = m["aa"] - 2 * l * m["av"] + l * l * m["vv"]
    fdf = m["ada"] + l * m["aa"] - dl * m["av"] - l * m["vda"] - l * l * m["av"] + l * dl * m["vv"]
    var = ff - mean_f * mean_f
    cov = fdf - mean_f * mean_df
    # A dimension where f does not vary over the data has no slope to fit: s = 0 there.
    tiny = 1e-12 * ff.abs().clamp(min=1e-300)
    s = torch.where(var > tiny, cov / torch.where(var > tiny, var, torch.ones_like(var)), torch.zeros_like(var))
    b = mean_df - s * mean_f
    return l, s, b


class EMS(Artifact):
    """DPM-Solver-v3's empirical model statistics on a log-SNR grid (a file-backed artifact).

    Args:
        lambdas: [N + 1] increasing log-SNR grid (float64).
        l, s, b: [N + 1, *S] statistics (float64); ``*S`` is the per-sample shape.
        meta: Provenance; ``meta.schedule`` (the noise schedule's ``to_dict()``) is required
            to use the statistics, ``meta.fingerprint`` and ``meta.guidance`` say which model
            function they describe.
        n_data: K, the number of datapoints they were estimated from.

    Raises:
        ValueError, TypeError: naming the bad tensor or field.
    """

    kind = "dpmv3_ems"
    # 2: meta.extra records the time derivative (finite differences for discrete-time models)
    version = 2
    file_backed = True
    filename = "dpmv3_ems.safetensors"

    def __init__(self, lambdas: torch.Tensor, l: torch.Tensor, s: torch.Tensor, b: torch.Tensor,
                 meta: ArtifactMeta | None = None, n_data: int | None = None):
        super().__init__(meta)
        tensors = {"lambda": lambdas, "l": l, "s": s, "b": b}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"tensor {name!r} must be a floating-point tensor, got {type(t).__name__}")
        if lambdas.dim() != 1 or lambdas.numel() < 2:
            raise ValueError(f"tensor 'lambda' must be a 1-D grid of at least 2 points, got shape {tuple(lambdas.shape)}")
        shape = (lambdas.numel(),) + tuple(l.shape[1:])
        for name in ("l", "s", "b"):
            t = tensors[name]
            if t.dim() < 1 or tuple(t.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}; expected {shape} "
                                 f"(one row per point of the {lambdas.numel()}-point grid, all with one shape)")
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                bad = int(torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(1))[0]) if t.dim() > 1 else None
                where = f" (first at grid point {bad})" if bad is not None else ""
                raise ValueError(f"tensor {name!r} contains NaN or Inf{where}")
        if not bool((lambdas[1:] > lambdas[:-1]).all()):
            raise ValueError("tensor 'lambda' must increase strictly (noisiest point first)")
        if n_data is not None and (isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1):
            raise ValueError(f"n_data={n_data!r} must be a whole number >= 1")
        self.lambdas = lambdas.double().contiguous()
        self.l, self.s, self.b = (t.double().contiguous() for t in (l, s, b))
        self.n_data = n_data

    # ------------------------------------------------------------------ artifact interface
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.lambdas, "l": self.l, "s": self.s, "b": self.b}

    def payload(self) -> dict[str, Any]:
        return {"n_grid": self.n_grid, "n_data": self.n_data, "sample_shape": list(self.sample_shape)}

    @classmethod
    def from_dict(cls, record: Any, source: str = "<inline>", tensors: dict[str, torch.Tensor] | None = None) -> "EMS":
        """Validate a record; format 1 on a discrete-time schedule is refused (see :meth:`Artifact.from_dict`)."""
        if isinstance(record, Mapping) and record.get("version") == 1:
            meta = record.get("meta")
            schedule = meta.get("schedule") if isinstance(meta, Mapping) else None
            if isinstance(schedule, Mapping) and schedule.get("kind") == "vp_discrete":
                raise ArtifactError(
                    f"{cls.kind} artifact {source}: format 1 took the time derivative of a discrete-time model by "
                    "forward AD between its integer timesteps, which makes s and b zig-zag; recompute it with "
                    "'fewstep ems compute' (or fewstep.compute_ems), which writes format 2")
        return super().from_dict(record, source, tensors)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], meta: ArtifactMeta,
                     tensors: dict[str, torch.Tensor] | None = None) -> "EMS":
        unknown = sorted(set(payload) - {"n_grid", "n_data", "sample_shape"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        if not tensors:
            raise ValueError("no tensors (an EMS needs 'lambda', 'l', 's' and 'b')")
        missing = [k for k in ("lambda", "l", "s", "b") if k not in tensors]
        if missing:
            raise ValueError(f"missing tensor(s) {missing}")
        extra = sorted(set(tensors) - {"lambda", "l", "s", "b"})
        if extra:
            raise ValueError(f"unexpected tensor(s) {extra}")
        if meta.schedule is None:
            raise ValueError("meta.schedule is missing: the statistics are meaningless without their noise schedule")
        ems = cls(tensors["lambda"], tensors["l"], tensors["s"], tensors["b"], meta, payload.get("n_data"))
        for key, value in (("n_grid", ems.n_grid), ("sample_shape", list(ems.sample_shape))):
            if key in payload and payload[key] != value:
                raise ValueError(f"{key}={payload[key]!r} in the header does not match the tensors ({value!r})")
        return ems

    # ------------------------------------------------------------------ accessors
    @property
    def n_grid(self) -> int:
        """N: the grid has N + 1 points."""
        return self.lambdas.numel() - 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape S of the statistics (the model's input shape without the batch)."""
        return tuple(self.l.shape[1:])

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule the statistics were computed for."""
        return make_schedule(dict(self.meta.schedule))

    def time_range(self) -> tuple[float, float]:
        """(least noisy, noisiest) model timestep the grid covers."""
        sched = self.schedule
        t = sched.model_time(sched.t_from_lambda(self.lambdas[[-1, 0]]))
        return float(t[0]), float(t[1])

    def degenerate(self) -> "EMS":
        """The statistics l = 1, s = b = 0 on the same grid (DPM-Solver++ in v3's form, paper App. A.2)."""
        one = torch.ones_like(self.l)
        return EMS(self.lambdas, one, torch.zeros_like(self.s), torch.zeros_like(self.b), self.meta, self.n_data)

    def __repr__(self) -> str:
        g = f", guidance={self.meta.guidance:g}" if self.meta.guidance is not None else ""
        return f"EMS(N={self.n_grid}, K={self.n_data}, shape={self.sample_shape}{g})"
