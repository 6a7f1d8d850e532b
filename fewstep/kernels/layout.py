"""Host-side layout helpers for the fused kernel: dimension coalescing and memory-overlap tests."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["coalesce", "max_offset", "overlaps", "same_view", "has_internal_overlap"]


def coalesce(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Merge dimensions so that every operand is addressed with as few dimensions as possible.

    Dimensions are first ordered outermost-first by the strides of ``strides[0]`` (the
    output, so that stores stay coalesced when every operand shares a permuted layout,
    e.g. channels-last), size-1 dimensions are dropped, then a dimension is merged into
    its outer neighbour when, for every operand, ``stride_outer == stride_inner * size_inner``.
    Contiguous operands with scalar or trailing-broadcast coefficients end up 1-D.

    Args:
        shape: The iteration shape.
        strides: One stride tuple per operand (0 for broadcast dimensions).

    Returns:
        (shape, strides) of the coalesced iteration space, at least 1-D.
    """
    ref = strides[0]
    dims = sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: -ref[d])
    if not dims:
        return (1,), [(0,) for _ in strides]
    sizes = [shape[dims[0]]]
    out = [[s[dims[0]]] for s in strides]
    for d in dims[1:]:
        if all(st[-1] == s[d] * shape[d] for st, s in zip(out, strides)):
            sizes[-1] *= shape[d]
            for st, s in zip(out, strides):
                st[-1] = s[d]
        else:
            sizes.append(shape[d])
            for st, s in zip(out, strides):
                st.append(s[d])
    return tuple(sizes), [tuple(st) for st in out]


def max_offset(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Largest element offset an operand with these (non-negative) strides reaches."""
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides))


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + (max_offset(t.shape, t.stride()) + 1) * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory (conservative: compares byte ranges)."""
    if a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors address exactly the same elements in the same order."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may address the same element (e.g. expanded dims)."""
    span = 1
    for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if s < span:
            return True
        span = s * n
    return False
