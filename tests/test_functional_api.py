"""The functional API: options, bad input, callbacks, and the no-host-sync guarantee."""

import pytest
import torch

import fewstep
from fewstep.samplers.plan import PlanExecutor
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(dim=4, components=3, num_classes=3, seed=0)


def eps_model(x, t, cond=None):
    return GMMModel(MIX, "linear")(x, t, cond)


def x_T(n=4):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(0))


def test_list_and_get_solvers():
    assert fewstep.list_solvers() == ["dc", "dc_dpmpp", "ddim", "dpmpp", "dpmv3", "unipc", "usf"]
    # usf needs a solver schedule, dpmv3 its EMS; dc / dc_dpmpp without ratios are their base solvers
    assert fewstep.list_solvers(runnable=True) == ["ddim", "dpmpp", "unipc"]
    s = fewstep.get_solver("unipc", order=3, variant="bh1")
    assert s.config["order"] == 3 and s.history_size == 4
    assert fewstep.get_solver(s) is s


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(solver="heun"), ValueError, "unknown solver 'heun'; available solvers: dc, dc_dpmpp, ddim, dpmpp, dpmv3, unipc, usf"),
        (dict(solver="dpmpp", order=4), ValueError, "order=4 of solver 'dpmpp' is out of range; allowed: 1 to 3"),
        (dict(solver="dpmpp", order=2.0), ValueError, "order=2.0 of solver 'dpmpp' must be a whole number"),
        (dict(solver="ddim", order=2), ValueError, r"unknown option\(s\) \['order'\] for solver 'ddim'; allowed: solver_schedule"),
        (dict(solver="unipc", bogus=1), ValueError, r"unknown option\(s\) \['bogus'\].*allowed: corrector"),
        (dict(nfe=0), ValueError, "nfe=0 is out of range; allowed: 1 to 100000"),
        (dict(prediction="eps"), ValueError, "unknown prediction type 'eps'"),
        (dict(prediction="flow"), ValueError, "prediction 'flow'.*needs the flow schedule"),
        (dict(schedule="flow", prediction="v_prediction"), ValueError, "needs a variance-preserving schedule"),
        (dict(spacing="uniform"), ValueError, "spacing=.uniform. is not one of"),
        (dict(guidance=2.0, cond=torch.zeros(4, dtype=torch.long)), ValueError, "guidance needs both cond and uncond"),
        (dict(uncond=torch.zeros(4)), ValueError, "uncond is only used with guidance"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fewstep.sample(eps_model, x_T(), **kwargs)


def test_mismatched_model_output_shape():
    with pytest.raises(ValueError, match=r"model output shape \(4, 2\) does not match sample shape \(4, 4\)"):
        fewstep.sample(lambda x, t: x[:, :2], x_T(), nfe=3)


def test_non_finite_model_output_names_the_first_bad_step():
    def broken(x, t):
        out = eps_model(x, t)
        return torch.where(t[:, None] < 400, torch.full_like(out, float("nan")), out)

    with pytest.raises(FloatingPointError, match=r"model output at step 4 \(timestep 200\) contains NaN or Inf"):
        # GridSpec leaves the convention to the solver: DDIMScheduler's linspace, [999, 799, ..., 0]
        fewstep.sample(broken, x_T(), solver="ddim", nfe=6, spacing=fewstep.GridSpec(spacing="linspace"))
    # with the check off the NaN just propagates
    out = fewstep.sample(broken, x_T(), solver="ddim", nfe=6, check_finite=False)
    assert torch.isnan(out).all()


def test_callback_sees_every_step_and_denoised_converges():
    seen = []
    out = fewstep.sample(eps_model, x_T(), nfe=5, callback=seen.append)
    assert [s.i for s in seen] == list(range(5))
    assert seen[-1].sigma > 0 and torch.equal(seen[-1].x, out)
    torch.testing.assert_close(seen[-1].denoised, out)  # last step into sigma = 0 returns x0


def test_guidance_matches_manual_cfg():
    labels = torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, -1)
    guided = fewstep.sample(eps_model, x_T(), nfe=6, guidance=2.5, cond=labels, uncond=null)

    def manual(x, t):
        u, c = eps_model(x, t, null), eps_model(x, t, labels)
        return u + 2.5 * (c - u)

    torch.testing.assert_close(guided, fewstep.sample(manual, x_T(), nfe=6))


