"""Time-Shift sampler: the variance-matching rule, exact no-op cases, no host syncs, the diffusers hook."""

import numpy as np
import pytest
import torch

import fewstep
from fewstep import TimeShift
from fewstep.samplers.plan import PlanExecutor
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(dim=16, components=4, num_classes=2, seed=0)
MODEL = GMMModel(MIX)
LINEAR = fewstep.make_schedule("linear")


def x_T(n=6):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("solver,options", [("ddim", {}), ("dpmpp", {}), ("unipc", {"order": 3}), ("dc", {})])
def test_window_zero_or_a_cutoff_above_every_timestep_is_the_plain_solver(solver, options):
    plain = fewstep.sample(MODEL, x_T(), solver=solver, nfe=8, **options)
    for rule in (TimeShift(0, 0), TimeShift(1, 0), {"window": 40, "cutoff": 999}, [40, 1000.0]):
        assert torch.equal(fewstep.sample(MODEL, x_T(), solver=solver, nfe=8, time_shift=rule, **options), plain)
    shifted = fewstep.sample(MODEL, x_T(), solver=solver, nfe=8, time_shift=TimeShift(40, 0), **options)
    assert float((shifted - plain).abs().max()) > 1e-4


def test_selection_matches_a_brute_force_search_over_the_window():
    abar = LINEAR.alphas_cumprod.numpy()
    rule = TimeShift(window=30, cutoff=0)
    g = np.random.default_rng(0)
    for t in (980.0, 500.0, 7.0, 999.0, 0.0):
        x = torch.tensor(g.normal(size=(5, 64)) * g.uniform(0.2, 1.0, size=(5, 1)))
        tau, var = rule.candidates(LINEAR, torch.tensor(t))
        got = TimeShift.select(x, tau, var).tolist()
        window = [k for k in range(int(t) - 15, int(t) + 16) if 0 <= k <= 999]
        for row, chosen in zip(x.numpy(), got):
            v = row.var(ddof=1)
            assert chosen == min(window, key=lambda k: (abs(v - (1 - abar[k])), k))


def test_fractional_and_continuous_schedules_use_the_schedules_own_sigma():
    rule = TimeShift(window=10, cutoff=0)
    tau, var = rule.candidates(LINEAR, torch.tensor([512.25]))
    _, sigma = LINEAR.alpha_sigma(tau[0])
    torch.testing.assert_close(var[0], sigma**2, rtol=1e-12, atol=0)
    flow = fewstep.make_schedule("flow")
    tau, var = rule.candidates(flow, torch.tensor([997.0]))
    assert tau.max().item() == 1000.0 and torch.allclose(var, (tau / 1000) ** 2)


def test_model_sees_the_shifted_timesteps_and_the_solver_keeps_its_coefficients():
    rule = TimeShift(window=60, cutoff=300, mode="input")
    plan = fewstep.make_plan(LINEAR, "unipc", 6)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return MODEL(x, t)

    out = fewstep.sample(model, x_T(), plan=plan, time_shift=rule)
    ex = PlanExecutor(plan, "cpu", torch.float64)
    x = x_T()
    for i, t_nominal in enumerate(plan.grid.model_timesteps.tolist()):
        if t_nominal > 300:
            t = TimeShift.select(x, *rule.candidates(LINEAR, torch.tensor(t_nominal)))
            assert (t - t_nominal).abs().max() <= 30 and torch.equal(seen[i].double(), t)
        else:
            t = torch.full((x.shape[0],), t_nominal, dtype=torch.float64)
            assert torch.equal(seen[i].double(), t)
        x, _ = ex.step(i, x, MODEL(x, t.float()))
    assert torch.equal(out, x)
    assert any(len(set(s.tolist())) > 1 for s in seen)  # per-sample timesteps


