"""Feature statistics: a streaming, mergeable float64 accumulator and statistics files.

:class:`FeatureStatistics` keeps the sufficient statistics of a feature set (count, sum, sum of
outer products) in float64 and is built for sharded, resumable and distributed runs:

* Rows are keyed by their global sample index. Sums are formed per block of ``block_size``
  consecutive indices (one float64 GEMM per complete block, on a freshly allocated buffer), so
  the blocks, and so every rounding, are the same however the samples arrive: in batches of any
  size, in any order, split over any shards or processes. Rows of an incomplete block wait in a
  ``block_size x D`` float64 buffer until the block is complete (or the result is asked for);
  a contiguous shard holds at most two such buffers.
* Block sums are added with error-free transformations (TwoSum; the total is kept as an
  unevaluated float64 pair ``hi + lo``), so their order changes the total by about ``2^-106``
  relative before the final rounding to float64.

Guarantee: the statistics are a function of the set of ``(index, feature row)`` pairs. On the
same device, BLAS library and thread count, :meth:`FeatureStatistics.result` is bitwise equal
for any batching, sharding and merge order, except where an entry's exact sum lies within
~``2^-100`` relative of a float64 rounding boundary (then the last bit may differ; the chance is
~1e-9 per entry). Across devices or BLAS builds the block GEMMs round differently and results
agree to ~1e-15 relative. The covariance is ``(sum xx^T - n mu mu^T) / (n - 1)`` in float64; its
relative error grows as ``eps * |mu|^2 / var``, negligible for network features (|mu|/std < 100).

:class:`GaussianStats` is a ``(mu, sigma, n, metadata)`` record saved as ``.npz`` with keys
``mu``, ``sigma``, ``n`` and ``metadata`` (JSON). Plain ``.npz`` files with only ``mu`` and
``sigma`` (EDM's and clean-fid's reference statistics) load too. Statistics whose metadata
disagree on the extractor, its weights, resize mode or input size are refused when compared.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fewstep.eval.metrics.fd import frechet_distance
from fewstep.infra.io import atomic_write_bytes

__all__ = ["FeatureStatistics", "GaussianStats", "COMPARED_FIELDS", "check_compatible"]

# Metadata fields that must agree (when both sides record them) for two statistics to be compared.
COMPARED_FIELDS = ("extractor", "weights_hash", "resize", "input_size", "options")
STATS_FORMAT = 1
_SYMMETRY_TOL = 1e-6


def _two_sum_(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """``hi + lo += x`` exactly up to the rounding of ``lo`` (Knuth's TwoSum), in place."""
    s = hi + x
    virtual = s - hi
    lo += (hi - (s - virtual)) + (x - virtual)
    hi.copy_(s)


class FeatureStatistics:
    """Streaming float64 count / sum / sum of outer products of feature rows, keyed by sample index.

    Args:
        block_size: Consecutive sample indices summed by one GEMM. Accumulators that are merged
            must use the same value; it changes results only at float64 round-off.
        device: Where the sums live; defaults to the device of the first features.

    Example::

        stats = FeatureStatistics()
        for start, batch in batches:          # any batch size, any order
            stats.update(extractor(batch), start=start)
        mu, sigma = stats.result()
    """

    def __init__(self, block_size: int = 1024, device: str | torch.device | None = None) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.device = torch.device(device) if device is not None else None
        self.dim: int | None = None
        self._sums: dict[str, torch.Tensor] = {}  # sum_hi, sum_lo [D]; outer_hi, outer_lo [D, D]
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (rows, filled)
        self._spans: list[list[int]] = []  # sorted disjoint [start, stop) index ranges seen
        self.next_index = 0

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of feature rows added."""
        return sum(stop - start for start, stop in self._spans)

    def spans(self) -> list[tuple[int, int]]:
        """Sample index ranges ``[start, stop)`` added so far, sorted and merged."""
        return [(start, stop) for start, stop in self._spans]

    def _claim(self, spans: list[list[int]]) -> None:
        # Check every new span before recording any, so a refused update changes nothing.
        for start, stop in spans:
            for a, b in self._spans:
                if a < stop and start < b:
                    raise ValueError(
                        f"samples {max(a, start)}..{min(b, stop) - 1} were already added to these statistics"
                    )
        merged: list[list[int]] = []
        for span in sorted(self._spans + [list(span) for span in spans]):
            if merged and merged[-1][1] == span[0]:
                merged[-1][1] = span[1]
            else:
                merged.append(span)
        self._spans = merged

    def _init(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.device = self.device or device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self._sums = {"sum_hi": zeros(dim), "sum_lo": zeros(dim),
                      "outer_hi": zeros(dim, dim), "outer_lo": zeros(dim, dim)}

    # -- accumulation ------------------------------------------------------------------------

    def _fold(self, rows: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        # A fresh contiguous copy: BLAS results can depend on the alignment of their operands.
        rows = rows.to(dtype=torch.float64, device=self.device, copy=True).contiguous()
        _two_sum_(sums["sum_hi"], sums["sum_lo"], rows.sum(dim=0))
        _two_sum_(sums["outer_hi"], sums["outer_lo"], rows.T @ rows)

    def _add_rows(self, block: int, offset: int, rows: torch.Tensor) -> None:
        if offset == 0 and rows.shape[0] == self.block_size:
            self._fold(rows, self._sums)
            return
        buffer, filled = self._pending.get(block) or (
            torch.zeros(self.block_size, self.dim, dtype=torch.float64, device=self.device),
            torch.zeros(self.block_size, dtype=torch.bool),
        )
        buffer[offset: offset + rows.shape[0]] = rows
        filled[offset: offset + rows.shape[0]] = True
        if bool(filled.all()):
            self._pending.pop(block, None)
            self._fold(buffer, self._sums)
        else:
            self._pending[block] = (buffer, filled)

    def update(self, features: torch.Tensor | np.ndarray, start: int | None = None) -> FeatureStatistics:
        """Adds feature rows for samples ``start, start + 1, ...``.

        Args:
            features: [B, D] features (any float dtype; converted to float64 exactly).
            start: Global index of the first row; defaults to ``next_index`` (continuing the
                previous update).

        Returns:
            ``self``.

        Raises:
            ValueError: On a wrong shape, non-finite values, a negative ``start``, or indices
                that were already added.
        """
        features = torch.as_tensor(features).detach()
        if features.ndim != 2 or (self.dim is not None and features.shape[1] != self.dim):
            want = f"[B, {self.dim}]" if self.dim is not None else "[B, D]"
            raise ValueError(f"features must have shape {want}, got {tuple(features.shape)}")
        if not features.is_floating_point() or not bool(torch.isfinite(features).all()):
            raise ValueError("features must be finite floating-point values")
        start = self.next_index if start is None else start
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        start = int(start)
        n = features.shape[0]
        if n == 0:
            return self
        self._claim([[start, start + n]])
        if self.dim is None:
            self._init(features.shape[1], features.device)
        features = features.to(dtype=torch.float64, device=self.device)
        index = start
        while index < start + n:
            block, offset = divmod(index, self.block_size)
            take = min(self.block_size - offset, start + n - index)
            self._add_rows(block, offset, features[index - start: index - start + take])
            index += take
        self.next_index = start + n
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Adds another accumulator's samples (e.g. another shard or process) into this one.

        Args:
            other: Statistics over sample indices disjoint from this one's, same ``block_size``.

        Returns:
            ``self``.

        Raises:
            ValueError: On a different ``block_size`` or feature size, or overlapping indices.
        """
        if other.block_size != self.block_size:
            raise ValueError(f"cannot merge block_size {other.block_size} into {self.block_size}")
        if other.dim is None:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self._claim(other._spans)
        if self.dim is None:
            self._init(other.dim, other.device)
        for key in ("sum", "outer"):
            _two_sum_(self._sums[f"{key}_hi"], self._sums[f"{key}_lo"], other._sums[f"{key}_hi"].to(self.device))
            self._sums[f"{key}_lo"] += other._sums[f"{key}_lo"].to(self.device)
        for block, (rows, filled) in sorted(other._pending.items()):
            for run_start, run_stop in _runs(filled):
                self._add_rows(block, run_start, rows[run_start:run_stop].to(self.device))
        self.next_index = max(self.next_index, other.next_index)
        return self

    # -- results -----------------------------------------------------------------------------

    def sums(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, sum x, sum x x^T)`` in float64 on CPU, including rows of incomplete blocks."""
        if self.dim is None:
            raise ValueError("no features were added")
        sums = {k: v.clone() for k, v in self._sums.items()}
        for block in sorted(self._pending):
            rows, filled = self._pending[block]
            self._fold(rows[filled.to(rows.device)], sums)
        total = {k: (sums[f"{k}_hi"] + sums[f"{k}_lo"]).cpu() for k in ("sum", "outer")}
        return self.count, total["sum"], total["outer"]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [D] and unbiased covariance [D, D], float64 on CPU.

        Raises:
            ValueError: With fewer than 2 rows.
        """
        n, total, outer = self.sums()
        if n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, have {n}")
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def to_stats(self, **metadata: Any) -> GaussianStats:
        """The :class:`GaussianStats` of the rows added so far.

        Args:
            **metadata: Metadata to record, typically ``extractor.metadata()`` plus the source.
        """
        mu, sigma = self.result()
        return GaussianStats(mu.numpy(), sigma.numpy(), n=self.count, metadata=metadata)

    # -- persistence (resumable runs) --------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as CPU tensors (save with ``fewstep.infra.io.save_tensors``)."""
        state = {
            "block_size": torch.tensor(self.block_size),
            "next_index": torch.tensor(self.next_index),
            "spans": torch.tensor(self._spans, dtype=torch.int64).reshape(-1, 2),
        }
        if self.dim is not None:
            state.update({k: v.cpu() for k, v in self._sums.items()})
            blocks = sorted(self._pending)
            state["pending_blocks"] = torch.tensor(blocks, dtype=torch.int64)
            state["pending_rows"] = torch.stack([self._pending[b][0].cpu() for b in blocks]) if blocks else (
                torch.zeros(0, self.block_size, self.dim, dtype=torch.float64))
            state["pending_filled"] = torch.stack([self._pending[b][1] for b in blocks]) if blocks else (
                torch.zeros(0, self.block_size, dtype=torch.bool))
        return state

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], device: str | torch.device | None = None
    ) -> FeatureStatistics:
        """Rebuilds an accumulator from :meth:`state_dict` (bitwise: resuming changes nothing).

        Raises:
            ValueError: If ``state`` is not a complete accumulator state.
        """
        try:
            stats = cls(int(state["block_size"]), device=device)
            stats.next_index = int(state["next_index"])
            stats._spans = [list(map(int, span)) for span in state["spans"].tolist()]
            if "sum_hi" in state:
                stats._init(int(state["sum_hi"].shape[0]), state["sum_hi"].device)
                for key in stats._sums:
                    stats._sums[key].copy_(state[key])
                for block, rows, filled in zip(
                    state["pending_blocks"].tolist(), state["pending_rows"], state["pending_filled"]
                ):
                    stats._pending[int(block)] = (rows.to(stats.device, torch.float64).clone(), filled.bool().clone())
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"not a FeatureStatistics state ({exc!r})") from None
        return stats


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of True in a 1-D boolean mask."""
    padded = torch.cat([torch.tensor([False]), mask.cpu(), torch.tensor([False])]).to(torch.int8)
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(zip(edges[::2], edges[1::2]))


# --- statistics files ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Gaussian fit of a feature set: what FD compares, and what a statistics file holds.

    Args:
        mu: Mean [D].
        sigma: Covariance [D, D] (symmetric).
        n: Number of feature rows, if known.
        metadata: JSON-serialisable fields, e.g. ``extractor``, ``weights_hash``, ``resize``,
            ``input_size`` (from ``FeatureExtractor.metadata()``) and ``source``.
        source: Where the statistics came from (a file path), used in error messages.

    Raises:
        ValueError: On malformed, non-finite or asymmetric statistics (naming ``source``).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = "statistics"

    def __post_init__(self) -> None:
        where = self.source
        mu = np.asarray(self.mu)
        sigma = np.asarray(self.sigma)
        for name, value in (("mu", mu), ("sigma", sigma)):
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                raise ValueError(f"{where}: {name} must be a real array, got dtype {value.dtype}")
        mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"{where}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}"
            )
        for name, value in (("mu", mu), ("sigma", sigma)):
            if not np.isfinite(value).all():
                raise ValueError(f"{where}: {name} contains NaN or Inf")
        scale = np.abs(sigma).max(initial=0.0)
        if np.abs(sigma - sigma.T).max(initial=0.0) > _SYMMETRY_TOL * scale:
            raise ValueError(f"{where}: sigma is not symmetric")
        if self.n is not None and (not isinstance(self.n, (int, np.integer)) or self.n < 1):
            raise ValueError(f"{where}: n must be a positive int, got {self.n!r}")
        try:
            metadata = json.loads(json.dumps(dict(self.metadata)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: metadata must be JSON-serialisable ({exc})") from None
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", None if self.n is None else int(self.n))
        object.__setattr__(self, "metadata", metadata)

    def save(self, path: str | Path) -> Path:
        """Writes the statistics atomically as ``.npz`` (``mu``, ``sigma``, ``n``, ``metadata``).

        Args:
            path: Destination file.

        Returns:
            The path written.
        """
        buffer = io.BytesIO()
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.int64(self.n)
        arrays["metadata"] = np.array(json.dumps({"format": STATS_FORMAT, **self.metadata}))
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        """Reads a statistics file: fewstep's, or any ``.npz`` with ``mu`` and ``sigma``.

        Args:
            path: The ``.npz`` file.

        Returns:
            The statistics, with ``source`` set to ``path``.

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is not an npz with valid ``mu`` / ``sigma`` (the message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npz statistics file ({exc})") from None
        missing = [key for key in ("mu", "sigma") if key not in arrays]
        if missing:
            raise ValueError(
                f"{path} has no {' or '.join(map(repr, missing))}; a statistics file needs 'mu' [D] and "
                f"'sigma' [D, D] (found keys {sorted(arrays)})"
            )
        metadata: dict[str, Any] = {}
        if "metadata" in arrays:
            try:
                metadata = json.loads(str(arrays["metadata"]))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: metadata is not valid JSON ({exc})") from None
            if not isinstance(metadata, dict):
                raise ValueError(f"{path}: metadata must be a JSON object")
            version = metadata.pop("format", STATS_FORMAT)
            if not isinstance(version, int) or version > STATS_FORMAT:
                raise ValueError(
                    f"{path}: unsupported statistics format {version!r} (this fewstep reads <= {STATS_FORMAT})"
                )
        n = arrays.get("n")
        if n is not None and (n.ndim != 0 or not np.issubdtype(n.dtype, np.integer)):
            raise ValueError(f"{path}: 'n' must be an integer scalar")
        stats = cls(arrays["mu"], arrays["sigma"], None if n is None else int(n), metadata, str(path))
        _check_psd(stats.sigma, str(path))
        return stats

    def frechet_distance(self, other: GaussianStats) -> float:
        """Fréchet distance to ``other`` after :func:`check_compatible`.

        Raises:
            ValueError: If the two statistics are not comparable.
        """
        check_compatible(self, other)
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


# Negative eigenvalues smaller than this (relative to the largest variance) are round-off: a
# rank-deficient covariance stored as float32 has them at ~1e-7.
_PSD_TOL = 1e-5


def _check_psd(sigma: np.ndarray, where: str) -> None:
    """Refuse a sigma that is no covariance (a negative eigenvalue beyond round-off): FD would be meaningless.

    One Cholesky factorisation of ``sigma + tol I`` (a third of an eigendecomposition's cost).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.size == 0:
        return
    tol = _PSD_TOL * max(float(np.abs(np.diag(sigma)).max()), np.finfo(np.float64).tiny)
    try:
        np.linalg.cholesky(sigma + tol * np.eye(sigma.shape[0]))
    except np.linalg.LinAlgError:
        low = float(np.linalg.eigvalsh(sigma)[0])
        raise ValueError(f"{where}: sigma is not a covariance matrix (not positive semi-definite: smallest "
                         f"eigenvalue {low:.4g}); the file is corrupt or not a statistics file") from None


def check_compatible(a: GaussianStats, b: GaussianStats) -> None:
    """Refuses to compare statistics of different feature spaces.

    Fields in :data:`COMPARED_FIELDS` must be equal when both sides record them; statistics
    without metadata (plain ``mu``/``sigma`` files) are accepted.

    Raises:
        ValueError: Naming the first differing field, both values and both sources.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"{a.source} has {a.mu.shape[0]}-d features but {b.source} has {b.mu.shape[0]}-d ones"
        )
    for key in COMPARED_FIELDS:
        if key in a.metadata and key in b.metadata and a.metadata[key] != b.metadata[key]:
            raise ValueError(
                f"statistics are not comparable: {key} differs ({a.source}: {a.metadata[key]!r}, "
                f"{b.source}: {b.metadata[key]!r})"
            )
