"""Fold every step of a :class:`~fewstep.samplers.plan.SolverPlan` into a few fused combinations.

A plan describes a step as four stages (convert, correct, compensate, predict) over the
sample, the raw model output and the history of converted outputs. Every stage is linear,
so their coefficient rows compose, once per plan, in float64, into rows over a fixed set of
*registers* (the tensors a step reads)::

    x                 the sample the model was evaluated at
    out               the raw model output (with guidance g: out_u, out_c, the two halves of
                      the doubled batch; out = out_u + g (out_c - out_u) is folded in too)
    x0                the transformed x0 (only with a non-linear x0 transform such as
                      thresholding, which splits a step: x0 first, then everything else)
    d1 ... d{H-1}     the previous converted outputs, newest first
    prev              the previous corrected sample (only for plans whose corrector cannot
                      be folded, see below)

and four *outputs* (the tensors a step writes)::

    d0                the new history entry (after DC-Solver's compensation)
    x_next            the next sample
    prev              this step's corrected sample, for the next step's corrector
    x0                the data prediction handed to the caller

Each output is its row over the registers plus an optional constant (``bias``): the
predictor's bias, and the corrector's (DPM-Solver-v3's b terms), which reaches ``prev`` as it
is and ``x_next`` times the predictor's ``x`` coefficient. The history entry is the space's
default (x0 or eps) or the plan's own ``history_coef`` row over (x, x0) (DPM-Solver-v3's f).

The corrector needs no ``prev`` register when its ``x_prev`` coefficient equals the previous
predictor's ``x`` coefficient (UniPC): then ``x_prev = (x - sum_j p_j d_{j+1}) / p_x`` is an
exact function of the registers, and the corrected sample folds into ``x_next``. The fold is
written as ``c_x / p_x`` times that expression, so it stays exact under autograd when the
coefficients are torch functions of parameters (DC-Solver's calibration).

Adding a plan field: validate it in ``SolverPlan.__post_init__``; compose it here in
:func:`fold_plan` with torch ops only (through ``per_step``, so elementwise tables broadcast
and gradients flow); if it changes what ``x_next`` reads besides ``x_prev``'s identity, list it
with ``predict_bias``/``predict_raw`` in :func:`_corrector_steps`; a new register goes into
:class:`Registers` (and the register lists in ``PlanExecutor.advance``/``_step_dense``),
a new per-step table into :class:`FoldedPlan`, ``FoldedPlan.structure`` and
``PlanExecutor._load_tables``/``load`` (in-place reload for captured graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["OUTPUTS", "Registers", "FoldedPlan", "fold_plan"]

OUTPUTS = ("d0", "x_next", "prev", "x0")
D0, X_NEXT, PREV, X0 = range(4)


@dataclass(frozen=True)
class Registers:
    """The register layout of a folded plan."""

    history: int
    guided: bool = False
    transform: bool = False
    prev: bool = False

    @cached_property
    def names(self) -> tuple[str, ...]:
        names = ["x", *(("out_u", "out_c") if self.guided else ("out",))]
        if self.transform:
            names.append("x0")
        names += [f"d{j}" for j in range(1, self.history)]
        if self.prev:
            names.append("prev")
        return tuple(names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def outputs(self) -> tuple[int, ...]:
        """Indices of the model-output registers."""
        return (1, 2) if self.guided else (1,)


@dataclass
class FoldedPlan:
    """A plan's steps as rows over registers (float64, on the plan's device, differentiable).

    Attributes:
        registers: The register layout.
        rows: ``[n, 4, K, *S]`` coefficients of the outputs :data:`OUTPUTS` over the K registers.
        bias: ``[n, 4, *S]`` additive terms of the outputs :data:`OUTPUTS`, or None (no step has one).
        pre: ``[n, K]`` row of the untransformed x0 (only with a transform; reads x and out).
        needed: ``[n][4]`` which outputs step i must write (``x0`` is always listed; callers
            that do not want it skip it).
        active: ``[n][4][K]`` which coefficients are non-zero (one host read of the whole table).
        pre_active: ``[n][K]`` the same for ``pre``.
        x0_is_d0: ``[n]`` whether ``x0`` and ``d0`` have identical rows (then x0 is a copy).
        bias_active: ``[n][4]`` which outputs of step i have a non-zero bias (None without bias).
    """

    registers: Registers
    rows: torch.Tensor
    bias: torch.Tensor | None
    pre: torch.Tensor | None
    needed: list[list[bool]]
    active: list[list[list[bool]]]
    pre_active: list[list[bool]] | None
    x0_is_d0: list[bool]
    bias_active: list[list[bool]] | None = None

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape[3:])

    def structure(self) -> tuple:
        """Everything but the coefficient values: plans with equal structures run the same launches."""
        return (self.registers, self.n, self.coefficient_shape, _freeze(self.bias_active), _freeze(self.needed),
                _freeze(self.active), _freeze(self.pre_active), tuple(self.x0_is_d0))


def _freeze(nested):
    return tuple(_freeze(v) for v in nested) if isinstance(nested, list) else nested


def _nonzero(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Which entries of the first ``lead`` dims are non-zero anywhere in the trailing dims."""
    return t.detach().reshape(*t.shape[:lead], -1).ne(0).any(-1)


