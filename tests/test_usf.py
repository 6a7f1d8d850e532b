"""USF solver schedules: equivalence, an independent eager reference, orders, files, errors.

The eager reference below follows the USF algorithm directly (Liu et al., ICLR 2024): it keeps
lists of x0 and eps, fits each derivative by a Vandermonde solve, and integrates the Taylor
polynomial against the exponential weight by Gauss-Legendre quadrature. It shares no code
with the plan builder, so agreeing with it to 1e-10 checks the compiled rows, including the
mixed data/noise schedules that go through tracked past samples.
"""

import json
import math
import random

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fewstep
from fewstep import ArtifactError, ArtifactMeta, FewstepScheduler, SolverSchedule, StepStrategy, USFScheduler
from fewstep.eval.convergence import ConvergenceStudy, fitted_order
from fewstep.samplers.solvers.usf import phi, spell_out
from fewstep.zoo.gmm import GaussianMixture, GMMModel

LINEAR = fewstep.make_schedule("linear")
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


@pytest.fixture(scope="module")
def gmm_model():
    mix = GaussianMixture.random(6, 5, seed=3, std_range=(0.2, 0.5))
    return GMMModel(mix, LINEAR)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def fake_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *[1] * (x.dim() - 1))
    return 0.5 * x * torch.cos(t / 400) + 0.3 * torch.sin(1.3 * x + t / 250)


# ---------------------------------------------------------------- the eager reference
def _relax(form, h, hh):
    if isinstance(form, str):
        b = hh if form == "bh1" else math.expm1(hh)
        return 0.5 * hh * b / (math.expm1(hh) - hh)
    return 1.0 + form * h


def _eager_update(F, lam, alpha, sigma, x_s, s, t, order, space, first, rest, relax):
    if sigma[t] == 0:  # the exact first-order limit into clean data
        assert order == 1
        return alpha[t] * F[s] if space == "data" else alpha[t] / alpha[s] * (x_s - sigma[s] * F[s])
    derivs = []
    for m in range(1, order):
        pts = [s] + (first if m == 1 else rest)
        vander = torch.tensor([[(lam[j] - lam[s]) ** q for q in range(len(pts))] for j in pts], dtype=torch.float64)
        coef = torch.linalg.solve(vander, torch.stack([F[j].reshape(-1) for j in pts]))
        d = math.factorial(m) * coef[m].reshape(F[s].shape)
        derivs.append(d * (_relax(relax, lam[t] - lam[s], (lam[s] - lam[t]) if space == "data" else lam[t] - lam[s])
                           if m == 1 else 1.0))
    nodes, weights = np.polynomial.legendre.leggauss(40)
    a, b = lam[s], lam[t]
    integral = torch.zeros_like(x_s)
    for u, w in zip(nodes, weights):
        l = 0.5 * (b - a) * u + 0.5 * (a + b)
        poly = F[s] + sum(d * (l - a) ** (m + 1) / math.factorial(m + 1) for m, d in enumerate(derivs))
        integral += 0.5 * (b - a) * w * (math.exp(l) if space == "data" else math.exp(-l)) * poly
    if space == "data":
        return sigma[t] / sigma[s] * x_s + sigma[t] * integral
    return alpha[t] / alpha[s] * x_s - alpha[t] * integral


def eager_usf(model, x_T, sched: SolverSchedule, schedule=LINEAR):
    t = schedule.time_from_model(torch.tensor(sched.timesteps, dtype=torch.float64))
    t = torch.cat([t, torch.tensor([schedule.t_min], dtype=torch.float64)])
    alpha, sigma = (v.tolist() for v in schedule.alpha_sigma(t))
    if sched.final_sigma == "zero":
        alpha[-1], sigma[-1] = 1.0, 0.0
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    n, steps = sched.num_steps, sched.steps
    F = {"data": {}, "noise": {}}
    x, x_prev = x_T, None
    for i in range(n):
        if i == 0 and sched.analytic_first_step:
            x0 = torch.zeros_like(x)
        else:
            out = model(x, torch.full((x.shape[0],), sched.timesteps[i], dtype=torch.float64))
            x0 = (x - sigma[i] * out) / alpha[i]
        F["data"][i], F["noise"][i] = x0, (x - alpha[i] * x0) / sigma[i]
        if i > 0 and steps[i - 1].corrector == "pseudo":
            st, s = steps[i - 1], i - 1
            past = list(range(s - 1, s - st.order, -1))
            x = _eager_update(F[st.space], lam, alpha, sigma, x_prev, s, i, st.order + 1, st.space,
                              [i] + past[: st.points], [i] + past, st.corrector_relaxation)
        st = steps[i]
        past = list(range(i - 1, i - st.order, -1))
        x_prev = x
        x = _eager_update(F[st.space], lam, alpha, sigma, x, i, i + 1, st.order, st.space, past[: st.points], past,
                          st.relaxation)
    return x


