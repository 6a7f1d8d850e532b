"""Built-in published schedules (Align Your Steps): exact numbers, every solver, interpolation, family warnings, CLI."""

import json
import math
import warnings

import pytest
import torch

import fewstep
from fewstep.samplers import solver_schedule as solver_schedule_module
from fewstep.samplers.published import loglinear_interp
from fewstep.samplers.solver_schedule import list_published, load_published
from fewstep.samplers.artifacts import ArtifactError

NAMES = ("ays:sd15", "ays:sdxl", "ays:svd")
SOLVER_OPTIONS = {"dpmv3": {"degenerate": True}}


def family_schedule(name):
    return fewstep.make_schedule(load_published(name).meta.schedule)


def test_every_built_in_schedule_is_listed_with_its_source_and_family():
    entries = {e["name"]: e for e in list_published()}
    assert set(NAMES) <= set(entries)
    for e in entries.values():
        assert "arXiv:2404.14507" in e["source"] and e["model_family"] and e["nfe"] == 10


@pytest.mark.parametrize("name", NAMES)
def test_native_step_count_reproduces_the_published_numbers_for_every_solver(name):
    info = load_published(name).published
    schedule = family_schedule(name)
    for solver in fewstep.list_solvers():
        options = {"solver_schedule": name, **SOLVER_OPTIONS.get(solver, {})}
        if solver == "usf":  # USF runs per-step strategies, which a timesteps-only schedule does not have
            with pytest.raises(ValueError, match="needs per-step strategies"):
                fewstep.make_plan(schedule, solver, **options)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the schedule's own family: no warning
            grid = fewstep.make_plan(schedule, solver, **options).grid
        if "timesteps" in info:  # published as timesteps: exactly those
            assert grid.model_timesteps.tolist() == [float(t) for t in info["timesteps"]], solver
        # sigma / alpha at the points are the published noise levels: exactly for VE sigmas, and to the
        # 1e-5 that the authors' float32 alphas_cumprod (vs our float64 betas) allow for the VP timesteps.
        levels = (grid.sigma / grid.alpha)[:-1].tolist()
        rel = 0 if info["published_form"] == "sigmas" else 1e-5
        for got, want in zip(levels, info["sigmas"][:-1]):
            assert got == pytest.approx(want, rel=rel, abs=0), (solver, got, want)
        assert float(grid.sigma[-1]) == 0.0


def test_the_numbers_agree_with_diffusers_ays_constants():
    from diffusers.schedulers import AysSchedules

    assert load_published("ays:sd15").published["timesteps"] == AysSchedules["StableDiffusionTimesteps"]
    assert load_published("ays:sdxl").published["timesteps"] == AysSchedules["StableDiffusionXLTimesteps"]
    assert load_published("ays:svd").published["sigmas"][:-1] == AysSchedules["StableDiffusionVideoSigmas"][:-1]
    for name, key in (("ays:sd15", "StableDiffusionSigmas"), ("ays:sdxl", "StableDiffusionXLSigmas")):
        info = load_published(name).published
        assert info["table_sigmas"] == AysSchedules[key][:-1]  # the paper's rounded Table 3 levels
        # the released integer timesteps move the levels by at most 1.4% (SDXL, t=13) from the table's
        assert info["sigmas"][:-1] == pytest.approx(info["table_sigmas"], rel=1.5e-2)


def test_loglinear_interpolation():
    levels = load_published("ays:sd15").published["sigmas"]
    assert loglinear_interp(levels, len(levels)) == pytest.approx(levels, rel=1e-14)
    fine = loglinear_interp(levels, 2 * (len(levels) - 1) + 1)
    assert fine[::2] == pytest.approx(levels, rel=1e-14)
    mids = [math.sqrt(a * b) for a, b in zip(levels, levels[1:])]  # linear in log = geometric mean
    assert fine[1::2] == pytest.approx(mids, rel=1e-12)
    sched = load_published("ays:sd15", 20)
    assert sched.nfe == 20 and sched.timesteps[::2] == tuple(float(t) for t in sched.published["timesteps"])
    grid = fewstep.make_plan("scaled_linear", "unipc", solver_schedule="ays:sd15", nfe=20).grid
    assert ((grid.sigma / grid.alpha)[:-1]).tolist() == pytest.approx(fine[:-1], rel=1e-5)
    assert load_published("ays:sd15", 10) is load_published("ays:sd15")
    for steps in (4, 7, 25):
        ts = load_published("ays:svd", steps).timesteps
        assert len(ts) == steps and ts[0] == 700.0 and all(b < a for a, b in zip(ts, ts[1:]))


def test_diffusers_scheduler_loads_by_name_and_interpolates_to_num_inference_steps():
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = fewstep.UniPCScheduler.from_config(fewstep.UniPCScheduler().config, solver_schedule="ays:sd15", **cfg)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == load_published("ays:sd15").published["timesteps"]
    sched.set_timesteps(7)
    assert len(sched.timesteps) == 7 and int(sched.timesteps[0]) == 999


def test_another_model_family_warns_once(monkeypatch):
    monkeypatch.setattr(solver_schedule_module, "_WARNED", set())
    from fewstep.zoo.gmm import GaussianMixture, GMMModel

    model = GMMModel(GaussianMixture.random(dim=4, components=2, seed=0))  # the DDPM "linear" schedule
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match="tuned for Stable Diffusion 1.x") as record:
        a = fewstep.sample(model, x, solver="ddim", solver_schedule="ays:sd15")
    assert sum("tuned for" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = fewstep.sample(model, x, solver="ddim", solver_schedule="ays:sd15")
    assert torch.equal(a, b)


def test_unknown_names_and_bad_requests_are_rejected():
    with pytest.raises(ValueError, match=r"unknown built-in schedule 'ays:sd3'.*ays:sd15"):
        fewstep.sample(lambda x, t: x, torch.zeros(1, 2), solver="ddim", solver_schedule="ays:sd3")
    with pytest.raises(ValueError, match="do not pass timesteps"):
        fewstep.make_plan("scaled_linear", "ddim", solver_schedule="ays:sd15", timesteps=[999, 500])
    with pytest.raises((ValueError, ArtifactError)):
        load_published("ays:sd15", 0)


def test_cli_lists_schedules(capsys):
    from fewstep.cli import main

    assert main(["list", "schedules"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES)
    assert main(["list", "schedules", "--json"]) == 0
    assert {e["name"] for e in json.loads(capsys.readouterr().out)} >= set(NAMES)
