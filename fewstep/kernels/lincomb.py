"""The solver-update entry points: fused linear combinations with coefficients in device memory.

Every solver step is a few linear combinations of the same tensors, so the executor needs
one operation::

    out_m = bias_m + sum_k c[m, k] * x_k        m < M <= 4 outputs, k < K <= 8 inputs

:func:`linear_combinations` computes all M outputs in one pass (one Triton launch on CUDA),
:func:`linear_combination` is the M = 1 case. Coefficients are 0-dim tensors (per-step
scalars) or elementwise tensors whose shape S broadcasts to the inputs' shape (e.g. [C, H, W]
or [1, C, 1, 1] against [B, C, H, W], as DPM-Solver-v3 needs). They are always tensors on
the inputs' device and are read from device memory inside the kernel, never passed by
value: a captured CUDA graph then replays with the current values instead of the ones
baked in at capture time. Python numbers are rejected for that reason.

Graph-friendly form: pass the whole per-step table ``[n, M, K, *S]`` (and bias ``[n, M, *S]``)
with ``step``, a 1-element integer device tensor; the kernel reads row ``table[step]``, so
advancing a step is ``step += 1`` on the device and no pointer changes between replays.

How a whole solver step fuses (coefficients composed once, in float64, by the plan builder):
every stage of :class:`~fewstep.samplers.plan.PlanExecutor` is affine in the registers, so
with the raw model output as an input the conversion ``x0 = c_x x + c_out out`` (and CFG:
``out = u + g (c - u)`` is two inputs, the uncond/cond halves of the batched output, as
views), the history push, the corrector, DC-Solver's compensation and the predictor all
collapse into rows over the same inputs ``(x, out_u, out_c, D_1, ..., D_{H-1})``:

- output 0, the new history entry ``D_0`` (x0 or eps), and
- output 1, ``x_next``. The corrected sample is never materialised: since the corrector's
  ``x_prev`` coefficient equals the previous predictor's ``x`` coefficient,
  ``x_corr = x + b_0 D_0 + sum_{j>=1} (b^c_j - b^p_{j-1}) D_j`` needs no ``x_prev`` register.

That is one launch per step reading K = 2 + H (+1 with CFG) and writing 2 tensors. With a
non-linear x0 transform (thresholding, clipping) it is two: ``x0`` first, then the rest
with ``x0`` as an input. ``out=`` writes straight into preallocated buffers (an output may
be exactly one of the inputs, e.g. ``x_next`` over ``x``; the dropped history slot is a
natural destination for ``D_0``), and ``nonfinite=`` makes the same pass record NaN/Inf,
replacing the executor's separate ``isfinite`` pass.

Precision: accumulation in float32 for float16/bfloat16/float32 operands (float64 if any
input or output is float64); coefficients and bias are cast to the accumulation dtype; the
output dtype defaults to the promoted dtype of the inputs. Inputs may have any strides and
mixed floating dtypes.

Backends: ``"triton"`` (one launch; CUDA tensors, or CPU tensors in Triton's interpreter
with ``TRITON_INTERPRET=1``), ``"torch"`` (the reference in :mod:`.reference`: any device,
autograd, in-place accumulation) and ``"auto"`` (Triton for CUDA tensors when triton is
importable and no input requires grad, else torch). triton is imported only when used.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch

from . import reference
from .layout import has_internal_overlap, overlaps, same_view

__all__ = ["linear_combination", "linear_combinations", "BACKENDS", "MAX_INPUTS", "MAX_OUTPUTS"]

BACKENDS = ("auto", "triton", "torch")
MAX_INPUTS = 8
MAX_OUTPUTS = 4
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32, float64"

Coefficients = Union[torch.Tensor, Sequence[torch.Tensor]]


def linear_combination(
    coefficients: Coefficients,
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    step: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Return ``sum_k coefficients[k] * tensors[k] (+ bias)`` as a new tensor (or in ``out``).

    Args:
        coefficients: K tensors (0-dim or broadcastable to the inputs' shape), or one tensor
            [K, *S]; with ``step``, a table [n, K, *S].
        tensors: K <= 8 floating tensors of identical shape on one device (any strides).
        bias: Optional additive tensor broadcastable to the inputs ([n, *S] with ``step``).
        out: Optional destination of the inputs' shape; it may be exactly one of the inputs.
        dtype: Output dtype (default: the promoted dtype of the inputs).
        step: Optional 1-element integer device tensor selecting the table row. Must be in
            range; it is not checked (that would need a host sync).
        nonfinite: Optional int32 device tensor (1 element, or [n] with ``step``) set to 1
            when the output holds NaN or Inf; it is never reset here.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The combination (``out`` when given).
    """
    lead = 0 if step is None else 1
    if isinstance(coefficients, torch.Tensor):
        if coefficients.dim() < lead + 1:
            raise ValueError(
                f"coefficients has shape {tuple(coefficients.shape)}; expected {_form(True, lead)}"
            )
        coefficients = coefficients.unsqueeze(lead)
    elif isinstance(coefficients, (list, tuple)):
        coefficients = [coefficients]
    else:
        raise TypeError(f"coefficients must be a tensor or a list of tensors, got {type(coefficients).__name__}")
    if isinstance(bias, torch.Tensor):
        if bias.dim() < lead:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; with step= it needs a leading table dimension")
        bias = bias.unsqueeze(lead)
    elif bias is not None:
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
    return _combine(coefficients, tensors, bias, None if out is None else [out], dtype, step, nonfinite, backend,
                    single=True)[0]


