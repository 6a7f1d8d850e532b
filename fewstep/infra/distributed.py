"""Processes of one ``fewstep eval`` run under ``torchrun`` / ``accelerate launch`` (or a single process).

Work is split by shard index (shard k goes to rank ``k % world_size``); every sample keeps its
own seed, so the shards, and every number computed from them, are the same for any number of
processes. Results travel to rank 0 as float64 tensors (feature sums, per-sample errors) through
a CPU (gloo) group, so the reduction is exact whatever the compute backend.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch

__all__ = ["ProcessGroup"]

T = TypeVar("T")


class ProcessGroup:
    """Rank, world size and the few collectives the eval runner needs.

    Joins the process group that ``torchrun`` / ``accelerate launch`` describe through the
    ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` environment variables; a plain run is rank 0 of 1.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owned = False
        self._group = None
        if self.world_size > 1:
            if not dist.is_available():
                raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._owned = True
            # Object collectives on CPU whatever the default backend (NCCL cannot gather pickles on CPU).
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``cuda`` means this process's GPU (``LOCAL_RANK``) in a multi-process run."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
        return device

    def mine(self, count: int) -> list[int]:
        """The shard indices this process computes."""
        return list(range(self.rank, count, self.world_size))

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; a user error there is raised on all ranks."""
        result: Any = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except (ValueError, OSError) as exc:
                if self.world_size == 1:
                    raise
                result = ("error", f"{' '.join(str(exc).split())}")
        status, value = self.broadcast(result)
        if status == "error":
            raise ValueError(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False
