"""Argument checks shared by every layer: one place that words the errors.

Every public entry point validates its inputs up front with these helpers, so a bad
value fails with a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind,
bad value) that names the parameter, the value and what is allowed, instead of an
error from deep inside torch, numpy or Python.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np
import torch

__all__ = [
    "check_bool",
    "check_int",
    "check_real",
    "check_choice",
    "check_index_list",
    "as_real_vector",
    "check_nfe",
    "check_nfe_list",
    "check_reference_nfe",
    "check_guidance",
    "check_guidance_list",
    "check_seed",
    "check_threads",
    "check_count",
    "MAX_NFE",
    "MAX_GUIDANCE",
    "MAX_SEED",
]

# The options every command and entry point shares (NFE, guidance, seed, threads, sizes) are
# checked by the helpers at the end of this module, so each is refused with the same words.
MAX_NFE = 100_000
# Guidance scales beyond this overflow float32 model outputs long before they mean anything.
MAX_GUIDANCE = 1e4
# Seeds are stored as int64 (torch generators, safetensors metadata).
MAX_SEED = 2**63 - 1


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; strings such as ``"false"`` are refused (they are truthy)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}={_show(value)} must be True or False")


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum]; bools and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}={_show(value)} must be a whole number")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"<= {maximum}" if minimum is None else \
            f"{minimum} to {maximum}"
        raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")
    return value


def check_real(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds (open or closed)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{name}={_show(value)} must be a real number")
    value = float(value)
    ok = math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if open_min else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_max else value <= maximum
    if not ok:
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        interval = f"{'(' if open_min or minimum is None else '['}{lo}, {hi}{')' if open_max or maximum is None else ']'}"
        raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number in {interval}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by equality, never hashed)."""
    choices = tuple(choices)
    if isinstance(value, str) or not isinstance(value, (list, dict, set)):
        for c in choices:
            if type(value) is type(c) and value == c:
                return value
    raise ValueError(f"{name}={_show(value)} is not one of {choices}")


def check_index_list(name: str, value: Any, maximum: int = 9999) -> tuple[int, ...]:
    """A collection of step indices (list, tuple, set or 1-D integer array) as a sorted tuple.

    Strings, bytes, mappings, floats and bools are refused, as are indices outside
    0..``maximum``.
    """
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        raise TypeError(f"{name}={_show(value)} must be a list of step indices (whole numbers)")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise TypeError(f"{name} must be a flat list of step indices, got an array of shape {value.shape}")
    out = set()
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must hold whole step indices, got {_show(v)} in {_show(value)}")
        if not 0 <= int(v) <= maximum:
            raise ValueError(f"{name} holds step index {int(v)}; allowed: 0 to {maximum}")
        out.add(int(v))
    return tuple(sorted(out))


def as_real_vector(name: str, value: Any, *, allow_empty: bool = False) -> np.ndarray:
    """A flat float64 array from a 1-D list/array/tensor of finite numbers.

    Nested (N-D) input is refused rather than flattened, so a mistaken shape is reported.
    """
    if isinstance(value, (str, bytes, dict)):
        raise TypeError(f"{name}={_show(value)} must be a list of numbers")
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: its values are unknown")
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={_show(value)} must be a list of numbers") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains a non-finite value: {_show(value)}")
    return arr


def _as_list(name: str, value: Any) -> list:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}={_show(value)} must be a list")
    if not value:
        raise ValueError(f"{name} must hold at least one value")
    return list(value)


def check_nfe(value: Any, name: str = "nfe", minimum: int = 1) -> int:
    """A number of model evaluations: a whole number in [``minimum``, :data:`MAX_NFE`]."""
    return check_int(name, value, minimum, MAX_NFE)


def check_nfe_list(value: Any, name: str = "nfe", minimum: int = 1) -> list[int]:
    """NFEs to run, each as :func:`check_nfe`, at least one; repeats dropped (``[5, 5]`` runs once)."""
    return list(dict.fromkeys(check_nfe(v, name, minimum) for v in _as_list(name, value)))


def check_reference_nfe(value: Any, nfe: Iterable[int], name: str = "reference_nfe") -> int:
    """The steps of a reference solution: an NFE at least as large as every NFE compared with it."""
    value, largest = check_nfe(value, name), max(nfe)
    if value < largest:
        raise ValueError(f"{name}={value} must be at least the largest nfe ({largest})")
    return value


def check_guidance(value: Any, name: str = "guidance", minimum: float = -MAX_GUIDANCE) -> float:
    """A classifier-free guidance scale: a finite number in [``minimum``, :data:`MAX_GUIDANCE`].

    The functional API takes any scale of that size; the commands pass ``minimum=0`` (their
    scales follow diffusers, where <= 1 means no guidance, so a negative one is a typo).
    """
    return check_real(name, value, minimum, MAX_GUIDANCE)


def check_guidance_list(value: Any, name: str = "guidance", minimum: float = -MAX_GUIDANCE) -> list[float]:
    """Guidance scales, each as :func:`check_guidance`, at least one; repeats dropped."""
    return list(dict.fromkeys(check_guidance(v, name, minimum) for v in _as_list(name, value)))


def check_seed(value: Any, name: str = "seed", minimum: int = 0) -> int:
    """A noise seed: a whole number in [``minimum``, :data:`MAX_SEED`] (int64, as torch stores it)."""
    return check_int(name, value, minimum, MAX_SEED)


def check_threads(value: Any, name: str = "threads") -> int:
    """A torch CPU thread count: a whole number >= 1."""
    return check_int(name, value, 1)


def check_count(name: str, value: Any, minimum: int = 1, optional: bool = False) -> int | None:
    """A size such as ``num_samples`` or ``batch_size``: a whole number >= ``minimum`` (None kept if ``optional``)."""
    if optional and value is None:
        return None
    return check_int(name, value, minimum)
