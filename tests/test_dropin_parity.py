"""Drop-in parity with diffusers' schedulers at the edges a pipeline reaches (issue 16).

Each test names the diffusers behaviour it checks; the pipeline-level matrix is
tests/test_pipelines_matrix.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fewstep
from diffusers.utils import logging as diffusers_logging
from fewstep import (
    DDIMSolverScheduler,
    DPMSolverPPScheduler,
    FewstepScheduler,
    UniPCScheduler,
    USFScheduler,
)


# diffusers warns about every fewstep key its own schedulers ignore: expected here, and noisy
diffusers_logging.set_verbosity_error()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- item 0: reload in a fresh process
def test_saved_pipelines_reload_in_a_fresh_interpreter(tmp_path):
    from fewstep.zoo.digits import load_digits_pipeline
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    sd = build_tiny_sd_pipeline()
    sd.scheduler = UniPCScheduler.from_config(sd.scheduler.config, order=3)
    sd.save_pretrained(tmp_path / "sd")
    digits = load_digits_pipeline(DPMSolverPPScheduler)
    digits.save_pretrained(tmp_path / "digits")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["scheduler"][0].startswith("fewstep")
    # The README's round trip, as a new user runs it: nothing but `import fewstep` first.
    script = textwrap.dedent(f"""
        import sys
        import fewstep
        assert "diffusers" not in sys.modules, "import fewstep must stay light"
        from diffusers import DiffusionPipeline
        sd = DiffusionPipeline.from_pretrained({str(tmp_path / "sd")!r})
        print(type(sd.scheduler).__name__, sd.scheduler.solver.config["order"])
        from fewstep.zoo.digits import DigitsPipeline
        digits = DigitsPipeline.from_pretrained({str(tmp_path / "digits")!r})
        print(type(digits.scheduler).__name__)
        assert type(sd.scheduler) is fewstep.UniPCScheduler
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["UniPCScheduler", "3", "DPMSolverPPScheduler"]


# ---------------------------------------------------------------- shared helpers
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
      "clip_sample": False, "set_alpha_to_one": False}
SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
           "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
           "use_dynamic_shifting": False}
FEWSTEP_CLASSES = [UniPCScheduler, DPMSolverPPScheduler, DDIMSolverScheduler]


