"""Finiteness of every step, recorded on the device and read without waiting for it."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["FiniteMonitor"]

INPUT, MODEL, SAMPLE = range(3)


class FiniteMonitor:
    """Per-step finiteness of the sample passed in, the model output and the new sample.

    Two device records, written by whichever path ran the step:

    - ``sums`` [n, 3] (input, model output, new sample): full reductions (NaN/Inf anywhere
      makes the sum non-finite), written in place by the PyTorch path: one reduction of the
      model output and one of the new sample per step (and of the input at step 0).
    - ``flags`` [n, W] int32: the fused kernel's per-operand non-finite flags (outputs, then
      inputs), free; ``roles[i]`` names the columns holding step i's input, model output
      and new sample.

    The host reads them only when that costs no device synchronisation: at once on the CPU,
    once the step's copy to pinned memory has completed on CUDA (never waiting), and
    everything at :meth:`check` with ``wait=True``. So a run that stops early still reports,
    and a NaN is named by step and by cause (the sample passed in, the model, or the
    solver overflowing the sample's dtype).
    """

    def __init__(self, n: int, device: torch.device, timesteps: torch.Tensor, step_offset: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.n, self.device, self.offset = n, torch.device(device), step_offset
        self.timesteps = timesteps  # CPU float64, for messages
        self.enabled = self.device.type != "meta"  # meta tensors have no values to read
        self.sums = torch.zeros(n, 3, dtype=dtype, device=self.device)
        self.flags: torch.Tensor | None = None
        self.roles: list[tuple[tuple[int, ...], ...] | None] = [None] * n
        self.checked = 0
        self._cells: list[Sequence[torch.Tensor] | None] = [None] * n
        self._rows = self.sums.unbind(0)
        self._dims: tuple[int, ...] = ()
        self._pinned = self.device.type == "cuda"
        self._host: list[torch.Tensor] | None = None
        self._events: dict[int, torch.cuda.Event] = {}

    def use_flags(self, width: int) -> torch.Tensor:
        """The [n, width] int32 flag record for the fused kernel (allocated on first use)."""
        if self.flags is None or self.flags.shape[1] < width:
            self.flags = torch.zeros(self.n, width, dtype=torch.int32, device=self.device)
            self._host = None
        return self.flags

    def reset(self) -> None:
        """Forget a previous run (two fills, no reallocation)."""
        self.sums.zero_()
        if self.flags is not None:
            self.flags.zero_()
        self.checked = 0
        self._events.clear()

    def cells(self, i: int) -> Sequence[torch.Tensor]:
        """The three 0-dim views ``sums[i, :]`` (built once per step)."""
        cells = self._cells[i]
        if cells is None:
            cells = self._cells[i] = self.sums[i].unbind(0)
        return cells

    def record(self, i: int, out: torch.Tensor, x_next: torch.Tensor, x_in: torch.Tensor | None = None) -> None:
        """Record step ``i`` with reductions written in place (device ops only, no temporaries)."""
        if not self.enabled:
            return
        cells = self._cells[i] or self.cells(i)
        if len(self._dims) != x_next.dim():
            self._dims = tuple(range(x_next.dim()))
        dims, dtype = self._dims, self.sums.dtype
        for col, t in ((INPUT, x_in), (MODEL, out), (SAMPLE, x_next)):
            if t is not None:
                torch.sum(t.detach() if t.requires_grad else t, dims, dtype=dtype, out=cells[col])

    def _publish(self, upto: int) -> int:
        """Start pinned copies of the rows not yet copied (CUDA); returns how many are readable."""
        if self._host is None:
            self._host = [torch.zeros_like(self.sums, device="cpu").pin_memory()]
            if self.flags is not None:
                self._host.append(torch.zeros_like(self.flags, device="cpu").pin_memory())
            self._events.clear()
        for i in range(self.checked, upto):
            if i not in self._events:
                self._host[0][i].copy_(self.sums[i], non_blocking=True)
                if self.flags is not None:
                    self._host[1][i].copy_(self.flags[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._events[i] = event
        return upto

    def check(self, upto: int, wait: bool = False) -> None:
        """Raise FloatingPointError for the first bad step below ``upto`` whose record is readable."""
        if not self.enabled or upto <= self.checked:
            return
        if self._pinned and not torch.cuda.is_current_stream_capturing():
            self._publish(upto)
            ready = self.checked
            while ready < upto:
                event = self._events[ready]
                if wait:
                    event.synchronize()
                elif not event.query():
                    break
                ready += 1
            sums = self._host[0][self.checked:ready]
            flags = self._host[1][self.checked:ready] if len(self._host) > 1 else None
        elif self.device.type == "cpu" or wait:
            ready = upto
            sums = self._rows[ready - 1] if ready == self.checked + 1 else self.sums[self.checked:ready]
            flags = None if self.flags is None else self.flags[self.checked:ready]
        else:
            return  # no cheap way to peek on this accelerator: checked when the run ends
        if ready <= self.checked:
            return
        # Plain Python on the host copy: no tensor ops (and no allocations) per check.
        rows = sums.tolist()
        if sums.dim() == 1:
            rows = [rows]
        flag_rows = None if flags is None else flags.tolist()
        for j, row in enumerate(rows):
            flagged = flag_rows is not None and any(flag_rows[j])
            if math.isfinite(sum(row)) and not flagged:  # NaN or Inf anywhere makes the sum non-finite
                continue
            i = self.checked + j
            causes = [not math.isfinite(v) for v in row]
            if flagged and self.roles[i] is not None:
                causes = [c or any(flag_rows[j][col] for col in cols) for c, cols in zip(causes, self.roles[i])]
            if any(causes):
                self._raise(i, causes)
        self.checked = ready

    def _raise(self, i: int, bad: list[bool]) -> None:
        step, t = i + self.offset, float(self.timesteps[i])
        where = f"step {step} (timestep {t:g})"
        if bad[INPUT]:
            raise FloatingPointError(f"the sample passed to {where} contains NaN or Inf")
        if bad[MODEL]:
            raise FloatingPointError(f"the model output at {where} contains NaN or Inf")
        raise FloatingPointError(
            f"the solver's update at {where} overflowed to NaN/Inf although the model output was finite: "
            "the sample's dtype cannot hold it (sample in float32) or the solver/grid is unstable here"
        )
