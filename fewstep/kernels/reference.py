"""PyTorch reference of the fused linear combination: any device (CPU, CUDA, MPS, meta), autograd-friendly.

Each output is accumulated in place in ``acc_dtype`` (float32, or float64 when an input or
output is float64): the first term is written into the accumulator, the others are added
with ``addcmul_``, which upcasts half-precision inputs on the fly. The accumulator is the
output itself whenever the output has the accumulation dtype, so an fp32 combination
allocates nothing but its result. Nothing reads a tensor value on the host.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import overlaps

__all__ = ["accumulate", "combine", "nonfinite_any", "mark_nonfinite"]


def accumulate(
    coefs: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    acc_dtype: torch.dtype,
    into: torch.Tensor | None,
) -> torch.Tensor:
    """``sum_k coefs[k] * tensors[k] (+ bias)`` accumulated in ``acc_dtype``, in ``into`` when given.

    No checks: ``into`` must have the inputs' shape and ``acc_dtype`` and overlap none of them
    (the plan executor guarantees this once per plan).
    """
    c0, t0 = _cast(coefs[0], acc_dtype), tensors[0]
    if t0.dtype == acc_dtype:
        acc = torch.mul(t0, c0) if into is None else torch.mul(t0, c0, out=into)
    else:
        # mul(fp16, fp32 scalar) would compute in fp16: upcast first, then scale in place.
        acc = t0.to(acc_dtype) if into is None else into.copy_(t0)
        acc.mul_(c0)
    for c, t in zip(coefs[1:], tensors[1:]):
        acc.addcmul_(t, _cast(c, acc_dtype))
    if bias is not None:
        acc.add_(_cast(bias, acc_dtype))
    return acc


def _cast(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return c if c.dtype == dtype else c.to(dtype)  # .to() is not free even when it is a no-op


def combine(
    rows: Sequence[Sequence[torch.Tensor]],
    tensors: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    outs: Sequence[torch.Tensor | None],
    dtypes: Sequence[torch.dtype],
    acc_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """``out_m = sum_k rows[m][k] * tensors[k] + biases[m]`` for every output m.

    Args:
        rows: M rows of K coefficients (0-dim or broadcastable to the inputs).
        tensors: K inputs of one shape.
        biases: M optional additive terms.
        outs: M optional destination tensors (may be exactly one of the inputs).
        dtypes: M output dtypes (used when ``outs[m]`` is None).
        acc_dtype: Accumulation dtype.

    Returns:
        The M outputs.
    """
    results: list[torch.Tensor] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    for coefs, bias, out, dtype in zip(rows, biases, outs, dtypes):
        direct = out is not None and out.dtype == acc_dtype and not any(overlaps(out, t) for t in tensors)
        acc = accumulate(coefs, tensors, bias, acc_dtype, out if direct else None)
        if out is None:
            results.append(acc if acc.dtype == dtype else acc.to(dtype))
        else:
            results.append(out)
            if not direct:
                pending.append((out, acc))
    # Outputs that alias an input are written only after every output has read the inputs.
    for out, acc in pending:
        out.copy_(acc)
    return results


def nonfinite_any(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim bool device tensor: does any output hold NaN or Inf? (one reduction pass each, no full-size temporaries)."""
    bad = None
    for out in outputs:
        lo, hi = torch.aminmax(out.detach())
        flag = ~(torch.isfinite(lo) & torch.isfinite(hi))  # aminmax propagates NaN
        bad = flag if bad is None else bad | flag
    return bad


def mark_nonfinite(flag: torch.Tensor, bad: torch.Tensor, step: torch.Tensor | None) -> None:
    """Set ``flag`` (or ``flag[step]``) to 1 where ``bad`` is true, on the device.

    ``bad`` is 0-dim (one flag: ``flag`` is [1] or [n]) or [M] (one per output: ``flag``
    is [M] or [n, M]); ``flag`` may be a strided view.
    """
    if step is None:
        flag.copy_(torch.maximum(flag, bad.reshape(flag.shape).to(flag.dtype)))
        return
    index = step.reshape(1).long()
    row = flag.index_select(0, index)
    flag.index_copy_(0, index, torch.maximum(row, bad.reshape(row.shape).to(flag.dtype)))
