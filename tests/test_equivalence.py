"""Numerical equivalence with diffusers' own schedulers where they overlap (float64).

Both sides see the same model outputs: a fixed nonlinear function of (x, t). Every
intermediate sample must agree to 1e-5 relative wherever diffusers' value is finite.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import fewstep
from fewstep import DDIMSolverScheduler, DPMSolverPPScheduler, FewstepScheduler, UniPCScheduler

SD_CONFIG = {  # Stable Diffusion 1.x scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
RTOL = 1e-5


def fake_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *[1] * (x.dim() - 1))
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


def trajectory(scheduler, n, x_T, model=fake_model, **set_kwargs):
    scheduler.set_timesteps(n, **set_kwargs)
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        scheduler.sigmas = scheduler.sigmas.double()  # run diffusers' arithmetic in float64 too
    x, out = x_T.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
        out.append(x)
    return out


def assert_same_trajectory(ours, theirs, allow_nonfinite_final=False):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.isfinite(a).all(), f"fewstep produced non-finite values at step {i}"
        if not torch.isfinite(b).all():
            assert allow_nonfinite_final and i == len(theirs) - 1, f"diffusers non-finite at step {i}"
            continue
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= RTOL, f"step {i}: relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _pair(ours_cls, theirs_cls, config, ours_kwargs, theirs_kwargs):
    return ours_cls.from_config(config, **ours_kwargs), theirs_cls.from_config(config, **theirs_kwargs)


@pytest.mark.parametrize("n", [5, 8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["midpoint", "heun"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_matches_dpmsolver_multistep(x_T, n, order, variant, spacing):
    cfg = {**SD_CONFIG, "timestep_spacing": spacing}
    ours, theirs = _pair(DPMSolverPPScheduler, DPMSolverMultistepScheduler, cfg,
                         dict(order=order, variant=variant), dict(solver_order=order, solver_type=variant))
    assert_same_trajectory(trajectory(ours, n, x_T), trajectory(theirs, n, x_T))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_prediction_types_and_final_sigma(x_T, prediction, order, final):
    cfg = {**SD_CONFIG, "prediction_type": prediction, "final_sigmas_type": final}
    ours, theirs = _pair(DPMSolverPPScheduler, DPMSolverMultistepScheduler, cfg, dict(order=order),
                         dict(solver_order=order))
    assert_same_trajectory(trajectory(ours, 12, x_T), trajectory(theirs, 12, x_T))


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("lower_order_final,euler_at_final", [(False, False), (False, True), (True, True)])
def test_dpmpp_final_order_rules(x_T, n, lower_order_final, euler_at_final):
    cfg = {**SD_CONFIG, "final_sigmas_type": "sigma_min"}  # "zero" would force order 1 on both sides
    ours, theirs = _pair(DPMSolverPPScheduler, DPMSolverMultistepScheduler, cfg,
                         dict(order=3, lower_order_final=lower_order_final, euler_at_final=euler_at_final),
                         dict(solver_order=3, lower_order_final=lower_order_final, euler_at_final=euler_at_final))
    assert_same_trajectory(trajectory(ours, n, x_T), trajectory(theirs, n, x_T))
    assert ours.plan.orders[-1] == (1 if euler_at_final or (lower_order_final and n < 15) else 3)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["midpoint", "heun"])
def test_noise_space_dpmsolver_matches(x_T, order, variant):
    # diffusers' "dpmsolver" (noise prediction) only supports final_sigmas_type="sigma_min".
    cfg = {**SD_CONFIG, "final_sigmas_type": "sigma_min"}
    ours, theirs = _pair(DPMSolverPPScheduler, DPMSolverMultistepScheduler, cfg,
                         dict(order=order, variant=variant, space="noise"),
                         dict(solver_order=order, solver_type=variant, algorithm_type="dpmsolver"))
    assert_same_trajectory(trajectory(ours, 10, x_T), trajectory(theirs, 10, x_T))


def test_dpmpp_dynamic_thresholding_matches(x_T):
    cfg = {**SD_CONFIG, "thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}
    ours, theirs = _pair(DPMSolverPPScheduler, DPMSolverMultistepScheduler, cfg, {}, {})
    assert_same_trajectory(trajectory(ours, 10, 3 * x_T), trajectory(theirs, 10, 3 * x_T))


@pytest.mark.parametrize("n", [5, 8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_unipc_matches_unipc_multistep(x_T, n, order, variant, spacing):
    cfg = {**SD_CONFIG, "timestep_spacing": spacing}
    ours, theirs = _pair(UniPCScheduler, UniPCMultistepScheduler, cfg, dict(order=order, variant=variant),
                         dict(solver_order=order, solver_type=variant))
    # diffusers' bh1 returns NaN on the final step to sigma = 0 (B(h) = -inf times 0).
    assert_same_trajectory(trajectory(ours, n, x_T), trajectory(theirs, n, x_T), allow_nonfinite_final=variant == "bh1")


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_noise_space_no_lower_order_final_and_disabled_corrector(x_T, order, variant):
    cfg = {**SD_CONFIG, "final_sigmas_type": "sigma_min"}
    ours, theirs = _pair(
        UniPCScheduler, UniPCMultistepScheduler, cfg,
        dict(order=order, variant=variant, space="noise", lower_order_final=False, disable_corrector=[1, 4]),
        dict(solver_order=order, solver_type=variant, predict_x0=False, lower_order_final=False,
             disable_corrector=[1, 4]),
    )
    assert_same_trajectory(trajectory(ours, 9, x_T), trajectory(theirs, 9, x_T))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_unipc_prediction_types(x_T, prediction):
    cfg = {**SD_CONFIG, "prediction_type": prediction}
    ours, theirs = _pair(UniPCScheduler, UniPCMultistepScheduler, cfg, dict(order=3), dict(solver_order=3))
    assert_same_trajectory(trajectory(ours, 10, x_T), trajectory(theirs, 10, x_T))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [4, 10, 50])
def test_ddim_matches_ddimscheduler(x_T, spacing, set_alpha_to_one, prediction, n):
    cfg = {**SD_CONFIG, "timestep_spacing": spacing, "set_alpha_to_one": set_alpha_to_one,
           "prediction_type": prediction}
    ours, theirs = _pair(DDIMSolverScheduler, DDIMScheduler, cfg, {}, {})
    assert ours.config.set_alpha_to_one is set_alpha_to_one
    assert_same_trajectory(trajectory(ours, n, x_T), trajectory(theirs, n, x_T))


@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (3.0, False), (1.0, True)])
def test_ddim_on_flow_is_flowmatch_euler(x_T, shift, dynamic):
    # With alpha = 1 - sigma and x0 = x - sigma v, the DDIM step is exactly Euler on v.
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    ours = DDIMSolverScheduler.from_config(theirs.config)
    assert ours.config.prediction_type == "flow_prediction"
    kw = {"mu": 0.9} if dynamic else {}
    assert_same_trajectory(trajectory(ours, 12, x_T, **kw), trajectory(theirs, 12, x_T, **kw))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_flow_matches_unipc_use_flow_sigmas(x_T, order, variant):
    config = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=order,
                  solver_type=variant)
    theirs = UniPCMultistepScheduler(**config)
    ours = UniPCScheduler.from_config(theirs.config, order=order, variant=variant)
    assert ours.config.shift == 3.0
    sigmas = np.array([0.97, 0.9, 0.7, 0.5, 0.3, 0.15, 0.05])  # both shift these by 3
    # diffusers' UniPC truncates flow timesteps to integers (fewstep keeps sigma * 1000 exact), so
    # the model here ignores t: what is compared is the solver arithmetic.
    ours.set_timesteps(sigmas=sigmas)
    theirs.set_timesteps(sigmas=sigmas)
    assert not torch.equal(ours.timesteps, ours.timesteps.round())
    assert (theirs.timesteps - ours.timesteps).abs().max() <= 1

    def model(x, t):
        return fake_model(x, torch.zeros_like(t))

    assert_same_trajectory(trajectory(ours, None, x_T, model, sigmas=sigmas),
                           trajectory(theirs, None, x_T, model, sigmas=sigmas), allow_nonfinite_final=variant == "bh1")


@pytest.mark.parametrize("ours_cls,theirs_cls,options", [
    (UniPCScheduler, UniPCMultistepScheduler, dict(order=2)),
    (UniPCScheduler, UniPCMultistepScheduler, dict(order=3, variant="bh1")),
    (DPMSolverPPScheduler, DPMSolverMultistepScheduler, dict(order=2)),
    (DPMSolverPPScheduler, DPMSolverMultistepScheduler, dict(order=3, variant="heun")),
], ids=["unipc2", "unipc3-bh1", "dpmpp2", "dpmpp3-heun"])
@pytest.mark.parametrize("n", [5, 10])
def test_wan_style_flow_configs_default_grid(x_T, ours_cls, theirs_cls, options, n):
    """use_flow_sigmas + flow_shift configs (Wan): same default grid and trajectory as diffusers."""
    kw = {"order": "solver_order", "variant": "solver_type"}
    theirs = theirs_cls(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction",
                        **{kw[k]: v for k, v in options.items()})
    ours = ours_cls.from_config(theirs.config)
    assert ours.solver.config == {**ours.solver.config, **options}  # solver_order/solver_type carried over

    def model(x, t):  # diffusers truncates flow timesteps to integers; compare the solver arithmetic
        return fake_model(x, torch.zeros_like(t))

    a, b = trajectory(ours, n, x_T, model), trajectory(theirs, n, x_T, model)
    torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas.float())
    assert_same_trajectory(a, b, allow_nonfinite_final=options.get("variant") == "bh1")


def test_functional_api_equals_scheduler_path(x_T):
    sched = UniPCScheduler.from_config(SD_CONFIG, order=3)
    via_scheduler = trajectory(sched, 7, x_T)[-1]
    via_sample = fewstep.sample(fake_model, x_T, schedule=sched.schedule, solver="unipc", nfe=7, order=3)
    torch.testing.assert_close(via_sample, via_scheduler, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver,options", [
    ("ddim", {}), ("dpmpp", {"order": 1}), ("dpmpp", {"order": 2}), ("dpmpp", {"order": 3, "variant": "heun"}),
    ("dpmpp", {"order": 3, "space": "noise"}), ("unipc", {"order": 1, "variant": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False}),
    ("unipc", {"order": 3, "variant": "bh2", "space": "noise", "lower_order_final": False}),
    ("dpmpp", {"order": 3, "lower_order_final": False, "euler_at_final": False}),
])
@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_final_step_to_sigma_zero_is_finite(x_T, solver, options, prediction_type):
    # (SD's set_alpha_to_one=False would make DDIM end on alphas_cumprod[0], as DDIMScheduler does)
    cfg = {**SD_CONFIG, "prediction_type": prediction_type, "set_alpha_to_one": True}
    sched = FewstepScheduler.from_config(cfg, solver=solver, solver_options=options)
    if solver == "unipc" and options.get("space") == "noise" and prediction_type == "flow_prediction":
        with pytest.raises(ValueError, match="space='noise' cannot correct a step that starts at alpha = 1e-06"):
            sched.set_timesteps(6)  # refused: see tests/test_hardening.py (fuzz 18)
        return
    xs = trajectory(sched, 6, x_T)
    assert float(sched.sigmas[-1]) == 0.0
    assert torch.isfinite(xs[-1]).all()
    # The step into sigma = 0 returns the data prediction at the last evaluated point.
    assert sched.plan.orders[-1] == 1


@pytest.mark.parametrize("ours_cls,theirs_cls,options", [
    (DPMSolverPPScheduler, DPMSolverMultistepScheduler, {"order": 3}),
    (UniPCScheduler, UniPCMultistepScheduler, {"order": 3}),
], ids=["dpmpp3", "unipc3"])
@pytest.mark.parametrize("n,begin", [(10, 4), (20, 10), (30, 20)])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_img2img_begin_index_matches_diffusers(x_T, ours_cls, theirs_cls, options, n, begin, final):
    cfg = {**SD_CONFIG, "final_sigmas_type": final}
    kw = {"order": "solver_order"}
    ours, theirs = _pair(ours_cls, theirs_cls, cfg, options, {kw[k]: v for k, v in options.items()})
    outs = []
    for s in (ours, theirs):
        s.set_timesteps(n)
        s.sigmas = s.sigmas.double()
        s.set_begin_index(begin)
        x = x_T.clone()
        for t in s.timesteps[begin:]:
            x = s.step(fake_model(x, t.expand(x.shape[0])), t, x).prev_sample
        outs.append(x)
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() <= RTOL


@pytest.mark.parametrize("cfg_extra", [
    {"clip_sample": True, "clip_sample_range": 1.0},
    {"clip_sample": True, "clip_sample_range": 0.7, "prediction_type": "v_prediction"},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
])
def test_ddim_with_clipping_or_thresholding_matches(x_T, cfg_extra):
    # DDIMScheduler clips x0 but keeps the raw model eps in its update; so does fewstep's DDIM.
    cfg = {**SD_CONFIG, "timestep_spacing": "trailing", "set_alpha_to_one": True, **cfg_extra}
    ours, theirs = _pair(DDIMSolverScheduler, DDIMScheduler, cfg, {}, {})
    assert_same_trajectory(trajectory(ours, 10, 3 * x_T), trajectory(theirs, 10, 3 * x_T))


def test_config_chains_behave_like_diffusers():
    # SD -> DDIM -> UniPC: DDIM-only choices (leading, set_alpha_to_one=False) must not leak.
    ours = UniPCScheduler.from_config(DDIMSolverScheduler.from_config(SD_CONFIG).config)
    theirs = UniPCMultistepScheduler.from_config(DDIMScheduler.from_config(SD_CONFIG).config)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    assert torch.equal(ours.timesteps, theirs.timesteps) and float(ours.sigmas[-1]) == 0.0
    # the generic class picks up the DDIM defaults from the solver, like the named class
    a, b = FewstepScheduler.from_config(SD_CONFIG, solver="ddim"), DDIMSolverScheduler.from_config(SD_CONFIG)
    a.set_timesteps(8)
    b.set_timesteps(8)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    # switching solver on a fewstep config drops the old solver's options, but keeps what diffusers'
    # names carry between its own schedulers (solver_order: UniPC order 3 -> DPM order 3)
    c = FewstepScheduler.from_config(UniPCScheduler.from_config(SD_CONFIG, order=3).config, solver="dpmpp")
    d = DPMSolverMultistepScheduler.from_config(UniPCMultistepScheduler.from_config(SD_CONFIG, solver_order=3).config)
    assert c.solver.name == "dpmpp" and c.solver.config["order"] == d.config.solver_order == 3
    assert c.solver.config["variant"] == d.config.solver_type == "midpoint"  # bh2 means nothing to DPM


@pytest.mark.parametrize("solver,options", [("dpmpp", {"order": 3}), ("dpmpp", {"order": 3, "lower_order_final": False}),
                                            ("unipc", {"order": 3, "lower_order_final": False})])
def test_zero_length_last_step_is_the_identity(x_T, solver, options):
    # explicit timesteps ending at 0 with final_sigma "min": the last step has h = 0
    ts = list(range(950, -1, -50))
    sched = FewstepScheduler.from_config({**SD_CONFIG, "final_sigmas_type": "sigma_min"}, solver=solver,
                                         solver_options=options)
    sched.set_timesteps(timesteps=ts)
    assert sched.plan.orders[-1] == 1
    xs = trajectory(sched, None, x_T, timesteps=ts)
    assert torch.isfinite(xs[-1]).all()
    if solver == "dpmpp":
        theirs = DPMSolverMultistepScheduler.from_config({**SD_CONFIG, "final_sigmas_type": "sigma_min"},
                                                         solver_order=3, **{k: v for k, v in options.items() if k != "order"})
        # diffusers divides by h = 0 there (NaN in float64); every earlier step must agree
        assert_same_trajectory(xs, trajectory(theirs, None, x_T, timesteps=ts), allow_nonfinite_final=True)
        torch.testing.assert_close(xs[-1], xs[-2])