def _corrector_steps(plan, fold: bool) -> tuple[list[bool], list[bool]]:
    """(corrected, folded) per step: whether step i corrects its sample, and without ``prev``."""
    n, h = plan.n, plan.history
    if plan.correct is None:
        return [False] * n, [False] * n
    corrected = _nonzero(plan.correct, 1)
    if n == 1 or not fold:
        return corrected.tolist(), [False] * n
    p, c = plan.predict.detach(), plan.correct.detach()
    same_x = (c[1:, 0] == p[:-1, 0]).reshape(n - 1, -1).all(1) & _nonzero(p[:-1, 0], 1)
    no_x = ~_nonzero(c[1:, 0], 1)  # the corrector does not read x_prev at all
    ok = (same_x & ~_nonzero(p[:-1, h], 1)) | no_x  # the previous predictor may not read the dropped entry
    for extra in (plan.predict_bias, plan.predict_raw):
        if extra is not None:
            ok &= ~_nonzero(extra[:-1], 1) | no_x
    flags = torch.stack([corrected, torch.cat([torch.zeros(1, dtype=torch.bool), ok])]).tolist()
    corrected, foldable = flags
    return corrected, [c and f for c, f in zip(corrected, foldable)]


def fold_plan(plan, transform: bool = False, guidance: float | None = None, fold_corrector: bool = True
              ) -> FoldedPlan:
    """Compose the stages of ``plan`` into rows over registers (see the module docstring).

    Args:
        plan: The solver plan.
        transform: Whether a non-linear x0 transform runs between conversion and the rest.
        guidance: Classifier-free guidance scale folded into the rows (model outputs are then
            the two halves of the doubled batch), or None.
        fold_corrector: Fold correctors through the x_prev identity where it holds. The fold
            starts the correction from the sample passed in; without it the corrected sample
            is kept in the compute dtype (a ``prev`` register), which matters when samples are
            half precision: the fold then rounds the corrector's base to the sample's dtype.

    Raises:
        ValueError: for a plan whose step reads a history entry or a previous sample that no
            earlier step wrote.
    """
    n, h = plan.n, plan.history
    corrected, folded = _corrector_steps(plan, fold_corrector)
    if corrected[0]:
        raise ValueError("solver plan corrects step 0, which has no previous sample (bad plan)")
    regs = Registers(h, guidance is not None, transform, any(c and not f for c, f in zip(corrected, folded)))
    names, K = regs.names, len(regs.names)
    shape = plan.coefficient_shape
    device = plan.predict.device
    f64 = torch.float64
    eye = torch.eye(K, dtype=f64, device=device).reshape(K, K, *([1] * len(shape)))

    def unit(name: str) -> torch.Tensor:
        return eye[names.index(name)]  # [K, 1, ...]

    def per_step(t: torch.Tensor) -> torch.Tensor:
        """[n] or [n, *S] -> [n, 1, *S] (scalars get singleton trailing dims)."""
        t = t.to(device=device, dtype=f64)
        return t.reshape(n, 1, *t.shape[1:], *([1] * (len(shape) + 1 - t.dim())))

    if guidance is None:
        out_vec = unit("out")
    else:
        out_vec = (1 - guidance) * unit("out_u") + guidance * unit("out_c")
    cx, co = per_step(plan.x0_coef[:, 0]), per_step(plan.x0_coef[:, 1])
    x0_raw = cx * unit("x") + co * out_vec
    x0 = unit("x0") if transform else x0_raw
    if plan.history_coef is not None:
        d0 = per_step(plan.history_coef[:, 0]) * unit("x") + per_step(plan.history_coef[:, 1]) * x0
    elif plan.space == "noise":
        grid = plan.grid
        d0 = per_step(1 / grid.sigma[:n]) * unit("x") + per_step(-grid.alpha[:n] / grid.sigma[:n]) * x0
    else:
        d0 = x0
    hist = [d0] + [unit(f"d{j}") for j in range(1, h)]

    x_corr = unit("x")
    if any(corrected):
        c = plan.correct
        p_prev = torch.cat([torch.zeros_like(plan.predict[:1]), plan.predict[:-1]])
        mask_shape = (n, 1, *([1] * len(shape)))
        fold_m = torch.tensor(folded, device=device).reshape(mask_shape)
        has_m = torch.tensor(corrected, device=device).reshape(mask_shape)
        c0, p0 = per_step(c[:, 0]), per_step(p_prev[:, 0])
        ratio = torch.where(fold_m & (p0 != 0), c0 / torch.where(fold_m & (p0 != 0), p0, torch.ones_like(p0)), 0.0)
        x_prev = unit("x") - sum((per_step(p_prev[:, 1 + j]) * unit(f"d{j + 1}") for j in range(h - 1)),
                                 torch.zeros_like(eye[0]))
        base = ratio * x_prev
        if regs.prev:
            base = base + torch.where(fold_m, 0.0, c0) * unit("prev")
        corr = base + sum(per_step(c[:, 1 + j]) * hist[j] for j in range(h))
        x_corr = torch.where(has_m, corr, unit("x"))

    if plan.compensate is not None:
        d0 = sum(per_step(plan.compensate[:, j]) * hist[j] for j in range(h))
    p = plan.predict
    x_next = per_step(p[:, 0]) * x_corr + per_step(p[:, 1]) * d0
    x_next = x_next + sum((per_step(p[:, 1 + j]) * hist[j] for j in range(1, h)), torch.zeros_like(eye[0]))
    if plan.predict_raw is not None:
        x_next = x_next + per_step(plan.predict_raw) * out_vec

    full = (n, K, *shape)
    rows = torch.stack([t.expand(full) for t in (d0, x_next, x_corr, x0)], 1)
    bias, bias_active = _output_bias(plan, shape, device)
    pre = x0_raw.reshape(n, K, -1)[:, :, 0] if transform else None

    # Host-side structure, from a few reads of whole tables.
    nz = _nonzero(rows, 3).cpu()  # [n, 4, K]
    if rows.requires_grad:
        # Coefficients that are functions of tuned parameters (DC calibration): a zero can have a
        # non-zero gradient (rho = 1 gives compensation weights (1, 0, 0)), and the corrector fold
        # differentiates through every predictor coefficient, so every register a step can read
        # stays a term; x0 keeps its own row (equal values, different gradients).
        nz = nz | ~_unwritten(regs, n)[:, None, :]
    needed = _needed_outputs(regs, nz, corrected, folded)
    _check_reads(regs, nz, needed)
    same = (rows[:, D0] == rows[:, X0]).reshape(n, -1).all(1) & (not rows.requires_grad)
    pre_active = None if pre is None else _nonzero(pre, 2).tolist()
    return FoldedPlan(regs, rows, bias, pre, needed.tolist(), nz.tolist(), pre_active, same.tolist(), bias_active)


