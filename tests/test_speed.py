"""The fused executor: equal to a SolverPlan's stage-by-stage definition, differentiable through its
coefficients, lean in allocations and host reads, reusable across runs and plans; the adapter's caches."""

import math
import warnings

import pytest
import torch

import fewstep
from fewstep import DPMSolverPPScheduler, UniPCScheduler
from fewstep.samplers.fold import fold_plan
from fewstep.samplers.plan import PlanExecutor, SolverPlan

warnings.filterwarnings("ignore", category=FutureWarning)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}

NO_TRITON = "needs triton (pip install -e '.[kernels-test]'): its CPU interpreter runs the Triton kernels"


def staged(plan, x, model, transform=None, guidance=None, sample_dtype=None):
    """A SolverPlan run stage by stage, exactly as its docstring defines a step (in x's dtype; with
    ``sample_dtype`` the sample handed to the next step is rounded to it, the corrector's base is not)."""
    n, h = plan.n, plan.history
    g = plan.grid
    hist, x_prev, outs = [None] * h, None, []
    for i in range(n):
        raw = model(x, i)
        out = raw if guidance is None else raw[0] + guidance * (raw[1] - raw[0])
        x0 = plan.x0_coef[i, 0] * x + plan.x0_coef[i, 1] * out
        if transform is not None:
            x0 = transform(x0)
        if plan.history_coef is not None:
            d = plan.history_coef[i, 0] * x + plan.history_coef[i, 1] * x0
        else:
            d = x0 if plan.space == "data" else (x - g.alpha[i] * x0) / g.sigma[i]
        hist = [d] + hist[:-1]
        if plan.correct is not None and bool(plan.correct[i].ne(0).any()):
            c = plan.correct[i]
            x = c[0] * x_prev + sum(c[1 + j] * hist[j] for j in range(h) if hist[j] is not None)
            if plan.correct_bias is not None:
                x = x + plan.correct_bias[i]
        if plan.compensate is not None:
            w = plan.compensate[i]
            hist[0] = sum(w[j] * hist[j] for j in range(h) if hist[j] is not None)
        p = plan.predict[i]
        x_next = p[0] * x + sum(p[1 + j] * hist[j] for j in range(h) if hist[j] is not None)
        if plan.predict_raw is not None:
            x_next = x_next + plan.predict_raw[i] * out
        if plan.predict_bias is not None:
            x_next = x_next + plan.predict_bias[i]
        x_prev = x
        outs.append((x_next, x0))
        x = x_next if sample_dtype is None else x_next.to(sample_dtype).to(x_next.dtype)
    return outs


def fused(plan, x, model, transform=None, guidance=None, dtype=torch.float64):
    ex = PlanExecutor(plan, x.device, dtype, transform, guidance=guidance)
    outs = []
    for i in range(plan.n):
        raw = model(x, i)
        x, x0 = ex.step(i, x, raw if guidance is None else torch.cat(raw))
        outs.append((x, x0))
    ex.raise_if_nonfinite()
    return outs, ex


def model_fn(scale=0.7):
    def model(x, i):
        return torch.tanh(x) * scale + 0.05 * (i + 1)
    return model


def guided_model(x, i):
    return torch.tanh(x) * 0.7, torch.tanh(1.3 * x) * 0.6 + 0.02 * i


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_same_run(got, want, tol=1e-12):
    assert len(got) == len(want)
    for i, ((x, x0), (xr, x0r)) in enumerate(zip(got, want)):
        assert rel(x, xr) <= tol and rel(x0, x0r) <= tol, f"step {i}: {rel(x, xr):.1e} {rel(x0, x0r):.1e}"


