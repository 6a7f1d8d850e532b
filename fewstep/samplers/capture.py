"""A whole fixed-NFE sampling run as one CUDA graph: ``fewstep.sample(..., graph=True)``.

The first call for a model, shape and solver structure runs the loop eagerly on a side
stream (warming up cuBLAS, Triton and torch.compile), then captures it over static buffers:
the noise, the conditioning, the model timesteps and the executor's coefficient tables.
Every kernel of the solver reads its coefficients from those tables in device memory, never
as by-value launch arguments, so a later call copies its own noise, conditioning,
timesteps and coefficients into them (:meth:`~fewstep.samplers.plan.PlanExecutor.load`) and
replays: a new set of timesteps with the same NFE and solver orders needs no new capture
and replays no stale coefficient.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from .fold import fold_plan
from .plan import PlanExecutor, SolverPlan, compute_dtype

__all__ = ["captured_sample", "clear_graphs", "CapturedRun", "MAX_GRAPHS_PER_MODEL"]

MAX_GRAPHS_PER_MODEL = 4
_GRAPHS: "weakref.WeakKeyDictionary[Any, OrderedDict[tuple, CapturedRun]]" = weakref.WeakKeyDictionary()


def clear_graphs() -> None:
    """Drop every cached captured run (and the device memory its graph holds)."""
    _GRAPHS.clear()


class CapturedRun:
    """One sampling loop over static tensors, captured as a CUDA graph by :meth:`capture`.

    Args:
        step: ``step(model, runner, i, x, t, cond, want_x0)``, the loop body.
        model: The model (called inside the graph: it must not synchronise with the host).
        runner: The executor; its tables are the graph's coefficient buffers.
        x_T, ts, cond: The first call's inputs, copied into the static buffers.
    """

    def __init__(self, step: Callable, model: Callable, runner: PlanExecutor, x_T: torch.Tensor,
                 ts: torch.Tensor, cond: torch.Tensor | None):
        self.step, self.model, self.runner = step, model, runner
        self.x, self.ts = x_T.clone(), ts.clone()
        self.cond = None if cond is None else cond.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def capture(self) -> torch.Tensor:
        """Run the loop once on a side stream (warm-up), then capture it; returns the warm-up's sample."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self.loop().clone()
        torch.cuda.current_stream().wait_stream(side)
        self.runner.raise_if_nonfinite()
        self.graph = torch.cuda.CUDAGraph()
        self.runner.reset()
        with torch.cuda.graph(self.graph):
            self.out = self.loop()
        return first

    def loop(self) -> torch.Tensor:
        """The sampling loop over the static buffers (what the graph records)."""
        x, batch = self.x, self.x.shape[0]
        for i in range(self.runner.plan.n):
            x, _ = self.step(self.model, self.runner, i, x, self.ts[i].expand(batch), self.cond, False)
        return x

    def load(self, plan: SolverPlan, x_T: torch.Tensor, ts: torch.Tensor, cond: torch.Tensor | None,
             folded=None) -> None:
        """Copy a new call's coefficients and inputs into the static buffers."""
        self.runner.load(plan, folded)
        self.x.copy_(x_T)
        self.ts.copy_(ts)
        if cond is not None:
            self.cond.copy_(cond)

    def replay(self) -> torch.Tensor:
        """Run the captured loop on the current buffers; returns a copy of the final sample."""
        self.runner.reset()  # host state, and the finite record zeroed on the device (outside the graph)
        self.graph.replay()
        self.runner.next_step = self.runner.plan.n
        self.runner.raise_if_nonfinite()
        return self.out.clone()


def captured_sample(step: Callable, model: Callable, plan: SolverPlan, x_T: torch.Tensor, ts: torch.Tensor,
                    cond: Any, guidance: float | None, transform: Callable | None, check_finite: bool
                    ) -> torch.Tensor:
    """``fewstep.sample(..., graph=True)``: replay the cached capture for this call's structure, or capture one."""
    if cond is not None and not isinstance(cond, torch.Tensor):
        raise TypeError("graph=True needs tensor cond/uncond (they are copied into the captured buffers)")
    folded = fold_plan(plan, transform is not None, guidance, fold_corrector=compute_dtype(x_T.dtype) == x_T.dtype)
    key = (folded.structure(), tuple(x_T.shape), x_T.dtype, x_T.device,
           None if cond is None else (tuple(cond.shape), cond.dtype), guidance is None, transform, check_finite, step)
    try:
        runs = _GRAPHS.setdefault(model, OrderedDict())
    except TypeError:  # not weak-referenceable: capture for this call only
        runs = OrderedDict()
    run = runs.get(key)
    if run is not None:
        runs.move_to_end(key)
        run.load(plan, x_T, ts, cond, folded)
        return run.replay()
    runner = PlanExecutor(plan, x_T.device, compute_dtype(x_T.dtype), transform, check_finite, guidance=guidance,
                          sample_dtype=x_T.dtype)
    run = CapturedRun(step, model, runner, x_T, ts, cond)
    first = run.capture()
    runs[key] = run
    while len(runs) > MAX_GRAPHS_PER_MODEL:
        runs.popitem(last=False)
    return first
