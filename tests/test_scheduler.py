"""The diffusers adapter: config translation, save/load, img2img, noise, errors."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import fewstep
from fewstep import DDIMSolverScheduler, DPMSolverPPScheduler, FewstepScheduler, UniPCScheduler

SD_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


def run(s, x, n=8, start=0, **kw):
    s.set_timesteps(n, **kw)
    if start:
        s.set_begin_index(start)
    for t in s.timesteps[start:]:
        x = s.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_save_load_round_trip(tmp_path):
    s = UniPCScheduler.from_config(SD_CONFIG, order=3, variant="bh1", disable_corrector=[2])
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UniPCScheduler" and saved["solver"] == "unipc"
    assert saved["solver_options"] == {"order": 3, "variant": "bh1", "space": "data", "corrector": True,
                                       "disable_corrector": [2], "lower_order_final": True}
    loaded = UniPCScheduler.from_pretrained(tmp_path)
    assert loaded.solver.config == s.solver.config
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(loaded, x), run(s, x), rtol=0, atol=0)


def test_generic_scheduler_and_solver_switch():
    s = FewstepScheduler.from_config(SD_CONFIG, solver="dpmpp", order=3)
    assert s.solver.name == "dpmpp" and s.solver.config["order"] == 3
    # A named class switching solver drops the other solver's options.
    d = DDIMSolverScheduler.from_config(UniPCScheduler.from_config(SD_CONFIG, order=3).config)
    assert d.solver.name == "ddim" and d.config.solver_options == {}
    # Same solver keeps them.
    u = UniPCScheduler.from_config(UniPCScheduler.from_config(SD_CONFIG, order=3).config)
    assert u.solver.config["order"] == 3


def test_diffusers_option_aliases_are_routed():
    s = DPMSolverPPScheduler.from_config(SD_CONFIG, solver_order=3, solver_type="heun")
    assert (s.solver.config["order"], s.solver.config["variant"]) == (3, "heun")


def test_unknown_keyword_and_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="unknown keyword 'eta'.*options of solver 'unipc'"):
        UniPCScheduler.from_config(SD_CONFIG, eta=0.5)
    with pytest.raises(ValueError, match=r"order=5 of solver 'unipc' is out of range; allowed: 1 to 3"):
        UniPCScheduler.from_config(SD_CONFIG, order=5)
    with pytest.raises(ValueError, match="variant='bh3'.*not one of \\('bh1', 'bh2'\\)"):
        UniPCScheduler.from_config(SD_CONFIG, variant="bh3")
    with pytest.raises(ValueError, match="UniPCScheduler runs solver 'unipc', not 'ddim'"):
        UniPCScheduler(solver="ddim")
    with pytest.raises(ValueError, match="unknown solver 'heun'; available solvers: dc, dc_dpmpp, ddim, dpmpp, dpmv3, unipc, usf"):
        FewstepScheduler(solver="heun")
    with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
        UniPCScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        UniPCScheduler(prediction_type="x0")


def test_step_errors():
    s = UniPCScheduler.from_config(SD_CONFIG)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        s.step(x, 999, x)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="timestep 500 is not one of the 3 scheduled timesteps"):
        s.step(x, 500, x)
    with pytest.raises(ValueError, match=r"model output shape \(1, 4, 4, 4\) does not match sample shape \(1, 4, 8, 8\)"):
        s.step(torch.zeros(1, 4, 4, 4), s.timesteps[0], x)
    s.set_timesteps(2)
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps have been taken"):
        s.step(x, s.timesteps[-1], x)
    with pytest.raises(ValueError, match="either sigmas or timesteps"):
        s.set_timesteps(sigmas=[1.0], timesteps=[10])
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        s.set_timesteps()
    flow = UniPCScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="mu must be passed"):
        flow.set_timesteps(4)


def test_nonfinite_model_output_names_the_step():
    s = DPMSolverPPScheduler.from_config(SD_CONFIG)
    s.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(FloatingPointError, match=r"step 2 \(timestep 599\) contains NaN or Inf"):
        for i, t in enumerate(s.timesteps):
            out = model(x, t)
            if i == 2:
                out[0, 0, 0, 0] = float("nan")
            x = s.step(out, t, x).prev_sample
    s.check_finite = False
    s.set_timesteps(5)
    for t in s.timesteps:
        x = s.step(torch.full_like(x, float("inf")), t, x).prev_sample


def test_add_noise_matches_ddpm_and_flow_scale_noise():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    ours = UniPCScheduler.from_config(SD_CONFIG).add_noise(x0, noise, t)
    theirs = DDPMScheduler.from_config(SD_CONFIG).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, theirs)
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(10)
    mine = UniPCScheduler.from_config(fm.config)
    mine.set_timesteps(10)
    ts = fm.timesteps[[2, 5]]
    # diffusers looks the sigma up by step index; fewstep reads it off the timestep itself.
    sig = (ts / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mine.scale_noise(x0[:2], ts, noise[:2]), sig * noise[:2] + (1 - sig) * x0[:2])
    with pytest.raises(ValueError, match="outside"):
        UniPCScheduler.from_config(SD_CONFIG).add_noise(x0[:1], noise[:1], torch.tensor([1500]))


def test_img2img_begin_index_restarts_the_warm_up():
    s = UniPCScheduler.from_config(SD_CONFIG, order=3)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = run(s, x, n=10, start=4)
    assert s._executor.plan.orders[:3] == [1, 2, 3]  # warm-up from the first step actually taken
    ts = s.timesteps[4:].tolist()
    ref = fewstep.sample(model, x, schedule=s.schedule, solver="unipc", nfe=None, timesteps=ts, order=3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [DDIMSolverScheduler, DPMSolverPPScheduler, UniPCScheduler])
def test_bf16_step_keeps_dtype_and_agrees_with_fp32(cls):
    s = cls.from_config(SD_CONFIG)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out32 = run(s, x)
    out16 = run(s, x.bfloat16())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()
    assert ((out16.float() - out32).norm() / out32.norm()) < 0.05


def test_karras_and_logsnr_configs_translate():
    s = UniPCScheduler.from_config({**SD_CONFIG, "use_karras_sigmas": True})
    # stored as diffusers' flag (diffusers rejects timestep_spacing="karras"), run as the karras grid
    assert s.config.use_karras_sigmas is True and s.config.timestep_spacing == "linspace"
    assert s._spacing == "karras"
    s.set_timesteps(6)
    assert s.timesteps.dtype == torch.float32 and len(s) == 1000
    s = DPMSolverPPScheduler.from_config({**SD_CONFIG, "use_lu_lambdas": True})
    assert s.config.use_lu_lambdas is True and s._spacing == "logsnr"


@pytest.mark.parametrize("extra,match", [
    ({"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}, "EDM-preconditioned"),
    ({"snr_shift_scale": 3.0}, "snr_shift_scale"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
    ({"timestep_type": "continuous"}, "timestep_type"),
])
def test_settings_fewstep_cannot_reproduce_raise(extra, match):
    with pytest.raises(ValueError, match=match):
        UniPCScheduler.from_config({**SD_CONFIG, **extra})


def test_diffusers_solver_settings_carry_over_when_meaningful():
    dpm = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "solver_type": "heun",
           "algorithm_type": "dpmsolver", "lower_order_final": False}
    s = DPMSolverPPScheduler.from_config(dpm)
    assert s.solver.config == {**s.solver.config, "order": 3, "variant": "heun", "space": "noise",
                               "lower_order_final": False}
    u = UniPCScheduler.from_config(dpm)  # 'heun' means nothing to UniPC: its default variant stays
    assert u.solver.config["order"] == 3 and u.solver.config["variant"] == "bh2"
    assert DPMSolverPPScheduler.from_config({**dpm, "algorithm_type": "sde-dpmsolver++"}).solver.config["space"] == "data"
    assert UniPCScheduler.from_config({**SD_CONFIG, "predict_x0": False}).solver.config["space"] == "noise"
    # keyword arguments win over what the config carried
    assert DPMSolverPPScheduler.from_config(dpm, order=1).solver.config["order"] == 1
    # diffusers' schedule flags work as keywords too
    assert UniPCScheduler.from_config(SD_CONFIG, use_karras_sigmas=True)._spacing == "karras"


def test_learned_variance_channels_are_dropped():
    s = DPMSolverPPScheduler.from_config({**SD_CONFIG, "variance_type": "learned_range"})
    s.set_timesteps(3)
    x = torch.randn(1, 3, 8, 8)
    out = torch.cat([model(x, 999), torch.full_like(x, 1e6)], 1)  # variance channels must not leak
    plain = DPMSolverPPScheduler.from_config(SD_CONFIG)
    plain.set_timesteps(3)
    t = s.timesteps[0]
    torch.testing.assert_close(s.step(out, t, x).prev_sample, plain.step(out[:, :3], t, x).prev_sample)


def test_step_accepts_pipeline_keywords_but_refuses_stochasticity():
    s = DDIMSolverScheduler.from_config(SD_CONFIG)
    s.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8)
    t = s.timesteps[0]
    s.step(model(x, t), t, x, eta=0.0, generator=torch.Generator(), use_clipped_model_output=None)
    with pytest.raises(ValueError, match="eta=0.5: fewstep solvers are deterministic"):
        s.step(model(x, t), t, x, eta=0.5)