PLANS = [
    ("scaled_linear", "ddim", {}),
    ("scaled_linear", "dpmpp", {"order": 1}),
    ("scaled_linear", "dpmpp", {"order": 2}),
    ("scaled_linear", "dpmpp", {"order": 2, "variant": "heun", "space": "noise"}),
    ("scaled_linear", "dpmpp", {"order": 3, "third_order": "taylor", "lower_order_final": False}),
    ("scaled_linear", "unipc", {"order": 1}),
    ("scaled_linear", "unipc", {"order": 2, "variant": "bh1"}),
    ("scaled_linear", "unipc", {"order": 3}),
    ("scaled_linear", "unipc", {"order": 3, "space": "noise"}),
    ("scaled_linear", "unipc", {"order": 2, "corrector": False}),
    ("scaled_linear", "unipc", {"order": 3, "disable_corrector": [2, 4]}),
    ("flow", "unipc", {"order": 3}),
    ("flow", "dpmpp", {"order": 2}),
]


@pytest.mark.parametrize("schedule,solver,options", PLANS, ids=lambda v: str(v))
def test_fused_steps_equal_the_staged_definition(schedule, solver, options):
    prediction = "flow" if schedule == "flow" else "epsilon"
    plan = fewstep.make_plan(schedule, solver, 7, prediction, **options)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got, ex = fused(plan, x, model_fn())
    assert_same_run(got, staged(plan, x, model_fn()))
    if solver == "unipc":  # UniPC's corrector folds: no register keeps the previous sample
        assert not ex.folded.registers.prev


@pytest.mark.parametrize("solver,options", [("unipc", {"order": 3}), ("ddim", {}), ("dpmpp", {"space": "noise"})])
def test_fused_steps_with_thresholding_and_folded_guidance(solver, options):
    plan = fewstep.make_plan("scaled_linear", solver, 6, **options)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = fewstep.DynamicThreshold(0.9, 1.5)
    assert_same_run(fused(plan, x, model_fn(), t)[0], staged(plan, x, model_fn(), t))
    assert_same_run(fused(plan, x, guided_model, guidance=4.5)[0], staged(plan, x, guided_model, guidance=4.5))


