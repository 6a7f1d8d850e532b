"""Solver-update kernels: every solver step is a linear combination of a few tensors.

:func:`linear_combination` and :func:`linear_combinations` are the entry points (fused
Triton kernel on CUDA, PyTorch reference elsewhere); see :mod:`fewstep.kernels.lincomb`.
"""

from .lincomb import BACKENDS, MAX_INPUTS, MAX_OUTPUTS, linear_combination, linear_combinations

__all__ = ["linear_combination", "linear_combinations", "BACKENDS", "MAX_INPUTS", "MAX_OUTPUTS"]
