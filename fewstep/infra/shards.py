"""Shard files of long jobs (``fewstep eval``, EMS): one atomic safetensors file per block of work.

A shard records the identity of the work that made it (configuration and sample range); a
file whose identity, tensors or finiteness do not check out is recomputed, never used. A
killed run keeps every finished shard and redoes at most the shards that were in flight.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from fewstep.infra.io import clean_temp_files, load_tensors, save_tensors

__all__ = ["ShardStore", "shard_ranges", "identity_digest"]


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shard: fixed boundaries, so any process count sees the same shards."""
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def identity_digest(identity: dict[str, Any], length: int = 16) -> str:
    """Short content key of a JSON-serialisable identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:length]


class ShardStore:
    """Shards of one job in ``folder``, valid only for ``identity``.

    Args:
        folder: Where the shard files live (created on the first write).
        identity: Everything that determines the shards' content (JSON-serialisable).
        log: Where notes about ignored files go.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.log = log
        clean_temp_files(self.folder)  # files of killed writers; live writers' files are kept

    def path(self, start: int, stop: int) -> Path:
        return self.folder / f"shard-{start:07d}-{stop:07d}.safetensors"

    def _key(self, start: int, stop: int) -> str:
        return json.dumps({**self.identity, "start": start, "stop": stop}, sort_keys=True)

    def load(self, start: int, stop: int, keys: tuple[str, ...],
             shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, extra metadata)`` of a finished shard, or None when it must be computed.

        Args:
            start, stop: The shard's range.
            keys: Tensors it must hold.
            shapes: Shapes some of them must have.
        """
        path = self.path(start, stop)
        if not path.exists():
            return None
        try:
            tensors, meta = load_tensors(path, with_metadata=True)
        except (OSError, ValueError) as exc:
            self.log(f"shards: recomputing {path}: {exc}")
            return None
        missing = [k for k in dict.fromkeys((*keys, *(shapes or {}))) if k not in tensors]
        if meta.get("identity") != self._key(start, stop):
            problem = "it was made for another configuration"
        elif missing:
            problem = f"it has no {missing}"
        elif any(tuple(tensors[k].shape) != tuple(v) for k, v in (shapes or {}).items()):
            problem = f"its shapes { {k: tuple(tensors[k].shape) for k in shapes} } are not {shapes}"
        elif not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            problem = "it contains NaN or Inf"
        else:
            return tensors, json.loads(meta.get("extra", "{}"))
        self.log(f"shards: recomputing {path}: {problem}")
        return None

    def save(self, start: int, stop: int, tensors: dict[str, torch.Tensor], **extra: Any) -> None:
        """Write a finished shard atomically (``extra``: JSON-serialisable notes such as timings)."""
        save_tensors(self.path(start, stop), tensors, {"identity": self._key(start, stop), "extra": json.dumps(extra)})
