"""Solver plans (per-step coefficient tables) and the one executor that runs them.

A solver turns a :class:`~fewstep.samplers.timesteps.TimeGrid` into a
:class:`SolverPlan` once, in float64. Every step of every solver is then the same
four linear stages over a fixed set of registers:

    convert     x0 = c_x x + c_out out;  D = x0 (data space) or e_x x + e_0 x0 (noise space),
                or h_x x + h_0 x0 when the plan gives its own history row (DPM-Solver-v3)
                D is pushed into the history D_0 (newest), D_1, ..., D_{H-1}
    correct     x = a x_prev + sum_j b_j D_j (+ bias)        (UniC-style correctors)
    compensate  D_0 = sum_j w_j D_j                          (DC-Solver's dynamic compensation)
    predict     x_next = a x + sum_j b_j D_j (+ r out) (+ bias) (the multistep predictor)

Coefficients are scalars or elementwise tensors (trailing dims broadcast against the
sample, as DPM-Solver-v3 needs). The executor does not run the stages one by one: they are
composed once per plan (:mod:`fewstep.samplers.fold`) into the outputs a step writes, each
one fused linear combination of the tensors it reads, so a step is one pass over memory
(one kernel launch on CUDA). A step never reads a tensor value on the host: which terms are
non-zero is decided once, from one read of the whole float64 table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels import reference as _reference
from ..kernels.lincomb import pick_backend
from .fold import D0, OUTPUTS, PREV, X0, X_NEXT, FoldedPlan, fold_plan
from .monitor import FiniteMonitor
from .timesteps import TimeGrid

__all__ = ["SolverPlan", "PlanExecutor", "FiniteMonitor", "SPACES"]

SPACES = ("data", "noise")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solver arithmetic runs in float32, or float64 when the sample is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class SolverPlan:
    """Float64 coefficient tables of one solver on one grid.

    Attributes:
        grid: The grid the plan was built for.
        space: ``"data"`` (histories hold x0) or ``"noise"`` (they hold eps).
        history: Number of stored model outputs H.
        x0_coef: [n, 2] (c_x, c_out) converting the raw output to x0.
        predict: [n, 1 + H, *S] coefficients over (x, D_0, ..., D_{H-1}).
        correct: [n, 1 + H, *S] over (x_prev, D_0, ...); an all-zero row means no correction.
        compensate: [n, H, *S] over (D_0, ...) giving the new D_0; None means never.
        predict_bias: [n, *S] additive term of the predictor, or None.
        predict_raw: [n, *S] coefficient of the raw model output in the predictor, or None
            (DDIM uses it to take eps from the raw output when x0 is thresholded).
        history_coef: [n, 2, *S] (h_x, h_0): the history entry is h_x x + h_0 x0 instead of
            the space's default, or None. DPM-Solver-v3 stores f = ((1 - l) x - alpha x0) / alpha,
            which needs the sample of its own step (elementwise l).
        correct_bias: [n, *S] additive term of the corrector, or None (zero where ``correct``
            is zero).
        orders: Predictor order used at each step (for inspection and tests).
        info: Free-form per-plan metadata (e.g. corrector orders).
    """

    grid: TimeGrid
    space: str
    history: int
    x0_coef: torch.Tensor
    predict: torch.Tensor
    correct: torch.Tensor | None = None
    compensate: torch.Tensor | None = None
    predict_bias: torch.Tensor | None = None
    predict_raw: torch.Tensor | None = None
    history_coef: torch.Tensor | None = None
    correct_bias: torch.Tensor | None = None
    orders: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, h = self.grid.n, self.history
        if self.space not in SPACES:
            raise ValueError(f"space={self.space!r} is not one of {SPACES}")
        _check_table("x0_coef", self.x0_coef, (n, 2))
        _check_table("predict", self.predict, (n, 1 + h))
        if self.correct is not None:
            _check_table("correct", self.correct, (n, 1 + h))
        if self.compensate is not None:
            _check_table("compensate", self.compensate, (n, h))
        if self.history_coef is not None:
            _check_table("history_coef", self.history_coef, (n, 2))
        for name in ("predict_bias", "predict_raw", "correct_bias"):
            table = getattr(self, name)
            if table is not None and (table.shape[0] != n or table.dtype != torch.float64):
                raise ValueError(f"{name} must be float64 with {n} rows, got {tuple(table.shape)}")
        if self.correct_bias is not None:
            if self.correct is None:
                raise ValueError("correct_bias needs a correct table")
            uncorrected = ~self.correct.detach().reshape(n, -1).ne(0).any(1)
            if bool(self.correct_bias.detach().reshape(n, -1)[uncorrected].ne(0).any()):
                raise ValueError("correct_bias must be zero on steps without a correction")
        for name in ("x0_coef", "predict", "correct", "compensate", "predict_bias", "predict_raw", "history_coef",
                     "correct_bias"):
            table = getattr(self, name)
            if table is not None and not bool(torch.isfinite(table).all()):
                step = int(torch.nonzero(~torch.isfinite(table.reshape(n, -1)).all(1))[0])
                raise FloatingPointError(f"solver plan has a non-finite {name} coefficient at step {step}")

    @property
    def n(self) -> int:
        """Number of steps."""
        return self.grid.n

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        """Trailing shape of elementwise coefficients (``()`` for scalar solvers)."""
        return tuple(self.predict.shape[2:])

    def check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError unless elementwise coefficients broadcast to a sample of ``shape`` [B, *S]."""
        coef, per_sample = self.coefficient_shape, tuple(shape[1:])
        try:
            fits = len(coef) <= len(per_sample) and torch.broadcast_shapes(coef, per_sample) == per_sample
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"this plan's elementwise coefficients have per-sample shape {coef} (e.g. DPM-Solver-v3 "
                f"statistics), which does not broadcast to the sample {tuple(shape)} (per-sample shape {per_sample})"
            )

    def correct_steps(self) -> list[int]:
        """Indices of the steps whose incoming sample is corrected."""
        if self.correct is None:
            return []
        rows = self.correct.detach().reshape(self.n, -1).ne(0).any(1)
        return [i for i, corrected in enumerate(rows.tolist()) if corrected]