def random_schedule(rng: random.Random, n: int, final_sigma: str = "zero") -> SolverSchedule:
    afs = rng.random() < 0.4
    k = n + afs
    lam = sorted(rng.uniform(-5.0, 4.0) for _ in range(k - 1))
    ts = LINEAR.model_time(LINEAR.t_from_lambda(torch.tensor([-5.2, *lam], dtype=torch.float64))).tolist()
    ts = [round(t * 64) / 64 for t in ts]  # exact in float32, the dtype sample() passes timesteps in
    steps = []
    for i in range(k):
        last = i == k - 1
        order = 1 if last and final_sigma == "zero" else rng.randint(1, min(4, i + 1))
        relax = lambda: rng.choice([0.0, round(rng.uniform(-0.6, 0.6), 3), "bh1", "bh2"])  # noqa: E731
        steps.append(StepStrategy(rng.choice(["data", "noise"]), order,
                                  rng.randint(1, order - 1) if order > 1 else None, relax(),
                                  "none" if last else rng.choice(["none", "pseudo"]), relax()))
    return SolverSchedule(ts, final_sigma, steps, afs, ArtifactMeta(schedule=LINEAR.to_dict()))


@pytest.mark.parametrize("seed", range(8))
def test_compiled_plan_matches_the_eager_usf_algorithm(gmm_model, x_T, seed):
    rng = random.Random(seed)
    sched = random_schedule(rng, rng.randint(2, 7), rng.choice(["zero", "min"]))
    ours = fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="usf", solver_schedule=sched)
    ref = eager_usf(gmm_model, x_T, sched)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_phi_is_accurate_across_the_series_switch():
    for k in range(1, 6):
        for z in (-3.0, -0.5000001, -0.4999999, -1e-6, 1e-6, 0.49999, 0.50001, 2.0):
            exact = sum(z**j / math.factorial(j + k) for j in range(60))
            assert phi(k, z) == pytest.approx(exact, rel=1e-12), (k, z)


# ---------------------------------------------------------------- equivalence with the built-in solvers
CASES = [
    ("ddim", {}),
    ("dpmpp", {}),  # DPM-Solver++(2M)
    ("dpmpp", {"variant": "heun"}),
    ("dpmpp", {"space": "noise"}),
    ("dpmpp", {"order": 3, "third_order": "taylor", "lower_order_final": False}),
    ("unipc", {}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False}),
    ("unipc", {"space": "noise"}),
    ("unipc", {"order": 1, "space": "noise", "variant": "bh1"}),
    ("unipc", {"corrector": False, "order": 3}),
    ("unipc", {"disable_corrector": [1, 3]}),
]


@pytest.mark.parametrize("spacing", ["linspace", "logsnr", fewstep.GridSpec(spacing="karras", final_sigma="min")],
                         ids=["linspace", "logsnr", "karras-min"])
@pytest.mark.parametrize("nfe", [5, 8])
@pytest.mark.parametrize("solver,options", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_spelled_out_solvers_are_reproduced(gmm_model, x_T, solver, options, spacing, nfe):
    plan = fewstep.make_plan(LINEAR, solver, nfe=nfe, spacing=spacing, **options)
    sched = SolverSchedule.from_grid(plan.grid, spell_out(solver, plan.grid, **options))
    ours = fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="usf", solver_schedule=sched)
    torch.testing.assert_close(ours, fewstep.sample(gmm_model, x_T, plan=plan), rtol=1e-12, atol=1e-12)


def test_reference_third_order_dpmpp_cannot_be_spelled_out():
    grid = fewstep.make_plan(LINEAR, "dpmpp", nfe=6, order=3).grid
    with pytest.raises(ValueError, match="third_order='reference' halves the second-derivative term"):
        spell_out("dpmpp", grid, order=3)