def test_half_precision_samples_keep_the_corrected_sample_in_float32():
    # Folding would restart UniPC's corrector from the bf16-rounded sample; for half samples the
    # corrected sample stays an fp32 register, as in the staged definition.
    plan = fewstep.make_plan("scaled_linear", "unipc", 6, order=3)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    assert not PlanExecutor(plan, "cpu", torch.float32, sample_dtype=torch.float32).folded.registers.prev
    ex = PlanExecutor(plan, "cpu", torch.float32, sample_dtype=torch.bfloat16)
    assert ex.folded.registers.prev
    y = x.bfloat16()
    for i in range(plan.n):
        y, _ = ex.step(i, y, torch.tanh(y))
    want = staged(plan, x.bfloat16().float(), lambda x, i: torch.tanh(x.bfloat16()).float(), sample_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and rel(y.float(), want[-1][0].bfloat16().float()) <= 1e-3  # folded: 7e-3


def exotic_plan(theta=None, seed=0):
    """A UniPC plan made elementwise over [4, 1, 1] with a bias, a raw-output term, DC-style compensation
    and a corrector whose x_prev coefficient differs from the predictor's (so it cannot fold)."""
    base = fewstep.make_plan("scaled_linear", "unipc", 6, order=2)
    g = torch.Generator().manual_seed(seed)
    n, h = base.n, base.history
    s = (4, 1, 1)
    scale = 1 + 0.05 * torch.randn(n, 1, *s, generator=g, dtype=torch.float64)
    if theta is not None:
        scale = scale * (1 + theta)
    predict = base.predict[..., None, None, None] * scale
    correct = base.correct[..., None, None, None] * (1 + 0.03 * torch.randn(n, 1, *s, generator=g, dtype=torch.float64))
    compensate = torch.zeros(n, h, *s, dtype=torch.float64)
    compensate[:, 0] = 1.0
    compensate[2:, 1] = 0.1 * torch.rand(n - 2, *s, generator=g, dtype=torch.float64)
    compensate[2:, 0] -= compensate[2:, 1]
    bias = 0.01 * torch.randn(n, *s, generator=g, dtype=torch.float64)
    raw = 0.02 * torch.randn(n, *s, generator=g, dtype=torch.float64)
    return SolverPlan(base.grid, "data", h, base.x0_coef, predict, correct=correct, compensate=compensate,
                      predict_bias=bias, predict_raw=raw, orders=base.orders)


def test_elementwise_bias_compensation_and_unfoldable_corrector():
    plan = exotic_plan()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got, ex = fused(plan, x, model_fn())
    assert ex.folded.registers.prev  # the corrector reads the kept previous sample
    assert_same_run(got, staged(plan, x, model_fn()))


@pytest.mark.parametrize("foldable", [True, False])
def test_history_row_and_corrector_bias(foldable):
    """DPM-Solver-v3's plan fields: an elementwise history row over (x, x0) and a corrector bias, with the
    corrector folded through the x_prev identity or (with a predictor bias) kept in the prev register."""
    base = fewstep.make_plan("scaled_linear", "unipc", 6, order=2)
    g = torch.Generator().manual_seed(4)
    n, s = base.n, (4, 1, 1)
    history_coef = 1 + 0.2 * torch.randn(n, 2, *s, generator=g, dtype=torch.float64)
    corrected = base.correct.ne(0).reshape(n, -1).any(1).reshape(n, 1, 1, 1).double()
    correct_bias = 0.03 * torch.randn(n, *s, generator=g, dtype=torch.float64) * corrected
    bias = 0.01 * torch.randn(n, *s, generator=g, dtype=torch.float64) if not foldable else None
    predict, correct = (t[..., None, None, None].expand(*t.shape, *s).clone() for t in (base.predict, base.correct))
    plan = SolverPlan(base.grid, "data", base.history, base.x0_coef, predict, correct=correct, predict_bias=bias,
                      history_coef=history_coef, correct_bias=correct_bias, orders=base.orders)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got, ex = fused(plan, x, model_fn())
    assert ex.folded.registers.prev is not foldable
    assert_same_run(got, staged(plan, x, model_fn()))
    assert_same_run(fused(plan, x, guided_model, guidance=3.0)[0], staged(plan, x, guided_model, guidance=3.0))


def test_dpm_solver_v3_plan_runs_as_defined():
    from tests.test_dpmv3 import synthetic_ems

    plan = fewstep.make_plan("linear", "dpmv3", 8, ems=synthetic_ems(n_grid=200), order=3)
    assert plan.history_coef is not None and bool(plan.correct_bias.ne(0).any())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_run(fused(plan, x, model_fn())[0], staged(plan, x, model_fn()))


def test_gradients_flow_through_folded_coefficients():
    # DC-Solver calibrates coefficients that are torch functions of parameters: the fold (corrector
    # included, folded through the x_prev identity) must give the staged computation's gradients.
    theta = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    base = fewstep.make_plan("scaled_linear", "unipc", 5, order=3)
    scale = 1 + theta * torch.linspace(0, 1, base.n, dtype=torch.float64)[:, None]
    shifted = torch.cat([scale[:1], scale[:-1]])  # step i corrects with step i - 1's x coefficient
    plan = SolverPlan(base.grid, "data", base.history, base.x0_coef, base.predict * scale,
                      correct=base.correct * shifted, orders=base.orders)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got, ex = fused(plan, x, model_fn())
    assert not ex.folded.registers.prev
    (g_fused,) = torch.autograd.grad(got[-1][0].square().sum(), theta, retain_graph=True)
    (g_staged,) = torch.autograd.grad(staged(plan, x, model_fn())[-1][0].square().sum(), theta)
    assert g_fused.abs() > 0 and math.isclose(float(g_fused), float(g_staged), rel_tol=1e-10)
    plan = exotic_plan(theta)
    (g_fused,) = torch.autograd.grad(fused(plan, x, model_fn())[0][-1][0].sum(), theta, retain_graph=True)
    (g_staged,) = torch.autograd.grad(staged(plan, x, model_fn())[-1][0].sum(), theta)
    assert math.isclose(float(g_fused), float(g_staged), rel_tol=1e-10)


class HostReads:
    """Counts Tensor methods that read values on the host."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.names:
            real = getattr(torch.Tensor, name)

            def counted(*a, _real=real, **k):
                self.count += 1
                return _real(*a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("solver", ["unipc", "dpmpp", "ddim"])
def test_executor_reads_the_table_in_bulk(monkeypatch, solver):
    # Building an executor reads its folded table a fixed number of times, however many steps.
    counts = []
    for n in (5, 40):
        plan = fewstep.make_plan("scaled_linear", solver, n, order=2) if solver != "ddim" else \
            fewstep.make_plan("scaled_linear", solver, n)
        with monkeypatch.context() as m:
            reads = HostReads(m)
            PlanExecutor(plan, "cpu", torch.float32)
        counts.append(reads.count)
    assert counts[0] == counts[1] <= 8


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op outputs with storage that none of the op's inputs had."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for a in (*args, *kwargs.values())
                for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        self.count += sum(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen
                          for t in (out if isinstance(out, (list, tuple)) else (out,)))
        return out


@pytest.mark.parametrize("solver,options", [("unipc", {"order": 3}), ("dpmpp", {"order": 2}), ("ddim", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_allocates_only_what_it_returns(solver, options, dtype):
    plan = fewstep.make_plan("scaled_linear", solver, 8, **options)
    ex = PlanExecutor(plan, "cpu", torch.float32)
    x = torch.randn(2, 4, 8, 8).to(dtype)
    counts = []
    for run in range(2):
        ex.reset()
        y = x
        for i in range(plan.n):
            out = torch.tanh(y)
            with Allocations() as allocs:
                y, x0 = ex.step(i, y, out)
                ex.check_finite_upto(i + 1)
            if run == 1 and i >= 3:
                counts.append(allocs.count)
    assert counts == [2] * len(counts)  # x_next and x0; history and finite record are written in place
    ex.reset()
    y = x
    for i in range(plan.n):
        out = torch.tanh(y)
        with Allocations() as allocs:
            y, x0 = ex.advance(i, y, out, want_x0=False)
        assert x0 is None and allocs.count == 1


def test_executor_reuse_and_load_give_fresh_runs():
    plan_a = fewstep.make_plan("scaled_linear", "unipc", 8, order=3)
    plan_b = fewstep.make_plan("scaled_linear", "unipc", 8, order=3, spacing="trailing")
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4))

    def run(ex):
        ex.reset()
        y = x
        for i in range(ex.plan.n):
            y, _ = ex.step(i, y, torch.tanh(y))
        return y

    ex = PlanExecutor(plan_a, "cpu", torch.float32)
    first = run(ex)
    assert torch.equal(run(ex), first)  # buffers reused, nothing left over
    ex.load(plan_b)  # same NFE and orders: coefficients swapped in place
    assert torch.equal(run(ex), run(PlanExecutor(plan_b, "cpu", torch.float32)))
    with pytest.raises(ValueError, match="structure differs"):
        ex.load(fewstep.make_plan("scaled_linear", "unipc", 8, order=2))


def test_fold_rejects_plans_that_read_unwritten_history():
    base = fewstep.make_plan("scaled_linear", "dpmpp", 4, order=2)
    predict = base.predict.clone()
    predict[0, 2] = 0.5  # step 0 reads D_1
    plan = SolverPlan(base.grid, "data", base.history, base.x0_coef, predict, orders=base.orders)
    with pytest.raises(ValueError, match="step 0 reads d1, which no earlier step wrote"):
        fold_plan(plan)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fp16 overflow, inside the interpreter
def test_fused_kernel_path_in_the_interpreter(monkeypatch):
    # The CUDA path (one Triton launch per step, per-operand NaN flags) run by Triton's CPU interpreter.
    pytest.importorskip("triton", reason=NO_TRITON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    from tests.test_dpmv3 import synthetic_ems

    v3 = {"ems": synthetic_ems("scaled_linear", 200, (4, 1, 1)), "order": 3}  # biases on x_next and prev
    for solver, options in [("unipc", {"order": 3}), ("ddim", {}), ("dpmpp", {"space": "noise"}), ("dpmv3", v3)]:
        plan = fewstep.make_plan("scaled_linear", solver, 6, **options)
        for transform in (None, fewstep.DynamicThreshold()):
            torch_ex = PlanExecutor(plan, "cpu", torch.float32, transform)
            triton_ex = PlanExecutor(plan, "cpu", torch.float32, transform)
            triton_ex._fused = True
            y = z = x
            for i in range(plan.n):
                y, y0 = torch_ex.step(i, y, torch.tanh(y))
                z, z0 = triton_ex.step(i, z, torch.tanh(z))
                assert rel(z, y) <= 1e-5 and rel(z0, y0) <= 1e-5
            triton_ex.raise_if_nonfinite()
    plan = fewstep.make_plan("scaled_linear", "unipc", 6)
    for bad, message in [("model", "model output at step 2"), ("overflow", "solver's update at step 2")]:
        ex = PlanExecutor(plan, "cpu", torch.float32)
        ex._fused = True
        y = x.half()
        with pytest.raises(FloatingPointError, match=message):
            for i in range(plan.n):
                out = torch.tanh(y)
                if i == 2:
                    out = out * float("nan") if bad == "model" else out + 6e4
                y, _ = ex.step(i, y, out)
                ex.check_finite_upto(i + 1)


def test_set_timesteps_is_cached(monkeypatch):
    s = UniPCScheduler.from_config(SD, order=3)
    s.set_timesteps(10)
    plan, timesteps = s.plan, s.timesteps
    first = int(timesteps[0])
    x = torch.randn(1, 4, 8, 8)
    for t in s.timesteps:
        x = s.step(torch.tanh(x), t, x).prev_sample
    executor = s._executor
    builds = []
    monkeypatch.setattr(type(s.solver), "plan", lambda self, *a, **k: builds.append(a) or pytest.fail("rebuilt"))
    timesteps[0] = -1  # the caller's copy: the cache keeps its own
    s.set_timesteps(10)
    assert s.plan is plan and int(s.timesteps[0]) == first and not builds
    y = torch.randn(1, 4, 8, 8)
    s.step(torch.tanh(y), s.timesteps[0], y)
    assert s._executor is executor  # reused (reset) for the same grid, device and dtype
    monkeypatch.undo()
    s.set_timesteps(12)
    assert s.plan is not plan and s.num_inference_steps == 12


def test_cached_runs_equal_fresh_ones():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))

    def run(s, n):
        s.set_timesteps(n)
        y = x
        for t in s.timesteps:
            y = s.step(torch.tanh(y) + t / 1000, t, y).prev_sample
        return y

    s = DPMSolverPPScheduler.from_config(SD, order=3)
    results = [run(s, n) for n in (6, 9, 6, 9)]
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    assert torch.equal(results[0], run(DPMSolverPPScheduler.from_config(SD, order=3), 6))


def test_reset_twice_reuses_each_buffer_once():
    plan = fewstep.make_plan("scaled_linear", "unipc", 6, order=3)
    ex = PlanExecutor(plan, "cpu", torch.float32)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8))

    def run():
        y = x
        for i in range(plan.n):
            y, _ = ex.step(i, y, torch.tanh(y))
        return y

    first = run()
    ex.reset()
    ex.reset()
    assert len({id(t) for t in ex._pool}) == len(ex._pool)
    assert torch.equal(run(), first)