def test_time_shift_reads_nothing_on_the_host(monkeypatch):
    # On the meta device any value read fails; the guard also refuses every host-reading method.
    rule = TimeShift(20, 0, mode="input")
    shifts = [s for s in rule.for_grid(fewstep.make_plan(LINEAR, "dpmpp", 5).grid, "meta") if s is not None]
    net = torch.nn.Conv2d(1, 1, 1).to("meta")
    hook = fewstep.time_shift(net, window=20, cutoff=100, mode="input", schedule=LINEAR)
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[1]))  # runs after the shift
    x = torch.empty(3, 1, 8, 8, device="meta")
    net.forward = lambda x, t: x  # the pre-hook runs first; the module itself need not take t
    net(x, torch.tensor(500, device="meta"))  # builds the per-device table once
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host read: Tensor.{_n}"))
    for tau, var in shifts:
        assert TimeShift.select(x, tau, var).shape == (3,)
    net(x, torch.tensor(500, device="meta"))
    monkeypatch.undo()
    hook.remove()
    assert len(shifts) == 5 and seen[-1].shape == (3,) and seen[-1].device.type == "meta"


def test_bad_rules_are_rejected():
    with pytest.raises(ValueError, match="time_shift window=-1 is out of range"):
        TimeShift(-1, 0)
    with pytest.raises(TypeError, match="time_shift cutoff='x' must be a real number"):
        TimeShift(10, "x")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['size'\]"):
        fewstep.sample(MODEL, x_T(), nfe=3, time_shift={"size": 3})
    with pytest.raises(TypeError, match="time_shift=5 must be fewstep.TimeShift"):
        fewstep.sample(MODEL, x_T(), nfe=3, time_shift=5)


@pytest.fixture(scope="module")
def digits_pipe():
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline(fewstep.UniPCScheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_run(pipe, **kw):
    latents = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return pipe(class_labels=[0, 1, 2, 3, 4, 5], num_inference_steps=6, latents=latents, output_type="pt",
                guidance_scale=3.0, **kw).images


def test_pipeline_hook_equals_the_functional_time_shift_and_is_undone(digits_pipe):
    pipe = digits_pipe
    plain = _pipe_run(pipe)
    with fewstep.time_shift(pipe, window=0):
        assert torch.equal(_pipe_run(pipe), plain)
    hook = fewstep.time_shift(pipe, window=40, cutoff=200)
    try:
        with pytest.raises(ValueError, match="already time-shifted"):
            fewstep.time_shift(pipe, window=10)
        shifted = _pipe_run(pipe)
    finally:
        hook.remove()
    assert torch.equal(_pipe_run(pipe), plain) and float((shifted - plain).abs().max()) > 1e-3
    # The same sampler through fewstep.sample: UniPC on the scheduler's grid, CFG, per-sample shift.
    unet = pipe.unet
    labels = torch.arange(6)
    latents = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = fewstep.sample(lambda x, t, c: unet(x, t, class_labels=c).sample, latents, schedule=pipe.scheduler.schedule,
                           solver="unipc", nfe=6, spacing=fewstep.GridSpec(spacing="linspace", convention="multistep"),
                           guidance=3.0, cond=labels, uncond=torch.full_like(labels, 10),
                           time_shift=TimeShift(40, 200))
    # The pipeline runs the UNet on another batch layout than fewstep.sample: float32 kernels round
    # differently (1.3e-5 with AVX2-only kernels), so not bitwise.
    torch.testing.assert_close(x.clamp(-1, 1), shifted, rtol=1e-4, atol=1e-4)


def test_compare_runs_time_shift_specs(tmp_path, monkeypatch):
    from fewstep.cli import main

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    assert main(["compare", "--model", "gmm", "--solvers", "ddim", "ddim:time_shift=[40,0]", "ddim:time_shift=[0,0]",
                 "--nfe", "6", "--num-samples", "8", "--out", str(tmp_path / "run"), "--no-progress", "--no-plot"]) == 0
    import json

    entries = {e["method"]: e["mse"] for e in json.loads((tmp_path / "run" / "results.json").read_text())["entries"]}
    assert entries["ddim"] == entries["ddim(time_shift=[0, 0])"] != entries["ddim(time_shift=[40, 0])"]