def _trajectory(scheduler, n, x):
    scheduler.set_timesteps(n)
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        scheduler.sigmas = scheduler.sigmas.double()
    out = []
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t.expand(x.shape[0])), t, x).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("theirs_cls,ours_solver,options,theirs_options", [
    (DPMSolverMultistepScheduler, "dpmpp", {}, {}),
    (UniPCMultistepScheduler, "unipc", {}, {}),
    (UniPCMultistepScheduler, "unipc", {"order": 3}, {"solver_order": 3}),  # bh1: diffusers' last step is NaN
])
@pytest.mark.parametrize("n", [5, 8])
def test_usf_scheduler_matches_diffusers_step_by_step(theirs_cls, ours_solver, options, theirs_options, n):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    twin = FewstepScheduler.from_config(SD_CONFIG, solver=ours_solver, **options)
    twin.set_timesteps(n)
    sched = SolverSchedule.from_grid(twin.grid, spell_out(twin.solver, twin.grid))
    ours = USFScheduler.from_config(SD_CONFIG, solver_schedule=sched)
    theirs = theirs_cls.from_config(SD_CONFIG, **theirs_options)
    twin = FewstepScheduler.from_config(SD_CONFIG, solver=ours_solver, **options)
    for i, (a, b, c) in enumerate(zip(_trajectory(ours, n, x), _trajectory(twin, n, x), _trajectory(theirs, n, x))):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, f"step {i}: usf vs {ours_solver}"
        # diffusers keeps alphas_cumprod in float32: the tolerance of tests/test_equivalence.py
        assert ((a - c).norm() / c.norm()).item() < 1e-5, f"step {i}: usf vs {theirs_cls.__name__}"


# ---------------------------------------------------------------- orders and the analytical first step
def _usf_errors(study, nfes, strategy, warmup=True):
    errs = []
    for n in nfes:
        grid = fewstep.build_grid(study.model.schedule, n, study.spec)
        steps = [strategy.replace(order=min(strategy.order, i + 1)) if warmup else strategy for i in range(n)]
        steps[-1] = steps[-1].replace(corrector="none")
        sched = SolverSchedule.from_grid(grid, steps)
        x = fewstep.sample(study.model, study.x_T, schedule=study.model.schedule, solver="usf", solver_schedule=sched)
        errs.append((x - study.reference).pow(2).mean().sqrt().item())
    return np.array(errs)


@pytest.fixture(scope="module")
def study():
    return ConvergenceStudy(schedule="linear", prediction="epsilon")


@pytest.mark.parametrize("strategy,expected", [
    (StepStrategy("data", 4), 4),  # beyond the built-in solvers: Taylor order 4 from three earlier outputs
    (StepStrategy("noise", 2), 2),
    (StepStrategy("data", 2, corrector="pseudo"), 3),
    (StepStrategy("data", 3, corrector="pseudo"), 4),  # the pseudo corrector adds one order for free
    (StepStrategy("data", 3, points=1), 2),  # a one-point first derivative caps the order at 2
])
def test_empirical_order(study, strategy, expected):
    nfes = [20, 28, 40, 56, 80]
    errs = _usf_errors(study, nfes, strategy)
    assert np.all(np.diff(errs) < 0), errs
    assert abs(fitted_order(nfes, errs) - expected) <= 0.3, fitted_order(nfes, errs)


def test_analytic_first_step_skips_one_model_evaluation(gmm_model, x_T):
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return gmm_model(x, t)

    grid = fewstep.make_plan(LINEAR, "unipc", nfe=6).grid  # integer timesteps: exact for the eager model call
    steps = spell_out("unipc", grid)
    sched = SolverSchedule.from_grid(grid, steps, analytic_first_step=True)
    assert (sched.nfe, sched.num_steps) == (5, 6)
    y = fewstep.sample(model, x_T, schedule=LINEAR, solver="usf", solver_schedule=sched)
    assert len(calls) == 5 and calls[0] == pytest.approx(sched.timesteps[1])
    torch.testing.assert_close(y, eager_usf(gmm_model, x_T, sched), rtol=1e-10, atol=1e-10)
    # With guidance (doubled batch, folded into the update) the first step skips the model too;
    # a model that ignores its conditioning makes guided and unguided runs coincide.
    calls.clear()
    cond = torch.zeros(x_T.shape[0], dtype=torch.long)
    guided = fewstep.sample(lambda x, t, c: model(x, t), x_T, schedule=LINEAR, solver="usf", solver_schedule=sched,
                            cond=cond, uncond=cond, guidance=4.0)
    assert len(calls) == 5
    torch.testing.assert_close(guided, y, rtol=1e-10, atol=1e-10)
    with pytest.raises(ArtifactError, match=r"made for NFE 5 \(its first step is analytic"):
        fewstep.sample(model, x_T, schedule=LINEAR, solver="usf", solver_schedule=sched, nfe=6)
    # A diffusers pipeline evaluates the model at every timestep: the first output is ignored.
    s = USFScheduler.from_config({}, solver_schedule=sched)
    with pytest.raises(ValueError, match="has 6 steps .*pass num_inference_steps=6"):
        s.set_timesteps(5)
    s.set_timesteps(6)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(gmm_model(x, t.expand(x.shape[0]).double()), t, x).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- files and scheduler configs
