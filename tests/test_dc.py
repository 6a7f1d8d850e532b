"""DC-Solver: exact reduction to UniPC / DPM-Solver++, Lagrange weights, gradients, artifacts, calibration."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fewstep
from fewstep import ArtifactError, ArtifactMeta, DCCPR, DCRatios, DCSolverScheduler, UniPCScheduler
from fewstep.cli import main
from fewstep.tuning.dc import calibrate as calibrate_module
from fewstep.samplers.dc_artifacts import cpr_features, fit_cpr, load_dc_file
from fewstep.samplers.solvers.dc import compensation_table, lagrange_weights
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(dim=4, components=3, num_classes=3, seed=0)
MODEL = GMMModel(MIX)
LINEAR = fewstep.make_schedule("linear")


def x_T(n=6, dtype=torch.float64):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("options", [{}, {"order": 3}, {"order": 1}, {"variant": "bh1", "order": 3},
                                     {"space": "noise"}, {"corrector": False}, {"dc_order": 3}, {"dc_order": 1}])
def test_unit_ratios_reproduce_unipc_bitwise(nfe, options):
    base = {k: v for k, v in options.items() if k != "dc_order"}
    ref = fewstep.sample(MODEL, x_T(), solver="unipc", nfe=nfe, **base)
    for ratios in (None, [1.0] * nfe):
        out = fewstep.sample(MODEL, x_T(), solver="dc", nfe=nfe, ratios=ratios, **options)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unit_ratios_reproduce_dpmpp_bitwise(order):
    for nfe in (2, 4, 7):
        ref = fewstep.sample(MODEL, x_T(), solver="dpmpp", nfe=nfe, order=order)
        assert torch.equal(fewstep.sample(MODEL, x_T(), solver="dc_dpmpp", nfe=nfe, order=order), ref)


def toy(x, t):
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.dim() - 1))
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


def run_scheduler(s, n=6, start=0):
    s.set_timesteps(n)
    if start:
        s.set_begin_index(start)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[start:]:
        x = s.step(toy(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_unit_ratios_reproduce_unipc_through_diffusers():
    ref = run_scheduler(UniPCScheduler.from_config({}, order=3))
    for kwargs in ({}, {"ratios": [1.0] * 6}):
        assert torch.equal(run_scheduler(DCSolverScheduler.from_config({}, order=3, **kwargs)), ref)
    other = run_scheduler(DCSolverScheduler.from_config({}, order=3, ratios=[1, 1, 0.9, 1.1, 1.05, 1]))
    assert float((other - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("dc_order", [1, 2, 3])
def test_lagrange_weights_exact_on_polynomials_of_degree_dc_order(dc_order):
    g = np.random.default_rng(dc_order)
    nodes = torch.tensor(np.sort(g.uniform(-2, 1, dc_order + 1))[::-1].copy())
    for at in (0.37, 1.0, -0.8, 1.6):
        w = lagrange_weights(nodes, torch.tensor(at, dtype=torch.float64))
        for degree in range(dc_order + 2):
            c = g.normal(size=degree + 1)
            p = lambda u: sum(ck * u**k for k, ck in enumerate(c))  # noqa: E731
            err = abs(float((w * p(nodes)).sum()) - p(at))
            if degree <= dc_order:
                assert err < 1e-12
            elif at not in nodes.tolist():
                assert err > 1e-6  # one degree more is not reproduced: the weights have the right order
    one_hot = lagrange_weights(nodes, nodes[1].clone())
    assert one_hot.tolist() == [0.0, 1.0] + [0.0] * (dc_order - 1)


def test_compensation_interpolates_in_model_timesteps_at_the_shifted_time():
    """Weights equal the Lagrange basis over the model timesteps t_i, t_{i-1}, t_{i-2} at
    t' = t_{i-1} + rho (t_i - t_{i-1}) (the official formula, written out here in numpy)."""
    plan = fewstep.make_plan(fewstep.make_schedule("scaled_linear"), "unipc", 6, spacing="logsnr")
    grid = plan.grid
    ratios = torch.tensor([1, 1, 0.7, 1.3, 0.95, 1.1], dtype=torch.float64)
    table = compensation_table(grid, ratios, 2, 3)
    ts = grid.model_timesteps.numpy()
    for i in range(6):
        if i < 2:
            assert table[i].tolist() == [1.0, 0.0, 0.0]
            continue
        t_ = ts[i - 1] + float(ratios[i]) * (ts[i] - ts[i - 1])
        pts = [ts[i], ts[i - 1], ts[i - 2]]
        expect = [np.prod([(t_ - pts[k]) / (pts[j] - pts[k]) for k in range(3) if k != j]) for j in range(3)]
        np.testing.assert_allclose(table[i].numpy(), expect, rtol=1e-10, atol=1e-12)


