"""DPM-Solver-v3: exact degenerate cases, an independent transcription of the official sampler,
snapping, the half-corrector, convergence orders, and the drop-in scheduler with its EMS file."""

import json
import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep import EMS, ArtifactError, ArtifactMeta, DPMSolverV3Scheduler
from fewstep.samplers.solvers.dpmv3 import _psi
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(4, 3, seed=0)
X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def synthetic_ems(schedule="linear", n_grid=400, shape=(4,)):
    """Smooth, dimension-dependent statistics shaped like real ones (any l, s, b define a consistent solver).

    l = sigma^2 / (alpha^2 v + sigma^2) is the exact l of Gaussian data of variance v.
    """
    sched = fewstep.make_schedule(schedule)
    lam = fewstep.samplers.ems.ems_lambda_grid(sched, n_grid)
    u = lam.reshape(-1, *[1] * len(shape))
    d = torch.linspace(0.5, 1.5, math.prod(shape), dtype=torch.float64).reshape(shape)
    l = torch.sigmoid(-(2 * u + torch.log(0.05 * d)))
    s = 0.1 * torch.sin(0.5 * u + d)
    b = 0.05 * torch.cos(0.3 * u * d)
    return EMS(lam, l, s, b, ArtifactMeta(schedule=sched.to_dict(), fingerprint=GMMModel(MIX).fingerprint()), 64)


@pytest.mark.parametrize("schedule,prediction,spacing", [
    ("linear", "epsilon", "linspace"), ("linear", "epsilon", "logsnr"), ("vp_cosine", "v_prediction", "logsnr"),
    ("flow", "flow", "linspace")])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_degenerate_statistics_reproduce_dpm_solver_pp(schedule, prediction, spacing, order):
    """l = 1, s = b = 0 is DPM-Solver++ exactly: order 2 in its Taylor ("heun") form, order 3 with the full
    second-difference term (third_order="taylor")."""
    model = GMMModel(MIX, schedule, prediction)
    kw = dict(schedule=schedule, prediction=prediction, nfe=7, spacing=spacing)
    ref = {1: dict(order=1), 2: dict(order=2, variant="heun"), 3: dict(order=3, variant="heun", third_order="taylor")}
    expect = fewstep.sample(model, X, solver="dpmpp", **ref[order], **kw)
    got = fewstep.sample(model, X, solver="dpmv3", degenerate=True, order=order, corrector=False, **kw)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    if order == 3:  # the reference DPM-Solver++(3M) (half the second-difference term) is a different method
        other = fewstep.sample(model, X, solver="dpmpp", order=3, variant="heun", **kw)
        assert float((other - got).abs().max()) > 1e-4


