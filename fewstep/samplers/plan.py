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
sample, as DPM-Solver-v3 needs). A step never reads a tensor value on the host: which
terms are non-zero is decided once, from the float64 table, when the plan is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..kernels import linear_combination
from .timesteps import TimeGrid

__all__ = ["SolverPlan", "PlanExecutor", "SPACES"]

SPACES = ("data", "noise")


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
            uncorrected = ~self.correct.reshape(n, -1).ne(0).any(1)
            if bool(self.correct_bias.reshape(n, -1)[uncorrected].ne(0).any()):
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
        """Raise ValueError unless elementwise coefficients match a sample of ``shape`` [B, *S]."""
        coef = self.coefficient_shape
        if coef and tuple(shape[1:]) != coef:
            raise ValueError(
                f"this plan's elementwise coefficients have per-sample shape {coef} (e.g. DPM-Solver-v3 "
                f"statistics), but the sample is {tuple(shape)} (per-sample shape {tuple(shape[1:])})"
            )

    def correct_steps(self) -> list[int]:
        """Indices of the steps whose incoming sample is corrected."""
        if self.correct is None:
            return []
        return [i for i in range(self.n) if bool(self.correct[i].ne(0).any())]


def _check_table(name: str, table: torch.Tensor, lead: tuple[int, ...]) -> None:
    if table.dtype != torch.float64:
        raise ValueError(f"{name} must be float64 (coefficients are computed in double precision)")
    if tuple(table.shape[: len(lead)]) != lead:
        raise ValueError(f"{name} must have leading shape {lead}, got {tuple(table.shape)}")


def _active(row: torch.Tensor) -> tuple[int, ...]:
    """Indices of the non-zero terms of one table row (decided on the host, once)."""
    return tuple(int(k) for k in range(row.shape[0]) if bool(row[k].ne(0).any()))


@dataclass
class _Stage:
    terms: tuple[int, ...]
    coefs: list[torch.Tensor]