def test_compensated_output_feeds_the_predictor_and_stays_in_the_history():
    """dc_dpmpp(order=1) against a hand-written loop: DDIM's data-space step on D'_i, where D'_i is
    the Lagrange value (over model timesteps) of the history, whose older entries are compensated too."""
    ratios = [1, 1, 0.6, 1.4, 0.8, 1.2]
    out = fewstep.sample(MODEL, x_T(), solver="dc_dpmpp", order=1, nfe=6, ratios=ratios)
    grid = fewstep.make_plan(LINEAR, "dc_dpmpp", 6, order=1).grid
    ts, alpha, sigma = grid.model_timesteps.tolist(), grid.alpha.tolist(), grid.sigma.tolist()
    x, hist = x_T(), []
    for i in range(6):
        eps = MODEL(x, torch.full((x.shape[0],), ts[i], dtype=torch.float32))
        hist.insert(0, (x - sigma[i] * eps) / alpha[i])
        if i >= 2:
            t_ = ts[i - 1] + ratios[i] * (ts[i] - ts[i - 1])
            pts = ts[i - 2: i + 1][::-1]
            w = [np.prod([(t_ - pts[k]) / (pts[j] - pts[k]) for k in range(3) if k != j]) for j in range(3)]
            hist[0] = w[0] * hist[0] + w[1] * hist[1] + w[2] * hist[2]
        x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * (1 - sigma[i + 1] * alpha[i] / (sigma[i] * alpha[i + 1])) * hist[0]
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-12)
    assert float((out - fewstep.sample(MODEL, x_T(), solver="ddim", nfe=6, spacing=grid_spec())).abs().max()) > 1e-3


def grid_spec():
    return fewstep.GridSpec(convention="multistep")


def _final_loss(solver, plan0, x, rho_free, dc_order=2):
    rho = torch.cat([torch.ones(dc_order, dtype=torch.float64), rho_free])
    out = fewstep.sample(MODEL, x, plan=solver.compensated(plan0, rho))
    return out.pow(2).sum()


@pytest.mark.parametrize("name", ["dc", "dc_dpmpp"])
@pytest.mark.parametrize("start", ["ones", "random"])
def test_gradient_of_the_final_sample_matches_finite_differences(name, start):
    solver = fewstep.get_solver(name)
    plan0 = fewstep.make_plan(LINEAR, solver, 6)
    x = x_T()
    free = torch.ones(4, dtype=torch.float64)
    if start == "random":
        free = free + 0.3 * torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = free.clone().requires_grad_()
    _final_loss(solver, plan0, x, p).backward()
    h = 1e-6
    fd = [(_final_loss(solver, plan0, x, free + h * e) - _final_loss(solver, plan0, x, free - h * e)).item() / (2 * h)
          for e in torch.eye(4, dtype=torch.float64)]
    assert all(abs(v) > 1e-4 for v in fd)  # every ratio matters
    np.testing.assert_allclose(p.grad.numpy(), fd, rtol=1e-5)


# ---------------------------------------------------------------- artifacts