def test_flow_grid_from_pure_noise_starts_with_the_exact_step():
    """A flow grid starting at sigma = 1 (alpha = 0, lambda = -inf): that point gets DPM-Solver++'s exact
    first step and never enters a stencil, with or without statistics."""
    model = GMMModel(MIX, "flow", "flow")
    kw = dict(schedule="flow", prediction="flow", sigmas=[1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    expect = fewstep.sample(model, X, solver="dpmpp", variant="heun", **kw)
    torch.testing.assert_close(fewstep.sample(model, X, solver="dpmv3", degenerate=True, corrector=False, **kw),
                               expect, rtol=0, atol=1e-12)
    plan = fewstep.make_plan(solver="dpmv3", ems=synthetic_ems("flow", 200), **kw)
    assert plan.info["ems_index"][0] is None and plan.orders[:2] == [1, 1] and 1 not in plan.correct_steps()
    assert torch.isfinite(fewstep.sample(model, X, plan=plan)).all()


def test_presets_are_valid_options():
    from pathlib import Path

    from omegaconf import OmegaConf

    presets = sorted((Path(__file__).parent.parent / "configs" / "samplers").glob("dpmv3*.yaml"))
    assert len(presets) >= 2
    for path in presets:
        opts = OmegaConf.to_container(OmegaConf.load(path))
        assert opts.pop("solver") == "dpmv3"
        fewstep.get_solver("dpmv3", degenerate=True, **opts)
        s = fewstep.FewstepScheduler.from_config({}, solver="dpmv3", degenerate=True, **opts)
        assert s.solver.config["order"] == opts["order"]


def test_degenerate_statistics_on_an_ems_grid_reproduce_dpm_solver_pp():
    """With an EMS the grid is snapped; on those timesteps degenerate v3 is still DPM-Solver++(2M)."""
    ems = synthetic_ems(n_grid=300)
    model = GMMModel(MIX)
    plan = fewstep.make_plan("linear", "dpmv3", 8, ems=ems, degenerate=True, corrector=False)
    assert plan.coefficient_shape == ()  # degenerate statistics are scalars
    ts = plan.grid.model_timesteps.tolist()
    expect = fewstep.sample(model, X, solver="dpmpp", variant="heun", timesteps=ts)
    torch.testing.assert_close(fewstep.sample(model, X, plan=plan), expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_noise_prediction_statistics_reproduce_dpm_solver(order):
    """The paper's other degenerate case, l = 0, s = -1, b = 0 (f = e^{-lambda} eps), is DPM-Solver in noise
    space; plain zero statistics (s = 0) are not: they hold sigma eps / alpha constant instead of eps."""
    ems = synthetic_ems(n_grid=300)
    zeros = torch.zeros_like(ems.l)
    model = GMMModel(MIX)

    def run(s):
        plan = fewstep.make_plan("linear", "dpmv3", 8, order=order, corrector=False,
                                 ems=EMS(ems.lambdas, zeros, s, zeros, ems.meta, 64))
        return fewstep.sample(model, X, plan=plan), plan.grid.model_timesteps.tolist()

    got, ts = run(-torch.ones_like(zeros))
    ref = {1: dict(order=1), 2: dict(order=2, variant="heun"), 3: dict(order=3, variant="heun", third_order="taylor")}
    expect = fewstep.sample(model, X, solver="dpmpp", space="noise", timesteps=ts, **ref[order])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    assert float((run(zeros)[0] - expect).abs().max()) > 1e-2


# ---------------------------------------------------------------------------- the official algorithm

def official_integrals(ems, exact):
    """The official code's cumulative integrals L, S, I, B, C and E^(k) on the EMS grid.

    ``exact=False``: its trapezoid rule. ``exact=True``: the same cumulative formulas with
    every interval integrated exactly for linearly interpolated exponent and factor (fewstep's
    rule, via psi), to check the plan's per-step tables to round-off.
    """
    lam = ems.lambdas.reshape(-1, *[1] * len(ems.sample_shape))
    dl = lam[1:] - lam[:-1]

    def pieces(a, y):
        if exact:
            p0, p1 = _psi(1, a[1:] - a[:-1])
            return dl * torch.exp(a[:-1]) * (y[:-1] * p0 + (y[1:] - y[:-1]) * p1)
        return 0.5 * dl * (y[1:] * torch.exp(a[1:]) + y[:-1] * torch.exp(a[:-1]))

    def cum(a, y):
        return torch.cat([torch.zeros_like(y[:1] * a[:1]), torch.cumsum(pieces(a, y), 0)])

    zero = torch.zeros_like(ems.l)
    L, S = cum(zero, ems.l), cum(zero, ems.s)
    I, B = cum(L + S, torch.ones_like(L)), cum(-S, ems.b)
    C = cum(L + S, B)

    def step(js, jt, k):
        decay = torch.exp(L[js] - L[jt])
        if k == 0:
            return decay, torch.exp(-L[jt] - S[js]) * (I[jt] - I[js]), torch.exp(-L[jt]) * (
                C[jt] - C[js] - B[js] * (I[jt] - I[js]))
        a = (L + S)[js:jt + 1] - (L + S)[js]
        d = lam[js:jt + 1] - lam[js]
        if not exact:
            w = d**k / math.factorial(k) * torch.exp(a)
            return decay, (0.5 * dl[js:jt] * (w[1:] + w[:-1])).sum(0), None
        psi = _psi(k, a[1:] - a[:-1])
        acc = sum(d[:-1] ** (k - i) / math.factorial(k - i) * dl[js:jt] ** (i + 1) * psi[i] for i in range(k + 1))
        return decay, (torch.exp(a[:-1]) * acc).sum(0), None

    def g(f, js, jj):
        return torch.exp(S[js] - S[jj]) * f - torch.exp(S[js]) * (B[jj] - B[js])

    return step, g


def official_sampler(model, x, ems, idx, order, p_pseudo, use_corrector, c_pseudo, exact):
    """A transcription of DPM_Solver_v3.sample: cached x / eps lists, the corrector rewrites the newest
    eps so that N = sigma eps - l x stays fixed, derivatives by the Taylor system or divided differences."""
    sched = fewstep.make_schedule(ems.meta.schedule)
    step_int, get_g = official_integrals(ems, exact)
    t_of = [float(sched.t_from_lambda(ems.lambdas[j:j + 1])[0]) for j in idx]
    alpha = [float(sched.alpha_sigma(torch.tensor(t, dtype=torch.float64))[0]) for t in t_of]
    sigma = [float(sched.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1]) for t in t_of]

    def derivatives(lams, gs, pseudo):
        n = len(gs) - 1
        if n == 0:
            return []
        if pseudo:
            table, out = list(gs), []
            for k in range(1, n + 1):
                table = [(table[j] - table[j + 1]) / (lams[j] - lams[j + k]) for j in range(n + 1 - k)]
                out.append(table[0] * math.factorial(k))
            return out
        R = torch.tensor([[(lams[j] - lams[0]) ** k for k in range(1, n + 1)] for j in range(1, n + 1)],
                         dtype=torch.float64)
        sol = torch.einsum("kj,j...->k...", torch.linalg.inv(R), torch.stack([gj - gs[0] for gj in gs[1:]]))
        return [sol[k] * math.factorial(k + 1) for k in range(n)]

    def update(xs, eps, pts, s, t, pseudo):
        js, jt = idx[s], idx[t]
        gs = [get_g((sigma[p] * eps[p] - ems.l[idx[p]] * xs[p]) / alpha[p], js, idx[p]) for p in pts]
        decay, first, const = step_int(js, jt, 0)
        x_t = alpha[t] / alpha[s] * decay * xs[s] - alpha[t] * first * gs[0] - alpha[t] * const
        lams = [float(ems.lambdas[idx[p]]) for p in pts]
        for k, gk in enumerate(derivatives(lams, gs, pseudo), start=1):
            x_t = x_t - alpha[t] * decay * step_int(js, jt, k)[1] * gk
        return x_t

    n = len(idx) - 1
    xs, eps, p_order = {}, {}, 0
    for step in range(1, n + 1):
        i = step - 1
        xs[i] = x
        eps[i] = model(x, torch.full((x.shape[0],), t_of[i], dtype=torch.float32))  # as fewstep.sample calls it
        c_order = p_order + c_pseudo
        if use_corrector and c_order > 1:
            pts = [i - 1, i] + list(range(i - 2, i - c_order, -1))
            n_old = sigma[i] * eps[i] - ems.l[idx[i]] * xs[i]
            xs[i] = update(xs, eps, pts, i - 1, i, c_pseudo)
            eps[i] = (n_old + ems.l[idx[i]] * xs[i]) / sigma[i]
        p_order = min(step, order, n + 1 - step)
        x = update(xs, eps, list(range(i, i - p_order, -1)), i, i + 1, p_pseudo)
    return x


@pytest.mark.parametrize("order,p_pseudo,use_corrector,c_pseudo", [
    (3, False, True, True), (2, True, True, False), (3, True, False, False), (1, False, True, True)])
def test_plan_equals_a_transcription_of_the_official_sampler(order, p_pseudo, use_corrector, c_pseudo):
    sched = fewstep.make_schedule("linear")
    model = GMMModel(MIX, sched)
    idx = [0, 22, 45, 70, 100, 130, 160, 200]  # an EMS-aligned grid ending at t_min (final_sigma="min")
    opts = dict(order=order, predictor_pseudo=p_pseudo, corrector=use_corrector, corrector_pseudo=c_pseudo)
    args = (order, p_pseudo, use_corrector, c_pseudo)
    gaps = []
    for r in (1, 2):  # EMS spacing h and h / 2
        ems = synthetic_ems(n_grid=200 * r)
        steps = [j * r for j in idx]
        ts = sched.model_time(sched.t_from_lambda(ems.lambdas[steps])).tolist()
        plan = fewstep.make_plan(sched, "dpmv3", ems=ems, timesteps=ts[:-1], final_sigma="min", **opts)
        assert plan.info["ems_index"] == steps
        got = fewstep.sample(model, X, plan=plan)
        if r == 1:
            exact = official_sampler(model, X, ems, steps, *args, exact=True)
            torch.testing.assert_close(got, exact, rtol=0, atol=1e-11)
        gaps.append(float((official_sampler(model, X, ems, steps, *args, exact=False) - got).abs().max()))
    # the official trapezoid rule differs by O(h^2) in the EMS spacing
    assert gaps[0] < 2e-3 and 3.0 < gaps[0] / gaps[1] < 5.0, gaps


def test_psi_matches_numerical_integration():
    z = torch.tensor([-30.0, -3.0, -1.0001, -1.0, -0.3, 0.0, 1e-9, 0.7, 1.0, 1.0001, 4.0, 25.0], dtype=torch.float64)
    u = torch.linspace(0, 1, 200001, dtype=torch.float64)
    for m, psi in enumerate(_psi(3, z)):
        ref = torch.trapezoid(torch.exp(z[:, None] * u) * u**m / math.factorial(m), u, dim=1)
        torch.testing.assert_close(psi, ref, rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------- grid, corrector, shapes

def test_timesteps_snap_to_the_ems_grid_and_bad_ranges_are_named():
    ems = synthetic_ems(n_grid=50)
    plan = fewstep.make_plan("linear", "dpmv3", 6, ems=ems)
    lam = plan.grid.lambda_[:-1]
    assert all(float((ems.lambdas - v).abs().min()) < 1e-12 for v in lam)
    assert plan.info["ems_index"][-1] is None and float(plan.grid.sigma[-1]) == 0.0
    narrow = EMS(ems.lambdas[10:], ems.l[10:], ems.s[10:], ems.b[10:], ems.meta)
    with pytest.raises(ValueError, match=r"timestep 999 \(log-SNR -5.0\d*\) is outside the EMS grid, which covers "
                                         r"timesteps 0 to \d+(\.\d+)?"):
        fewstep.make_plan("linear", "dpmv3", 6, ems=narrow)
    with pytest.raises(ValueError, match="both snap to EMS point .* compute EMS with a larger n_grid"):
        fewstep.make_plan("linear", "dpmv3", 40, ems=ems)


@pytest.mark.parametrize("region,expect", [("off", lambda t: True), ("low_noise", lambda t: t <= 499.5),
                                           ("high_noise", lambda t: t > 499.5)])
def test_half_corrector_regions(region, expect):
    ems = synthetic_ems(n_grid=400)
    plan = fewstep.make_plan("linear", "dpmv3", 10, ems=ems, half_corrector=region)
    ts = plan.grid.model_timesteps.tolist()
    assert plan.correct_steps() == [i for i in range(1, 10) if expect(ts[i])]


def test_sample_shape_must_match_the_statistics():
    with pytest.raises(ValueError, match=r"per-sample shape \(4,\) .* does not broadcast to the sample \(8, 2, 2\)"):
        fewstep.sample(lambda x, t: x, X.reshape(8, 2, 2), solver="dpmv3", ems=synthetic_ems(n_grid=50), nfe=5)


def test_compare_runs_dpmv3_only_when_given_its_ems(tmp_path):
    from fewstep.eval.compare import CompareConfig

    assert "dpmv3" not in [m.solver for m in CompareConfig(out=str(tmp_path)).methods]
    path = synthetic_ems(n_grid=50).save(tmp_path / "e.safetensors")
    methods = CompareConfig(out=str(tmp_path), solvers=[f"dpmv3:ems={path},order=3"]).methods
    assert methods[0].solver == "dpmv3" and methods[0].option_dict == {"ems": str(path), "order": 3}


def test_options_are_validated():
    with pytest.raises(ValueError, match="solver 'dpmv3' needs its model's statistics: pass ems=PATH"):
        fewstep.get_solver("dpmv3")
    with pytest.raises(ValueError, match="half_corrector='both' .* is not one of"):
        fewstep.get_solver("dpmv3", degenerate=True, half_corrector="both")


@pytest.mark.slow
def test_convergence_orders_with_ems():
    """Predictor orders 1-3 on the exact mixture with its computed EMS; the pseudo-order corrector is second order."""
    from fewstep.eval.convergence import ConvergenceStudy, fitted_order

    study = ConvergenceStudy()
    mix = study.mixture
    ems = fewstep.compute_ems(study.model, lambda i: mix.sample(len(i), torch.Generator().manual_seed(int(i[0]))),
                              "linear", n_grid=1600, n_data=256, batch_size=256, progress=False)
    nfes = [20, 28, 40, 56, 80]
    measured = {}
    for label, opts in {"p1": dict(order=1, corrector=False), "p2": dict(order=2, corrector=False),
                        "p3": dict(order=3, corrector=False), "p3c": dict(order=3, corrector_pseudo=False),
                        "p3pc": dict(order=3)}.items():
        measured[label] = fitted_order(nfes, study.errors("dpmv3", nfes, ems=ems, lower_order_final=False, **opts))
    assert abs(measured["p1"] - 1) < 0.2 and abs(measured["p2"] - 2) < 0.2 and abs(measured["p3"] - 3) < 0.3
    assert measured["p3c"] > 3.0 and abs(measured["p3pc"] - 2) < 0.3, measured


# ---------------------------------------------------------------------------- the scheduler

def gmm_scheduler_run(s, nfe=6):
    model = GMMModel(MIX)
    s.set_timesteps(nfe)
    x = X.clone()
    for t in s.timesteps:
        x = s.step(model(x, t.reshape(1)), t, x).prev_sample
    return x


def test_scheduler_round_trip_with_its_ems_file(tmp_path):
    ems = synthetic_ems(n_grid=100)
    path = ems.save(tmp_path / "e.safetensors")
    s = DPMSolverV3Scheduler.from_config({}, ems=str(path), order=3)
    out = gmm_scheduler_run(s)
    expect = fewstep.sample(GMMModel(MIX), X, solver="dpmv3", ems=ems, order=3, nfe=6)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert s.timesteps.dtype == torch.float32 and torch.equal(s.timesteps.double(), s.grid.model_timesteps.float().double())
    s.save_pretrained(tmp_path / "sched")
    config = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverV3Scheduler" and config["solver_options"]["ems"]["file"] == EMS.filename
    assert (tmp_path / "sched" / EMS.filename).stat().st_size > 0 and "lambda" not in json.dumps(config["solver_options"])
    loaded = DPMSolverV3Scheduler.from_pretrained(tmp_path / "sched")
    torch.testing.assert_close(gmm_scheduler_run(loaded), out, rtol=0, atol=0)
    # a different EMS under the saved name is refused, and so is a missing one
    synthetic_ems(n_grid=120).save(tmp_path / "sched" / EMS.filename)
    with pytest.raises(ValueError, match="is not the one the config names"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path / "sched")
    (tmp_path / "sched" / EMS.filename).unlink()
    del s, loaded, ems
    import gc

    gc.collect()
    with pytest.raises(ArtifactError, match=f"{EMS.filename} .* not found"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path / "sched")
    with pytest.raises(ValueError, match="needs its model's statistics"):
        DPMSolverV3Scheduler.from_config({})


@pytest.mark.slow
def test_scheduler_in_the_digits_pipeline_with_computed_ems(tmp_path):
    """A drop-in scheduler: EMS of the guided digits model, CFG inside the pipeline, save/load of the pipeline."""
    from fewstep.tuning.ems.command import EMSComputeConfig, run_ems_compute
    from fewstep.zoo.digits import DigitsPipeline, load_digits_pipeline

    out = tmp_path / "ems.safetensors"
    run_ems_compute(EMSComputeConfig(out=str(out), n_grid=24, n_data=4, batch_size=4, guidance=2.0, progress=False),
                    log=lambda s: None)
    pipe = load_digits_pipeline()
    pipe.scheduler = DPMSolverV3Scheduler.from_config(pipe.scheduler.config, ems=str(out))
    gen = torch.Generator().manual_seed(0)
    images = pipe(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=5, generator=gen,
                  output_type="np").images
    assert np.isfinite(images).all() and images.shape[0] == 2
    pipe.save_pretrained(tmp_path / "pipe")
    again = DigitsPipeline.from_pretrained(tmp_path / "pipe")
    assert type(again.scheduler).__name__ == "DPMSolverV3Scheduler" and again.scheduler.solver.config["ems"] == EMS.load(out)
    images2 = again(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(images2, images)