def linear_combinations(
    coefficients: torch.Tensor | Sequence[Sequence[torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    *,
    out: Sequence[torch.Tensor | None] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    step: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """Return M combinations ``out_m = sum_k coefficients[m][k] * tensors[k] (+ bias[m])`` from one pass.

    Args:
        coefficients: A coefficient matrix: one tensor [M, K, *S] (a table [n, M, K, *S]
            with ``step``), or M rows of K tensors (0-dim or broadcastable to the inputs).
        tensors: K <= 8 floating tensors of identical shape on one device (any strides).
        bias: None, a tensor [M, *S] ([n, M, *S] with ``step``), or M tensors-or-None.
        out: Optional M destinations (or None entries); one may be exactly an input.
        dtype: Output dtype, one per output, or None (the promoted dtype of the inputs).
        step: Optional 1-element integer device tensor selecting the table row (unchecked).
        nonfinite: Optional int32 device tensor (1 element, or [n] with ``step``) set to 1
            when any output holds NaN or Inf; shape [M] ([n, M] with ``step``) keeps one flag
            per output, [M + K] ([n, M + K]) one per output and then one per input.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        The M outputs, in order.
    """
    return _combine(coefficients, tensors, bias, out, dtype, step, nonfinite, backend, single=False)


def _form(single: bool, lead: int) -> str:
    dims = ("n, " if lead else "") + ("" if single else "M, ") + "K, *S"
    return f"[{dims}] with S broadcastable to the inputs' shape"


def _check_inputs(tensors) -> tuple[torch.Size, torch.device]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    if not 1 <= len(tensors) <= MAX_INPUTS:
        raise ValueError(f"tensors must hold 1 to {MAX_INPUTS} tensors, got {len(tensors)}")
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{k}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in _FLOATS:
            raise TypeError(f"tensors[{k}] has dtype {t.dtype}; allowed: {_FLOAT_NAMES}")
        if t.shape != tensors[0].shape:
            raise ValueError(f"tensors[{k}] has shape {tuple(t.shape)} but tensors[0] has {tuple(tensors[0].shape)}")
        if t.device != tensors[0].device:
            raise ValueError(f"tensors[{k}] is on {t.device} but tensors[0] is on {tensors[0].device}")
    return tensors[0].shape, tensors[0].device


def _broadcasts(s: Sequence[int], shape: Sequence[int]) -> bool:
    if not s:
        return True
    return len(s) <= len(shape) and all(a in (1, b) for a, b in zip(reversed(s), reversed(shape)))


def _check_operand(name: str, c, shape, device, what: str = "coefficients") -> None:
    if not isinstance(c, torch.Tensor):
        raise TypeError(
            f"{name} is a {type(c).__name__}; {what} must be tensors on the inputs' device "
            "(they are read from device memory, never baked in as numbers)"
        )
    if c.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {c.dtype}; allowed: {_FLOAT_NAMES}")
    if c.device != device:
        raise ValueError(f"{name} is on {c.device} but the inputs are on {device}")
    if not _broadcasts(c.shape, shape):
        raise ValueError(f"{name} has shape {tuple(c.shape)}, which does not broadcast to the inputs' shape {tuple(shape)}")


def _user_shape(t: torch.Tensor, single: bool, lead: int) -> tuple[int, ...]:
    shape = list(t.shape)
    if single:
        del shape[lead]
    return tuple(shape)


def _check_coefficients(coefficients, K, shape, device, lead, single):
    """Return (table or None, rows or None, M)."""
    if isinstance(coefficients, torch.Tensor):
        table = coefficients
        bad = table.dim() < lead + 2 or table.numel() == 0
        if bad or table.shape[lead + 1] != K or not 1 <= table.shape[lead] <= MAX_OUTPUTS:
            shown = _user_shape(table, single, lead) if table.dim() >= lead + 2 else tuple(table.shape)
            raise ValueError(
                f"coefficients has shape {shown} for K={K} tensors; expected {_form(single, lead)}"
                + ("" if single else f" and 1 <= M <= {MAX_OUTPUTS}")
            )
        _check_operand("coefficients", table[(0,) * (lead + 2)], shape, device)
        return table, None, table.shape[lead]
    if lead:
        raise TypeError(f"step= needs coefficients as one tensor {_form(single, lead)}, not a list")
    if not isinstance(coefficients, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in coefficients):
        raise TypeError("coefficients must be a tensor or M lists of K tensors")
    if not 1 <= len(coefficients) <= MAX_OUTPUTS:
        raise ValueError(f"coefficients must hold 1 to {MAX_OUTPUTS} rows, got {len(coefficients)}")
    for m, row in enumerate(coefficients):
        if len(row) != K:
            where = "" if single else f"[{m}]"
            raise ValueError(f"need one coefficient per tensor: coefficients{where} has {len(row)}, tensors has {K}")
        for k, c in enumerate(row):
            _check_operand(f"coefficients[{k}]" if single else f"coefficients[{m}][{k}]", c, shape, device)
    return None, coefficients, len(coefficients)


def _check_bias(bias, M, shape, device, lead):
    """Return (bias table or None, M bias rows or None)."""
    if isinstance(bias, torch.Tensor):
        if bias.dim() < lead + 1 or bias.shape[lead] != M:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected [{'n, ' if lead else ''}M={M}, *S]")
        _check_operand("bias", bias[(0,) * (lead + 1)], shape, device, "biases")
        return bias, None
    if bias is None:
        return None, [None] * M
    if lead:
        raise TypeError("step= needs bias as one tensor [n, M, *S] or None")
    if not isinstance(bias, (list, tuple)) or len(bias) != M:
        raise TypeError(f"bias must be None, a tensor or a list of {M} tensors-or-None")
    for m, b in enumerate(bias):
        if b is not None:
            _check_operand(f"bias[{m}]", b, shape, device, "biases")
    return None, list(bias)


def _check_dtypes(dtype, M, tensors, single) -> list[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is None:
            dtype = tensors[0].dtype
            if any(t.dtype != dtype for t in tensors):
                dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        dtypes = [dtype] * M
    elif isinstance(dtype, (list, tuple)) and len(dtype) == M and not single:
        dtypes = list(dtype)
    else:
        raise TypeError(f"dtype must be None, a torch.dtype{'' if single else f' or a list of {M} dtypes'}")
    for dt in dtypes:
        if dt not in _FLOATS:
            raise TypeError(f"dtype {dt} is not allowed; allowed: {_FLOAT_NAMES}")
    return dtypes


def _check_outputs(out, dtypes, requested, tensors, others, needs_grad, single) -> list[torch.Tensor | None]:
    """Validate ``out`` (M tensors-or-None); fills ``dtypes`` from the given outputs."""
    M, shape, device = len(dtypes), tensors[0].shape, tensors[0].device
    if out is None:
        return [None] * M
    if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)) or len(out) != M:
        raise TypeError(f"out must be a list of {M} tensors-or-None")
    for m, o in enumerate(out):
        name = "out" if single else f"out[{m}]"
        if o is None:
            continue
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(o).__name__}")
        if o.shape != shape or o.device != device or o.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a floating tensor of shape {tuple(shape)} on {device}, got "
                             f"{o.dtype} {tuple(o.shape)} on {o.device}")
        if requested is not None and o.dtype != dtypes[m]:
            raise ValueError(f"{name} has dtype {o.dtype} but dtype={dtypes[m]} was requested")
        dtypes[m] = o.dtype
        if needs_grad:
            raise ValueError("out= cannot be used when an input requires grad")
        if has_internal_overlap(o):
            raise ValueError(f"{name} has overlapping elements (e.g. an expanded tensor)")
        for k, t in enumerate(tensors):
            if overlaps(o, t) and not same_view(o, t):
                raise ValueError(f"{name} partially overlaps tensors[{k}]; an output may only be exactly one input")
        if any(overlaps(o, x) for x in [*(x for x in out[:m] if x is not None), *others]):
            raise ValueError(f"{name} shares memory with another output, a coefficient, the bias, step or nonfinite")
    return list(out)