def test_ratio_and_cpr_files_round_trip(tmp_path):
    meta = ArtifactMeta(fingerprint=MODEL.fingerprint(), schedule=LINEAR.to_dict(), nfe=5, guidance=3.0, solver="dc")
    r = DCRatios([1, 1, 0.8, 1.2, 0.99], 2, meta)
    c = DCCPR(np.linspace(-1, 1, 36).tolist(), 2, ArtifactMeta(solver="dc", extra={"pairs": [[5, 2.0]]}))
    for art, cls in ((r, DCRatios), (c, DCCPR)):
        for suffix in (".json", ".yaml"):
            loaded = cls.load(art.save(tmp_path / f"{cls.kind}{suffix}"))
            assert loaded == art and loaded.meta == art.meta and load_dc_file(tmp_path / f"{cls.kind}{suffix}") == art
    assert DCRatios.coerce([1, 1, 0.5]).meta.nfe == 3


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.update(ratios=[1, 1, 0.9]), "ratios has 3 entries but meta.nfe is 5"),
    (lambda r: r.update(ratios=[1, 1, float("nan"), 1, 1]), r"ratios\[2\] is nan; every entry must be finite"),
    (lambda r: r.update(ratios=[1, 1, "x", 1, 1]), r"ratios\[2\]='x' is not a number"),
    (lambda r: r.update(ratios=[1, 0.9, 1, 1, 1]), r"ratios\[1\]=0.9: the first dc_order=2 ratios must be 1"),
    (lambda r: r.update(dc_order=7), "dc_order=7 is out of range"),
    (lambda r: r.update(extra_field=1), r"unknown field\(s\) \['extra_field'\]"),
])
def test_malformed_ratio_files_are_rejected(tmp_path, mutate, match):
    record = DCRatios([1, 1, 0.9, 1.1, 1], meta=ArtifactMeta(nfe=5)).to_dict()
    mutate(record)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=f"dc_ratios artifact {path}: .*{match}"):
        DCRatios.load(path)


def test_cpr_files_with_the_wrong_length_or_nan_are_rejected(tmp_path):
    for coefficients, match in (([0.0] * 35, "must hold 36 numbers"), ([0.0] * 35 + [float("nan")], "is nan")):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(DCCPR([0.0] * 36).to_dict() | {"coefficients": coefficients}))
        with pytest.raises(ArtifactError, match=f"dc_cpr artifact {path}: .*{match}"):
            DCCPR.load(path)


def test_mismatched_solver_nfe_guidance_and_options_are_rejected(tmp_path):
    meta = ArtifactMeta(schedule=LINEAR.to_dict(), nfe=5, guidance=3.0, solver="dc")
    path = DCRatios([1, 1, 0.9, 1.1, 1], 2, meta).save(tmp_path / "r.json")
    x = x_T()
    with pytest.raises(ArtifactError, match="made for NFE 5, but this grid has 6 steps"):
        fewstep.sample(MODEL, x, solver="dc", nfe=6, dc_file=str(path))
    with pytest.raises(ArtifactError, match="belongs to solver 'dc', not 'dc_dpmpp'"):
        fewstep.sample(MODEL, x, solver="dc_dpmpp", nfe=5, ratios=path)
    with pytest.raises(ArtifactError, match="made for another noise schedule"):
        fewstep.sample(MODEL, x, schedule="scaled_linear", solver="dc", nfe=5, ratios=path)
    with pytest.raises(ArtifactError, match="made for NFE 4, but this grid has 5 steps"):
        fewstep.sample(MODEL, x, solver="dc", nfe=5, ratios=[1, 1, 1, 1])
    with pytest.raises(ArtifactError, match="dc_ratios has 4 ratios, but this grid has 5 steps"):
        fewstep.sample(MODEL, x, solver="dc", nfe=5, ratios=DCRatios([1, 1, 1, 1]))
    cond = torch.arange(6) % 3
    with pytest.raises(ArtifactError, match="calibrated for guidance 3, this run uses 5"):
        fewstep.sample(MODEL, x, solver="dc", nfe=5, ratios=path, guidance=5.0, cond=cond,
                       uncond=torch.full_like(cond, -1))
    with pytest.raises(ValueError, match="with cpr needs guidance=<CFG scale>"):
        fewstep.make_plan("linear", fewstep.get_solver("dc", cpr=DCCPR([0.0] * 36)), 5)
    with pytest.raises(ValueError, match="with cpr needs guidance=<CFG scale>"):  # an unguided run
        fewstep.sample(MODEL, x, solver="dc", nfe=5, cpr=DCCPR([0.0] * 36))
    with pytest.raises(ValueError, match="takes ratios or cpr, not both"):
        fewstep.get_solver("dc", cpr=DCCPR([0.0] * 36), ratios=[1, 1], guidance=2.0)
    with pytest.raises(ValueError, match="made with dc_order=3, but solver 'dc' has dc_order=2"):
        fewstep.get_solver("dc", ratios=DCRatios([1, 1, 1, 0.9], dc_order=3, meta=ArtifactMeta(solver="dc")))
    with pytest.raises(ValueError, match="got both ratios and dc_file"):
        fewstep.get_solver("dc", ratios=[1, 1, 1], dc_file=str(path))
    (tmp_path / "y.json").write_text(json.dumps({"fewstep_artifact": "ems", "version": 1}))
    with pytest.raises(ArtifactError, match="is neither a dc_ratios nor a dc_cpr artifact"):
        fewstep.get_solver("dc", dc_file=str(tmp_path / "y.json"))


