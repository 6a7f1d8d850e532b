"""torch.compile and captured runs: the step index is never a specialised constant, so a run compiles
twice (its first step, then one graph for all the others), matches eager exactly, and a later run with
other timesteps reads its own coefficients (review finding 12: the step used to recompile every step)."""

import warnings

import pytest
import torch

import fewstep
from fewstep import DDIMSolverScheduler, DPMSolverPPScheduler, UniPCScheduler
from fewstep.samplers.capture import CapturedRun
from fewstep.samplers.plan import PlanExecutor
from fewstep.samplers.sampling import model_step

warnings.filterwarnings("ignore", category=FutureWarning)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
SCHEDULERS = [(UniPCScheduler, {"order": 3}), (DPMSolverPPScheduler, {"order": 3}),
              pytest.param(DDIMSolverScheduler, {}, marks=pytest.mark.slow)]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (dynamo only by default: exact, fast)."""

    def __init__(self, inner="eager"):
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model(x, t):
    return torch.tanh(x) * 0.8 + t.reshape(-1, *([1] * (x.dim() - 1))) / 2000


def scheduler_loop(step, s, x, **set_timesteps):
    s.set_timesteps(**set_timesteps)
    graphs = []
    for t in s.timesteps:
        x = step(model(x, t), t, x, return_dict=False)[0]
        graphs.append(x)
    return x


@pytest.mark.parametrize("cls,options", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_compiled_scheduler_step_compiles_twice_and_matches_eager(cls, options):
    backend = CountingBackend()
    s = cls.from_config(SD, **options)
    step = torch.compile(s.step, backend=backend)
    eager = cls.from_config(SD, **options)
    x = xe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s.set_timesteps(12)
    eager.set_timesteps(12)
    counts = []
    for t in s.timesteps:
        x = step(model(x, t), t, x, return_dict=False)[0]
        xe = eager.step(model(xe, t), t, xe).prev_sample
        counts.append(backend.graphs)
        assert torch.equal(x, xe)
    assert counts[1] == counts[-1]  # nothing compiled after the first two steps
    # A second set of timesteps (same NFE) reuses the graphs and reads its own coefficients.
    custom = [980, 900, 830, 700, 620, 500, 450, 300, 220, 150, 90, 20]
    compiled = scheduler_loop(step, s, torch.ones(1, 4, 8, 8), timesteps=custom)
    reference = scheduler_loop(eager.step, eager, torch.ones(1, 4, 8, 8), timesteps=custom)
    assert torch.equal(compiled, reference) and backend.graphs == counts[-1]


@pytest.mark.parametrize("solver,options", [("unipc", {"order": 3}),
                                            pytest.param("dpmpp", {"order": 2}, marks=pytest.mark.slow),
                                            pytest.param("ddim", {}, marks=pytest.mark.slow)])
def test_compiled_executor_step_is_one_full_graph(solver, options):
    plan = fewstep.make_plan("scaled_linear", solver, 10, **options)
    threshold = fewstep.DynamicThreshold()
    compiled_ex, eager_ex = (PlanExecutor(plan, "cpu", torch.float32, threshold) for _ in range(2))
    backend = CountingBackend()
    step = torch.compile(compiled_ex.step, fullgraph=True, backend=backend)
    x = xe = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    for i in range(plan.n):
        x, x0 = step(i, x, torch.tanh(x))
        xe, x0e = eager_ex.step(i, xe, torch.tanh(xe))
        assert torch.equal(x, xe) and torch.equal(x0, x0e)
    compiled_ex.raise_if_nonfinite()
    assert backend.graphs == 2


def test_compiled_sampling_run_reads_each_runs_coefficients():
    backend = CountingBackend()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    cond, uncond = torch.tensor([0.3, -0.2]), torch.zeros(2)

    def cond_model(x, t, c):
        return model(x, t) + c.reshape(-1, 1, 1, 1)

    for spacing in ("linspace", "trailing"):  # same NFE, other timesteps: no new graph
        for kwargs in ({}, {"guidance": 5.0, "cond": cond, "uncond": uncond}):
            m = cond_model if kwargs else model
            eager = fewstep.sample(m, x, solver="unipc", nfe=8, spacing=spacing, **kwargs)
            compiled = fewstep.sample(m, x, solver="unipc", nfe=8, spacing=spacing, compile={"backend": backend},
                                      **kwargs)
            assert torch.equal(compiled, eager)
        if spacing == "linspace":
            graphs = backend.graphs
    assert graphs == 4 and backend.graphs == graphs  # two per model call signature, none for new timesteps


def test_captured_loop_replays_new_coefficients_and_inputs():
    # What graph=True records and replays, run here without CUDA: the loop over static buffers,
    # then a second plan (same NFE and orders) loaded into those buffers in place.
    plan_a = fewstep.make_plan("scaled_linear", "unipc", 8, order=3)
    plan_b = fewstep.make_plan("scaled_linear", "unipc", 8, order=3, spacing="trailing")
    x_a = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    x_b = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    runner = PlanExecutor(plan_a, "cpu", torch.float32)
    run = CapturedRun(model_step, model, runner, x_a, plan_a.grid.model_timesteps.float(), None)
    assert torch.equal(run.loop(), fewstep.sample(model, x_a, plan=plan_a))
    static = (run.x, run.ts, runner._rows)
    run.load(plan_b, x_b, plan_b.grid.model_timesteps.float(), None)
    runner.reset()
    assert torch.equal(run.loop(), fewstep.sample(model, x_b, plan=plan_b))
    assert all(a is b for a, b in zip(static, (run.x, run.ts, runner._rows)))  # same buffers, new values


def test_compile_and_graph_options_are_validated():
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="graph=True .* needs a CUDA sample, got cpu"):
        fewstep.sample(model, x, nfe=3, graph=True)
    with pytest.raises(TypeError, match="compile must be True/False or a dict"):
        fewstep.sample(model, x, nfe=3, compile="max-autotune")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="callback"):
            fewstep.sample(model, x.cuda(), nfe=3, graph=True, callback=print)


@pytest.mark.slow
@pytest.mark.parametrize("cls,options", SCHEDULERS[:2], ids=lambda v: getattr(v, "__name__", str(v)))
def test_inductor_compiled_scheduler_loop(cls, options):
    # The real compiler: one fused kernel per step; equal to eager up to float32 rounding.
    s, eager = cls.from_config(SD, **options), cls.from_config(SD, **options)
    step = torch.compile(s.step)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    compiled = scheduler_loop(step, s, x, num_inference_steps=10)
    reference = scheduler_loop(eager.step, eager, x, num_inference_steps=10)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
    out = fewstep.sample(model, x, solver="unipc", nfe=10, compile=True)
    torch.testing.assert_close(out, fewstep.sample(model, x, solver="unipc", nfe=10), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_a_second_set_of_timesteps():
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    first = fewstep.sample(model, x, solver="unipc", nfe=8, graph=True)
    torch.testing.assert_close(first, fewstep.sample(model, x, solver="unipc", nfe=8))
    for spacing in ("trailing", "leading"):
        replayed = fewstep.sample(model, x * 0.5, solver="unipc", nfe=8, spacing=spacing, graph=True)
        torch.testing.assert_close(replayed, fewstep.sample(model, x * 0.5, solver="unipc", nfe=8, spacing=spacing))
