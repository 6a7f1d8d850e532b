"""Tuned files checked against the run that uses them (issue 21 item 2): guidance and grid, on every path."""

import warnings

import pytest
import torch

import fewstep
from fewstep import DCSolverScheduler, DPMSolverV3Scheduler
from fewstep.samplers import GridSpec, make_schedule
from fewstep.samplers.artifacts import ArtifactError, ArtifactMeta
from fewstep.samplers.dc_artifacts import DCRatios
from fewstep.samplers.ems import EMS, ems_lambda_grid
from fewstep.zoo.gmm import GaussianMixture, GMMModel

SCHED = make_schedule("linear")
MIX = GaussianMixture.random(4, 3, 2, seed=0)
MODEL = GMMModel(MIX, SCHED, "epsilon")
X = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
C = torch.arange(4) % 2
U = torch.full_like(C, -1)


def ratios(guidance, nfe=4, grid=None, schedule=SCHED.to_dict()):
    extra = {} if grid is None else {"grid": {"timesteps": grid, "final_sigma": 0.0}, "spacing": "karras"}
    return DCRatios([1.0, 1.0] + [0.9] * (nfe - 2), meta=ArtifactMeta(schedule=schedule, nfe=nfe, guidance=guidance,
                                                                       solver="dc", extra=extra))


def ems(guidance, shape=(4,)):
    ones = torch.ones(17, *shape, dtype=torch.float64)
    return EMS(ems_lambda_grid(SCHED, 16), ones, 0 * ones, 0 * ones,
               ArtifactMeta(schedule=SCHED.to_dict(), guidance=guidance, solver="dpmv3"))


def run(guidance, **kw):
    guided = dict(guidance=guidance, cond=C, uncond=U) if guidance is not None else dict(cond=C)
    return fewstep.sample(MODEL, X, schedule=SCHED, nfe=4, **guided, **kw)


@pytest.mark.parametrize("made,used", [(2.0, None), (None, 7.5), (2.0, 3.0)])
def test_dc_ratios_of_another_guidance_are_refused(made, used):
    """Reproducer 02: unguided <-> guided passed silently (only two guided scales were compared)."""
    with pytest.raises(ArtifactError, match="guidance"):
        run(used, solver="dc", ratios=ratios(made))
    run(made, solver="dc", ratios=ratios(made))  # its own guidance runs
    run(used, solver="dc", ratios=[1.0, 1.0, 0.9, 0.9])  # a bare list records nothing to check


def test_guidance_one_is_no_guidance():
    run(1.0, solver="dc", ratios=ratios(None))
    run(None, solver="dc", ratios=ratios(1.0))


@pytest.mark.parametrize("made,used", [(3.0, 7.5), (None, 7.5), (3.0, None)])
def test_ems_of_another_guidance_is_refused_also_with_a_prebuilt_plan(made, used):
    """Reproducer 08: an EMS computed at one guidance drove a run at another silently."""
    made_text = "no guidance" if made is None else f"guidance {made:g}"
    with pytest.raises(ArtifactError, match=f"dpmv3_ems artifact was made for {made_text}"):
        run(used, solver="dpmv3", ems=ems(made))
    plan = fewstep.make_plan(SCHED, fewstep.get_solver("dpmv3", ems=ems(made)), 4)
    guided = dict(guidance=used, cond=C, uncond=U) if used is not None else dict(cond=C)
    with pytest.raises(ArtifactError, match="uses " + ("no guidance" if used is None else f"guidance {used:g}")):
        fewstep.sample(MODEL, X, plan=plan, **guided)
    run(made, solver="dpmv3", ems=ems(made))


def test_ratios_calibrated_on_another_grid_are_refused():
    karras = fewstep.make_plan(SCHED, "unipc", 4, spacing=GridSpec(spacing="karras", convention="multistep"))
    r = ratios(2.0, grid=karras.grid.model_timesteps.tolist())
    for spacing in ("linspace", "trailing"):
        with pytest.raises(ArtifactError, match=r"calibrated on the grid \[999, .*spacing karras.*this run's grid"):
            run(2.0, solver="dc", ratios=r, spacing=GridSpec(spacing=spacing, convention="multistep"))
    run(2.0, solver="dc", ratios=r, spacing=GridSpec(spacing="karras", convention="multistep"))


def test_calibrate_dc_records_its_grid():
    r = fewstep.calibrate_dc(MODEL, X[:2], schedule=SCHED, nfe=4, iterations=1, reference_nfe=6, cond=C[:2],
                             guidance=2.0, uncond=U[:2], progress=False)
    grid = r.meta.extra["grid"]
    assert len(grid["timesteps"]) == 4 and grid["final_sigma"] == 0.0
    with pytest.raises(ArtifactError, match="calibrated on the grid"):
        run(2.0, solver="dc", ratios=r, spacing="karras")