def test_cpr_matches_the_nested_cascade_and_fit_recovers_it():
    coef = np.random.default_rng(0).normal(scale=0.3, size=36)
    cpr = DCCPR(coef.tolist())
    for nfe, g in ((5, 1.5), (8, 7.5), (12, 3.0)):
        c = coef.reshape(4, 3, 3)
        n, gs = nfe / 50, g / 12
        expect = [1.0, 1.0]
        for i in range(2, nfe):
            x = (i + 1) / nfe
            a = [sum((c[k, m] @ [n * n, n, 1]) * gs ** (2 - m) for m in range(3)) for k in range(4)]
            expect.append(sum(a[k] * x**k for k in range(4)))
        np.testing.assert_allclose(cpr.ratios(nfe, g), expect, rtol=1e-12)
        assert cpr_features(nfe, g, [2]).shape == (1, 36)
    pairs = [(n, g) for n in (5, 6, 8, 10) for g in (1.5, 3.0, 5.0, 7.5)]
    data = [DCRatios(cpr.ratios(n, g), meta=ArtifactMeta(nfe=n, guidance=g)) for n, g in pairs]
    fitted = fit_cpr(data, ArtifactMeta(solver="dc"), ridge=0)
    assert fitted.meta.extra["pairs"][0] == [5, 1.5] and fitted.meta.solver == "dc"
    for n, g in [*pairs, (7, 4.0), (9, 2.0)]:  # the model class holds the truth: unseen pairs too
        np.testing.assert_allclose(fitted.ratios(n, g), cpr.ratios(n, g), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="needs at least 3 of each"):
        fit_cpr(data[:8])
    with pytest.raises(ValueError, match="needs meta.guidance"):
        fit_cpr([DCRatios([1, 1, 1])])
    with pytest.raises(ValueError, match="ridge"):
        fit_cpr(data, ridge=-1.0)


def test_cpr_ridge_shrinks_predictions_towards_no_compensation():
    rng = np.random.default_rng(1)
    pairs = [(n, g) for n in (5, 6, 8, 10) for g in (1.5, 3.0, 5.0, 7.5)]
    data = [DCRatios([1, 1, *(1 + rng.normal(scale=0.3, size=n - 2))], meta=ArtifactMeta(nfe=n, guidance=g))
            for n, g in pairs]
    spread = [max(abs(r - 1) for n, g in [*pairs, (12, 9.0)] for r in fit_cpr(data, ridge=lam).ratios(n, g))
              for lam in (0.0, 1e-3, 1e-1, 1e6)]
    assert spread[0] > spread[1] > spread[2] > spread[3] and spread[3] < 1e-5  # towards rho = 1, not 0
    assert fit_cpr(data, ridge=1e-3).meta.extra["ridge"] == 1e-3


