"""Reference (PyTorch) linear combination used by every solver step."""

from __future__ import annotations

from typing import Sequence

import torch


def linear_combination(
    coefficients: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``sum_k coefficients[k] * tensors[k] (+ bias)``.

    Coefficients are 0-dim tensors or elementwise tensors broadcastable against the
    inputs (DPM-Solver-v3's per-dimension coefficients); they already live on the
    inputs' device, so nothing here synchronises with the host.

    Args:
        coefficients: One coefficient per input tensor.
        tensors: Input tensors of identical shape.
        bias: Optional additive term broadcastable to the inputs.

    Returns:
        A new tensor with the shape and dtype of ``tensors[0]``.
    """
    if len(coefficients) != len(tensors) or not tensors:
        raise ValueError(f"need one coefficient per tensor, got {len(coefficients)} and {len(tensors)}")
    out = tensors[0] * coefficients[0]
    for c, t in zip(coefficients[1:], tensors[1:]):
        out.addcmul_(t, c)
    if bias is not None:
        out.add_(bias)
    return out
