"""Computing DPM-Solver-v3's empirical model statistics for any model (``fewstep.compute_ems``).

For every point lambda_j of the EMS grid and every datapoint k (x0_k, noise z_k and a
Rademacher vector r_k, all drawn from seeds that depend on k alone):

    x = alpha_j x0_k + sigma_j z_k,       a(x, lambda) = e^{-lambda} eps(x, lambda)
    (a, J_a r)  = jvp(a, (x, lambda), (r, 0))                     ->  l-term alpha r * (J_a r)
    (a, da)     = jvp(a, (x, lambda), (dx/dlambda, 1))            ->  the total derivative along the ODE

with dx/dlambda = (d log alpha / d lambda) x - sigma eps. ``eps`` is the function the sampler
integrates: the converted model output, CFG-combined when ``guidance`` is given. The float64
sums of :data:`fewstep.samplers.ems.MOMENTS` over the data determine l, s and b in closed form
(:func:`~fewstep.samplers.ems.ems_from_moments`).

The time derivative (``time_derivative``): a network trained at integer timesteps only (every
diffusers UNet/DiT on a discrete DDPM schedule) was never fitted between them; its sinusoidal
time embedding makes the output at a fixed x wiggle with fractional t (the digits UNet: period
~6 steps, amplitude ~1e-3), and a JVP in t measures that wiggle, not the trend the sampler
follows, so s and b zig-zag between grid points. ``"finite_difference"`` keeps the exact JVP
in x and the analytic lambda-dependence of the output conversion, and takes the network's
explicit time dependence as a central difference over +-``fd_step`` in lambda (default: the
EMS grid spacing; one-sided, second order at the grid's ends), between integer timesteps on a
discrete-time schedule. ``"auto"`` uses it for discrete-time models (a
:class:`~fewstep.samplers.schedules.DiscreteVPSchedule`, unless the model says
``continuous_time = True``, as the analytic GMM does) and the pure JVP otherwise
(continuous-time VP, EDM/VE and flow-matching models). The choice is recorded in the EMS.

Work is split into fixed blocks of ``batch_size`` datapoints, each always evaluated as one
batch, and grid chunks of ``chunk_size`` points. Every chunk's sums are written atomically to
``workdir``; a rerun skips finished chunks, so a killed run resumes and ends with the same
file. Under ``torchrun`` / ``accelerate launch`` (an initialised ``torch.distributed``
group) the blocks are dealt round-robin to the processes; each block's float64 sums are
exchanged exactly (an all-reduce where only the owner contributes a non-zero) and added in
block order, so any number of processes gives the same statistics, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep.config import resolve_device
from fewstep.infra.io import claim_identity, clean_temp_files, lock_directory, read_json
from fewstep.infra.shards import ShardStore, shard_ranges
from fewstep.infra.validation import check_count, check_guidance, check_seed
from fewstep.samplers.artifacts import ArtifactMeta, model_fingerprint
from fewstep.samplers.ems import EMS, MOMENTS, ems_from_moments, ems_lambda_grid
from fewstep.samplers.prediction import cfg_combine, check_prediction, eps_coefficients
from fewstep.samplers.schedules import DiscreteVPSchedule, NoiseSchedule, make_schedule

__all__ = ["compute_ems", "EMS_DATA_SEED", "TIME_DERIVATIVES", "forward_ad_workarounds", "resolve_time_derivative"]

# EMS data, noise and Rademacher seeds start here: evaluation seeds are 0..N-1.
EMS_DATA_SEED = 100_000
# 2: the time derivative is a recorded choice (finite difference for discrete-time models);
# 3: the grid chunks are ShardStore shards (``shard-START-STOP.safetensors``, was ``chunk_C.safetensors``).
_FORMAT = 3
TIME_DERIVATIVES = ("auto", "jvp", "finite_difference")


@contextlib.contextmanager
def forward_ad_workarounds():
    """Run diffusers models under forward-mode AD (torch 2.x gaps, found on torch 2.13).

    The fused CPU/GPU attention kernels have no forward-AD formula (the math kernel does), and
    ``group_norm``'s forward-AD formula views its input, which fails on the non-contiguous
    tensors attention blocks hand it. Restores everything on exit.
    """
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original = F.group_norm

    def group_norm(input, *args, **kwargs):
        return original(input.contiguous(), *args, **kwargs)

    F.group_norm = group_norm
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        F.group_norm = original


def _stream_seed(seed: int, index: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0])


def _split_data(item: Any, n: int) -> tuple[torch.Tensor, Any, Any]:
    x0, cond, uncond = (item, None, None) if isinstance(item, torch.Tensor) else (tuple(item) + (None, None))[:3]
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1 or x0.shape[0] != n:
        raise ValueError(f"data_sampler must return x0 (a float tensor [{n}, ...]) or (x0, cond[, uncond]) for "
                         f"{n} indices; got {type(x0).__name__} {getattr(x0, 'shape', '')}")
    return x0, cond, uncond


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, tuple):
        return tuple(_cat(u, v) for u, v in zip(a, b))
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return list(a) + list(b)


class _Block:
    """One fixed block of datapoints: data, noise and Rademacher vectors, kept for the whole run."""

    def __init__(self, indices: torch.Tensor, data_sampler: Callable, seed: int, device: torch.device,
                 guidance: float | None):
        n = indices.numel()
        x0, self.cond, self.uncond = _split_data(data_sampler(indices), n)
        if guidance is not None and (self.cond is None or self.uncond is None):
            raise ValueError("with guidance, data_sampler must return (x0, cond, uncond)")
        self.x0 = x0.to(device)
        shape = tuple(x0.shape[1:])
        z, r = [], []
        for k in indices.tolist():
            z.append(torch.randn(shape, generator=torch.Generator().manual_seed(_stream_seed(seed, k, 0))))
            g = torch.Generator().manual_seed(_stream_seed(seed, k, 1))
            r.append(torch.randint(0, 2, shape, generator=g).float() * 2 - 1)
        self.z = torch.stack(z).to(device=device, dtype=x0.dtype)
        self.r = torch.stack(r).to(device=device, dtype=x0.dtype)


class _Function:
    """a(x, lambda) = e^{-lambda} eps(x, lambda): the converted (and guided) model output."""

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction: str, guidance: float | None):
        self.model, self.schedule, self.prediction, self.guidance = model, schedule, prediction, guidance

    def __call__(self, x: torch.Tensor, lam: torch.Tensor, block: _Block,
                 network_t: torch.Tensor | None = None) -> torch.Tensor:
        """a(x, lam); ``network_t`` (default: that of ``lam``) is the schedule time the network sees."""
        sched = self.schedule
        t = sched.t_from_lambda(lam)
        alpha, sigma = sched.alpha_sigma(t)
        model_t = sched.model_time(t if network_t is None else network_t).to(x.dtype)
        if self.guidance is None:
            out = self.model(x, model_t) if block.cond is None else self.model(x, model_t, block.cond)
        else:
            both = self.model(torch.cat([x, x]), torch.cat([model_t, model_t]), _cat(block.uncond, block.cond))
            out = cfg_combine(*both.chunk(2), self.guidance)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the model must return a tensor shaped like its input {tuple(x.shape)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        col = (-1,) + (1,) * (x.dim() - 1)
        ex, eo = eps_coefficients(self.prediction, alpha, sigma)
        eps = ex.to(x.dtype).reshape(col) * x + eo.to(x.dtype).reshape(col) * out
        return torch.exp(-lam).to(x.dtype).reshape(col) * eps


def _fd_stencil(schedule: NoiseSchedule, lam: float, fd_step: float) -> tuple[torch.Tensor, list[float]]:
    """Schedule times and weights of the finite difference d(out)/d lambda at ``lam``: sum_i w_i out(t_i).

    Central over lam -+ h, h = fd_step narrowed to stay inside the schedule; within fd_step / 2 of
    the schedule's ends one-sided and second order over lam, lam +- fd_step, lam +- 2 fd_step. On a discrete-time
    schedule every time is rounded to the integer timesteps the network was trained on (never a
    fractional one), distinct ones, and the weights use the log-SNRs of those integers.
    """
    ends = schedule.lambda_(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64)).tolist()
    fd_step = min(fd_step, (ends[1] - ends[0]) / 4)  # a one-sided stencil (2 fd_step wide) stays inside (n_grid=1)
    h = min(fd_step, lam - ends[0], ends[1] - lam)
    central = h >= 0.5 * fd_step  # closer to an end, a central difference would shrink to nothing
    if central:
        nodes = [lam - h, lam + h]
    else:
        sign = 1.0 if lam - ends[0] < ends[1] - lam else -1.0  # away from the end
        nodes = [lam, lam + sign * fd_step, lam + 2 * sign * fd_step]
    t = schedule.t_from_lambda(torch.tensor(nodes, dtype=torch.float64)).clamp(schedule.t_min, schedule.t_max)
    if isinstance(schedule, DiscreteVPSchedule):
        t = t.round()
        if central and t[0] == t[1]:  # both inside one step (the steep low-noise end): the step around lam
            lo = min(math.floor(float(schedule.t_from_lambda(torch.tensor([lam], dtype=torch.float64))[0])),
                     int(schedule.t_max) - 1)
            t = torch.tensor([lo + 1.0, float(lo)], dtype=torch.float64)
        elif not central:  # distinct integers, moving away from the end
            step = 1.0 if t[0] == schedule.t_min else -1.0
            for i in (1, 2):
                if (t[i] - t[i - 1]) * step < 1:
                    t[i] = t[i - 1] + step
    x = schedule.lambda_(t).tolist()
    if central:
        return t, [-1.0 / (x[1] - x[0]), 1.0 / (x[1] - x[0])]
    # derivative at x[0] of the parabola through the three nodes (Lagrange)
    x0, x1, x2 = x
    return t, [(2 * x0 - x1 - x2) / ((x0 - x1) * (x0 - x2)), (x0 - x2) / ((x1 - x0) * (x1 - x2)),
               (x0 - x1) / ((x2 - x0) * (x2 - x1))]


def _block_sums(fn: _Function, block: _Block, lam: float, schedule: NoiseSchedule,
                fd_step: float | None = None) -> torch.Tensor:
    """[len(MOMENTS), *S] float64 sums of one block at one grid point.

    ``fd_step`` None: the total derivative is one JVP in (x, lambda). Else the network's explicit
    time dependence is the finite difference of :func:`_fd_stencil` at this x,
    and the JVP covers x and the output conversion's own lambda-dependence.
    """
    x0 = block.x0
    n = x0.shape[0]
    lam_t = torch.full((n,), lam, dtype=torch.float64, device=x0.device)
    t = schedule.t_from_lambda(torch.tensor([lam], dtype=torch.float64))
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
    # d log(alpha) / d lambda of this schedule, by forward AD through its own formulas
    _, dlog_alpha = torch.func.jvp(lambda u: torch.log(schedule.alpha_sigma(schedule.t_from_lambda(u))[0]),
                                   (torch.tensor([lam], dtype=torch.float64),),
                                   (torch.ones(1, dtype=torch.float64),))
    x = alpha * x0 + sigma * block.z

    def f(x_, lam_):
        return fn(x_, lam_, block)

    a, ja = torch.func.jvp(f, (x, lam_t), (block.r, torch.zeros_like(lam_t)))
    eps = a * math.exp(lam)
    dx = float(dlog_alpha) * x - sigma * eps
    if fd_step is None:
        _, da = torch.func.jvp(f, (x, lam_t), (dx, torch.ones_like(lam_t)))
        da = da.double()
    else:
        # the network's time is a constant here: no tangent reaches its time embedding
        t_here = schedule.t_from_lambda(lam_t)
        _, da = torch.func.jvp(lambda x_, lam_: fn(x_, lam_, block, t_here), (x, lam_t), (dx, torch.ones_like(lam_t)))
        times, weights = _fd_stencil(schedule, lam, fd_step)
        # the weights sum to 0, so the conversion term e^{-lam} ex x cancels: e^{-lam} eo d(out)/d lam is left
        da = da.double()
        for t_i, w in zip(times.tolist(), weights):
            da = da + w * fn(x, lam_t, block, torch.full_like(lam_t, t_i)).double()
    a, v = a.double(), x.double() / alpha
    lr = alpha * block.r.double() * ja.double()
    terms = (lr, a, v, da, a * a, a * v, v * v, a * da, v * da)
    return torch.stack([u.sum(0) for u in terms])


def resolve_time_derivative(choice: str, model: Any, schedule: NoiseSchedule) -> str:
    """``"jvp"`` or ``"finite_difference"`` for ``choice`` (``"auto"``: see the module docstring).

    Raises:
        ValueError: an unknown choice.
    """
    if choice not in TIME_DERIVATIVES:
        raise ValueError(f"time_derivative={choice!r} must be one of {', '.join(TIME_DERIVATIVES)}")
    if choice != "auto":
        return choice
    continuous = getattr(model, "continuous_time", None)
    if continuous is None:
        continuous = not isinstance(schedule, DiscreteVPSchedule)
    return "jvp" if continuous else "finite_difference"


def _dist() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_device(model: Any) -> torch.device:
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "unet", None) or getattr(
        model, "transformer", None)
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def compute_ems(
    model: Callable[..., torch.Tensor],
    data_sampler: Callable[[torch.Tensor], Any],
    schedule: "str | NoiseSchedule",
    *,
    n_grid: int = 250,
    n_data: int = 1024,
    prediction: str = "epsilon",
    guidance: float | None = None,
    batch_size: int = 128,
    seed: int = EMS_DATA_SEED,
    t_start: float | None = None,
    t_end: float | None = None,
    workdir: "str | Path | None" = None,
    chunk_size: int = 8,
    device: "str | torch.device | None" = None,
    fingerprint: str | None = None,
    data_description: str = "user data_sampler",
    time_derivative: str = "auto",
    fd_step: float | None = None,
    progress: bool = True,
) -> EMS:
    """Estimate DPM-Solver-v3's EMS (l, s, b) of a model on a log-SNR grid.

    Args:
        model: ``model(x, t)`` or ``model(x, t, cond)`` returning the raw network output
            (``prediction`` says what it is); ``t`` is a 1-D tensor of model timesteps. It
            must support forward-mode AD (``torch.func.jvp``) in ``x`` and ``t``.
        data_sampler: ``data_sampler(indices)`` for a LongTensor of datapoint indices returns
            ``x0`` ([n, *S], the model's input space: pixels or latents), ``(x0, cond)``, or
            with guidance ``(x0, cond, uncond)``. It must be deterministic per index (the
            same index always gives the same datapoint): real data, or samples of the model.
        schedule: The model's noise schedule (a name or :class:`NoiseSchedule`).
        n_grid: N; the grid has N + 1 points uniform in log-SNR.
        n_data: K datapoints (the paper: K matters more than N).
        prediction: The model's output type (``epsilon``, ``v_prediction``, ``sample``, ``flow``).
        guidance: Classifier-free guidance scale; the statistics are then those of the guided
            noise prediction ``eps_u + w (eps_c - eps_u)``, the function the sampler solves.
        batch_size: Datapoints per model call (CFG doubles it). Part of the result's identity:
            batches are fixed so that the sums do not depend on how the work is split.
        seed: Noise and Rademacher vectors of datapoint k come from ``(seed, k)``; keep it
            disjoint from evaluation seeds (the default 100000 is).
        t_start, t_end: The grid's schedule-time range (default: the whole schedule; see
            :func:`~fewstep.samplers.ems.ems_lambda_grid`).
        workdir: Folder for per-chunk results; a rerun with the same settings resumes there.
            None keeps everything in memory.
        chunk_size: Grid points per saved chunk.
        device: Where the model runs (default: the device of its parameters, else CPU).
        fingerprint: Model id recorded in the EMS (default: :func:`model_fingerprint`).
        data_description: Recorded in the EMS and the resume identity (e.g. ``"digits:real"``).
        time_derivative: How the explicit time dependence of the model enters the total
            derivative: ``"jvp"`` (forward-mode AD in lambda), ``"finite_difference"`` (a central
            difference over +-``fd_step``; for networks trained at integer timesteps only) or
            ``"auto"``: finite differences for discrete-time models (see the module docstring).
        fd_step: Half-width in lambda of the finite difference (default: the EMS grid spacing).
        progress: Show a progress bar (on the first process only).

    Returns:
        The :class:`EMS` (the same on every process).

    Raises:
        TypeError: a count, seed or guidance that is not a number of the right kind.
        ValueError: bad arguments, a data sampler or model returning the wrong shapes, or a
            workdir holding chunks of a different run.
    """
    schedule = make_schedule(schedule)
    prediction = check_prediction(prediction, schedule)
    for name, value, low in (("n_data", n_data, 2), ("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1)):
        check_count(name, value, low)
    check_seed(seed)
    if guidance is not None:
        guidance = check_guidance(guidance)
    lambdas = ems_lambda_grid(schedule, n_grid, t_start, t_end)
    time_derivative = resolve_time_derivative(time_derivative, model, schedule)
    if time_derivative == "jvp":
        if fd_step is not None:
            raise ValueError(f"fd_step={fd_step!r} needs time_derivative='finite_difference' (or 'auto' on a "
                             "discrete-time model)")
    else:
        fd_step = float(lambdas[1] - lambdas[0]) if fd_step is None else fd_step
        if isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not 0 < fd_step < math.inf:
            raise ValueError(f"fd_step={fd_step!r} must be a positive number (a half-width in log-SNR)")
        fd_step = float(fd_step)
    device = resolve_device(device) if device is not None else _model_device(model)  # usable here, or ValueError
    rank, world = _dist()
    n_blocks = math.ceil(n_data / batch_size)
    mine = [b for b in range(n_blocks) if b % world == rank]
    blocks = {b: _Block(torch.arange(b * batch_size, min((b + 1) * batch_size, n_data)), data_sampler, seed, device,
                        guidance) for b in mine}
    shape = tuple(next(iter(blocks.values())).x0.shape[1:]) if blocks else None
    if world > 1:
        shapes: list = [None] * world
        torch.distributed.all_gather_object(shapes, shape)
        shape = next(s for s in shapes if s is not None)
    fingerprint = fingerprint if fingerprint is not None else model_fingerprint(model)
    identity = {
        "format": _FORMAT, "fingerprint": fingerprint, "schedule": schedule.to_dict(), "prediction": prediction,
        "guidance": guidance, "n_grid": n_grid, "n_data": n_data, "batch_size": batch_size, "seed": seed,
        "chunk_size": chunk_size, "lambda": [float(lambdas[0]), float(lambdas[-1])], "sample_shape": list(shape),
        "data": data_description, "time_derivative": time_derivative, "fd_step": fd_step,
    }
    fn = _Function(model, schedule, prediction, guidance)
    chunks = [list(range(start, stop)) for start, stop in shard_ranges(n_grid + 1, chunk_size)]
    workdir = None if workdir is None else Path(workdir)
    lock = lock_directory(workdir, "another EMS computation") if workdir is not None and rank == 0 else (
        contextlib.nullcontext())
    with lock:
        if workdir is not None and rank == 0:
            clean_temp_files(workdir, all_stale=True)
            _refuse_older_format(workdir / "run.json")
            claim_identity(workdir / "run.json", identity, "a partial EMS run with other settings",
                           "delete it or use the same settings to resume")
        _barrier(world)
        store = None if workdir is None else ShardStore(workdir, identity, print if rank == 0 else lambda _: None)

        def finished(c: int) -> torch.Tensor | None:
            found = None if store is None else store.load(
                chunks[c][0], chunks[c][-1] + 1, ("sums",), {"sums": (len(chunks[c]), len(MOMENTS), *shape)})
            return None if found is None else found[0]["sums"]

        done = {c: finished(c) for c in range(len(chunks))}
        todo = [c for c in done if done[c] is None]
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(chunks[c]) for c in todo) * len(mine), desc="EMS", unit="batch",
                   disable=not progress or rank != 0)
        with bar, forward_ad_workarounds(), torch.no_grad():
            for c in todo:
                per_block = torch.zeros(len(chunks[c]), n_blocks, len(MOMENTS), *shape, dtype=torch.float64)
                for pos, j in enumerate(chunks[c]):
                    for b in mine:
                        per_block[pos, b] = _block_sums(fn, blocks[b], float(lambdas[j]), schedule, fd_step).cpu()
                        bar.update()
                if world > 1:  # exact: every slot has one non-zero contributor
                    per_block = per_block.to(device) if torch.distributed.get_backend() == "nccl" else per_block
                    torch.distributed.all_reduce(per_block)
                    per_block = per_block.cpu()
                sums = per_block.sum(1)
                if not bool(torch.isfinite(sums).all()):
                    raise FloatingPointError(f"the model output or its derivatives are not finite at EMS grid points "
                                             f"{chunks[c][0]}..{chunks[c][-1]}")
                done[c] = sums
                if store is not None and rank == 0:
                    store.save(chunks[c][0], chunks[c][-1] + 1, {"sums": sums})
        _barrier(world)
    sums = torch.cat([done[c] for c in range(len(chunks))])
    l, s, b = ems_from_moments(lambdas, sums, n_data)
    t_lo, t_hi = schedule.model_time(schedule.t_from_lambda(lambdas[[-1, 0]])).tolist()
    meta = ArtifactMeta(
        fingerprint=fingerprint, schedule=schedule.to_dict(), guidance=guidance, solver="dpmv3",
        extra={"prediction": prediction, "n_grid": n_grid, "n_data": n_data, "batch_size": batch_size, "seed": seed,
               "data": data_description, "timesteps": [t_hi, t_lo], "time_derivative": time_derivative,
               "fd_step": fd_step},
    )
    return EMS(lambdas, l, s, b, meta, n_data)


def _refuse_older_format(run_file: Path) -> None:
    """A work folder of an older fewstep holds chunk files this version does not read: say so."""
    if not run_file.exists():
        return
    try:
        old = read_json(run_file).get("format")
    except (ValueError, AttributeError):
        return  # not ours: claim_identity says what it holds
    if isinstance(old, int) and old < _FORMAT:
        raise ValueError(f"{run_file.parent} holds a partial EMS run of an older fewstep (format {old}; this "
                         f"version writes format {_FORMAT} and cannot resume it); delete the folder to recompute")


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
