"""DPM-Solver-v3: multistep predictor-corrector built on empirical model statistics (EMS).

With EMS l, s, b (see :mod:`fewstep.samplers.ems`), the ODE in lambda is solved for
f = (sigma eps - l x) / alpha, reparameterised as g = e^{-(S - S_s)} f - int_s e^{-(S - S_s)} b,
which the statistics make as flat as possible, so its Taylor expansion converges fast.
One step from s to t (lambda_s < lambda_t), with L = int l, S = int s (relative to s):

    x_t = (alpha_t / alpha_s) e^{-L_t} x_s
          - alpha_t e^{-L_t} sum_k E_k g^(k)_s - alpha_t e^{-L_t} int_s^t e^{L + S} Bt,
    E_k = int_s^t e^{L + S} (lambda - lambda_s)^k / k!,   Bt(lambda) = int_s^lambda e^{-S} b,

where the derivatives g^(k) come from earlier (predictor) or also the new (corrector) outputs.
Every term is linear in (x_s, f_j) plus a constant, so the whole step is one row of
elementwise float64 coefficients, built once per set of timesteps. The history holds the f
of each step, as the official code does: a correction changes x, not f.

Integrals: l, s, b are linear between EMS grid points, L and S exact (trapezoid), and every
integrand e^{a} p with a linearly interpolated a and polynomial p is integrated exactly per
interval (``_psi``). With l = 1, s = b = 0 this is exact, so ``degenerate=True`` reproduces
DPM-Solver++ to round-off: order 2 is DPM-Solver++(2M) in its Taylor ("heun") form, order 3
is ``dpmpp(order=3, third_order="taylor")`` (tests/test_dpmv3.py). The paper's noise-prediction
case, l = 0, s = -1, b = 0, is likewise DPM-Solver in noise space (``dpmpp(space="noise")``).

Ending: with ``final_sigma="zero"`` (the default grid, diffusers' convention) the last step is
the jump to sigma = 0, x_0 = the data prediction at the last (corrected) point, the same for
every solver; with ``final_sigma="min"`` (``final_sigmas_type="sigma_min"`` in the scheduler)
the grid ends at t_min, the EMS grid's last point, and that last interval is an ordinary v3
step on the statistics, as the official code ends.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..ems import EMS
from ..plan import SolverPlan
from ..registry import register_solver
from ..timesteps import TimeGrid
from .base import Option, Solver, StepGeometry, ei_coefficients, empty_tables, usable_order

__all__ = ["DPMSolverV3", "snap_to_ems"]

# |z| below this: psi_m(z) from its power series (the closed-form recurrence cancels).
_PSI_SERIES_MAX = 1.0
_PSI_TERMS = 30
HALF_CORRECTOR = ("off", "low_noise", "high_noise")


def _psi(m_max: int, z: torch.Tensor) -> list[torch.Tensor]:
    """psi_m(z) = int_0^1 e^{z u} u^m / m! du for m = 0..m_max (float64, stable for all z)."""
    small = z.abs() <= _PSI_SERIES_MAX
    zs = torch.where(small, z, torch.zeros_like(z))
    zl = torch.where(small, torch.ones_like(z), z)
    out = []
    prev = torch.expm1(zl) / zl
    ez = torch.exp(zl)
    for m in range(m_max + 1):
        if m > 0:
            prev = (ez / math.factorial(m) - prev) / zl
        # series: sum_n z^n / (n! m! (n + m + 1))
        term = torch.full_like(zs, 1.0 / math.factorial(m))
        series = term / (m + 1)
        for n in range(1, _PSI_TERMS):
            term = term * zs / n
            series = series + term / (n + m + 1)
        out.append(torch.where(small, series, prev))
    return out


def _cumulative(values: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Cumulative trapezoid integral from the first point (exact for piecewise-linear values)."""
    dl = (lam[1:] - lam[:-1]).reshape(-1, *([1] * (values.dim() - 1)))
    steps = 0.5 * dl * (values[1:] + values[:-1])
    return torch.cat([torch.zeros_like(values[:1]), torch.cumsum(steps, 0)])


