"""Triton kernel: M linear combinations of the same K strided inputs in one launch.

One program handles ``BLOCK`` elements of the (coalesced) iteration space: it loads each
input once, then for every output accumulates ``bias_m + sum_k c[m, k] * x_k`` in float32
(float64 for float64 operands) and stores it in the output's dtype. Coefficients and bias
are read from device memory inside the kernel, optionally from the row ``table[step]``
with ``step`` itself read from a device tensor, so a captured CUDA graph replays with the
current values. Strides are passed per operand (after :func:`~fewstep.kernels.layout.coalesce`),
so transposed, sliced and broadcast operands need no copies. With a flag tensor the kernel
also records whether any value it stored is non-finite (which covers every input: each
input enters every output, and ``0 * inf`` is NaN), for all outputs at once, per output, or
per operand (outputs and inputs: the executor tells a NaN model output from an overflowing
update this way); lanes that see one store 1, the others store nothing, so the finite case
costs a compare per element and value.

This module imports triton; :mod:`fewstep.kernels.lincomb` imports it only when the
Triton backend is used. Whether kernels compile for the GPU or run in Triton's CPU
interpreter is decided by ``TRITON_INTERPRET`` when a kernel is first needed in that mode;
the kernel calls no ``@triton.jit`` helpers of triton's standard library (``tl.zeros``,
``tl.sum``), which are bound when triton is imported, so the interpreter also works when
the variable is set after that import (as the tests do).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl

from .layout import coalesce, max_offset

__all__ = ["combine", "launch_arguments", "flag_layout", "interpreting", "BLOCK", "NUM_WARPS"]

if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):
    # Tuple kernel arguments in the interpreter (3.3) and triton.knobs (3.4); tested with 3.9.
    raise ImportError(f"fewstep's Triton kernel needs triton >= 3.4, found {triton.__version__}")

BLOCK = 1024
NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


def _lincomb_kernel(
    xs, outs, coef, coef_lead, bias, bias_lead, step, flag, flag_strides, strides, shape, numel,
    COEF_SCALAR: tl.constexpr, BIAS_MODE: tl.constexpr, HAS_STEP: tl.constexpr, HAS_FLAG: tl.constexpr,
    FLAG_MODE: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    # strides: one R-tuple per operand, in the order outputs (M), inputs (K), coefficients, bias.
    K: tl.constexpr = len(xs)
    M: tl.constexpr = len(outs)
    R: tl.constexpr = len(shape)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    lin = pid * BLOCK + tl.arange(0, BLOCK)
    mask = lin < numel

    # Coordinates, innermost dimension first; every operand's offset reuses them.
    coords = ()
    rem = lin
    for j in tl.static_range(R):
        if j == R - 1:
            coords = coords + (rem,)
        else:
            coords = coords + (rem % shape[R - 1 - j],)
            rem = rem // shape[R - 1 - j]
    offs = ()
    for o in tl.static_range(M + K + 2):
        off = coords[0] * strides[o][R - 1]
        for j in tl.static_range(1, R):
            off += coords[j] * strides[o][R - 1 - j]
        offs = offs + (off,)

    row = 0
    if HAS_STEP:
        row = tl.load(step).to(tl.int64)
    coef_row = coef + row * coef_lead[0]
    bias_row = bias + row * bias_lead[0]

    values = ()
    for k in tl.static_range(K):
        values = values + (tl.load(xs[k] + offs[M + k], mask=mask).to(ACC),)

    bad = tl.full([BLOCK], 0, tl.int1)
    # Only lanes that saw a non-finite value store, all the same value: no atomic, no
    # reduction, and nothing at all in the normal (finite) case.
    flag_row = flag + row * flag_strides[0] + tl.full([BLOCK], 0, tl.int32)
    if HAS_FLAG and FLAG_MODE == 2:  # one flag per operand: outputs, then inputs
        for k in tl.static_range(K):
            v = values[k]
            bad_k = (v != v) | (tl.abs(v) == float("inf"))
            tl.store(flag_row + (M + k) * flag_strides[1], tl.full([BLOCK], 1, flag.dtype.element_ty),
                     mask=bad_k & mask)

    for m in tl.static_range(M):
        if BIAS_MODE == 0:
            acc = tl.full([BLOCK], 0, ACC)
        elif BIAS_MODE == 1:
            acc = tl.full([BLOCK], 0, ACC) + tl.load(bias_row + m * bias_lead[1]).to(ACC)
        else:
            acc = tl.load(bias_row + m * bias_lead[1] + offs[M + K + 1], mask=mask).to(ACC)
        for k in tl.static_range(K):
            c_ptr = coef_row + m * coef_lead[1] + k * coef_lead[2]
            if COEF_SCALAR:
                c = tl.load(c_ptr).to(ACC)
            else:
                c = tl.load(c_ptr + offs[M + K], mask=mask).to(ACC)
            acc += c * values[k]
        y = acc.to(outs[m].dtype.element_ty)
        tl.store(outs[m] + offs[m], y, mask=mask)
        if HAS_FLAG:
            yc = y.to(ACC)
            bad_m = (yc != yc) | (tl.abs(yc) == float("inf"))
            if FLAG_MODE > 0:
                tl.store(flag_row + m * flag_strides[1], tl.full([BLOCK], 1, flag.dtype.element_ty), mask=bad_m & mask)
            else:
                bad = bad | bad_m
    if HAS_FLAG and FLAG_MODE == 0:
        tl.store(flag_row, tl.full([BLOCK], 1, flag.dtype.element_ty), mask=bad & mask)


_KERNELS: dict[bool, object] = {}


def flag_layout(flag: torch.Tensor, M: int, K: int, lead: int) -> int:
    """0: one flag for all outputs ([1], or [n] with a step); 1: one per output ([M] / [n, M]);
    2: one per operand, the M outputs then the K inputs ([M + K] / [n, M + K])."""
    width = flag.shape[-1] if flag.dim() == lead + 1 else 0
    if width == M + K:
        return 2
    return 1 if width == M and M > 1 else 0


def interpreting() -> bool:
    """Whether Triton kernels built now run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _kernel():
    # triton.jit picks compiled vs interpreted at decoration time; keep one of each so a
    # process can use both (e.g. interpreter tests next to CUDA runs).
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = triton.jit(_lincomb_kernel)
    return _KERNELS[mode]


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _broadcast_view(t: torch.Tensor, keep: int, shape: tuple[int, ...]) -> torch.Tensor:
    """View of ``t`` = [*L, *S] (``keep`` leading dims L) as [*L, *shape], stride 0 where S broadcasts."""
    for _ in range(len(shape) + keep - t.dim()):
        t = t.unsqueeze(keep)
    return t.expand(*t.shape[:keep], *shape)