def _output_bias(plan, shape: tuple[int, ...], device) -> tuple[torch.Tensor | None, list[list[bool]] | None]:
    """([n, 4, *B] constants of the outputs, which are non-zero): the corrector's bias is in the
    corrected sample (``prev``) and, times the predictor's x coefficient, in ``x_next``.

    Biases broadcast against the sample like coefficients (aligned on the right); B is the
    broadcast of their shapes and the coefficient shape S.
    """
    tables = [t for t in (plan.predict_bias, plan.correct_bias) if t is not None]
    if not tables:
        return None, None
    n, f64 = plan.n, torch.float64
    out = torch.broadcast_shapes(shape, *(tuple(t.shape[1:]) for t in tables))

    def table(t):  # [n, *T] -> [n, *B]
        t = t.to(device=device, dtype=f64)
        return t.reshape(n, *([1] * (len(out) + 1 - t.dim())), *t.shape[1:]).expand(n, *out)

    zero = torch.zeros(n, *out, dtype=f64, device=device)
    corr = zero if plan.correct_bias is None else table(plan.correct_bias)
    x_next = table(plan.predict[:, 0]) * corr
    if plan.predict_bias is not None:
        x_next = x_next + table(plan.predict_bias)
    bias = torch.stack([zero, x_next, corr, zero], 1)
    return bias, _nonzero(bias, 2).cpu().tolist()


def _needed_outputs(regs: Registers, nz: torch.Tensor, corrected, folded) -> torch.Tensor:
    """[n, 4] which outputs each step must write: d0 when a later step reads it, prev when the
    next step's corrector reads it, always x_next and x0."""
    n = nz.shape[0]
    needed = torch.zeros(n, 4, dtype=torch.bool)
    needed[:, X_NEXT] = needed[:, X0] = True
    reads = nz[:, :X0].any(1)  # [n, K]: registers read by d0, x_next or prev
    for j in range(1, min(regs.history, n)):
        needed[: n - j, D0] |= reads[j:, regs.index(f"d{j}")]
    unfolded = torch.tensor([c and not f for c, f in zip(corrected, folded)], dtype=torch.bool)
    needed[:-1, PREV] = unfolded[1:]
    return needed


def _unwritten(regs: Registers, n: int) -> torch.Tensor:
    """[n, K]: the registers step i cannot read yet (history entries and prev no earlier step wrote)."""
    steps = torch.arange(n)
    unwritten = torch.zeros(n, len(regs.names), dtype=torch.bool)
    for k, name in enumerate(regs.names):
        if name.startswith("d"):
            unwritten[:, k] = steps < int(name[1:])
        elif name == "prev":
            unwritten[0, k] = True
    return unwritten


def _check_reads(regs: Registers, nz: torch.Tensor, needed: torch.Tensor) -> None:
    names = regs.names
    bad = nz & needed[:, :, None] & _unwritten(regs, nz.shape[0])[:, None, :]
    if bool(bad.any()):
        i, _, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"solver plan step {i} reads {names[k]}, which no earlier step wrote (bad plan)")