@dataclasses.dataclass(frozen=True)
class _StepIntegrals:
    """The EMS integrals of one step s -> t, relative to s (float64, [*S] or scalars).

    Attributes:
        L_t: int_s^t l.
        S: int_s^lambda_j s at every point j of the window (from ``lo``).
        Bt: int_s^lambda_j e^{-S} b at every point of the window.
        E: E_k = int_s^t e^{L + S} (lambda - lambda_s)^k / k!, k = 0..max_k.
        K: int_s^t e^{L + S} Bt.
        lo: First EMS index of the window.
    """

    L_t: torch.Tensor
    S: torch.Tensor
    Bt: torch.Tensor
    E: list
    K: torch.Tensor
    lo: int


class _Stats:
    """l, s, b on an increasing log-SNR grid; [M, *S] tensors or [M] for scalar statistics."""

    def __init__(self, lambdas: torch.Tensor, l: torch.Tensor, s: torch.Tensor, b: torch.Tensor):
        self.lam, self.l, self.s, self.b = lambdas, l, s, b

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def _col(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * len(self.shape)))

    def step(self, js: int, jt: int, lo: int, max_k: int) -> _StepIntegrals:
        """Integrals of the step from grid point ``js`` to ``jt``; the window reaches back to ``lo``."""
        sl = slice(lo, jt + 1)
        lam, l, s, b = self.lam[sl], self.l[sl], self.s[sl], self.b[sl]
        r = js - lo
        L, S = _cumulative(l, lam), _cumulative(s, lam)
        L, S = L - L[r], S - S[r]
        dlam = self._col(lam[1:] - lam[:-1])
        # Bt(lambda_j), exact for -S and b linear on each interval
        p0, p1 = _psi(1, S[:-1] - S[1:])
        pieces = dlam * torch.exp(-S[:-1]) * (b[:-1] * p0 + (b[1:] - b[:-1]) * p1)
        Bt = torch.cat([torch.zeros_like(pieces[:1]), torch.cumsum(pieces, 0)])
        Bt = Bt - Bt[r]
        # over [lambda_s, lambda_t]: e^{a} times a polynomial in lambda, a = L + S linear per interval
        a = (L + S)[r:]
        h = dlam[r:]
        d = self._col(lam[r:-1] - lam[r])  # interval starts, relative to lambda_s
        psi = _psi(max(max_k, 1), a[1:] - a[:-1])
        ea = torch.exp(a[:-1])
        E = []
        for k in range(max_k + 1):
            # (d + u)^k / k! = sum_i d^(k-i) / (k-i)! u^i / i!, and int_0^h e^{a} u^i / i! = e^{a_0} h^(i+1) psi_i
            poly = sum(d ** (k - i) / math.factorial(k - i) * h ** (i + 1) * psi[i] for i in range(k + 1))
            E.append((ea * poly).sum(0))
        Bs = Bt[r:]
        K = (ea * h * (Bs[:-1] * psi[0] + (Bs[1:] - Bs[:-1]) * psi[1])).sum(0)
        return _StepIntegrals(L[-1], S, Bt, E, K, lo)


def _derivative_weights(offsets: list[float], pseudo: bool) -> np.ndarray:
    """Weights W[k-1, j] with g^(k) ~ sum_j W g_j from values at lambda offsets (offsets[0] = 0).

    Taylor: solve sum_k (r_j^k / k!) g^(k) = g_j - g_0 for all derivatives at once;
    pseudo (the paper's pseudo-order solver): g^(k) ~ k! times the k-th divided difference of
    the first k + 1 points only.
    """
    n = len(offsets) - 1
    r = np.asarray(offsets, dtype=np.float64)
    W = np.zeros((n, n + 1))
    if n == 0:
        return W
    if pseudo:
        # divided differences as weight vectors over the points
        table = [np.eye(n + 1)[j] for j in range(n + 1)]
        for k in range(1, n + 1):
            table = [(table[j] - table[j + 1]) / (r[j] - r[j + k]) for j in range(n + 1 - k)]
            W[k - 1] = table[0] * math.factorial(k)
        return W
    R = np.array([[r[j] ** k / math.factorial(k) for k in range(1, n + 1)] for j in range(1, n + 1)])
    inv = np.linalg.inv(R)
    W[:, 1:] = inv
    W[:, 0] = -inv.sum(1)
    return W