# ---------------------------------------------------------------- through a diffusers pipeline

@pytest.fixture(scope="module")
def pipe():
    from fewstep.zoo.digits import load_digits_pipeline

    p = load_digits_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _call(pipe, guidance):
    return pipe(class_labels=[1, 2], guidance_scale=guidance, num_inference_steps=4, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_the_scheduler_reads_the_guidance_from_the_pipeline(pipe):
    """newcomer/dc_use.py: ratios calibrated at 7.5 ran in pipe(guidance_scale=3.0) without a word."""
    base = pipe.scheduler
    try:
        schedule = DCSolverScheduler.from_config(base.config).schedule.to_dict()
        pipe.scheduler = DCSolverScheduler.from_config(base.config, ratios=ratios(7.5, schedule=schedule))
        with pytest.raises(ArtifactError, match=r"made for guidance 7.5, but the pipeline .*guidance_scale=3.0"):
            _call(pipe, 3.0)
        with pytest.raises(ArtifactError, match="uses no guidance"):
            _call(pipe, 1.0)  # diffusers: guidance_scale <= 1 runs no CFG
        assert torch.isfinite(_call(pipe, 7.5)).all()
        # the DC scheduler's own guidance option must agree with the pipeline too
        pipe.scheduler = DCSolverScheduler.from_config(base.config, ratios=ratios(7.5, schedule=schedule),
                                                       guidance=7.5)
        with pytest.raises(ArtifactError, match="guidance option is 7.5"):
            _call(pipe, 3.0)
        ems_bad = EMS(*(t for t in ems(3.0, (1, 8, 8)).tensors().values()), ArtifactMeta(
            schedule=DPMSolverV3Scheduler.from_config(base.config, degenerate=True).schedule.to_dict(), guidance=3.0))
        pipe.scheduler = DPMSolverV3Scheduler.from_config(base.config, ems=ems_bad)
        with pytest.raises(ArtifactError, match="dpmv3_ems artifact was made for guidance 3"):
            _call(pipe, 7.5)
        assert torch.isfinite(_call(pipe, 3.0)).all()
    finally:
        pipe.scheduler = base


def test_a_scheduler_outside_a_pipeline_warns_once_that_it_cannot_check():
    s = DCSolverScheduler.from_config({}, ratios=ratios(7.5))
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="cannot see this run's guidance scale") as record:
        for _ in range(2):
            s.set_timesteps(4)
            for t in s.timesteps:
                x = s.step(torch.tanh(x), t, x).prev_sample
    assert sum("cannot see" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = DCSolverScheduler.from_config({}, ratios=ratios(7.5), guidance=7.5)  # declared: checked, no warning
        s.set_timesteps(4)
        s.step(torch.tanh(x), s.timesteps[0], x)
    s = DCSolverScheduler.from_config({}, ratios=ratios(7.5), guidance=3.0)
    with pytest.raises(ArtifactError, match="calibrated for guidance 7.5, this run uses 3"):
        s.set_timesteps(4)


def test_relabel_is_the_deliberate_override():
    e = ems(None).relabel(guidance=7.5)
    run(7.5, solver="dpmv3", ems=e)
    assert e.meta.extra["relabelled"] == {"guidance": None} and ems(None).meta.guidance is None
    with pytest.raises(ValueError, match="relabel takes meta fields"):
        ems(None).relabel(bogus=1)


def test_the_scheduler_warns_when_the_pipeline_model_is_not_the_tuned_one(pipe):
    base = pipe.scheduler
    try:
        schedule = DCSolverScheduler.from_config(base.config).schedule.to_dict()
        r = DCRatios([1.0, 1.0, 0.9, 0.9], meta=ArtifactMeta(schedule=schedule, nfe=4, guidance=3.0,
                                                             fingerprint="module:another-model"))
        pipe.scheduler = DCSolverScheduler.from_config(base.config, ratios=r)
        with pytest.warns(UserWarning, match="tuned on model module:another-model"):
            _call(pipe, 3.0)
    finally:
        pipe.scheduler = base


def test_a_prebuilt_plan_is_checked_against_the_model_too():
    r = DCRatios([1.0, 1.0, 0.9, 0.9], meta=ArtifactMeta(schedule=SCHED.to_dict(), nfe=4, guidance=2.0,
                                                         fingerprint="gmm:another"))
    plan = fewstep.make_plan(SCHED, fewstep.get_solver("dc", ratios=r, guidance=2.0), 4)
    for kw in (dict(plan=plan), dict(solver="dc", ratios=r)):
        with pytest.warns(UserWarning, match="tuned on model gmm:another") as record:
            fewstep.sample(MODEL, X, guidance=2.0, cond=C, uncond=U, **({} if "plan" in kw else
                                                                        dict(schedule=SCHED, nfe=4)), **kw)
        assert record[0].filename == __file__  # attributed to the caller of fewstep.sample
