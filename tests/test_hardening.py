"""Regression tests for the hardening issue: one test per numbered finding of the core.

The reproducers live in ../shared/findings/fuzz (F01-F18 here; F19-F26 are CLI findings,
tests/test_compare.py and tests/test_cli.py) and ../shared/findings/review (R1-R11).
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMWuerstchenScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LTXEulerAncestralRFScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import fewstep
from fewstep import (
    ContinuousVPSchedule,
    DDIMSolverScheduler,
    DiscreteVPSchedule,
    DPMSolverPPScheduler,
    FewstepScheduler,
    FlowSchedule,
    GridSpec,
    UniPCScheduler,
)
from fewstep.zoo.gmm import GaussianMixture, GMMModel

SD = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
      "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


def tanh_model(x, t, *cond):
    return torch.tanh(x)


def smooth_model(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


def run(sched, x, n, model=smooth_model, begin=0, stop=None, **kw):
    sched.set_timesteps(n, **kw)
    if begin:
        sched.set_begin_index(begin)
    for t in sched.timesteps[begin:stop]:
        x = sched.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


# ---------------------------------------------------------------------------- fuzz findings


def test_f01_linear_betas_with_zero_terminal_snr_match_diffusers():
    cfg = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = run(UniPCScheduler.from_config(cfg), x, 10)
    theirs = run(UniPCMultistepScheduler.from_config(cfg), x, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    sched = DiscreteVPSchedule.from_betas(rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 2.0**-24  # diffusers' stand-in, kept bit for bit
    with pytest.raises(ValueError, match="strictly decreasing"):  # only the zero-SNR end is exempt
        DiscreteVPSchedule([0.9, 0.8, 0.85, 0.1])


@pytest.mark.parametrize("source", [LTXEulerAncestralRFScheduler, DDPMWuerstchenScheduler])
@pytest.mark.parametrize("with_name", [False, True])
def test_f02_configs_of_other_model_families_are_refused(source, with_name):
    cfg = dict(source().config)
    if with_name:
        cfg["_class_name"] = source.__name__
    with pytest.raises(ValueError, match="cannot build a fewstep scheduler from a"):
        FewstepScheduler.from_config(cfg)


def test_f02_compatibles_list_the_schedulers_whose_configs_translate():
    names = {c.__name__ for c in UniPCScheduler().compatibles}
    assert {"DDIMScheduler", "PNDMScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"} <= names
    assert "LTXEulerAncestralRFScheduler" not in names and "EDMEulerScheduler" not in names
    for cls in UniPCScheduler().compatibles:
        try:
            source = cls()
        except ImportError:  # DPMSolverSDEScheduler needs torchsde
            continue
        UniPCScheduler.from_config(source.config).set_timesteps(4)  # every listed default config translates


@pytest.mark.parametrize("key", ["thresholding", "clip_sample", "rescale_betas_zero_snr", "use_dynamic_shifting"])
def test_f03_string_booleans_are_refused(tmp_path, key):
    FewstepScheduler.from_config({}).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg[key] = "false"
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match=f"{key}='false' must be True or False"):
        FewstepScheduler.from_pretrained(tmp_path)


def test_f04_trained_betas_must_match_the_schedule():
    with pytest.raises(ValueError, match="trained_betas has 50 entries but num_train_timesteps=1000"):
        FewstepScheduler.from_config({"num_train_timesteps": 1000, "trained_betas": [0.02] * 50})
    with pytest.raises(ValueError, match=r"alphas_cumprod must be a flat list.*\(2, 2\)"):
        DiscreteVPSchedule([[0.9, 0.8], [0.7, 0.6]])
    with pytest.raises(ValueError, match="trained_betas must be a flat list"):
        DiscreteVPSchedule.from_betas(num_train_timesteps=4, trained_betas=[[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="trained_betas describe a VP schedule; this is a flow-matching config"):
        FewstepScheduler.from_config({"prediction_type": "flow_prediction", "trained_betas": [0.5] * 3})


def test_f05_meta_device_runs_without_reading_values():
    x = torch.randn(2, 4, device="meta")
    assert fewstep.sample(tanh_model, x, nfe=4).device.type == "meta"
    s = UniPCScheduler.from_config({})
    s.set_timesteps(3, device="meta")
    y = x
    for t in s.timesteps:
        y = s.step(torch.tanh(y), t, y).prev_sample
    assert y.device.type == "meta" and y.shape == x.shape
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="model output is on meta but the sample on cpu"):
        s.step(torch.randn(2, 4, device="meta"), s.timesteps[0], torch.randn(2, 4))


def test_f06_zero_dim_and_one_dim_inputs():
    with pytest.raises(ValueError, match="x_T must have a batch dimension"):
        fewstep.sample(tanh_model, torch.tensor(1.0), nfe=2)
    s = FewstepScheduler.from_config({"variance_type": "learned_range"})
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="needs samples with a channel dimension"):
        s.step(torch.randn(8), s.timesteps[0], torch.randn(4))
    out = FewstepScheduler.from_config({}).add_noise(torch.tensor(0.5), torch.tensor(1.0), torch.tensor(500))
    assert out.shape == ()
    batch = FewstepScheduler.from_config({}).add_noise(torch.ones(3, 2), torch.zeros(3, 2), torch.tensor([1, 500, 999]))
    assert batch.shape == (3, 2) and bool((batch[0] > batch[2]).all())


def test_f07_thresholding_an_empty_batch():
    for shape in [(0, 4), (1, 0)]:
        out = fewstep.sample(tanh_model, torch.randn(*shape), nfe=3, thresholding=fewstep.DynamicThreshold())
        assert out.shape == shape
    s = FewstepScheduler.from_config({"thresholding": True})
    s.set_timesteps(3)
    x = torch.randn(0, 3)
    assert s.step(torch.tanh(x), s.timesteps[0], x).prev_sample.shape == (0, 3)


def test_f08_extreme_numbers_raise_value_errors_naming_them():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="mu=1000"):  # degenerate grid, named by its settings
        fewstep.sample(tanh_model, x, schedule="flow", prediction="flow", mu=1000.0)
    s = FewstepScheduler.from_config({"prediction_type": "flow_prediction", "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="mu=1000"):
        s.set_timesteps(4, mu=1000.0)
    s.set_timesteps(4, mu=-50.0)  # large negative mu: finite and valid (no overflow in the shift)
    with pytest.raises(ValueError, match=r"rho=0.001 is not allowed.*\[0.1, 100\]"):
        GridSpec(spacing="karras", rho=1e-3)
    with pytest.raises(TypeError, match="got inf"):
        fewstep.get_solver("unipc", disable_corrector=[float("inf")])


@pytest.mark.parametrize("kwargs,match", [
    (dict(mu=5.0), "mu only applies to flow-matching schedules"),
    (dict(shift=1e9), "shift only applies to flow-matching schedules"),
    (dict(spacing=GridSpec(shift_terminal=0.5)), "shift_terminal only applies"),
])
def test_f09_flow_options_on_vp_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fewstep.sample(tanh_model, torch.randn(2, 4), nfe=5, **kwargs)
    with pytest.raises(TypeError, match="mu='abc' must be a real number"):
        fewstep.sample(tanh_model, torch.randn(2, 4), nfe=5, mu="abc")
    with pytest.raises(ValueError, match="shift only applies to flow-matching configs"):
        FewstepScheduler.from_config({"shift": 3.0, "beta_schedule": "linear"})


@pytest.mark.parametrize("value,exc", [
    ("12", TypeError), (b"bh1", TypeError), ([1.7], TypeError), ([-5], ValueError), ([10**9], ValueError),
    ({"1": 2}, TypeError), ([True], TypeError), ([float("nan")], TypeError),
])
def test_f10_disable_corrector_accepts_only_step_index_lists(value, exc):
    with pytest.raises(exc, match="disable_corrector"):
        fewstep.get_solver("unipc", disable_corrector=value)


def test_f10_disable_corrector_valid_forms():
    for value in ([3, 1], (1, 3), {3, 1}, np.array([3, 1])):
        assert fewstep.get_solver("unipc", disable_corrector=value).config["disable_corrector"] == (1, 3)


@pytest.mark.parametrize("guidance,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                          (1e300, ValueError), ("7.5", TypeError), ([1.0, 2.0], TypeError)])
def test_f11_guidance_is_validated_up_front(guidance, exc):
    model = GMMModel(GaussianMixture.random(4, 4, 2), "linear")
    calls = model.calls
    with pytest.raises(exc, match="guidance="):
        fewstep.sample(model, torch.randn(2, 4), guidance=guidance, cond=torch.tensor([0, 1]),
                       uncond=torch.tensor([-1, -1]), nfe=4)
    assert model.calls == calls  # refused before the model ran


def test_f12_custom_sigmas_out_of_range_raise_like_timesteps():
    with pytest.raises(ValueError, match=r"custom sigma 1e\+06 is outside"):
        fewstep.make_plan("linear", sigmas=[1e6, 10.0, 1.0])
    with pytest.raises(ValueError, match="custom sigma 0 is outside"):
        fewstep.make_plan("linear", sigmas=[10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"sigmas must be a flat list of numbers, got shape \(2, 2\)"):
        fewstep.make_plan("linear", sigmas=[[10, 5], [2, 1]])
    s = FewstepScheduler.from_config({})
    with pytest.raises(ValueError, match=r"timesteps must be a flat list of numbers, got shape \(2, 2\)"):
        s.set_timesteps(timesteps=[[999, 500], [200, 1]])
    plan = fewstep.make_plan("linear", sigmas=[10.0, 1.0])  # in range: used exactly
    torch.testing.assert_close(plan.grid.diffusers_sigmas()[:2], torch.tensor([10.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("build,exc,match", [
    (lambda: DiscreteVPSchedule.from_betas(num_train_timesteps=-1), ValueError, "num_train_timesteps=-1"),
    (lambda: DiscreteVPSchedule.from_betas(num_train_timesteps=1000.0), TypeError, "num_train_timesteps=1000.0"),
    (lambda: DiscreteVPSchedule.from_betas(beta_start="0.0001"), TypeError, "beta_start='0.0001'"),
    (lambda: DiscreteVPSchedule.from_betas(beta_start=-0.01), ValueError, "beta_start=-0.01"),
    (lambda: DiscreteVPSchedule.from_betas(beta_end=1e300), ValueError, "beta_end=1e"),
    (lambda: DiscreteVPSchedule.from_betas(trained_betas="abc"), TypeError, "trained_betas='abc'"),
    (lambda: fewstep.make_plan(FlowSchedule(0), prediction="flow"), ValueError, "num_train_timesteps=0"),
    (lambda: ContinuousVPSchedule("cosine", cosine_s=-1.0), ValueError, "cosine_s=-1.0"),
    (lambda: ContinuousVPSchedule(t_min=0.0), ValueError, "t_min=0.0"),
    (lambda: ContinuousVPSchedule(beta_min=-1.0), ValueError, "beta_min=-1.0"),
    (lambda: GridSpec(spacing="leading", steps_offset="1"), TypeError, "steps_offset='1'"),
    (lambda: fewstep.make_plan(schedule=[]), TypeError, "schedule=\\[\\]"),
    (lambda: fewstep.make_plan(prediction=[]), TypeError, "prediction=\\[\\]"),
    (lambda: FewstepScheduler.from_config({"solver": "unipc", "solver_options": [1, 2]}), TypeError, "solver_options"),
    (lambda: FewstepScheduler.from_config({"num_train_timesteps": "1000"}), TypeError, "num_train_timesteps='1000'"),
])
def test_f13_wrong_types_and_degenerate_values_are_named(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("text,exc", [("null", ValueError), ("[1, 2]", TypeError), ("42", TypeError)])
def test_f13_non_object_config_files_are_refused(tmp_path, text, exc):
    (tmp_path / "scheduler_config.json").write_text(text)
    with pytest.raises(exc, match=f"scheduler config in {tmp_path}"):
        FewstepScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(timestep_scale=float("nan")), "timestep_scale=nan"), (dict(timestep_scale=0.0), "timestep_scale=0.0"),
    (dict(t_min=-1.0), "t_min=-1.0"), (dict(schedule="cosine", t_max=1.0), "t_max=1.0"),
    (dict(t_min=0.9, t_max=0.1), "t_max=0.1"),
])
def test_f14_continuous_schedule_parameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinuousVPSchedule(**kwargs)


def test_f15_step_misuse_is_caught():
    s = UniPCScheduler.from_config({})
    s.set_timesteps(5)
    s.step(torch.randn(2, 4), s.timesteps[0], torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"shape changed mid-run, from \(2, 4\) at step 0 to \(4, 4\) at step 1"):
        s.step(torch.randn(4, 4), s.timesteps[1], torch.randn(4, 4))
    s.set_timesteps(5)
    with pytest.raises(TypeError, match="sample must be a floating-point tensor, got torch.int64"):
        s.step(torch.ones(2, 4, dtype=torch.int64), s.timesteps[0], torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="begin_index=1.5"):
        s.set_begin_index(1.5)
    with pytest.raises(ValueError, match="begin_index=10 is out of range; allowed: 0 to 5"):
        s.set_begin_index(10)


def test_f16_nonfinite_samples_and_solver_overflow_are_reported():
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="solver's update at step 0 .* overflowed"):
        fewstep.sample(lambda x, t: torch.full_like(x, 6e4), x.half(), nfe=5)  # model output is finite
    xn = x.clone()
    xn[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="sample passed to step 0"):
        fewstep.sample(lambda x, t: torch.zeros_like(x), xn, nfe=5)
    with pytest.raises(ValueError, match="epsilon-prediction model cannot be converted to x0 where alpha < 1e-05"):
        fewstep.sample(tanh_model, x, schedule="flow", prediction="epsilon", solver="unipc", nfe=5)
    with pytest.raises(FloatingPointError, match="model output at step 2"):
        fewstep.sample(lambda x, t: x * float("nan") if float(t[0]) < 700 else x, x, nfe=5)


def test_f17_nan_steps_are_named_absolutely_and_reported_early():
    def run_bad(begin, bad, stop=None):
        s = UniPCScheduler.from_config({})
        s.set_timesteps(6)
        if begin:
            s.set_begin_index(begin)
        x = torch.randn(1, 4)
        for i in range(begin, stop or 6):
            out = torch.full_like(x, float("nan")) if i == bad else torch.tanh(x)
            x = s.step(out, s.timesteps[i], x).prev_sample

    with pytest.raises(FloatingPointError, match=r"model output at step 3 \(timestep 500\)"):
        run_bad(2, 3)
    with pytest.raises(FloatingPointError, match=r"model output at step 1 \(timestep 832\)"):
        run_bad(0, 1, stop=4)  # the caller stops after 4 of 6 steps


def test_f18_unipc_noise_space_corrector_from_pure_noise_is_refused():
    mix = GaussianMixture.random(6, 5, seed=1, std_range=(0.05, 0.5))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GMMModel(mix, "flow", "flow")
    for schedule, prediction in [("flow", "flow"),
                                 (DiscreteVPSchedule.from_betas(rescale_betas_zero_snr=True), "v_prediction")]:
        with pytest.raises(ValueError, match="space='noise' cannot correct a step that starts at alpha"):
            fewstep.make_plan(schedule, "unipc", nfe=4, prediction=prediction, space="noise")
    # What the refusal protects against, and that the alternatives it names are fine:
    exact = mix.ode_solution(x, (0.0, 1.0), (1.0, 0.0), steps=2000)
    for opts in [dict(space="data"), dict(space="noise", corrector=False), dict(space="noise", disable_corrector=[0])]:
        y = fewstep.sample(model, x, schedule="flow", prediction="flow", solver="unipc", nfe=8, **opts)
        assert float((y - exact).abs().max()) < 0.3
    # Through the adapter, a UniPC flow config with predict_x0=False fails at set_timesteps.
    s = UniPCScheduler.from_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                    "flow_shift": 3.0, "prediction_type": "flow_prediction", "predict_x0": False})
    with pytest.raises(ValueError, match="space='noise'"):
        s.set_timesteps(8)


# --------------------------------------------------------------------------- review findings


@pytest.mark.parametrize("extra", [dict(shift=3.0, use_karras_sigmas=True),
                                   dict(use_dynamic_shifting=True, use_karras_sigmas=True),
                                   dict(use_exponential_sigmas=True), dict(shift=3.0, use_exponential_sigmas=True)])
def test_r1_flowmatch_karras_and_exponential_grids(extra):
    kw = {"mu": 0.8} if extra.get("use_dynamic_shifting") else {}
    theirs = FlowMatchEulerDiscreteScheduler(**extra)
    theirs.set_timesteps(8, **kw)
    ours = DDIMSolverScheduler.from_config(theirs.config)
    ours.set_timesteps(8, **kw)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("target", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDIMScheduler,
                                    EulerDiscreteScheduler])
@pytest.mark.parametrize("source", [UniPCScheduler, DDIMSolverScheduler])
def test_r2_saved_fewstep_configs_load_into_diffusers(tmp_path, source, target):
    source.from_config(SD).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["timestep_spacing"] is not None and saved["set_alpha_to_one"] is False
    sched = target.from_pretrained(tmp_path)
    sched.set_timesteps(20)
    direct = target.from_config(SD)
    direct.set_timesteps(20)
    if target is DDIMScheduler:
        assert float(sched.final_alpha_cumprod) == float(direct.final_alpha_cumprod)
    assert sched.config.timestep_spacing in ("linspace", "leading", "trailing")


def test_r2_config_chains_still_take_each_solvers_default_spacing():
    ddim = DDIMSolverScheduler.from_config(SD)
    assert ddim.config.timestep_spacing == "leading"
    assert UniPCScheduler.from_config(ddim.config).config.timestep_spacing == "linspace"


def test_r3_diffusers_flags_on_a_fewstep_config_are_translated_or_refused():
    fs = UniPCScheduler.from_config(SD)
    assert UniPCScheduler.from_config(fs.config, use_karras_sigmas=True)._spacing == "karras"
    b = DPMSolverPPScheduler.from_config(fs.config, use_flow_sigmas=True, flow_shift=3.0)
    assert (b.config.prediction_type, b.config.shift) == ("flow_prediction", 3.0)
    with pytest.raises(ValueError, match="lambda_min_clipped"):
        UniPCScheduler.from_config(fs.config, lambda_min_clipped=-5.1)


def test_r3_karras_flag_survives_a_default_spacing_in_a_config_chain():
    dpm = DPMSolverMultistepScheduler.from_config(PNDMScheduler.from_config(SD).config, use_karras_sigmas=True)
    ours = DPMSolverPPScheduler.from_config(dpm.config)
    assert ours.config.use_karras_sigmas is True and ours._spacing == "karras"
    ours.set_timesteps(6)
    dpm.set_timesteps(6)
    torch.testing.assert_close(ours.sigmas, dpm.sigmas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,ours_cls", [(UniPCMultistepScheduler, UniPCScheduler),
                                          (DPMSolverMultistepScheduler, DPMSolverPPScheduler)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_r4_flow_sigmas_ignore_the_integer_spacing_as_diffusers_does(cls, ours_cls, spacing):
    theirs = cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", timestep_spacing=spacing)
    theirs.set_timesteps(10)
    ours = ours_cls.from_config(theirs.config)
    ours.set_timesteps(10)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours_cls,theirs_cls", [(UniPCScheduler, UniPCMultistepScheduler),
                                                  (DDIMSolverScheduler, DDIMScheduler)])
def test_r5_zero_snr_with_linear_betas_is_accepted(ours_cls, theirs_cls):
    cfg = DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing").config
    ours, theirs = ours_cls.from_config(cfg), theirs_cls.from_config(cfg)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() and int(ours.timesteps[0]) == 999


def test_r6_disable_corrector_indices_are_absolute_under_img2img():
    cfg = {**SD, "timestep_spacing": "trailing"}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def traj(s):
        s.set_timesteps(10)
        s.sigmas = s.sigmas.double()
        s.set_begin_index(3)
        y = x
        for t in s.timesteps[3:]:
            y = s.step(smooth_model(y, t.expand(2)), t, y).prev_sample
        return y

    ours = traj(UniPCScheduler.from_config(cfg, order=3, disable_corrector=[4]))
    theirs = traj(UniPCMultistepScheduler.from_config(cfg, solver_order=3, disable_corrector=[4]))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    plain = traj(UniPCScheduler.from_config(cfg, order=3))
    assert float((plain - ours).abs().max()) > 1e-4  # the index really disabled a correction


def test_r7_karras_with_sigma_min_is_a_documented_difference():
    # diffusers spaces n Karras points down to sigma_min and ends with a zero-length step there
    # (one wasted model evaluation); fewstep spaces n + 1 points (docs/diffusers-differences.md).
    cfg = {**SD, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    ours, theirs = DPMSolverPPScheduler.from_config(cfg), DPMSolverMultistepScheduler.from_config(cfg)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    assert float(theirs.sigmas[-2]) == float(theirs.sigmas[-1])
    assert float(ours.sigmas[-2]) > float(ours.sigmas[-1])
    torch.testing.assert_close(ours.sigmas[[0, -1]], theirs.sigmas[[0, -1]], rtol=1e-5, atol=1e-6)
    expected = torch.linspace(float(ours.sigmas[0]) ** (1 / 7), float(ours.sigmas[-1]) ** (1 / 7), 7) ** 7
    torch.testing.assert_close(ours.sigmas.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_r8_custom_vp_sigmas_out_of_range_raise():
    s = UniPCScheduler.from_config(SD)
    with pytest.raises(ValueError, match="custom sigma 30 is outside"):
        s.set_timesteps(sigmas=[30.0, 5.0, 1.0, 0.01])


def test_r9_step_index_lookup_needs_no_float64_on_the_device(monkeypatch):
    # MPS has no float64: the first step's timestep lookup must happen on the host.
    s = UniPCScheduler.from_config(SD)
    s.set_timesteps(5)
    real_double = torch.Tensor.double

    def guarded_double(self):
        if self is s.timesteps:
            raise AssertionError("float64 requested on the scheduler's device timesteps")
        return real_double(self)

    monkeypatch.setattr(torch.Tensor, "double", guarded_double)
    x = torch.randn(1, 4)
    s.step(torch.tanh(x), s.timesteps[0], x)


def test_r10_pred_original_sample_is_the_callers_to_edit():
    def traj(touch):
        s = UniPCScheduler.from_config(SD)
        s.set_timesteps(8)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps:
            o = s.step(0.5 * x + 0.1, t, x)
            if touch:
                o.pred_original_sample.clamp_(-0.1, 0.1)
            x = o.prev_sample
        return x

    torch.testing.assert_close(traj(True), traj(False), rtol=0, atol=0)


def test_r11_a_run_that_stops_early_reports():
    s = DPMSolverPPScheduler.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(FloatingPointError, match="model output at step 2"):
        for i, t in enumerate(s.timesteps[:8]):  # denoising_end = 0.8
            out = 0.5 * x
            if i == 2:
                out[0, 0, 0, 0] = float("nan")
            x = s.step(out, t, x).prev_sample

def test_r11_raise_if_nonfinite_covers_flags_not_yet_readable(monkeypatch):
    # On an accelerator the per-step check never waits for the device; raise_if_nonfinite does.
    from fewstep.samplers.plan import FiniteMonitor

    real_check = FiniteMonitor.check
    monkeypatch.setattr(FiniteMonitor, "check", lambda self, upto, wait=False: wait and real_check(self, upto, wait))
    s = DPMSolverPPScheduler.from_config({})
    s.set_timesteps(10)
    x = torch.randn(1, 4)
    for i, t in enumerate(s.timesteps[:3]):
        x = s.step(torch.full_like(x, float("nan")) if i == 2 else x, t, x).prev_sample
    with pytest.raises(FloatingPointError, match="model output at step 2"):
        s.raise_if_nonfinite()


def test_guidance_bounds_are_named():
    assert math.isclose(fewstep.infra.validation.check_guidance(7.5), 7.5)
    with pytest.raises(ValueError, match=r"\[-10000, 10000\]"):
        fewstep.infra.validation.check_guidance(2e4)


def test_a_failed_set_timesteps_changes_nothing():
    # Found by tests/test_properties.py: the grid used to be kept although the plan failed.
    s = UniPCScheduler.from_config({"rescale_betas_zero_snr": True}, space="noise")
    with pytest.raises(ValueError, match="space='noise'"):
        s.set_timesteps(2)
    assert s.grid is None and s.plan is None
    s = UniPCScheduler.from_config({})
    s.set_timesteps(4)
    grid = s.grid
    with pytest.raises(ValueError):
        s.set_timesteps(sigmas=[1e9, 1.0])
    assert s.grid is grid and len(s.timesteps) == 4