def _usf_schedule(nfe=5):
    grid = fewstep.make_plan(LINEAR, "unipc", nfe=nfe, spacing="logsnr").grid
    steps = spell_out("unipc", grid, order=3)
    steps[1] = steps[1].replace(space="noise", relaxation=0.137)
    return SolverSchedule.from_grid(grid, steps, meta=ArtifactMeta(guidance=3.0, fingerprint="gmm:abc",
                                                                   extra={"search": {"seed": 1}}))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    a = _usf_schedule()
    b = fewstep.load_solver_schedule(a.save(tmp_path / f"s{suffix}"))
    assert b == a and b.steps == a.steps and b.timesteps == a.timesteps and b.meta == a.meta
    t = SolverSchedule([999.0, 500.25, 12.5], meta=ArtifactMeta(solver="unipc"))
    assert fewstep.load_solver_schedule(t.save(tmp_path / f"t{suffix}")) == t


def test_save_pretrained_keeps_the_schedule_inline(tmp_path, x_T):
    a = _usf_schedule()
    s = USFScheduler.from_config({}, solver_schedule=a)
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["solver_options"]["solver_schedule"]["steps"][1]["relaxation"] == 0.137
    loaded = USFScheduler.from_pretrained(tmp_path)
    assert loaded.solver.schedule == a
    x = x_T.reshape(2, 2, 4, 6)
    assert all(torch.equal(p, q) for p, q in zip(_trajectory(loaded, 5, x), _trajectory(s, 5, x)))
    # A FewstepScheduler reading the same folder runs usf too (the config records the solver).
    assert FewstepScheduler.from_pretrained(tmp_path).solver.name == "usf"


def test_tuned_timesteps_work_with_any_solver(tmp_path, gmm_model, x_T):
    ts = [999.0, 640.5, 333.25, 120.0, 31.5]
    path = SolverSchedule(ts, meta=ArtifactMeta(solver="unipc", schedule=LINEAR.to_dict())).save(tmp_path / "t.json")
    y = fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="unipc", solver_schedule=path)
    assert torch.equal(y, fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="unipc", timesteps=ts))
    s = FewstepScheduler.from_config({}, solver="unipc", solver_schedule=str(path))
    s.set_timesteps(5)
    assert s.timesteps.tolist() == ts
    s.save_pretrained(tmp_path / "sched")
    again = FewstepScheduler.from_pretrained(tmp_path / "sched")
    again.set_timesteps(None)  # the schedule fixes the step count
    assert again.timesteps.tolist() == ts
    with pytest.raises(ArtifactError, match="belongs to solver 'unipc', not 'dpmpp'"):
        fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="dpmpp", solver_schedule=path)
    tuned = SolverSchedule(ts, meta=ArtifactMeta(solver="unipc", extra={"solver_options": {"order": 3}}))
    with pytest.warns(UserWarning, match=r"tuned for unipc with \{'order': 3\}, not \{'order': 2\}"):
        fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="unipc", order=2, solver_schedule=tuned)