def smooth_model(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


def run(s, n=None, start=0, x=None, model=smooth_model, **set_kwargs):
    """A full (or img2img-style, from ``start``) sampling loop in float64 with the smooth model."""
    s.set_timesteps(n, **set_kwargs)
    if isinstance(getattr(s, "sigmas", None), torch.Tensor):
        s.sigmas = s.sigmas.double()  # diffusers' schedulers then step in float64 too
    if start and hasattr(s, "set_begin_index"):  # diffusers' DDIM is stateless: it has none
        s.set_begin_index(start)
    if x is None:
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in s.timesteps[start:]:
        x = s.step(model(x, t), t, x).prev_sample
    return x


# ---------------------------------------------------------------- item 1: mu without dynamic shifting
@pytest.mark.parametrize("cls", FEWSTEP_CLASSES)
def test_mu_is_ignored_without_dynamic_shifting_as_diffusers_does(cls):
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 4
    sigmas = np.linspace(1.0, 1 / n, n)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(SCHNELL)
    theirs.set_timesteps(n, sigmas=sigmas, mu=0.8)
    ours, plain = cls.from_config(SCHNELL), cls.from_config(SCHNELL)
    ours.set_timesteps(n, sigmas=sigmas, mu=0.8)
    plain.set_timesteps(n, sigmas=sigmas)
    torch.testing.assert_close(ours.timesteps.float(), theirs.timesteps, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ours.sigmas, plain.sigmas, rtol=0, atol=0)
    dynamic = cls.from_config({**SCHNELL, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="mu must be passed"):
        dynamic.set_timesteps(n, sigmas=sigmas)
    with pytest.raises(ValueError, match="mu"):  # a VP config has no dynamic shift
        cls.from_config(SD).set_timesteps(n, mu=0.8)


# ---------------------------------------------------------------- item 2: back into diffusers
def _diffusers_configs():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    return {
        "wan-unipc": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                             solver_type="bh2"),
        "sana-dpm": DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=3.0, algorithm_type="dpmsolver++"),
        "dpm-karras": DPMSolverMultistepScheduler.from_config(SD, use_karras_sigmas=True),
        "dpm-lu": DPMSolverMultistepScheduler.from_config(SD, use_lu_lambdas=True),
        "dpm-3-heun": DPMSolverMultistepScheduler.from_config(SD, solver_order=3, solver_type="heun"),
        # (bh1 is left out: diffusers' UniPC bh1 gives NaN on its final step to sigma = 0)
        "unipc-3": UniPCMultistepScheduler.from_config(SD, solver_order=3),
        "unipc-exp": UniPCMultistepScheduler.from_config(SD, use_exponential_sigmas=True),
        "ddim-sd": DDIMScheduler.from_config(SD),
        "euler-sdxl": EulerDiscreteScheduler.from_config({**SD, "timestep_spacing": "leading"}),
        "flowmatch-sd3": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def _same_run(a, b, n=8):
    if type(a).__name__.startswith("FlowMatch"):
        # FlowMatchEuler's step is not the probability-flow solver the others are: compare grids
        a.set_timesteps(n), b.set_timesteps(n)
        torch.testing.assert_close(b.sigmas, a.sigmas, rtol=0, atol=0)
        return
    torch.testing.assert_close(run(b, n), run(a, n), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(_diffusers_configs()))
@pytest.mark.parametrize("via", [UniPCScheduler, DPMSolverPPScheduler, DDIMSolverScheduler])
def test_diffusers_to_fewstep_to_diffusers_gives_the_same_images(name, via, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    source = _diffusers_configs()[name]
    theirs_cls = type(source)
    # pipe.scheduler = fewstep...from_config(...); pipe.scheduler = Theirs.from_config(pipe.scheduler.config)
    back = theirs_cls.from_config(via.from_config(source.config).config)
    for key, value in source.config.items():
        if not key.startswith("_"):
            assert back.config[key] == value, (key, back.config[key], value)
    _same_run(theirs_cls.from_config(source.config), back)
    # Through saved files diffusers itself resolves defaults on the way (a DDIM config saved by
    # UniPCMultistepScheduler says timestep_spacing="linspace"): fewstep must do what its twin does.
    twin = {UniPCScheduler: UniPCMultistepScheduler, DPMSolverPPScheduler: DPMSolverMultistepScheduler,
            DDIMSolverScheduler: DDIMScheduler}[via]
    via.from_config(source.config).save_pretrained(tmp_path / "ours")
    twin.from_config(source.config).save_pretrained(tmp_path / "twin")
    ours, theirs = (theirs_cls.from_pretrained(tmp_path / d) for d in ("ours", "twin"))
    resolved = {}
    for key, value in source.config.items():
        if not key.startswith("_") and ours.config[key] != value:
            # only where the twin resolved the key too (a default of its own, a value it maps)
            assert theirs.config[key] != value, (key, ours.config[key], value)
            resolved[key] = ours.config[key]
    plain = {k: v for k, v in source.config.items() if k != "_use_default_values"}
    _same_run(theirs_cls.from_config({**plain, **resolved}), ours)


def test_fewstep_only_settings_reach_diffusers_as_their_flags():
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    fs = UniPCScheduler.from_config(SD, order=3, variant="bh1", lower_order_final=False)
    back = UniPCMultistepScheduler.from_config(fs.config)
    assert (back.config.solver_order, back.config.solver_type, back.config.lower_order_final) == (3, "bh1", False)
    fs = DPMSolverPPScheduler.from_config({**SD, "final_sigmas_type": "sigma_min"}, order=3, variant="heun",
                                          space="noise")
    back = DPMSolverMultistepScheduler.from_config(fs.config)
    assert (back.config.solver_order, back.config.solver_type, back.config.algorithm_type) == (3, "heun", "dpmsolver")
    torch.testing.assert_close(run(fs, 10), run(back, 10), rtol=1e-6, atol=1e-8)
    # fewstep's spacing names that diffusers spells as flags
    for spacing, flag in [("karras", "use_karras_sigmas"), ("logsnr", "use_lu_lambdas"),
                          ("exponential", "use_exponential_sigmas")]:
        fs = DPMSolverPPScheduler.from_config(SD, timestep_spacing=spacing)
        assert fs.config[flag] is True and fs.config.timestep_spacing == "linspace"
        back = DPMSolverMultistepScheduler.from_config(fs.config)
        back.set_timesteps(7), fs.set_timesteps(7)
        torch.testing.assert_close(fs.sigmas, back.sigmas, rtol=2e-5, atol=0)
    with pytest.raises(ValueError, match="conflicts with use_karras_sigmas"):
        DPMSolverPPScheduler.from_config(SD, timestep_spacing="logsnr", use_karras_sigmas=True)


# ---------------------------------------------------------------- item 3: custom timesteps, shifted flow
def test_custom_timesteps_on_a_shifted_flow_config_are_refused_with_the_reason():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ts = [1000.0, 750.0, 500.0, 250.0]
    for cls in FEWSTEP_CLASSES:
        with pytest.raises(ValueError, match="shift the sigmas derived from them but not the timesteps"):
            cls.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config).set_timesteps(timesteps=ts)
    # unshifted: the same grid as diffusers (where timesteps and sigmas agree)
    theirs = FlowMatchEulerDiscreteScheduler(shift=1.0)
    theirs.set_timesteps(timesteps=ts)
    ours = DDIMSolverScheduler.from_config(theirs.config)
    ours.set_timesteps(timesteps=ts)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    torch.testing.assert_close(ours.timesteps.float(), theirs.timesteps)


# ---------------------------------------------------------------- item 4: USF in Flux pipelines and img2img
def _usf_twin(config, n, solver="unipc", **set_kwargs):
    from fewstep.samplers.solver_schedule import SolverSchedule
    from fewstep.samplers.solvers.usf import spell_out

    twin = FewstepScheduler.from_config(config, solver=solver)
    twin.set_timesteps(n, **set_kwargs)
    return SolverSchedule.from_grid(twin.grid, spell_out(twin.solver, twin.grid))


def test_usf_runs_when_a_pipeline_passes_the_schedules_own_sigmas():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = {**SCHNELL, "use_dynamic_shifting": True, "shift": 3.0}
    n = 4
    sigmas = np.linspace(1.0, 1 / n, n)  # what FluxPipeline passes
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    schedule = _usf_twin(cfg, n, sigmas=sigmas, mu=mu)
    usf = USFScheduler.from_config(cfg, solver_schedule=schedule)
    unipc = UniPCScheduler.from_config(cfg)
    ours = run(usf, n, sigmas=sigmas, mu=mu)
    torch.testing.assert_close(ours, run(unipc, n, sigmas=sigmas, mu=mu), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(usf.timesteps, unipc.timesteps)
    with pytest.raises(ValueError, match="the solver schedule runs its own 4 timesteps"):
        usf.set_timesteps(n, sigmas=sigmas, mu=mu + 0.5)  # another resolution: another grid
    with pytest.raises(ValueError, match="the solver schedule runs its own 4 timesteps"):
        usf.set_timesteps(5, sigmas=np.linspace(1.0, 0.2, 5), mu=mu)
    # the documented override: the schedule's grid, whatever the caller passes
    forced = USFScheduler.from_config(cfg, solver_schedule=schedule, schedule_overrides_sigmas=True)
    torch.testing.assert_close(run(forced, n, sigmas=sigmas, mu=mu + 0.5), ours, rtol=0, atol=0)


@pytest.mark.parametrize("solver,options", [("unipc", {}), ("unipc", {"order": 3, "variant": "bh1"}),
                                            ("dpmpp", {}), ("unipc", {"order": 3})])
def test_usf_spelling_out_a_solver_equals_it_started_part_way(solver, options):
    from fewstep.samplers.solver_schedule import SolverSchedule
    from fewstep.samplers.solvers.usf import spell_out

    n = 10
    twin = FewstepScheduler.from_config(SD, solver=solver, **options)
    twin.set_timesteps(n)
    schedule = SolverSchedule.from_grid(twin.grid, spell_out(twin.solver, twin.grid))
    for start in (0, 1, 3, 6):
        ref = run(FewstepScheduler.from_config(SD, solver=solver, **options), n, start)
        got = run(USFScheduler.from_config(SD, solver_schedule=schedule), n, start)
        # float64 loops; the two tables are built by different code (plan algebra vs Taylor rows)
        assert _rel(got, ref) < 1e-10, (start, _rel(got, ref))


# ---------------------------------------------------------------- item 5: smaller gaps
@pytest.mark.parametrize("cls", FEWSTEP_CLASSES)
def test_steps_refuse_a_timestep_other_than_the_one_they_compute_with(cls):
    s = cls.from_config(SD)
    s.set_timesteps(50)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="timestep 437 is not one of the 50 scheduled timesteps"):
        s.step(x, 437, x)
    ts = s.timesteps
    s.step(x, ts[10], x)  # the first step finds its place (diffusers' DDIM: stateless)
    with pytest.raises(ValueError, match=r"got timestep .*next step is 11"):
        s.step(x, ts[30], x)  # out of order: diffusers' DDIM would step from 30, fewstep's plan cannot
    with pytest.raises(ValueError, match="next step is 11"):
        s.step(x, float(ts[12]), x)
    # in order, given as tensor elements, host copies or plain numbers: all fine
    s.step(x, ts[11], x)
    s.step(x, ts[12].clone(), x)
    s.step(x, int(ts[13]), x)


def test_thresholding_accepts_diffusers_ranges_and_matches():
    from diffusers import DPMSolverMultistepScheduler

    cfg = {**SD, "thresholding": True, "sample_max_value": 0.5, "dynamic_thresholding_ratio": 0.0,
           "prediction_type": "epsilon"}
    ours = DPMSolverPPScheduler.from_config(cfg)
    theirs = DPMSolverMultistepScheduler.from_config(cfg)
    # one tolerance for the whole sample: the clamp's kink amplifies round-off on single elements
    assert _rel(run(ours, 6), run(theirs, 6)) < 1e-6


def test_constructors_take_diffusers_argument_names():
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    kw = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=3, solver_type="heun",
              lower_order_final=False)
    ours = DPMSolverPPScheduler(**kw)
    assert ours.solver.config["order"] == 3 and ours.solver.config["variant"] == "heun"
    assert ours.solver.config["lower_order_final"] is False and ours.config.solver_order == 3
    assert DPMSolverPPScheduler(**kw, use_karras_sigmas=True)._spacing == "karras"
    torch.testing.assert_close(run(ours, 8), run(DPMSolverMultistepScheduler(**kw), 8), rtol=1e-6, atol=1e-8)
    u = UniPCScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=1)
    theirs = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                     solver_order=1)
    # diffusers truncates flow timesteps to integers (docs/diffusers-differences.md): a model that ignores t
    def model(x, t):
        return smooth_model(x, torch.zeros_like(torch.as_tensor(t, dtype=x.dtype)))

    torch.testing.assert_close(run(u, 8, model=model), run(theirs, 8, model=model), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="disagree"):
        UniPCScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, shift=2.0)
    # explicit solver_options win over diffusers' names; the config then records what runs
    s = UniPCScheduler(solver_order=3, solver_options={"order": 1})
    assert s.solver.config["order"] == 1 and s.config.solver_order == 1