def launch_arguments(
    table: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    outs: Sequence[torch.Tensor],
    acc_dtype: torch.dtype,
    step: torch.Tensor | None,
    flag: torch.Tensor | None,
) -> tuple[tuple, dict, tuple[int]]:
    """Positional arguments, constexpr keywords and grid of one launch (see :func:`combine`)."""
    shape = tuple(tensors[0].shape)
    lead = 0 if step is None else 1
    coef = _broadcast_view(table, lead + 2, shape)
    coef_lead = ((coef.stride(0) if lead else 0), *coef.stride()[lead : lead + 2])
    coef_scalar = all(s == 0 for s in coef.stride()[lead + 2 :])
    if bias is None:
        bias_mode, bias_arg, bias_lead, bias_strides = 0, tensors[0], (0, 0), (0,) * len(shape)
    else:
        b = _broadcast_view(bias, lead + 1, shape)
        bias_lead = ((b.stride(0) if lead else 0), b.stride(lead))
        bias_strides = b.stride()[lead + 1 :]
        bias_mode = 1 if all(s == 0 for s in bias_strides) else 2
        bias_arg = bias
    operand_strides = [o.stride() for o in outs] + [t.stride() for t in tensors]
    operand_strides += [coef.stride()[lead + 2 :], bias_strides]
    numel = tensors[0].numel()
    cshape, cstrides = coalesce(shape, operand_strides)
    # int32 offsets unless some operand (tables included) reaches past 2**31 elements.
    reach = max(max_offset(t.shape, t.stride()) for t in (*outs, *tensors, table))
    reach = max(reach, numel + BLOCK, 0 if bias is None else max_offset(bias.shape, bias.stride()))
    flag_mode = 0 if flag is None else flag_layout(flag, len(outs), len(tensors), lead)
    flag_strides = (0, 0)
    if flag is not None:
        flag_strides = (flag.stride(0) if lead else 0, flag.stride(-1) if flag_mode else 0)
    args = (
        tuple(tensors), tuple(outs), table, coef_lead, bias_arg, bias_lead,
        tensors[0] if step is None else step, tensors[0] if flag is None else flag,
        flag_strides, tuple(cstrides), cshape, numel,
    )
    constexprs = dict(
        COEF_SCALAR=coef_scalar, BIAS_MODE=bias_mode, HAS_STEP=step is not None, HAS_FLAG=flag is not None,
        FLAG_MODE=flag_mode, ACC=_tl_dtype(acc_dtype), INT64=reach > _INT32_MAX, BLOCK=BLOCK,
    )
    return args, constexprs, (triton.cdiv(numel, BLOCK),)


def combine(
    table: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    outs: Sequence[torch.Tensor],
    acc_dtype: torch.dtype,
    step: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
) -> None:
    """Write ``outs[m] = bias[m] + sum_k table[m, k] * tensors[k]`` in one launch.

    Args:
        table: Coefficients [(n,) M, K, *S], S broadcastable to the inputs' shape.
        tensors: K inputs of one shape (any strides).
        bias: None or [(n,) M, *Sb].
        outs: M preallocated outputs of the inputs' shape, without internal overlap.
        acc_dtype: torch.float32 or torch.float64.
        step: Optional 1-element integer tensor selecting the table row (then ``table``,
            ``bias`` and ``flag`` have a leading dimension n).
        flag: Optional int32 tensor set to 1 (at ``[step]`` when given) where a value is
            NaN or Inf (see :func:`flag_layout`).
    """
    args, constexprs, grid = launch_arguments(table, tensors, bias, outs, acc_dtype, step, flag)
    device = tensors[0].device
    # Triton launches on the current CUDA device; make it the tensors' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _kernel()[grid](*args, **constexprs, num_warps=NUM_WARPS, enable_fp_fusion=True)
