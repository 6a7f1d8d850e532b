"""Time-Shift's official form (mode="target"): the official DDIM step, every solver, the pipeline hook."""

import pytest
import torch

import fewstep
from fewstep import TimeShift
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(dim=16, components=4, num_classes=2, seed=0)
MODEL = GMMModel(MIX)
LINEAR = fewstep.make_schedule("linear")


def x_T(n=6):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def official_ddim(x, window, cutoff, nfe):
    """An independent spelled-out DDIM with the official target shift (TS-DPM-ADM ``ddim_sample``).

    The network stays on the grid t_i; from the sample's variance, t_s in t_i +- window/2; the step's
    target is t_s - (t_i - t_{i+1}); the first step (no history) and the step to sigma = 0 keep theirs.
    """
    abar = LINEAR.alphas_cumprod.double()
    grid = fewstep.make_plan(LINEAR, "ddim", nfe).grid
    ts = grid.model_timesteps.double()
    for i in range(nfe):
        eps = MODEL(x, ts[i].expand(len(x)))
        x0 = (x - grid.sigma[i] * eps) / grid.alpha[i]
        a, s = grid.alpha[i + 1].expand(len(x)), grid.sigma[i + 1].expand(len(x))
        if i > 0 and float(ts[i]) > cutoff and float(grid.sigma[i + 1]) > 0:
            cand = torch.arange(int(ts[i]) - window // 2, int(ts[i]) + window // 2 + 1).clamp(0, 999)
            k = (x.var(1)[:, None].float() - (1 - abar[cand])[None].float()).abs().argmin(1)
            target = (cand[k] - (ts[i] - ts[i + 1])).clamp(0, 999).long()
            a, s = abar[target].sqrt(), (1 - abar[target]).sqrt()
        x = a[:, None] * x0 + s[:, None] * eps
    return x


@pytest.mark.parametrize("window,cutoff", [(40, 0), (80, 300), (10, 600)])
def test_target_mode_ddim_is_the_official_step(window, cutoff):
    ours = fewstep.sample(MODEL, x_T(), solver="ddim", nfe=8, time_shift=TimeShift(window, cutoff))
    # float64 throughout; the two differ only in how x0/eps are combined (rounding).
    torch.testing.assert_close(ours, official_ddim(x_T(), window, cutoff, 8), rtol=1e-10, atol=1e-10)
    assert TimeShift(window, cutoff).mode == "target"


@pytest.mark.parametrize("solver,options", [("ddim", {}), ("dpmpp", {}), ("unipc", {"order": 3}), ("dc", {}),
                                            ("dpmpp", {"variant": "heun"})])
def test_target_mode_for_every_solver_keeps_the_network_on_the_grid(solver, options):
    plain = fewstep.sample(MODEL, x_T(), solver=solver, nfe=8, **options)
    for rule in (TimeShift(0, 0), TimeShift(40, 999), [1, 0, "target"]):
        assert torch.equal(fewstep.sample(MODEL, x_T(), solver=solver, nfe=8, time_shift=rule, **options), plain)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return MODEL(x, t)

    plan = fewstep.make_plan(LINEAR, solver, 8, **options)
    shifted = fewstep.sample(model, x_T(), plan=plan, time_shift=TimeShift(40, 0))
    assert float((shifted - plain).abs().max()) > 1e-4
    grid_t = set(plan.grid.model_timesteps.float().tolist())
    assert all(len(set(t.tolist())) == 1 and t[0].item() in grid_t for t in seen)  # one grid timestep per call


def test_input_mode_is_the_previous_behaviour_and_modes_differ():
    rule_in = TimeShift(40, 0, "input")
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return MODEL(x, t)

    a = fewstep.sample(model, x_T(), solver="unipc", nfe=6, time_shift=rule_in)
    assert any(len(set(t.tolist())) > 1 for t in seen)  # per-sample network timesteps
    assert torch.equal(a, fewstep.sample(MODEL, x_T(), solver="unipc", nfe=6, time_shift={"window": 40, "cutoff": 0,
                                                                                           "mode": "input"}))
    b = fewstep.sample(MODEL, x_T(), solver="unipc", nfe=6, time_shift=[40, 0])
    assert float((a - b).abs().max()) > 1e-4


def test_moves_skip_the_first_and_last_step_and_contain_the_plain_step_exactly():
    rule = TimeShift(40, 0)
    plan = fewstep.make_plan(LINEAR, "unipc", 6)
    moves = rule.target_moves(plan.grid, "cpu", torch.float64)
    assert moves[0] is None and moves[-1] is None and all(m is not None for m in moves[1:-1])
    for m in moves[1:-1]:  # the plain step is among the candidates, exactly
        k = int((m.p == 1).nonzero()[0]) if bool((m.p == 1).any()) else None
        assert k is not None and m.q[k] == 0


def test_target_moves_read_nothing_on_the_host(monkeypatch):
    moves = [m for m in TimeShift(20, 0).target_moves(fewstep.make_plan(LINEAR, "unipc", 5).grid, "meta")
             if m is not None]
    x = torch.empty(3, 1, 8, 8, device="meta")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host read: Tensor.{_n}"))
    for m in moves:
        assert m.apply(x, x, x).shape == x.shape
    monkeypatch.undo()
    assert len(moves) == 3


def test_bad_modes_and_hooks_are_rejected():
    with pytest.raises(ValueError, match="time_shift mode"):
        TimeShift(10, 0, "output")
    with pytest.raises(ValueError, match="target_moves is the target-mode table"):
        TimeShift(10, 0, "input").target_moves(fewstep.make_plan(LINEAR, "ddim", 4).grid, "cpu")
    with pytest.raises(ValueError, match="mode='target' moves the step targets of a fewstep scheduler"):
        fewstep.time_shift(torch.nn.Conv2d(1, 1, 1), window=20, schedule=LINEAR)


@pytest.fixture(scope="module")
def digits_pipe():
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline(fewstep.UniPCScheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_target_hook_equals_fewstep_sample_and_is_undone(digits_pipe):
    pipe = digits_pipe
    latents = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def run():
        return pipe(class_labels=[0, 1, 2, 3, 4, 5], num_inference_steps=6, latents=latents, output_type="pt",
                    guidance_scale=3.0).images

    plain = run()
    with fewstep.time_shift(pipe, window=40, cutoff=0):
        shifted = run()
    assert torch.equal(run(), plain) and "step" not in pipe.scheduler.__dict__
    labels = torch.arange(6)
    with torch.no_grad():
        x = fewstep.sample(lambda x, t, c: pipe.unet(x, t, class_labels=c).sample, latents,
                           schedule=pipe.scheduler.schedule, solver="unipc", nfe=6,
                           spacing=fewstep.GridSpec(spacing="linspace", convention="multistep"), guidance=3.0,
                           cond=labels, uncond=torch.full_like(labels, 10), time_shift=TimeShift(40, 0))
    # The pipeline runs the UNet on another batch layout than fewstep.sample: float32 kernels round
    # differently (1.3e-5 with AVX2-only kernels), so not bitwise.
    torch.testing.assert_close(x.clamp(-1, 1), shifted, rtol=1e-4, atol=1e-4)
    assert float((shifted - plain).abs().max()) > 1e-3
    from diffusers import DDIMScheduler

    foreign = type("P", (), {"unet": pipe.unet, "scheduler": DDIMScheduler()})()
    with pytest.raises(ValueError, match="got scheduler DDIMScheduler"):
        fewstep.time_shift(foreign, window=40)
    fewstep.time_shift(foreign, window=40, mode="input").remove()