def snap_to_ems(grid: TimeGrid, lambdas: torch.Tensor) -> tuple[TimeGrid, list[int | None]]:
    """Move every finite grid point to the nearest EMS point; infinite ends stay.

    Returns:
        The snapped grid and, per point, its EMS index (None for lambda = +-inf).

    Raises:
        ValueError: a point outside the EMS range (naming the allowed timesteps), or two
            points snapping to one EMS point (the EMS grid is too coarse).
    """
    sched = grid.schedule
    lam = grid.lambda_
    spacing = lambdas[1:] - lambdas[:-1]
    lo, hi = float(lambdas[0] - spacing[0] / 2), float(lambdas[-1] + spacing[-1] / 2)
    index: list[int | None] = []
    for i, v in enumerate(lam.tolist()):
        if not math.isfinite(v):
            index.append(None)
            continue
        if not lo <= v <= hi:
            t_min, t_max = sched.model_time(sched.t_from_lambda(lambdas[[-1, 0]])).tolist()
            what = "terminal point" if i == grid.n else "timestep"
            raise ValueError(
                f"{what} {float(sched.model_time(grid.t[i:i + 1])[0]):g} (log-SNR {v:.4g}) is outside the EMS grid, "
                f"which covers timesteps {t_min:g} to {t_max:g} (log-SNR {float(lambdas[0]):.4g} to "
                f"{float(lambdas[-1]):.4g}); sample inside that range or compute EMS over a wider one"
            )
        j = int(torch.argmin((lambdas - v).abs()))
        if index and index[-1] is not None and j <= index[-1]:
            raise ValueError(
                f"grid points {i - 1} and {i} both snap to EMS point {j}: the EMS grid ({lambdas.numel()} points) "
                f"is too coarse for these {grid.n} steps; compute EMS with a larger n_grid"
            )
        index.append(j)
    t = grid.t.clone()
    finite = [i for i, j in enumerate(index) if j is not None]
    if finite:
        t[finite] = sched.t_from_lambda(lambdas[[index[i] for i in finite]])
    alpha, sigma = sched.alpha_sigma(t)
    alpha, sigma = torch.where(torch.isfinite(lam), alpha, grid.alpha), torch.where(torch.isfinite(lam), sigma, grid.sigma)
    new_lam = torch.where(torch.isfinite(lam), torch.log(alpha) - torch.log(sigma), lam)
    snapped = dataclasses.replace(grid, t=t, alpha=alpha, sigma=sigma, lambda_=new_lam,
                                  model_timesteps=sched.model_time(t[:-1]))
    return snapped, index


def _region_allows(region: str, grid: TimeGrid, i: int) -> bool:
    """The half-corrector rule at point i, in schedule time normalised to [0, 1]."""
    if region == "off":
        return True
    sched = grid.schedule
    tau = (float(grid.t[i]) - sched.t_min) / (sched.t_max - sched.t_min)
    return tau <= 0.5 if region == "low_noise" else tau > 0.5


