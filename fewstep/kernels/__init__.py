"""Solver-update kernels: every solver step is a linear combination of a few tensors."""

from .lincomb import linear_combination

__all__ = ["linear_combination"]