# ---------------------------------------------------------------- bad schedules and bad requests
def _record():
    return _usf_schedule().to_dict()


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r["timesteps"].__setitem__(2, 900.0), r"timesteps must strictly decrease .*timesteps\[2\]=900.0"),
    (lambda r: r["timesteps"].__setitem__(0, -1.0), r"timesteps\[0\]=-1.0 must be a finite number >= 0"),
    (lambda r: r["steps"].pop(), "steps has 4 strategies but there are 5 timesteps"),
    (lambda r: r["steps"][2].update(space="velocity"), r"steps\[2\]: space='velocity' is not one of"),
    (lambda r: r["steps"][2].update(corrector="implicit"), r"steps\[2\]: corrector='implicit' is not one of"),
    (lambda r: r["steps"][2].update(trick=1), r"steps\[2\]: unknown strategy field\(s\) \['trick'\]"),
    (lambda r: r["steps"][2].update(order=5), r"steps\[2\]: order=5 is out of range; allowed: 1 to 4"),
    (lambda r: r["steps"][2].update(points=3), r"steps\[2\]: points=3 is not allowed for order 3"),
    (lambda r: r["steps"][1].update(order=3, points=2), r"steps\[1\]: order 3 needs 3 points but step 1 has only 2"),
    (lambda r: r["steps"][4].update(corrector="pseudo"), r"steps\[4\]: the last step cannot have a corrector"),
    (lambda r: r["steps"][4].update(order=2, points=1), r"steps\[4\]: a step into sigma = 0 is first order"),
    (lambda r: r["steps"][2].update(relaxation="bh3"), r"steps\[2\]: relaxation='bh3' is not one of"),
    (lambda r: r["meta"].update(nfe=6), "meta.nfe=6 does not match the 5 timesteps"),
    (lambda r: r.update(analytic_first_step="yes"), "analytic_first_step='yes' must be true or false"),
    (lambda r: r.update(stepz=[]), r"unknown field\(s\) \['stepz'\]"),
])
def test_corrupt_schedules_are_rejected(tmp_path, mutate, match):
    record = _record()
    mutate(record)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=f"solver_schedule artifact {path}: .*{match}"):
        fewstep.load_solver_schedule(path)


def test_requests_that_do_not_fit_the_schedule_are_rejected(gmm_model, x_T):
    sched = _usf_schedule()
    run = dict(schedule=LINEAR, solver="usf", solver_schedule=sched)
    with pytest.raises(ArtifactError, match="made for NFE 5, but nfe=6 was requested"):
        fewstep.sample(gmm_model, x_T, nfe=6, **run)
    with pytest.raises(ValueError, match="fixes the timesteps; do not pass timesteps or sigmas"):
        fewstep.sample(gmm_model, x_T, timesteps=[999.0, 500.0], **run)
    with pytest.raises(ArtifactError, match="made for another noise schedule"):
        fewstep.sample(gmm_model, x_T, **{**run, "schedule": "scaled_linear"})
    with pytest.raises(ValueError, match="only solver 'usf' runs; use solver='usf'"):
        fewstep.sample(gmm_model, x_T, **{**run, "solver": "unipc"})
    with pytest.raises(ValueError, match="solver 'usf' needs solver_schedule="):
        fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="usf")
    with pytest.raises(ValueError, match="'usf' needs per-step strategies, but this solver schedule holds only"):
        fewstep.sample(gmm_model, x_T, schedule=LINEAR, solver="usf", solver_schedule=SolverSchedule([999.0, 10.0]))
    with pytest.raises(ValueError, match="has 5 steps .*but num_inference_steps=8 was requested"):
        USFScheduler.from_config(SD_CONFIG, solver_schedule=SolverSchedule(sched.timesteps, steps=sched.steps)
                                 ).set_timesteps(8)
    with pytest.raises(ValueError, match="usf runs its solver schedule's own grid"):
        fewstep.get_solver("usf", solver_schedule=sched).plan(fewstep.build_grid(LINEAR, 6))
    with pytest.raises(ValueError, match="solver 'usf' needs solver_schedule"):
        USFScheduler.from_config(SD_CONFIG)


def test_img2img_cut_restarts_the_warm_up(x_T):
    sched = _usf_schedule(8)
    s = USFScheduler.from_config({}, solver_schedule=sched)
    s.set_timesteps(8)
    s.set_begin_index(3)
    x = x_T.reshape(2, 2, 4, 6)
    for t in s.timesteps[3:]:
        x = s.step(fake_model(x, t.expand(2)), t, x).prev_sample
    assert torch.isfinite(x).all()
    cut = s.solver.plan(s.grid.subgrid(3), "epsilon")
    assert cut.orders[:3] == [1, 2, 3] and cut.history >= 3