def test_vp_schedulers_expose_betas_and_alphas_as_diffusers_does():
    from diffusers import DDIMScheduler

    ours, theirs = DDIMSolverScheduler.from_config(SD), DDIMScheduler.from_config(SD)
    for key in ("betas", "alphas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cls", [UniPCScheduler, DDIMSolverScheduler, FewstepScheduler])
def test_save_and_reload_keep_the_config_equal(cls, tmp_path):
    first = cls.from_config(SD)
    first.save_pretrained(tmp_path / "a")
    again = cls.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert "_use_default_values" not in again.config
    assert dict(cls.from_pretrained(tmp_path / "b").config) == dict(again.config)
    assert (tmp_path / "a" / "scheduler_config.json").read_text() == (tmp_path / "b" / "scheduler_config.json").read_text()


# ---------------------------------------------------------------- diffusers' scheduler-test checks, for the drop-ins
# What diffusers' common scheduler tests (and the UniPC / DPM multistep / DDIM suites) check of a
# scheduler, as it applies to a drop-in: written here against the fewstep classes and their twins.
def _twins():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    return [(UniPCScheduler, UniPCMultistepScheduler), (DPMSolverPPScheduler, DPMSolverMultistepScheduler),
            (DDIMSolverScheduler, DDIMScheduler)]