@register_solver
class DPMSolverV3(Solver):
    """DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, NeurIPS 2023): EMS-based multistep predictor-corrector."""

    name = "dpmv3"
    # DPMSolverMultistepScheduler's grids: flow grids start at sigma = 1 - 1/N, inside an EMS grid.
    diffusers_convention = "dpmsolver"
    paper = ("Zheng, Lu, Chen & Zhu. DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model "
             "Statistics. NeurIPS 2023")
    summary = "multistep predictor-corrector on empirical model statistics (needs an EMS file: fewstep ems compute)"
    options = {
        "ems": Option(None, "the model's EMS (path or fewstep.EMS; see 'fewstep ems compute')", kind="artifact",
                      artifact=EMS),
        "order": Option(2, "predictor order (the paper: 3 unconditional, 2 guided)", bounds=(1, 3), kind="int"),
        "predictor_pseudo": Option(False, "pseudo-order predictor (divided differences; the paper's choice at "
                                          "very low NFE)", kind="bool"),
        "corrector": Option(True, "correct each new point with its own model output (no extra NFE)", kind="bool"),
        "corrector_pseudo": Option(True, "corrector of order p + 1 with pseudo-order derivatives (else order p)",
                                   kind="bool"),
        "corrector_max_steps": Option(
            0, "no corrector on grids of more steps than this (0: no limit; the official scripts: 8 for "
               "ScoreSDE, 6 for EDM)", bounds=(0, 1_000_000), kind="int"),
        "lower_order_final": Option(True, "order <= steps left at the end", kind="bool"),
        "half_corrector": Option(
            "off", "correct only in half of the time range: 'low_noise' (t <= 0.5, the paper's rule for large "
                   "guidance) or 'high_noise' (t > 0.5, what the official code's half=True does)",
            choices=HALF_CORRECTOR),
        "degenerate": Option(False, "use l = 1, s = b = 0 (DPM-Solver++; no EMS needed)", kind="bool"),
    }

    def _check_config(self) -> None:
        if self.config["ems"] is None and not self.config["degenerate"]:
            raise ValueError("solver 'dpmv3' needs its model's statistics: pass ems=PATH (compute them with "
                             "'fewstep ems compute' or fewstep.compute_ems), or degenerate=True")

    @property
    def history_size(self) -> int:
        cfg = self.config
        return cfg["order"] + int(cfg["corrector"] and cfg["corrector_pseudo"])

    def _stats(self, grid: TimeGrid) -> tuple[_Stats, TimeGrid, list[int | None]]:
        ems: EMS | None = self.config["ems"]
        if ems is not None:
            ems.check(schedule=grid.schedule, solver=self.name)
            grid, index = snap_to_ems(grid, ems.lambdas)
            lam = ems.lambdas
        else:
            finite = [i for i in range(grid.n + 1) if math.isfinite(float(grid.lambda_[i]))]
            lam = grid.lambda_[finite]
            index = [None] * (grid.n + 1)
            for pos, i in enumerate(finite):
                index[i] = pos
        if self.config["degenerate"]:
            one = torch.ones_like(lam)
            return _Stats(lam, one, torch.zeros_like(lam), torch.zeros_like(lam)), grid, index
        return _Stats(lam, ems.l, ems.s, ems.b), grid, index

    def _corrects(self, grid: TimeGrid) -> bool:
        """Whether this grid gets the corrector (``corrector`` and the ``corrector_max_steps`` rule)."""
        limit = self.config["corrector_max_steps"]
        return self.config["corrector"] and (limit == 0 or grid.n <= limit)

    def _orders(self, grid: TimeGrid) -> list[int]:
        cfg, n = self.config, grid.n
        orders = []
        for i in range(n):
            p = min(i + 1, cfg["order"])
            if cfg["lower_order_final"]:
                p = min(p, n - i)
            orders.append(usable_order(grid, i, p))
        return orders

    def _row(self, stats: _Stats, grid: TimeGrid, index: list, s: int, t: int, points: list[int], pseudo: bool
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(A, [coefficient of f_p for p in points], bias) of the step s -> t with stencil ``points``.

        x_t = A x_s - alpha_t e^{-L_t} (sum_k E_k g^(k) + K), g^(k) = sum_p W[k, p] g_p and
        g_p = e^{-S_p} f_p - Bt_p: linear in the f's plus a constant (the bias).
        """
        js, jt = index[s], index[t]
        ems_points = [index[p] for p in points]
        W = _derivative_weights([float(stats.lam[j] - stats.lam[js]) for j in ems_points], pseudo)
        ints = stats.step(js, jt, min(ems_points + [js]), len(points) - 1)
        alpha_t = float(grid.alpha[t])
        decay = alpha_t * torch.exp(-ints.L_t)
        A = decay / float(grid.alpha[s])
        coefs, bias = [], -decay * ints.K
        for q, j in enumerate(ems_points):
            w = ints.E[0] * float(q == 0) + sum(ints.E[k] * float(W[k - 1, q]) for k in range(1, len(points)))
            coefs.append(-decay * w * torch.exp(-ints.S[j - ints.lo]))
            bias = bias + decay * (w - ints.E[0] * float(q == 0)) * ints.Bt[j - ints.lo]
        return A, coefs, bias

    def plan(self, grid: TimeGrid, prediction: str = "epsilon") -> SolverPlan:
        cfg = self.config
        stats, grid, index = self._stats(grid)
        n, H = grid.n, self.history_size
        shape = stats.shape
        orders = self._orders(grid)
        base = empty_tables(grid, H, prediction)
        predict = torch.zeros(n, 1 + H, *shape, dtype=torch.float64)
        correct = torch.zeros(n, 1 + H, *shape, dtype=torch.float64)
        predict_bias = torch.zeros(n, *shape, dtype=torch.float64)
        correct_bias = torch.zeros(n, *shape, dtype=torch.float64)
        history = torch.zeros(n, 2, *shape, dtype=torch.float64)
        corrector_orders = [0] * n
        for i in range(n):
            if index[i] is None:  # alpha = 0 (flow's pure-noise start): store x0 and step exactly
                history[i, 1] = 1.0
                a, c0 = ei_coefficients(StepGeometry.of(grid, i), "data")
                predict[i, 0], predict[i, 1] = a, c0
                continue
            alpha_i = float(grid.alpha[i])
            history[i, 0] = (1.0 - stats.l[index[i]]) / alpha_i
            history[i, 1] = -1.0
            if index[i + 1] is None:  # into sigma = 0: the data prediction at the (corrected) x
                predict[i, 0] = history[i, 0]
                predict[i, 1] = -1.0
            else:
                pts = list(range(i, i - orders[i], -1))
                A, coefs, bias = self._row(stats, grid, index, i, i + 1, pts, cfg["predictor_pseudo"])
                predict[i, 0] = A
                for q, c in enumerate(coefs):
                    predict[i, 1 + q] = c
                predict_bias[i] = bias
            # corrector of point i: the step i-1 -> i again, now with f_i (stencil i-1, i, i-2, ...)
            if i == 0 or not self._corrects(grid) or index[i - 1] is None or not _region_allows(
                    cfg["half_corrector"], grid, i):
                continue
            c = orders[i - 1] + int(cfg["corrector_pseudo"])  # the official rule: correct only when c > 1
            pts = ([i - 1, i] + list(range(i - 2, i - c, -1)))[:c]
            while any(p < 0 or index[p] is None for p in pts):
                pts.pop()
            if len(pts) < 2:
                continue
            A, coefs, bias = self._row(stats, grid, index, i - 1, i, pts, cfg["corrector_pseudo"])
            correct[i, 0] = A
            for p, coef in zip(pts, coefs):
                correct[i, 1 + (i - p)] = coef  # history slot of point p after the push at step i
            correct_bias[i] = bias
            corrector_orders[i] = len(pts)
        return SolverPlan(
            grid, "data", H, base["x0_coef"], predict, correct=correct, predict_bias=predict_bias,
            history_coef=history, correct_bias=correct_bias, orders=orders,
            info={"corrector_orders": corrector_orders, "ems_index": index},
        )