class FiniteMonitor:
    """Per-step finiteness of the model output and the new sample, kept on the device.

    Each step records two booleans computed from sums (one reduction per tensor, no
    temporaries: NaN/Inf anywhere makes the sum non-finite). The host reads them only when
    that costs no device synchronisation: at once on the CPU, after the step's event has
    completed on CUDA (never waiting), and everything at :meth:`check` with ``wait=True``.
    So a run that stops early still reports, and a NaN is named by step and by cause
    (the model, or the solver overflowing the sample's dtype).
    """

    def __init__(self, n: int, device: torch.device, timesteps: torch.Tensor, step_offset: int = 0):
        self.n, self.device, self.offset = n, device, step_offset
        self.timesteps = timesteps  # CPU float64, for messages
        self.enabled = device.type != "meta"  # meta tensors have no values to read
        self.flags = torch.ones(n, 3, dtype=torch.bool, device=device)  # (input, output, sample)
        self.checked = 0
        self._events: dict[int, torch.cuda.Event] = {}
        self._host = None
        if device.type == "cuda":
            self._host = torch.ones(n, 3, dtype=torch.bool).pin_memory()

    def record(self, i: int, out: torch.Tensor, x_next: torch.Tensor, x_in: torch.Tensor | None = None) -> None:
        """Record step ``i`` (device ops only)."""
        if not self.enabled:
            return
        sums = [out.sum(dtype=torch.float32), x_next.sum(dtype=torch.float32)]
        if x_in is not None:
            sums.insert(0, x_in.sum(dtype=torch.float32))
        ok = torch.isfinite(torch.stack(sums))
        if x_in is None:
            self.flags[i, 1:] = ok
        else:
            self.flags[i] = ok
        if self._host is not None:
            self._host[i].copy_(self.flags[i], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events[i] = event

    def check(self, upto: int, wait: bool = False) -> None:
        """Raise FloatingPointError for the first bad step below ``upto`` whose flags are readable."""
        if not self.enabled:
            return
        ready = upto
        if self._host is None and self.device.type != "cpu" and not wait:
            return  # no cheap way to peek on this accelerator: checked when the run ends
        if self._host is not None:
            ready = self.checked
            while ready < upto:
                event = self._events.get(ready)
                if event is not None and not wait and not event.query():
                    break
                if event is not None and wait:
                    event.synchronize()
                ready += 1
            flags = self._host[self.checked:ready]
        else:
            flags = self.flags[self.checked:ready].cpu()
        if ready <= self.checked:
            return
        bad = (~flags).any(1).nonzero()
        if len(bad):
            self._raise(self.checked + int(bad[0]), flags[int(bad[0])].tolist())
        self.checked = ready

    def _raise(self, i: int, flags: list[bool]) -> None:
        step, t = i + self.offset, float(self.timesteps[i])
        where = f"step {step} (timestep {t:g})"
        if not flags[0]:
            raise FloatingPointError(f"the sample passed to {where} contains NaN or Inf")
        if not flags[1]:
            raise FloatingPointError(f"the model output at {where} contains NaN or Inf")
        raise FloatingPointError(
            f"the solver's update at {where} overflowed to NaN/Inf although the model output was finite: "
            "the sample's dtype cannot hold it (sample in float32) or the solver/grid is unstable here"
        )


class PlanExecutor:
    """Runs a :class:`SolverPlan` step by step on tensors of one device and dtype.

    Args:
        plan: The plan.
        device: Device of the sample.
        dtype: Compute dtype (float32 for half-precision samples, float64 kept as is).
        transform: Optional x0 transform (thresholding/clipping) applied after conversion.
        check_finite: Record, without host syncs, whether each step's model output and
            new sample were finite; :meth:`check_finite_upto` reports the first bad step.
        step_offset: Added to step indices in messages (img2img runs start part-way).
    """

    def __init__(
        self,
        plan: SolverPlan,
        device: torch.device | str,
        dtype: torch.dtype,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_finite: bool = True,
        step_offset: int = 0,
    ):
        self.plan = plan
        self.device, self.dtype = torch.device(device), dtype
        self.transform = transform
        self.check_finite = check_finite
        self.step_offset = step_offset
        n = plan.n

        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=self.device, dtype=dtype)

        x0 = on_device(plan.x0_coef)
        self._x0 = [(x0[i, 0], x0[i, 1]) for i in range(n)]
        if plan.space == "noise":
            # eps = (x - alpha x0) / sigma at the evaluated points.
            g = plan.grid
            e = torch.stack([1 / g.sigma[:n], -g.alpha[:n] / g.sigma[:n]], 1)
            e = on_device(e)
            self._eps = [(e[i, 0], e[i, 1]) for i in range(n)]
        hist = on_device(plan.history_coef)
        self._hist = None if hist is None else [(hist[i, 0], hist[i, 1]) for i in range(n)]
        self._predict = self._stages(plan.predict, on_device(plan.predict))
        self._correct = self._stages(plan.correct, on_device(plan.correct), skip_if_zero=True)
        self._compensate = self._stages(plan.compensate, on_device(plan.compensate), skip_identity=True)
        bias = on_device(plan.predict_bias)
        self._bias = [None] * n if bias is None else [bias[i] for i in range(n)]
        cbias = on_device(plan.correct_bias)
        self._correct_bias = [None] * n if cbias is None else [
            cbias[i] if bool(plan.correct_bias[i].ne(0).any()) else None for i in range(n)]
        raw = on_device(plan.predict_raw)
        self._raw = [None] * n if raw is None else [
            raw[i] if bool(plan.predict_raw[i].ne(0).any()) else None for i in range(n)]
        self.monitor = FiniteMonitor(n, self.device, plan.grid.model_timesteps, step_offset) if check_finite else None
        self.reset()

    @staticmethod
    def _stages(table64, table, skip_if_zero=False, skip_identity=False) -> list[_Stage | None]:
        if table is None:
            return []
        stages: list[_Stage | None] = []
        for i in range(table64.shape[0]):
            terms = _active(table64[i])
            identity = skip_identity and terms == (0,) and bool(table64[i, 0].eq(1).all())
            if (skip_if_zero and not terms) or identity:
                stages.append(None)
            else:
                stages.append(_Stage(terms, [table[i, k] for k in terms]))
        return stages

    def reset(self) -> None:
        """Forget the history so the plan can run again from step 0."""
        self.history: list[torch.Tensor | None] = [None] * self.plan.history
        self.x_prev: torch.Tensor | None = None
        self.next_step = 0
        self.shape: torch.Size | None = None
        if self.monitor is not None:
            self.monitor.flags.fill_(True)
            self.monitor.checked = 0

    @staticmethod
    def _apply(stage: _Stage, registers: Sequence[torch.Tensor | None], bias=None) -> torch.Tensor:
        tensors = [registers[k] for k in stage.terms]
        if any(t is None for t in tensors):
            raise RuntimeError("solver plan reads a history entry that was never written (bad plan)")
        return linear_combination(stage.coefs, tensors, bias)

    def _check_inputs(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> None:
        if i != self.next_step:
            raise RuntimeError(f"steps must be taken in order: expected step {self.next_step}, got {i}")
        for name, t in (("sample", x), ("model output", model_output)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"the {name} must be a floating-point tensor, got {what}")
        if model_output.device != x.device:
            raise ValueError(f"the model output is on {model_output.device} but the sample on {x.device}")
        if model_output.shape != x.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not match sample shape {tuple(x.shape)}"
            )
        if self.shape is None:
            self.plan.check_sample_shape(tuple(x.shape))
            self.shape = x.shape
        elif x.shape != self.shape:
            raise ValueError(
                f"the sample's shape changed mid-run, from {tuple(self.shape)} at step {self.step_offset} to "
                f"{tuple(x.shape)} at step {i + self.step_offset}; start a new run (set_timesteps) for a new batch"
            )

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance from grid point ``i`` to ``i + 1``.

        Args:
            i: Step index; steps must be taken in order 0, 1, ..., n - 1.
            x: The sample the model was evaluated at.
            model_output: The raw model output at (x, t_i).

        Returns:
            (x_next, x0): the next sample and the data prediction at step i, both in ``x``'s
            dtype and both the caller's to modify (neither aliases the solver's history).
        """
        self._check_inputs(i, x, model_output)
        out_dtype = x.dtype
        x_in = x
        x = x.to(self.dtype)
        out = model_output.to(self.dtype)

        cx, co = self._x0[i]
        x0 = linear_combination((cx, co), (x, out))
        if self.transform is not None:
            x0 = self.transform(x0)
        if self._hist is not None:
            hx, h0 = self._hist[i]
            d = linear_combination((hx, h0), (x, x0))
        elif self.plan.space == "noise":
            ex, e0 = self._eps[i]
            d = linear_combination((ex, e0), (x, x0))
        else:
            d = x0
        if self.history:
            self.history.insert(0, d)
            self.history.pop()

        if self._correct and self._correct[i] is not None:
            x = self._apply(self._correct[i], [self.x_prev, *self.history], self._correct_bias[i])
        if self._compensate and self._compensate[i] is not None:
            self.history[0] = self._apply(self._compensate[i], self.history)
        x_next = self._apply(self._predict[i], [x, *self.history], self._bias[i])
        if self._raw[i] is not None:
            x_next.addcmul_(out, self._raw[i])

        self.x_prev = x
        self.next_step = i + 1
        x_next = x_next.to(out_dtype)
        if self.monitor is not None:
            self.monitor.record(i, out, x_next, x_in if i == 0 else None)
        x0_out = x0.to(out_dtype)
        if x0_out is d:  # the history keeps d: hand out a copy the caller may edit in place
            x0_out = x0_out.clone()
        return x_next, x0_out

    def check_finite_upto(self, upto: int, wait: bool = False) -> None:
        """Raise FloatingPointError naming the first bad step below ``upto`` (see :class:`FiniteMonitor`)."""
        if self.monitor is not None:
            self.monitor.check(upto, wait)

    def raise_if_nonfinite(self) -> None:
        """Check every step taken so far, waiting for the device if needed."""
        self.check_finite_upto(self.next_step, wait=True)
