"""Noise schedules and timestep grids, checked against diffusers' own numbers."""

import math

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
from fewstep.samplers.schedules import ContinuousVPSchedule, DiscreteVPSchedule, FlowSchedule, VESchedule
from fewstep.samplers.timesteps import GridSpec, build_grid

BETA_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("cfg", BETA_CONFIGS, ids=lambda c: c["beta_schedule"] + ("_zsnr" if len(c) > 3 else ""))
def test_discrete_vp_matches_diffusers_alphas_cumprod(cfg):
    ours = DiscreteVPSchedule.from_betas(**cfg)
    theirs = DPMSolverMultistepScheduler(**cfg).alphas_cumprod.double()
    assert torch.equal(ours.alphas_cumprod, theirs)  # bit for bit: the model's own noise levels


def test_trained_betas_round_trip():
    betas = np.linspace(1e-4, 2e-2, 50)
    s = DiscreteVPSchedule.from_betas(num_train_timesteps=50, trained_betas=betas)
    assert s.num_train_timesteps == 50
    rebuilt = fewstep.make_schedule(s.to_dict())
    assert torch.equal(rebuilt.alphas_cumprod, s.alphas_cumprod)


SCHEDULES = [
    fewstep.make_schedule("scaled_linear"),
    fewstep.make_schedule("squaredcos_cap_v2"),
    ContinuousVPSchedule("linear"),
    ContinuousVPSchedule("cosine"),
    FlowSchedule(),
    VESchedule(),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s)[:40])
def test_lambda_inverse_round_trip_and_monotone(schedule):
    lo, hi = schedule.t_min, schedule.t_max
    t = torch.linspace(lo + 1e-3 * (hi - lo), hi - 1e-3 * (hi - lo), 101, dtype=torch.float64)
    lam = schedule.lambda_(t)
    assert bool((lam[1:] < lam[:-1]).all()), "lambda must decrease with t"
    torch.testing.assert_close(schedule.t_from_lambda(lam), t, rtol=1e-9, atol=1e-9 * hi)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(torch.log(alpha / sigma), lam, rtol=1e-10, atol=1e-10)
    if schedule.variance_preserving:
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=1e-12, atol=1e-12)
    s = schedule.diffusers_sigma(t)
    torch.testing.assert_close(schedule.t_from_diffusers_sigma(s), t, rtol=1e-9, atol=1e-9 * hi)


def test_schedule_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown schedule 'nope'.*scaled_linear"):
        fewstep.make_schedule("nope")
    with pytest.raises(ValueError, match="beta_schedule='cubic'"):
        DiscreteVPSchedule.from_betas(beta_schedule="cubic")
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPSchedule([0.9, 0.95])
    with pytest.raises(ValueError, match=r"sigma_max=1.0 is not allowed.*\(5, inf\)"):
        VESchedule(sigma_min=5, sigma_max=1)


# ---------------------------------------------------------------- grids vs diffusers


def _diffusers_timesteps(cls, n, **cfg):
    s = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **cfg)
    s.set_timesteps(n)
    return s.timesteps.double(), getattr(s, "sigmas", None)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 4, 7, 10, 25, 250])
def test_multistep_integer_spacings_match_dpmsolver_and_unipc(spacing, n):
    offset = 1 if spacing == "leading" else 0
    sched = fewstep.make_schedule("scaled_linear")
    grid = build_grid(sched, n, GridSpec(spacing=spacing, steps_offset=offset))
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        ts, sigmas = _diffusers_timesteps(cls, n, timestep_spacing=spacing, steps_offset=offset)
        torch.testing.assert_close(grid.model_timesteps, ts)
        torch.testing.assert_close(grid.diffusers_sigmas().float(), sigmas, rtol=1e-6, atol=0)
    assert grid.integer_timesteps and float(grid.sigma[-1]) == 0.0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 5, 10, 50])
def test_ddim_integer_spacings_match_ddimscheduler(spacing, n):
    offset = 1 if spacing == "leading" else 0
    grid = build_grid(
        fewstep.make_schedule("scaled_linear"), n, GridSpec(spacing=spacing, steps_offset=offset, convention="ddim")
    )
    ts, _ = _diffusers_timesteps(DDIMScheduler, n, timestep_spacing=spacing, steps_offset=offset)
    torch.testing.assert_close(grid.model_timesteps, ts)


@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (3.0, False), (1.0, True)])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_linspace_matches_flowmatch_euler(shift, dynamic, n):
    mu = 0.7 if dynamic else None
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    theirs.set_timesteps(n, mu=mu)
    grid = build_grid(FlowSchedule(), n, GridSpec(spacing="linspace", shift=shift, mu=mu, convention="ddim"))
    torch.testing.assert_close(grid.diffusers_sigmas().float(), theirs.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grid.model_timesteps.float(), theirs.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("cls,convention", [(UniPCMultistepScheduler, "multistep"),
                                            (DPMSolverMultistepScheduler, "dpmsolver")])
@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (5.0, False), (1.0, True)])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_flow_linspace_matches_multistep_flow_sigmas(cls, convention, shift, dynamic, n):
    # Wan-style configs: use_flow_sigmas + flow_shift (+ dynamic shifting).
    theirs = cls(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                 use_dynamic_shifting=dynamic)
    theirs.set_timesteps(n, mu=0.6 if dynamic else None)
    grid = build_grid(FlowSchedule(), n, GridSpec(spacing="linspace", shift=shift, mu=0.6 if dynamic else None,
                                                  convention=convention))
    torch.testing.assert_close(grid.diffusers_sigmas().float(), theirs.sigmas, rtol=1e-6, atol=1e-7)