def test_thresholding_and_clipping_bound_x0():
    seen = []
    fewstep.sample(lambda x, t: -3 * x, 2 * x_T(), nfe=4, thresholding=fewstep.Clip(0.5), callback=seen.append)
    assert all(s.denoised.abs().max() <= 0.5 for s in seen)
    out = fewstep.sample(lambda x, t: -3 * x, 2 * x_T(), nfe=4, thresholding=fewstep.DynamicThreshold(0.9, 1.5))
    assert out.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("solver", ["ddim", "dpmpp", "unipc"])
def test_make_plan_is_reusable(solver):
    plan = fewstep.make_plan("linear", solver, 6, order=2) if solver != "ddim" else fewstep.make_plan("linear", solver, 6)
    a = fewstep.sample(eps_model, x_T(), plan=plan)
    b = fewstep.sample(eps_model, x_T(), plan=plan)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prebuilt plan"):
        fewstep.sample(eps_model, x_T(), plan=plan, order=3)


class _NoSync:
    """Make every host-synchronising Tensor method raise while active."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        for name in self.names:
            def boom(*a, _name=name, **k):
                raise AssertionError(f"host sync: Tensor.{_name} called inside a solver step")
            self.mp.setattr(torch.Tensor, name, boom)

    def __exit__(self, *exc):
        self.mp.undo()


@pytest.mark.parametrize("solver,options", [("ddim", {}), ("dpmpp", {"order": 3}), ("unipc", {"order": 3}),
                                            ("dpmpp", {"order": 2, "space": "noise"})])
def test_steps_do_no_host_sync(monkeypatch, solver, options):
    plan = fewstep.make_plan("scaled_linear", solver, 8, **options)
    # Coefficients live on the sample's device; the meta device has no data at all, so any
    # value read on the host would fail there too.
    ex = PlanExecutor(plan, "meta", torch.float32, fewstep.DynamicThreshold(), check_finite=True)
    assert ex._rows.device.type == "meta"  # the folded coefficient table
    x = torch.empty(2, 4, 8, 8, device="meta")
    with _NoSync(monkeypatch):
        for i in range(plan.n):
            x, _ = ex.step(i, x, torch.empty_like(x))
    assert x.device.type == "meta"
    assert all(c.device.type == "meta" for st in ex._steps for o in st.outputs for c in o.coefs)
    with _NoSync(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        x.sum().item()  # the guard itself works


def test_thresholding_must_be_a_transform():
    with pytest.raises(ValueError, match="thresholding must be fewstep.DynamicThreshold"):
        fewstep.sample(eps_model, x_T(), nfe=3, thresholding=True)


def test_plan_fixes_grid_and_prediction():
    plan = fewstep.make_plan("linear", "unipc", 5, prediction="v_prediction")
    with pytest.raises(ValueError, match=r"\['prediction'\] cannot be combined with a prebuilt plan"):
        fewstep.sample(eps_model, x_T(), plan=plan, prediction="epsilon")
    with pytest.raises(ValueError, match=r"\['nfe', 'spacing'\] cannot be combined"):
        fewstep.sample(eps_model, x_T(), plan=plan, nfe=5, spacing="logsnr")


@pytest.mark.parametrize("schedule,expected", [("linear", "linspace"), ("flow", "linspace"), ("vp_cosine", "logsnr"),
                                               ("ve", "karras")])
def test_default_spacing_follows_the_schedule(schedule, expected):
    plan = fewstep.make_plan(schedule, "dpmpp", 6, prediction="flow" if schedule == "flow" else "epsilon")
    ref = fewstep.make_plan(schedule, "dpmpp", 6, prediction="flow" if schedule == "flow" else "epsilon",
                            spacing=expected)
    assert torch.equal(plan.grid.t, ref.grid.t)
    out = fewstep.sample(GMMModel(MIX, schedule, plan_prediction(schedule)), x_T().double() * plan.grid.sigma[0],
                         plan=plan)
    assert torch.isfinite(out).all()


def plan_prediction(schedule):
    return "flow" if schedule == "flow" else "epsilon"