def _check_flag(nonfinite, step, table, M, K, device) -> int:
    """Validate ``nonfinite``; returns its layout: 0 one flag, 1 one per output, 2 one per operand."""
    if nonfinite is None:
        return 0
    if not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.int32:
        raise TypeError("nonfinite must be an int32 tensor")
    if nonfinite.device != device:
        raise ValueError(f"nonfinite is on {nonfinite.device} but the inputs are on {device}")
    shape = tuple(nonfinite.shape)
    if step is None:
        if shape == (M + K,):
            return 2
        if nonfinite.numel() == 1:
            return 0
        if shape == (M,):
            return 1
        raise ValueError(f"nonfinite must have one element, shape [M] = [{M}] (one flag per output) or "
                         f"[M + K] = [{M + K}] (per output, then per input), got {shape}")
    n = table.shape[0]
    if shape == (n,):
        return 0
    if shape in ((n, M), (n, M + K)):
        return 2 if shape == (n, M + K) else 1
    raise ValueError(f"with step=, nonfinite must have shape [n] = [{n}] like the table, [n, M] = [{n}, {M}] or "
                     f"[n, M + K] = [{n}, {M + K}], got {shape}")


def _combine(coefficients, tensors, bias, out, dtype, step, nonfinite, backend, single):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    shape, device = _check_inputs(tensors)
    K, lead = len(tensors), 0 if step is None else 1
    if step is not None:
        if not isinstance(step, torch.Tensor) or step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
            raise TypeError("step must be a 1-element int32/int64 tensor")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but the inputs are on {device}")
    table, rows, M = _check_coefficients(coefficients, K, shape, device, lead, single)
    bias_table, bias_rows = _check_bias(bias, M, shape, device, lead)
    flag_mode = _check_flag(nonfinite, step, table, M, K, device)
    coefs = [table] if table is not None else [c for r in rows for c in r]
    biases = [bias_table] if bias_table is not None else [b for b in bias_rows if b is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *coefs, *biases))
    dtypes = _check_dtypes(dtype, M, tensors, single)
    others = [*coefs, *biases, *(x for x in (step, nonfinite) if x is not None)]
    out = _check_outputs(out, dtypes, dtype, tensors, others, needs_grad, single)

    acc_dtype = torch.float64 if torch.float64 in (*dtypes, *(t.dtype for t in tensors)) else torch.float32
    if shape.numel() == 0:
        return tuple(o if o is not None else torch.empty(shape, dtype=dt, device=device) for o, dt in zip(out, dtypes))

    if pick_backend(backend, device, needs_grad) == "triton":
        from . import triton_lincomb

        if table is None:
            table = _stack_rows(rows, acc_dtype)
        if bias_table is None:
            bias_table = _stack_bias(bias_rows, device, acc_dtype)
        outs = [o if o is not None else torch.empty_like(tensors[0], dtype=dt) for o, dt in zip(out, dtypes)]
        triton_lincomb.combine(table, tensors, bias_table, outs, acc_dtype, step, nonfinite)
        return tuple(outs)

    if table is not None:
        row_table = table if step is None else table.index_select(0, step.reshape(1)).squeeze(0)
        rows = [r.unbind(0) for r in row_table.to(acc_dtype).unbind(0)]
    if bias_table is not None:
        row_bias = bias_table if step is None else bias_table.index_select(0, step.reshape(1)).squeeze(0)
        bias_rows = row_bias.unbind(0)
    # Inputs are checked before an output may overwrite one of them.
    bad_inputs = [reference.nonfinite_any([t]) for t in tensors] if flag_mode == 2 else []
    results = reference.combine(rows, tensors, bias_rows, out, dtypes, acc_dtype)
    if nonfinite is not None:
        if flag_mode:
            bad = [reference.nonfinite_any([r]) for r in results] + bad_inputs
            reference.mark_nonfinite(nonfinite, torch.stack(bad), step)
        else:
            reference.mark_nonfinite(nonfinite, reference.nonfinite_any(results), step)
    return tuple(results)


