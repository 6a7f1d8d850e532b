"""Seeds derived from a run's seed: one generator per (seed, k) without collisions between nearby seeds."""

from __future__ import annotations

__all__ = ["derived_seed"]

_STRIDE = 1_000_003  # a prime above any k in use: seeds s and s + 1 never share a derived seed for k < _STRIDE


def derived_seed(seed: int, k: int) -> int:
    """The seed of item ``k`` (a micro-batch, a training round) of a run seeded with ``seed``.

    Why not ``seed + k``: runs with seeds 0 and 1 would then replay each other's streams shifted
    by one. ``seed * 1_000_003 + k`` keeps the streams of different seeds apart for every
    ``k < 1_000_003`` and depends on ``(seed, k)`` alone, so a resumed or re-split run draws
    the same numbers for item ``k``.

    Args:
        seed: The run's seed (>= 0).
        k: The item's index (>= 0).
    """
    return seed * _STRIDE + k