def test_flow_custom_sigmas_are_shifted_like_diffusers():
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    sig = [1.0, 0.8, 0.5, 0.25]
    theirs.set_timesteps(sigmas=sig, mu=2.0)
    grid = build_grid(FlowSchedule(), None, GridSpec(sigmas=sig, mu=2.0, time_shift_type="linear"))
    torch.testing.assert_close(grid.diffusers_sigmas().float(), theirs.sigmas)


def test_logsnr_karras_and_time_grids():
    sched = ContinuousVPSchedule("linear")
    g = build_grid(sched, 8, GridSpec(spacing="logsnr", final_sigma="min"))  # DPM-Solver: n + 1 points
    steps = g.lambda_[1:] - g.lambda_[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(8), rtol=1e-9, atol=0)
    assert float(g.t[0]) == sched.t_max and float(g.t[-1]) == sched.t_min

    g = build_grid(sched, 6, GridSpec(spacing="karras", rho=7.0, final_sigma="min"))
    root = sched.diffusers_sigma(g.t) ** (1 / 7)
    torch.testing.assert_close(root[1:] - root[:-1], (root[1] - root[0]).expand(6), rtol=1e-8, atol=0)

    g = build_grid(sched, 5, GridSpec(spacing="time_quadratic", final_sigma="min"))
    torch.testing.assert_close(g.t.sqrt()[1:] - g.t.sqrt()[:-1], (g.t.sqrt()[1] - g.t.sqrt()[0]).expand(5))

    g = build_grid(VESchedule(), 4, GridSpec(spacing="karras"))
    assert float(g.sigma[-1]) == 0 and math.isinf(float(g.lambda_[-1]))
    # final_sigma="zero": the n evaluations span [t_max, t_min] (EDM), then a step to sigma = 0
    assert float(g.t[0]) == 80.0 and float(g.t[-2]) == 0.002


@pytest.mark.parametrize("key,spacing", [("use_karras_sigmas", "karras"), ("use_lu_lambdas", "logsnr")])
@pytest.mark.parametrize("n", [2, 8, 25])
def test_karras_and_lu_grids_match_diffusers_sigmas(key, spacing, n):
    theirs = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         **{key: True})
    theirs.set_timesteps(n)
    grid = build_grid(fewstep.make_schedule("scaled_linear"), n, GridSpec(spacing=spacing))
    torch.testing.assert_close(grid.diffusers_sigmas().float(), theirs.sigmas, rtol=2e-5, atol=0)
    # diffusers rounds these timesteps for the model; fewstep keeps the exact fractional ones
    assert (grid.model_timesteps - theirs.timesteps.double()).abs().max() <= 0.5 + 1e-6


@pytest.mark.parametrize("spacing", ["logsnr", "karras", "time_uniform", "time_quadratic"])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_continuous_spacings_on_flow_are_sensible(spacing, n):
    grid = build_grid(FlowSchedule(), n, GridSpec(spacing=spacing, shift=3.0, shift_terminal=0.1))
    s = grid.diffusers_sigmas()
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0 and bool((s[1:] < s[:-1]).all())
    if n > 1:
        assert abs(float(s[-2]) - 0.1) < 1e-12  # shift_terminal pins the last evaluation



def test_explicit_timesteps_and_sigmas():
    sched = fewstep.make_schedule("linear")
    g = build_grid(sched, None, GridSpec(timesteps=[999, 500.5, 20]))
    assert g.n == 3 and not g.integer_timesteps
    torch.testing.assert_close(g.model_timesteps, torch.tensor([999, 500.5, 20], dtype=torch.float64))
    s = sched.diffusers_sigma(torch.tensor([900.0, 300.0]))
    g = build_grid(sched, 2, GridSpec(sigmas=s.tolist()))
    torch.testing.assert_close(g.t[:2], torch.tensor([900.0, 300.0], dtype=torch.float64))


def test_subgrid_for_img2img():
    g = build_grid(fewstep.make_schedule("linear"), 10, GridSpec())
    sub = g.subgrid(4)
    assert sub.n == 6 and torch.equal(sub.t, g.t[4:])
    with pytest.raises(ValueError, match="start index 10"):
        g.subgrid(10)


@pytest.mark.parametrize(
    "kwargs,spec,match",
    [
        ({"nfe": 0}, GridSpec(), "nfe=0 is out of range; allowed: 1 to 100000"),
        ({"nfe": 2.5}, GridSpec(), "nfe=2.5 must be a whole number"),
        ({"nfe": 1001}, GridSpec(spacing="leading"), "larger than the model's num_train_timesteps=1000"),
        ({"nfe": None}, GridSpec(timesteps=[800, 800, 10]), "step 0 goes from t=800 to t=800"),
        ({"nfe": 2}, GridSpec(timesteps=[999, 500, 10]), "does not match the 3 explicit"),
        ({"nfe": None}, GridSpec(timesteps=[400, 600]), "strictly decrease"),
        ({"nfe": None}, GridSpec(timesteps=[1200, 600]), "timestep 1200 is outside"),
    ],
)
def test_grid_errors(kwargs, spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_grid(fewstep.make_schedule("linear"), kwargs["nfe"], spec)


def test_grid_spec_errors():
    with pytest.raises(ValueError, match="spacing='uniform' is not one of.*logsnr"):
        GridSpec(spacing="uniform")
    with pytest.raises(ValueError, match="final_sigma='none'"):
        GridSpec(final_sigma="none")
    with pytest.raises(ValueError, match="needs a discrete-time VP schedule"):
        build_grid(FlowSchedule(), 4, GridSpec(spacing="leading"))