def _stack_rows(rows, dtype) -> torch.Tensor:
    s = torch.broadcast_shapes(*(c.shape for r in rows for c in r))
    return torch.stack([torch.stack([c.to(dtype).expand(s) for c in r]) for r in rows])


def _stack_bias(bias_rows, device, dtype) -> torch.Tensor | None:
    present = [b for b in bias_rows if b is not None]
    if not present:
        return None
    s = torch.broadcast_shapes(*(b.shape for b in present))
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.stack([(zero if b is None else b.to(dtype)).expand(s) for b in bias_rows])


@functools.cache
def _triton_missing() -> str | None:
    """Why the Triton backend cannot be imported, or None when it can."""
    try:
        from . import triton_lincomb  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def _triton_importable() -> bool:
    return _triton_missing() is None


def pick_backend(backend: str, device: torch.device, needs_grad: bool) -> str:
    """The backend ``backend`` resolves to for tensors on ``device`` (raises when it cannot run)."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and not needs_grad and _triton_importable() else "torch"
    if not _triton_importable():
        raise RuntimeError(f"backend='triton' needs the triton package, version >= 3.4 (pip install "
                           f"'fewstep[kernels]'): {_triton_missing()}")
    if needs_grad:
        raise ValueError("backend='triton' does not support autograd; use backend='torch' for inputs that require grad")
    if device.type == "cpu":
        from . import triton_lincomb

        if not triton_lincomb.interpreting():
            raise RuntimeError("backend='triton' runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1")
    elif device.type != "cuda":
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
    return "triton"