def test_sample_evaluates_cpr_at_its_own_guidance():
    cpr = DCCPR((0.02 * np.cos(np.arange(36))).tolist())
    cond = torch.arange(6) % 3
    run = dict(nfe=6, guidance=4.0, cond=cond, uncond=torch.full_like(cond, -1))
    via_cpr = fewstep.sample(MODEL, x_T(), solver="dc", cpr=cpr, **run)
    assert torch.equal(via_cpr, fewstep.sample(MODEL, x_T(), solver="dc", ratios=cpr.ratios(6, 4.0), **run))
    assert not torch.equal(via_cpr, fewstep.sample(MODEL, x_T(), solver="dc", ratios=cpr.ratios(6, 2.0), **run))


def test_scheduler_carries_ratios_and_cpr_through_save_pretrained(tmp_path):
    ratios = [1, 1, 0.9, 1.1, 1.05, 1]
    s = DCSolverScheduler.from_config({}, ratios=ratios)
    s.save_pretrained(tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "scheduler_config.json").read_text())
    assert saved["solver"] == "dc" and saved["solver_options"]["ratios"]["ratios"] == ratios
    loaded = DCSolverScheduler.from_pretrained(tmp_path / "r")
    assert torch.equal(run_scheduler(loaded), run_scheduler(s))
    cpr_path = DCCPR((0.01 * np.arange(36)).tolist(), meta=ArtifactMeta(solver="dc")).save(tmp_path / "cpr.json")
    c = DCSolverScheduler.from_config({}, dc_file=str(cpr_path), guidance=7.5)
    assert c.config.solver_options["dc_file"] is None and c.config.solver_options["guidance"] == 7.5
    c.save_pretrained(tmp_path / "c")
    assert torch.equal(run_scheduler(DCSolverScheduler.from_pretrained(tmp_path / "c")), run_scheduler(c))
    assert c.plan.info["dc_ratios"] == DCCPR.load(cpr_path).ratios(6, 7.5)
    with pytest.raises(ValueError, match="with cpr needs guidance"):  # pipelines never pass one
        DCSolverScheduler.from_config({}, cpr=str(cpr_path)).set_timesteps(6)
    # img2img: the run restarts part-way and keeps the ratios of the absolute steps
    assert torch.isfinite(run_scheduler(s, start=2)).all()


def test_digits_pipeline_saved_with_dc_ratios_reloads_as_the_same_sampler(tmp_path):
    from fewstep.zoo.digits import DigitsPipeline, load_digits_pipeline

    pipe = load_digits_pipeline(DCSolverScheduler)
    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, ratios=[1, 1, 0.5, 0.8, 1])
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(class_labels=[0, 1, 2, 3], num_inference_steps=5, latents=latents, output_type="pt",
                  guidance_scale=3.0)
    before = pipe(**kwargs).images
    pipe.save_pretrained(tmp_path)
    loaded = DigitsPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DCSolverScheduler
    assert loaded.scheduler.solver.config["ratios"] == pipe.scheduler.solver.config["ratios"]
    assert torch.equal(loaded(**kwargs).images, before)
    unipc = load_digits_pipeline(UniPCScheduler)
    unipc.set_progress_bar_config(disable=True)
    assert float((unipc(**kwargs).images - before).abs().max()) > 1e-3


# ---------------------------------------------------------------- calibration


def _calibrate(**kw):
    cond = torch.arange(8) % 3
    return fewstep.calibrate_dc(MODEL, x_T(8), schedule="linear", nfe=5, guidance=3.0, cond=cond,
                                uncond=torch.full_like(cond, -1), reference_nfe=60, **{"objective": "final", **kw})