@pytest.mark.parametrize("pair", range(3), ids=["unipc", "dpmpp", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_full_loops_equal_the_twin(pair, prediction_type, n):
    ours_cls, theirs_cls = _twins()[pair]
    cfg = {**SD, "prediction_type": prediction_type}
    if ours_cls is DDIMSolverScheduler and n == 1:
        cfg["set_alpha_to_one"] = True  # diffusers' DDIM ends one step on alphas_cumprod[0] otherwise
    assert _rel(run(ours_cls.from_config(cfg), n), run(theirs_cls.from_config(cfg), n)) < 1e-6


@pytest.mark.parametrize("pair", range(3), ids=["unipc", "dpmpp", "ddim"])
def test_step_api_shape_tuple_fp16_and_public_attributes(pair):
    ours_cls, theirs_cls = _twins()[pair]
    s = ours_cls.from_config(SD)
    assert s.init_noise_sigma == 1.0 and len(s) == 1000 and s.order == 1
    assert theirs_cls.__name__ in {c.__name__ for c in s.compatibles}
    s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.scale_model_input(x, s.timesteps[0]), x)
    out = s.step(smooth_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert out.prev_sample.shape == x.shape and out.pred_original_sample.shape == x.shape
    s.set_timesteps(10)
    tup = s.step(smooth_model(x, s.timesteps[0]), s.timesteps[0], x, return_dict=False)
    assert torch.equal(tup[0], out.prev_sample)  # return_dict=False: the same tensors, as a tuple
    s.set_timesteps(10)
    half = s.step(smooth_model(x, s.timesteps[0]).half(), s.timesteps[0], x.half()).prev_sample
    assert half.dtype == torch.float16 and _rel(half, out.prev_sample) < 1e-3


@pytest.mark.parametrize("pair", range(3), ids=["unipc", "dpmpp", "ddim"])
def test_loop_with_noise_from_a_begin_index_equals_the_twin(pair):
    # diffusers' test_full_loop_with_noise: add_noise at t_start, then step from there
    ours_cls, theirs_cls = _twins()[pair]
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    outs = []
    for cls in (ours_cls, theirs_cls):
        s = cls.from_config(SD)
        s.set_timesteps(10)
        start = 4
        x = s.add_noise(x0, noise, s.timesteps[start:start + 1])
        outs.append(run(s, 10, start, x))
    assert _rel(*outs) < 1e-6


def test_config_switch_through_diffusers_schedulers_and_back():
    # diffusers' test_switch: UniPC -> DPM singlestep -> DEIS -> DPM multistep -> UniPC gives the same run
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

    first = UniPCScheduler.from_config(SD, order=3)
    config = first.config
    for cls in (DPMSolverSinglestepScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler):
        config = cls.from_config(config).config
    again = UniPCScheduler.from_config(config)
    assert again.solver.config == first.solver.config
    assert _rel(run(again, 10), run(first, 10)) == 0.0


def test_a_begin_index_past_every_step_is_accepted_as_diffusers_does():
    # img2img at a low strength and step count (n = 1, strength 0.75): the pipeline cuts every step
    from diffusers import UniPCMultistepScheduler

    for s in (UniPCScheduler.from_config(SD), UniPCMultistepScheduler.from_config(SD)):
        s.set_timesteps(1)
        s.set_begin_index(1)
        assert len(s.timesteps[1:]) == 0
    s = UniPCScheduler.from_config(SD)
    s.set_timesteps(1)
    with pytest.raises(ValueError, match="begin_index=2 is out of range; allowed: 0 to 1"):
        s.set_begin_index(2)