def _check_table(name: str, table: torch.Tensor, lead: tuple[int, ...]) -> None:
    if table.dtype != torch.float64:
        raise ValueError(f"{name} must be float64 (coefficients are computed in double precision)")
    if tuple(table.shape[: len(lead)]) != lead:
        raise ValueError(f"{name} must have leading shape {lead}, got {tuple(table.shape)}")


@dataclass
class _Output:
    """One output of one step on the PyTorch path: the non-zero terms of its row."""

    slot: int
    regs: tuple[int, ...]
    coefs: list[torch.Tensor]
    bias: torch.Tensor | None = None


@dataclass
class _Step:
    """What step i reads and writes, built on first use from the folded rows."""

    outputs: list[_Output]  # in the order d0, x_next, prev, x0; only the ones the step writes
    x0_copies_d0: bool
    pre: _Output | None = None
    # Fused-kernel form: one [M, K', *S] block over the registers the step reads.
    block: torch.Tensor | None = None
    block_regs: tuple[int, ...] = ()
    block_slots: tuple[int, ...] = ()
    block_bias: torch.Tensor | None = None
    pre_block: torch.Tensor | None = None
    pre_regs: tuple[int, ...] = ()


class PlanExecutor:
    """Runs a :class:`SolverPlan` step by step on tensors of one device and dtype.

    Each step is the few fused linear combinations of :func:`~fewstep.samplers.fold.fold_plan`
    (one Triton launch on CUDA; in-place accumulation chains elsewhere), with coefficients
    read from device tables, writing the new history entry into the slot it replaces. Under
    ``torch.compile`` the same rows run densely, indexed by the step, so every step traces to
    the same graph.

    Args:
        plan: The plan.
        device: Device of the sample.
        dtype: Compute dtype (float32 for half-precision samples, float64 kept as is).
        transform: Optional x0 transform (thresholding/clipping) applied after conversion.
        check_finite: Record, without host syncs, whether each step's model output and
            new sample were finite; :meth:`check_finite_upto` reports the first bad step.
        step_offset: Added to step indices in messages (img2img runs start part-way).
        guidance: Classifier-free guidance scale folded into the update; ``model_output`` is
            then the model's output on the doubled batch ``(x, x)``, unconditional half first.
        sample_dtype: dtype of the samples (default ``dtype``). For half-precision samples
            the corrected sample is kept in ``dtype`` between steps (one more register) instead
            of being refolded from the rounded sample: UniPC then loses no accuracy to bfloat16.
    """

    def __init__(
        self,
        plan: SolverPlan,
        device: torch.device | str,
        dtype: torch.dtype,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_finite: bool = True,
        step_offset: int = 0,
        guidance: float | None = None,
        sample_dtype: torch.dtype | None = None,
    ):
        self.plan = plan
        self.device, self.dtype = torch.device(device), dtype
        self.transform = transform
        self.check_finite = check_finite
        self.step_offset = step_offset
        self.guidance = guidance
        self.sample_dtype = sample_dtype or dtype
        self._fold_corrector = self.sample_dtype == dtype
        self.folded = fold_plan(plan, transform is not None, guidance, self._fold_corrector)
        regs = self.folded.registers
        self._names = regs.names
        self._x0_reg = regs.index("x0") if regs.transform else None
        self._load_tables(self.folded)
        self._grad = self._rows.requires_grad
        self._fused = pick_backend("auto", self.device, self._grad) == "triton"
        self._steps: list[_Step | None] = [None] * plan.n
        self.monitor = (FiniteMonitor(plan.n, self.device, plan.grid.model_timesteps, step_offset, dtype)
                        if check_finite else None)
        if self._fused and self.monitor is not None:
            self.monitor.use_flags(len(OUTPUTS) + len(self._names))
        self._buffer_shape: torch.Size | None = None  # buffers are allocated at the first step
        self._placeholders = None
        self._hist: list[torch.Tensor | None] = [None] * (self.folded.registers.history - 1)
        self._prev = self._prev_spare = self._hist_spare = None
        self.reset()

    # ------------------------------------------------------------------ tables
    def _load_tables(self, folded: FoldedPlan) -> None:
        f = folded
        self._rows = f.rows.to(device=self.device, dtype=self.dtype)  # [n, 4, K, *S]
        self._bias = None if f.bias is None else f.bias.to(device=self.device, dtype=self.dtype)  # [n, 4, *S]
        self._pre = None if f.pre is None else f.pre.to(device=self.device, dtype=self.dtype)
        self._x0_is_d0 = all(f.x0_is_d0)

    def structure(self) -> tuple:
        """What decides the executor's code path (registers, written outputs, non-zero terms, shapes).

        Two plans with the same structure run the same launches: :meth:`load` swaps one's
        coefficients for the other's in place, which is what a captured CUDA graph replays.
        """
        return self.folded.structure()

    def load(self, plan: SolverPlan, folded: FoldedPlan | None = None) -> None:
        """Take ``plan``'s coefficients, written into this executor's device tables in place.

        Args:
            plan: A plan with the same :meth:`structure` (e.g. other timesteps, same NFE and orders).
            folded: ``plan`` already folded with this executor's transform and guidance, if at hand.

        Raises:
            ValueError: when ``plan`` has another :meth:`structure` (build a new executor).
        """
        folded = folded or fold_plan(plan, self.transform is not None, self.guidance, self._fold_corrector)
        if folded.structure() != self.structure():
            raise ValueError("the plan's structure differs from the executor's (other orders, terms or shapes): "
                             "build a new PlanExecutor for it")
        with torch.no_grad():
            self._rows.copy_(folded.rows)
            if self._bias is not None:
                self._bias.copy_(folded.bias)
            if self._pre is not None:
                self._pre.copy_(folded.pre)
            for i, st in enumerate(self._steps):  # the fused kernel's blocks are gathered copies
                if st is not None and st.block is not None:
                    self._fill_blocks(i, st)
        self.plan, self.folded = plan, folded
        if self.monitor is not None:
            self.monitor.timesteps = plan.grid.model_timesteps

    # ------------------------------------------------------------------ run state
    def reset(self) -> None:
        """Forget the history so the plan can run again from step 0 (buffers are kept for reuse)."""
        if self._buffer_shape is not None:
            for t in (*self._hist, self._prev, self._prev_spare, self._hist_spare):
                if t is not None and id(t) in self._owned:
                    self._pool.append(t)
        self._hist, self._prev = [None] * len(self._hist), None
        self._prev_spare = self._hist_spare = None
        self.next_step = 0
        self.shape: torch.Size | None = None
        if self.monitor is not None:
            self.monitor.reset()

    def _allocate(self, shape: torch.Size) -> None:
        """Start using buffers for samples of ``shape`` (allocated on demand)."""
        self._buffer_shape = shape
        self._pool, self._owned, self._scratch = [], set(), None
        self._placeholders = None

    def _start_history(self) -> None:
        """Zeros standing in for the history entries (and previous sample) not yet written.

        Never written, and read only by compiled steps, which run dense over every register.
        Eagerly they are expanded scalars (no memory); a compiled run gets full-size distinct
        tensors, so that every step traces with the same strides and aliasing (one graph).
        """
        full = torch.compiler.is_compiling()
        if self._placeholders is None or self._placeholders[2] != full:
            shape, h = self._buffer_shape, self.folded.registers.history
            make = (lambda: torch.zeros(shape, device=self.device, dtype=self.dtype)) if full else \
                (lambda: torch.zeros((), device=self.device, dtype=self.dtype).expand(shape))
            zeros = [make() for _ in range(h)]
            self._placeholders = (zeros[1:], zeros[0], full)
        self._hist, self._prev = list(self._placeholders[0]), self._placeholders[1]

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> None:
        # Under torch.compile the step order is the caller's to keep (the adapter and fewstep.sample
        # check it outside the graph): comparing i with next_step would tie two symbols together.
        in_order = torch.compiler.is_compiling() or i == self.next_step
        if (in_order and self.shape is not None and isinstance(x, torch.Tensor)
                and isinstance(model_output, torch.Tensor) and x.shape == self.shape
                and model_output.shape == self._output_shape and x.is_floating_point()
                and model_output.is_floating_point() and model_output.device == x.device):
            return  # the common case, in one condition; the checks below name what is wrong
        if not in_order:
            raise RuntimeError(f"steps must be taken in order: expected step {self.next_step}, got {i}")
        for name, t in (("sample", x), ("model output", model_output)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"the {name} must be a floating-point tensor, got {what}")
        if model_output.device != x.device:
            raise ValueError(f"the model output is on {model_output.device} but the sample on {x.device}")
        expected = x.shape if self.guidance is None else (2 * x.shape[0], *x.shape[1:])
        if model_output.shape != expected:
            what = "the doubled batch (uncond, cond) " if self.guidance is not None else ""
            raise ValueError(f"model output shape {tuple(model_output.shape)} does not match {what}sample shape "
                             f"{tuple(expected) if self.guidance is not None else tuple(x.shape)}")
        if self.shape is None:
            self.plan.check_sample_shape(tuple(x.shape))
            self.shape, self._output_shape = x.shape, model_output.shape
            if self._buffer_shape != x.shape:
                self._allocate(x.shape)
            self._start_history()
        elif x.shape != self.shape:
            raise ValueError(
                f"the sample's shape changed mid-run, from {tuple(self.shape)} at step {self.step_offset} to "
                f"{tuple(x.shape)} at step {i + self.step_offset}; start a new run (set_timesteps) for a new batch"
            )

    # ------------------------------------------------------------------ stepping
    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance from grid point ``i`` to ``i + 1``.

        Args:
            i: Step index; steps must be taken in order 0, 1, ..., n - 1.
            x: The sample the model was evaluated at.
            model_output: The raw model output at (x, t_i) (the doubled batch with ``guidance``).

        Returns:
            (x_next, x0): the next sample and the data prediction at step i, both in ``x``'s
            dtype and both the caller's to modify (neither aliases the solver's history).
        """
        return self.advance(i, x, model_output, want_x0=True)

    def advance(self, i: int, x: torch.Tensor, model_output: torch.Tensor,
                want_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`step`, optionally without materialising x0 (then returned as None)."""
        self._check_inputs(i, x, model_output)
        outs = (model_output,) if self.guidance is None else model_output.chunk(2)
        if torch.compiler.is_compiling():
            return self._step_dense(i, x, model_output, outs, want_x0)
        st = self._steps[i] or self._build_step(i)
        regs = [x, *outs, *([None] if self._x0_reg is not None else ()), *self._hist]
        if self.folded.registers.prev:
            regs.append(self._prev)
        functional = self._grad or (torch.is_grad_enabled() and (x.requires_grad or model_output.requires_grad))
        if self._fused and not functional:
            results = self._run_fused(i, st, regs, x, want_x0)
        else:
            results = self._run_torch(st, regs, x, want_x0, functional)
            if self.monitor is not None:
                self.monitor.record(i, model_output, results[X_NEXT], x if i == 0 else None)
        self._advance_state(i, results, functional)
        return results[X_NEXT], results[X0]

    def _advance_state(self, i: int, results: list, functional: bool) -> None:
        if self._hist:
            dropped = self._hist.pop()
            d0 = results[D0]
            if d0 is None:  # no later step reads this step's entry: keep the buffer in its place
                self._hist.insert(0, dropped)
            else:
                self._hist.insert(0, d0)
                # The dropped entry is the next step's destination for d0 (functional steps write none).
                self._hist_spare = None if functional or id(dropped) not in self._owned else dropped
        if self.folded.registers.prev and results[PREV] is not None:
            old, self._prev = self._prev, results[PREV]
            self._prev_spare = None if functional or id(old) not in self._owned else old
        self.next_step = i + 1

    def _target(self, slot: int) -> torch.Tensor:
        """Where a step writes d0 (the slot the history drops) or prev (the other of two buffers)."""
        spare = self._hist_spare if slot == D0 else self._prev_spare
        if spare is not None:
            return spare
        if self._pool:
            return self._pool.pop()
        buffer = self._new_buffer()
        self._owned.add(id(buffer))
        return buffer

    def _new_buffer(self) -> torch.Tensor:
        return torch.empty(self._buffer_shape, device=self.device, dtype=self.dtype)

    def release_buffers(self) -> None:
        """Free the sample-sized buffers (reallocated by the next run's first step)."""
        self._buffer_shape = self._placeholders = None
        self._pool, self._owned, self._scratch = [], set(), None
        self._hist, self._prev = [None] * len(self._hist), None
        self._prev_spare = self._hist_spare = None
        self.shape = None

    def _run_torch(self, st: _Step, regs: list, x: torch.Tensor, want_x0: bool, functional: bool) -> list:
        """The step as in-place accumulation chains (the PyTorch reference of the fused kernel)."""
        dtype = self.dtype
        if st.pre is not None:
            x0 = _reference.accumulate(st.pre.coefs, [regs[k] for k in st.pre.regs], None, dtype, None)
            regs[self._x0_reg] = self.transform(x0)
        cast = x.dtype != dtype
        results = [None] * 4
        for o in st.outputs:
            slot = o.slot
            if slot == X0 and not want_x0:
                continue
            if functional:
                into = None
            elif slot == D0 or slot == PREV:
                into = self._target(slot)
            elif cast:
                into = self._scratch if self._scratch is not None else self._new_scratch()
            else:
                into = None
            ks, cs = o.regs, o.coefs
            t0 = regs[ks[0]]
            if t0.dtype == dtype:
                acc = torch.mul(t0, cs[0]) if into is None else torch.mul(t0, cs[0], out=into)
            else:  # mul(half, fp32 scalar) would compute in half: upcast first
                acc = t0.to(dtype) if into is None else into.copy_(t0)
                acc.mul_(cs[0])
            for j in range(1, len(ks)):
                acc.addcmul_(regs[ks[j]], cs[j])
            if o.bias is not None:
                acc.add_(o.bias)
            results[slot] = acc.to(x.dtype) if cast and slot in (X_NEXT, X0) else acc
        if want_x0 and st.x0_copies_d0:
            results[X0] = results[D0].to(x.dtype) if cast else results[D0].clone()
        return results

    def _new_scratch(self) -> torch.Tensor:
        self._scratch = self._new_buffer()
        return self._scratch

    def _run_fused(self, i: int, st: _Step, regs: list, x: torch.Tensor, want_x0: bool) -> list:
        from ..kernels import triton_lincomb

        if st.pre is not None:
            x0 = self._new_buffer()
            triton_lincomb.combine(st.pre_block, [regs[k] for k in st.pre_regs], None, [x0], self.dtype)
            regs[self._x0_reg] = self.transform(x0)
        slots = st.block_slots if want_x0 else st.block_slots[:-1]
        outs = [self._target(s) if s in (D0, PREV) else torch.empty_like(x) for s in slots]
        inputs = [regs[k] for k in st.block_regs]
        flags = None
        if self.monitor is not None:
            width = len(st.block_slots) + len(inputs)
            flags = self.monitor.use_flags(width)[i, : len(slots) + len(inputs)]
            reg_col = {k: len(slots) + j for j, k in enumerate(st.block_regs)}
            model = (*self.folded.registers.outputs, self._x0_reg)
            self.monitor.roles[i] = ((reg_col[0],) if 0 in reg_col else (),
                                     tuple(reg_col[k] for k in model if k in reg_col),
                                     (slots.index(X_NEXT),))
        block = st.block if want_x0 else st.block[:-1]
        bias = None if st.block_bias is None else (st.block_bias if want_x0 else st.block_bias[:-1])
        triton_lincomb.combine(block, inputs, bias, outs, self.dtype, flag=flags)
        results = [None] * 4
        for s, t in zip(slots, outs):
            results[s] = t
        return results

    def _step_dense(self, i, x, model_output, outs, want_x0):
        """Every output over every register, rows indexed by the (symbolic) step: one graph for all steps."""
        regs = [x, *outs, *([None] if self._x0_reg is not None else ()), *self._hist]
        if self.folded.registers.prev:
            regs.append(self._prev)
        if self._pre is not None:
            pre = self._pre[i][: self._x0_reg]  # not [i, :k], which makes torch.compile specialise i
            x0 = _accumulate_all(pre, regs[: self._x0_reg], self.dtype)
            regs[self._x0_reg] = self.transform(x0)
        rows = self._rows[i]
        bias = [None] * 4 if self._bias is None else self._bias[i]
        f = self.folded
        results: list = [None] * 4
        if f.registers.history > 1:
            results[D0] = _accumulate_all(rows[D0], regs, self.dtype)
        xn = _accumulate_all(rows[X_NEXT], regs, self.dtype, bias[X_NEXT])
        results[X_NEXT] = xn.to(x.dtype)
        if f.registers.prev:
            results[PREV] = _accumulate_all(rows[PREV], regs, self.dtype, bias[PREV])
        if want_x0:
            x0 = results[D0] if self._x0_is_d0 and results[D0] is not None else _accumulate_all(rows[X0], regs,
                                                                                                  self.dtype)
            results[X0] = x0.to(x.dtype, copy=True)
        if self.monitor is not None:
            self.monitor.sums[i] = torch.stack([t.detach().sum(dtype=self.dtype) for t in (x, model_output, xn)])
        self._advance_state(i, results, functional=True)
        return results[X_NEXT], results[X0]

    # ------------------------------------------------------------------ step programs
    def _build_step(self, i: int) -> _Step:
        f = self.folded
        K = len(self._names)
        rows = self._rows[i]
        flat = rows.reshape(4 * K, *rows.shape[2:]).unbind(0)
        outputs = []
        for m in (D0, X_NEXT, PREV, X0):
            if not f.needed[i][m] or (m == X0 and f.x0_is_d0[i] and f.needed[i][D0]):
                continue
            regs = tuple(k for k in range(K) if f.active[i][m][k]) or (0,)
            bias = self._bias[i, m] if self._bias is not None and f.bias_active[i][m] else None
            outputs.append(_Output(m, regs, [flat[m * K + k] for k in regs], bias))
        st = _Step(outputs, x0_copies_d0=f.needed[i][D0] and f.x0_is_d0[i])
        if self._pre is not None:
            regs = tuple(k for k in range(K) if f.pre_active[i][k]) or (0,)
            st.pre = _Output(X0, regs, [self._pre[i, k] for k in regs])
        if self._fused:
            slots = tuple(m for m in (D0, X_NEXT, PREV, X0) if f.needed[i][m])
            st.block_slots = slots
            st.block_regs = tuple(sorted({k for m in slots for k in range(K) if f.active[i][m][k]})) or (0,)
            if st.pre is not None:
                st.pre_regs = st.pre.regs
            self._fill_blocks(i, st)
        self._steps[i] = st
        return st

    def _fill_blocks(self, i: int, st: _Step) -> None:
        """(Re)gather the fused kernel's per-step blocks from the dense rows, in place if they exist."""
        rows = self._rows[i][list(st.block_slots)][:, list(st.block_regs)]
        st.block = rows.contiguous() if st.block is None else st.block.copy_(rows)
        if self._bias is not None:
            bias = self._bias[i][list(st.block_slots)]
            st.block_bias = bias.contiguous() if st.block_bias is None else st.block_bias.copy_(bias)
        if st.pre is not None:
            pre = self._pre[i, list(st.pre_regs)].reshape(1, -1)
            st.pre_block = pre.contiguous() if st.pre_block is None else st.pre_block.copy_(pre)

    # ------------------------------------------------------------------ finiteness
    def check_finite_upto(self, upto: int, wait: bool = False) -> None:
        """Raise FloatingPointError naming the first bad step below ``upto`` (see :class:`FiniteMonitor`)."""
        if self.monitor is not None:
            self.monitor.check(upto, wait)

    def raise_if_nonfinite(self) -> None:
        """Check every step taken so far, waiting for the device if needed."""
        self.check_finite_upto(self.next_step, wait=True)


def _accumulate_all(row: torch.Tensor, regs: list, acc_dtype: torch.dtype, bias: torch.Tensor | None = None):
    return _reference.accumulate(row.unbind(0), regs, bias, acc_dtype, None)