def test_calibration_lowers_the_loss_and_records_its_provenance():
    r = _calibrate(iterations=12)
    e = r.meta.extra
    assert r.ratios[:2] == [1.0, 1.0] and r.ratios[2:] != [1.0, 1.0, 1.0]
    assert e["loss"] < 0.8 * e["loss_uncompensated"] and e["reference"] == "ddim, 60 steps"
    assert (r.meta.nfe, r.meta.guidance, r.meta.solver, r.meta.fingerprint) == (5, 3.0, "dc", MODEL.fingerprint())
    cond = torch.arange(8) % 3
    out = fewstep.sample(MODEL, x_T(8), solver="dc", nfe=5, ratios=r, guidance=3.0, cond=cond,
                         uncond=torch.full_like(cond, -1))
    ref = fewstep.sample(MODEL, x_T(8), solver="ddim", nfe=60, guidance=3.0, cond=cond, uncond=torch.full_like(cond, -1))
    assert (out - ref).pow(2).mean().item() == pytest.approx(e["loss"], rel=1e-9)


def test_interrupted_calibration_resumes_to_the_same_ratios(tmp_path, monkeypatch):
    whole = _calibrate(iterations=6)
    real_save = calibrate_module._save_checkpoint
    calls = []

    def crash_after_three(path, state):
        real_save(path, state)
        calls.append(state["iteration"])
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_module, "_save_checkpoint", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        _calibrate(iterations=6, checkpoint=tmp_path / "state.json")
    monkeypatch.setattr(calibrate_module, "_save_checkpoint", real_save)
    assert json.loads((tmp_path / "state.json").read_text())["iteration"] == 3
    resumed = _calibrate(iterations=6, checkpoint=tmp_path / "state.json")
    assert resumed.ratios == whole.ratios and resumed.meta.extra["loss"] == whole.meta.extra["loss"]
    for other in ({"lr": 0.05}, {"lr_schedule": "cosine"}, {"bounds": (0.5, 1.5)}):
        with pytest.raises(ValueError, match="checkpoint of another calibration"):
            _calibrate(**{"iterations": 6, **other}, checkpoint=tmp_path / "state.json")
    cosine = _calibrate(iterations=6, lr_schedule="cosine", checkpoint=tmp_path / "cosine.json")
    with pytest.raises(ValueError, match="checkpoint of another calibration"):  # the schedule depends on it
        _calibrate(iterations=7, lr_schedule="cosine", checkpoint=tmp_path / "cosine.json")
    assert cosine.ratios != whole.ratios


def test_calibration_keeps_ratios_within_bounds_and_anneals_the_rate():
    r = _calibrate(iterations=8, lr=0.5, bounds=(0.9, 1.05), lr_schedule="cosine")
    assert all(0.9 <= v <= 1.05 for v in r.ratios) and r.meta.extra["bounds"] == [0.9, 1.05]
    assert r.meta.extra["lr_schedule"] == "cosine" and any(v in (0.9, 1.05) for v in r.ratios[2:])
    rates = [calibrate_module._rate(0.1, "cosine", k, 8) for k in range(9)]
    assert rates[0] == 0.1 and rates[4] == pytest.approx(0.05) and rates[8] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert calibrate_module._rate(0.1, "constant", 7, 8) == 0.1
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        _calibrate(iterations=1, lr_schedule="step")
    for bad in ((1.0, 2.0), (0.5,), "0,2"):
        with pytest.raises(ValueError, match="bounds must be None or"):
            _calibrate(iterations=1, bounds=bad)


def test_calibration_rejects_bad_setups():
    with pytest.raises(ValueError, match="solver 'unipc' has no dynamic compensation"):
        _calibrate(solver="unipc")
    with pytest.raises(ValueError, match="do not pass \\['ratios'\\]"):
        _calibrate(ratios=[1] * 5)
    with pytest.raises(ValueError, match="NFE 2 leaves no step to compensate"):
        fewstep.calibrate_dc(MODEL, x_T(), schedule="linear", nfe=2)
    with pytest.raises(ValueError, match="reference must be a tensor of x_T's shape"):
        fewstep.calibrate_dc(MODEL, x_T(), schedule="linear", nfe=4, reference=torch.zeros(3))

    def frozen(x, t):
        with torch.no_grad():
            return MODEL(x, t)

    with pytest.raises(ValueError, match="must not run under torch.no_grad"):
        fewstep.calibrate_dc(frozen, x_T(), schedule="linear", nfe=5, iterations=1, reference=x_T(), objective="final")
    with pytest.raises(ValueError, match="must not run under torch.no_grad"):
        fewstep.calibrate_dc(frozen, x_T(), schedule="linear", nfe=5, iterations=1, objective="trajectory")


