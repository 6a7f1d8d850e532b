"""DC-Solver's tuned files: per-step compensation ratios and cascade-polynomial-regression coefficients.

Both are inline artifacts (a few floats; see :mod:`fewstep.samplers.artifacts`), so a
scheduler config carries them and ``save_pretrained`` / ``from_pretrained`` round-trip them.

* :class:`DCRatios`: one ratio per step for one NFE (and one guidance scale), as written by
  :func:`fewstep.calibrate_dc`. The first ``dc_order`` ratios are 1: compensation needs
  ``dc_order + 1`` model outputs.
* :class:`DCCPR`: the 36 coefficients of the cascade polynomial regression (Zhao et al.,
  ECCV 2024, Sec. 3.4) that predict the ratios for any (NFE, guidance) pair.

CPR, in the official layout (``coefficients.reshape(4, 3, 3)[k, m, l]``): with
``n = NFE / 50``, ``g = guidance / 12`` and ``x = (i + 1) / NFE`` at step ``i`` (0-based),

    rho_i = sum_k a_k x^k,  a_k = sum_m b_km g^(2-m),  b_km = sum_l c_kml n^(2-l)

i.e. a cubic in x whose coefficients are quadratics in g whose coefficients are quadratics
in n. ``rho`` is linear in the 36 numbers, so fitting them is a least-squares problem.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .artifacts import Artifact, ArtifactError, ArtifactMeta
from fewstep.infra.validation import check_guidance, check_int, check_nfe, check_real

__all__ = ["DCRatios", "DCCPR", "cpr_features", "fit_cpr", "CPR_SIZE", "DEFAULT_DC_ORDER", "MAX_DC_ORDER"]

CPR_SIZE = 36
DEFAULT_DC_ORDER = 2
MAX_DC_ORDER = 3
# The official scale factors of the CPR inputs.
_NFE_SCALE, _GUIDANCE_SCALE = 50.0, 12.0
_CONSTANT = 8  # index of x^0 g^0 n^0 in the official order (k=0, m=2, l=2)
DEFAULT_CPR_RIDGE = 1e-3


def _dc_order(value: Any) -> int:
    return check_int("dc_order", value, 1, MAX_DC_ORDER)


def _number_list(name: str, value: Any) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of numbers, got {type(value).__name__}")
    out = []
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{k}]={v!r} is not a number")
        if not math.isfinite(float(v)):
            raise ValueError(f"{name}[{k}] is {v!r}; every entry must be finite")
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} is empty")
    return out


class _DCArtifact(Artifact):
    """A list of numbers (``values_field``) and the ``dc_order`` it was made with."""

    values_field: ClassVar[str]
    dc_order: int

    def payload(self) -> dict[str, Any]:
        return {self.values_field: list(getattr(self, self.values_field)), "dc_order": self.dc_order}

    @classmethod
    def from_payload(cls, payload, meta, tensors=None):
        unknown = sorted(set(payload) - {cls.values_field, "dc_order"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        if cls.values_field not in payload:
            raise ValueError(f"missing field {cls.values_field!r}")
        return cls(payload[cls.values_field], payload.get("dc_order", DEFAULT_DC_ORDER), meta)


class DCRatios(_DCArtifact):
    """Per-step compensation ratios rho_i of DC-Solver for one NFE.

    Args:
        ratios: One ratio per step (length = NFE); rho = 1 leaves a step unchanged and the
            first ``dc_order`` must be 1.
        dc_order: Order of the Lagrange interpolation they were made with.
        meta: Provenance (model fingerprint, schedule, NFE, guidance, solver).

    Raises:
        ValueError, TypeError: non-finite or non-numeric ratios, a ratio other than 1 in the
            warm-up steps, or a length that contradicts ``meta.nfe``.
    """

    kind = "dc_ratios"
    values_field = "ratios"

    def __init__(self, ratios: Sequence[float], dc_order: int = DEFAULT_DC_ORDER, meta: ArtifactMeta | None = None):
        super().__init__(meta)
        self.ratios = _number_list("ratios", ratios)
        self.dc_order = _dc_order(dc_order)
        warm = [k for k, r in enumerate(self.ratios[: self.dc_order]) if r != 1.0]
        if warm:
            raise ValueError(f"ratios[{warm[0]}]={self.ratios[warm[0]]!r}: the first dc_order={self.dc_order} ratios "
                             f"must be 1 (compensation needs dc_order + 1 = {self.dc_order + 1} model outputs)")
        if self.meta.nfe is not None and self.meta.nfe != len(self.ratios):
            raise ValueError(f"ratios has {len(self.ratios)} entries but meta.nfe is {self.meta.nfe}")

    @classmethod
    def coerce(cls, value: Any, what: str = "artifact") -> "DCRatios":
        """Also accepts a plain list of numbers (one per step), the inline form of a scheduler config.

        A plain list has no dc_order of its own: it is read with the least (1) and takes the
        solver's ``dc_order`` there, which then checks its warm-up ratios (a check against the
        default order here would reject lists meant for ``dc_order=1``).
        """
        if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
            try:
                ratios = cls(value, dc_order=1)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what}: {exc}") from None
            return cls(ratios.ratios, dc_order=1, meta=ArtifactMeta(nfe=ratios.nfe))
        return super().coerce(value, what)

    @property
    def nfe(self) -> int:
        return len(self.ratios)


def cpr_features(nfe: int, guidance: float, steps: Sequence[int]) -> np.ndarray:
    """The [len(steps), 36] design matrix of CPR: monomials x^k g^(2-m) n^(2-l) in the official order."""
    n, g = nfe / _NFE_SCALE, guidance / _GUIDANCE_SCALE
    x = (np.asarray(steps, dtype=np.float64) + 1.0) / nfe
    xk = x[:, None] ** np.arange(4)[None, :]  # [S, 4]
    gm = g ** np.array([2.0, 1.0, 0.0])
    nl = n ** np.array([2.0, 1.0, 0.0])
    return (xk[:, :, None, None] * gm[None, None, :, None] * nl[None, None, None, :]).reshape(len(x), CPR_SIZE)


class DCCPR(_DCArtifact):
    """Cascade polynomial regression: DC ratios for any NFE and guidance scale from 36 numbers.

    Args:
        coefficients: The 36 coefficients in the official order (see the module docstring).
        dc_order: Order of the interpolation the ratios were calibrated with.
        meta: Provenance; ``meta.extra["pairs"]`` lists the (NFE, guidance) pairs it was fitted on.
    """

    kind = "dc_cpr"
    values_field = "coefficients"

    def __init__(self, coefficients: Sequence[float], dc_order: int = DEFAULT_DC_ORDER,
                 meta: ArtifactMeta | None = None):
        super().__init__(meta)
        self.coefficients = _number_list("coefficients", coefficients)
        if len(self.coefficients) != CPR_SIZE:
            raise ValueError(f"coefficients must hold {CPR_SIZE} numbers (4 x 3 x 3), got {len(self.coefficients)}")
        self.dc_order = _dc_order(dc_order)

    def ratios(self, nfe: int, guidance: float) -> list[float]:
        """The predicted ratio of every step (the first ``dc_order`` are 1)."""
        nfe = check_nfe(nfe)
        guidance = check_guidance(guidance)
        free = list(range(self.dc_order, nfe))
        rho = cpr_features(nfe, guidance, free) @ np.asarray(self.coefficients) if free else np.zeros(0)
        if not np.isfinite(rho).all():
            raise ArtifactError(f"dc_cpr predicts non-finite ratios at NFE {nfe}, guidance {guidance:g}")
        return [1.0] * min(self.dc_order, nfe) + rho.tolist()


def fit_cpr(calibrated: Sequence[DCRatios], meta: ArtifactMeta | None = None, *,
            ridge: float = DEFAULT_CPR_RIDGE) -> DCCPR:
    """Ridge-regularised least-squares fit of the 36 CPR coefficients to calibrated ratios of several pairs.

    The penalty ``ridge * ||c||^2`` acts on the coefficients of ``rho - 1`` over unit-norm
    columns, so it pulls predictions towards rho = 1 (no compensation) rather than 0. The
    calibrated ratios are noisy (many steps barely change the loss), and an unregularised fit
    of 36 numbers to them extrapolates wildly for pairs at the edge of the grid; the default
    was chosen by leave-one-out on the calibration losses (``benchmarks/dc_cpr_ridge.py``).

    Args:
        calibrated: Ratio artifacts whose ``meta.guidance`` is set, one per pair; they must
            share ``dc_order`` and cover at least 3 NFEs and 3 guidance scales (each cascade
            level is quadratic).
        meta: Provenance of the result (the fitted pairs are added to ``extra``).
        ridge: Penalty weight (>= 0); 0 is plain least squares.

    Returns:
        The :class:`DCCPR` (minimum-norm solution when the pairs leave directions undetermined).

    Raises:
        ValueError: too few pairs, missing guidance, mixed ``dc_order``, duplicate pairs.
    """
    if not calibrated:
        raise ValueError("fit_cpr needs calibrated ratios for several (NFE, guidance) pairs")
    orders = {r.dc_order for r in calibrated}
    if len(orders) != 1:
        raise ValueError(f"fit_cpr got ratios made with different dc_order values {sorted(orders)}")
    pairs = []
    for r in calibrated:
        if r.meta.guidance is None:
            raise ValueError("every calibrated ratio set needs meta.guidance (the CFG scale it was made for)")
        pairs.append((r.nfe, r.meta.guidance))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"fit_cpr got the same (NFE, guidance) pair twice: {sorted(pairs)}")
    nfes, scales = {p[0] for p in pairs}, {p[1] for p in pairs}
    if len(nfes) < 3 or len(scales) < 3:
        raise ValueError(f"CPR is quadratic in the NFE and in the guidance: it needs at least 3 of each, got NFE "
                         f"{sorted(nfes)} and guidance {sorted(scales)}")
    ridge = check_real("ridge", ridge, 0.0)
    (dc_order,) = orders
    rows, targets = [], []
    for r in calibrated:
        free = list(range(dc_order, r.nfe))
        rows.append(cpr_features(r.nfe, r.meta.guidance, free))
        targets.append(np.asarray(r.ratios[dc_order:]))
    a, b = np.concatenate(rows), np.concatenate(targets)
    # The monomials span very different scales (n^2 ~ 0.01): solve on unit-norm columns.
    scale = np.linalg.norm(a, axis=0)
    penalty = math.sqrt(ridge) * np.eye(CPR_SIZE)
    coef = np.linalg.lstsq(np.concatenate([a / scale, penalty]), np.concatenate([b - 1.0, np.zeros(CPR_SIZE)]),
                           rcond=None)[0] / scale
    coef[_CONSTANT] += 1.0  # the x^0 g^0 n^0 monomial is 1 everywhere
    residual = float(np.sqrt(np.mean((a @ coef - b) ** 2)))
    meta = meta or ArtifactMeta()
    extra = {**meta.extra, "pairs": [[n, g] for n, g in sorted(pairs)], "fit_rms": residual, "ridge": ridge}
    meta = ArtifactMeta(**{**meta.to_dict(), "nfe": None, "guidance": None, "extra": extra})
    return DCCPR(coef.tolist(), dc_order, meta)


def load_dc_file(path: str | os.PathLike) -> DCRatios | DCCPR:
    """A ``dc_ratios`` or ``dc_cpr`` file, whichever it holds.

    Raises:
        ArtifactError: neither kind, unreadable, or invalid.
    """
    for cls in (DCRatios, DCCPR):
        try:
            return cls.load(path)
        except ArtifactError as exc:
            if "this is not a" not in str(exc):
                raise
    raise ArtifactError(f"{path} is neither a dc_ratios nor a dc_cpr artifact")