CLI = ["calibrate", "dc", "--model", "gmm", "--num-samples", "2", "--iterations", "1", "--reference-nfe", "10",
       "--no-progress"]


def test_calibrate_cli_single_pair(tmp_path, capsys):
    assert main([*CLI, "--nfe", "4", "--guidance", "2.5", "--out", str(tmp_path / "r.json")]) == 0
    r = DCRatios.load(tmp_path / "r.json")
    assert r.nfe == 4 and r.meta.guidance == 2.5 and r.meta.extra["seed"] == 100000
    assert r.meta.extra["reference"] == "ddim, 10 steps"
    capsys.readouterr()
    assert main([*CLI, "--iterations", "2", "--nfe", "4", "--out", str(tmp_path / "r.json")]) == 2
    assert "holds a calibration with other settings (differs in: ['iterations'])" in capsys.readouterr().err
    assert main([*CLI, "--grid", "nfe=4,5", "guidance=2,3,4", "--out", str(tmp_path / "c2.json")]) == 2
    assert "needs at least 3 of each" in capsys.readouterr().err
    assert main([*CLI, "--nfe", "4", "5", "--out", str(tmp_path / "c3.json")]) == 2
    assert "several NFE or guidance values need --grid" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_cli_grid_fits_cpr(tmp_path):
    out = tmp_path / "cpr.yaml"
    assert main([*CLI, "--grid", "nfe=3,4,5", "guidance=2,3,4", "--out", str(out)]) == 0
    cpr = DCCPR.load(out)
    pairs = sorted(p.name for p in (tmp_path / "cpr.calibration").glob("ratios-*.json"))
    assert len(cpr.meta.extra["pairs"]) == 9 == len(pairs) and pairs[0] == "ratios-nfe3-g2.json"
    assert cpr.meta.fingerprint == DCRatios.load(tmp_path / "cpr.calibration" / pairs[0]).meta.fingerprint


def test_compare_runs_dc_from_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    path = DCRatios([1, 1, 0.9, 1.1, 1], meta=ArtifactMeta(nfe=5, solver="dc")).save(tmp_path / "r.json")
    assert main(["compare", "--model", "gmm", "--solvers", "unipc", f"dc:dc_file={path}", "dc:ratios=[1,1,1,1,1]",
                 "--nfe", "5", "--num-samples", "8", "--out", str(tmp_path / "run"), "--no-progress",
                 "--no-plot"]) == 0
    entries = {e["method"]: e["mse"] for e in json.loads((tmp_path / "run" / "results.json").read_text())["entries"]}
    assert entries["unipc"] == entries["dc(ratios=[1, 1, 1, 1, 1])"] != entries[f"dc(dc_file={path})"]


@pytest.mark.slow
def test_calibrate_cli_survives_kill_9(tmp_path):
    args = [sys.executable, "-m", "fewstep.cli", "calibrate", "dc", "--model", "gmm", "--num-samples", "6",
            "--iterations", "30", "--nfe", "6", "--guidance", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "whole.json")], check=True, env=env, capture_output=True)
    state = tmp_path / "cut.calibration" / "state-nfe6-g3.json"
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "cut.json")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["iteration"] >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut.json").exists()
    subprocess.run([*args, "--out", str(tmp_path / "cut.json")], check=True, env=env, capture_output=True)
    assert DCRatios.load(tmp_path / "cut.json").ratios == DCRatios.load(tmp_path / "whole.json").ratios


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


DC_PRESETS = sorted((ROOT / "configs" / "calibrate").glob("dc-*.yaml")) + sorted(
    p for p in (ROOT / "configs" / "compare").glob("*.yaml") if p.name.startswith(("dc-", "timeshift-")))


@pytest.mark.parametrize("path", DC_PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sampler_presets_load_with_their_commands_schema(path, monkeypatch):
    from fewstep.config import load_config
    from fewstep.tuning.dc.command import CalibrateDCConfig
    from fewstep.eval.compare import CompareConfig

    monkeypatch.chdir(ROOT)  # presets name files relative to the repository root
    cfg = load_config(CalibrateDCConfig if path.parent.name == "calibrate" else CompareConfig, path)
    if path.parent.name == "compare":
        assert any(m.solver.startswith("dc") or "time_shift" in m.option_dict for m in cfg.methods)


def test_calibrate_preset_runs_with_overrides(tmp_path):
    out = tmp_path / "g.json"
    assert main(["calibrate", "dc", "--config", str(ROOT / "configs" / "calibrate" / "dc-gmm.yaml"),
                 "iterations=1", "num_samples=2", "reference_nfe=10", f"out={out}", "--no-progress"]) == 0
    assert DCRatios.load(out).meta.extra["iterations"] == 1


@pytest.mark.slow
def test_calibrate_cli_on_a_unet_pipeline_folder(tmp_path):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "r.json"
    assert main(["calibrate", "dc", "--model", str(tmp_path / "sd"), "--nfe", "4", "--guidance", "3",
                 "--num-samples", "2", "--iterations", "2", "--reference-nfe", "8", "--height", "32", "--width", "32",
                 "--out", str(out), "--no-progress"]) == 0
    r = DCRatios.load(out)
    assert r.meta.fingerprint == fewstep.model_fingerprint(pipe) and r.meta.extra["spacing"].startswith("spacing=leading")
    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, dc_file=str(out))
    latents = pipe(["a red cube"], num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                   output_type="latent").images
    assert latents.shape == (1, 4, 4, 4) and torch.isfinite(latents).all()


def test_calibration_runs_on_the_grid_the_scheduler_samples(tmp_path):
    # The pipeline grid comes from the scheduler (one derivation): with diffusers' use_karras_sigmas
    # flag the calibration grid is the Karras grid the DCSolverScheduler samples on, not the config's
    # nominal timestep_spacing.
    from fewstep.eval.testbeds import make_testbed
    from fewstep.tuning.dc.command import calibration_inputs
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    testbed = make_testbed(str(tmp_path / "sd"), "cpu", None, 32, 32)
    for flags in ({}, {"use_karras_sigmas": True}):
        testbed.base_config = {**testbed.base_config, **flags}
        sched = DCSolverScheduler.from_config(testbed.base_config)
        sched.set_timesteps(5)
        inputs = calibration_inputs(testbed, 3.0, 2, 100000, None)
        plan = fewstep.make_plan(inputs["schedule"], "dc", 5, spacing=inputs["spacing"])
        assert torch.equal(plan.grid.model_timesteps, sched.grid.model_timesteps), flags
        assert inputs["spacing"] == sched.grid_spec()
    assert calibration_inputs(testbed, 3.0, 2, 100000, "trailing")["spacing"].spacing == "trailing"


def test_calibration_reference_is_kept_reused_and_checked(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    args = [*CLI, "--nfe", "4", "--guidance", "2.5", "--out", str(tmp_path / "a.json")]
    assert main(args) == 0
    work = tmp_path / "a.calibration"
    path, done = work / "reference-g2.5.safetensors", work / "ratios-nfe4-g2.5.json"
    ref = load_file(path)["samples"]
    assert "reference: ddim, 10 steps" in capsys.readouterr().out
    done.unlink()  # the pair again: the kept reference is used, not recomputed
    assert main(args) == 0 and "reference:" not in capsys.readouterr().out
    save_file({"x": ref}, path, {"identity": "[('model', 'gmm')]"})  # the layout before the ReferenceStore
    done.unlink()
    assert main(args) == 0
    assert f"reference: ignoring {path}: it was made for another configuration" in capsys.readouterr().out
    assert torch.equal(load_file(path)["samples"], ref)
