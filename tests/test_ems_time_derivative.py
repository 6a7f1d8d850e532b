"""The EMS time derivative of discrete-time models (finite differences between integer timesteps), format 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fewstep
from fewstep import EMS, ArtifactError, ArtifactMeta, compute_ems
from fewstep.tuning.ems.compute import _fd_stencil, resolve_time_derivative
from fewstep.zoo.gmm import GaussianMixture, GMMModel

DIM = 4
SCALE = torch.tensor([0.6, 0.9, 1.2, 1.5], dtype=torch.float64)


def trend(t):
    """A smooth dependence on the timestep (model time 0..999)."""
    return 0.3 + 0.5 * (t / 999.0) ** 2


def synthetic_model(oscillate: bool):
    """eps = a linear part plus k(t) tanh(x) (+ an oscillation of k that vanishes at every integer t: a network
    trained at integer timesteps only)."""
    def model(x, t):
        k = trend(t)
        if oscillate:
            k = k + 2e-3 * torch.sin(2 * math.pi * t)  # period 1 step: like a time embedding between its training points
        return (0.5 * x + k[:, None] * SCALE * torch.tanh(x)).to(x.dtype)
    return model


def gaussian_data(idx):
    return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(int(k)), dtype=torch.float64)
                        for k in idx])


KW = dict(n_grid=40, n_data=64, batch_size=64, progress=False)


def test_finite_difference_follows_the_integer_trend_not_the_fractional_oscillation():
    """Statistics of a model that oscillates between integer timesteps: the finite difference gives those of
    its smooth trend, the JVP follows the oscillation."""
    truth = compute_ems(synthetic_model(False), gaussian_data, "linear", time_derivative="jvp", **KW)
    fd = compute_ems(synthetic_model(True), gaussian_data, "linear", time_derivative="finite_difference", **KW)
    jvp = compute_ems(synthetic_model(True), gaussian_data, "linear", time_derivative="jvp", **KW)
    assert fd.meta.extra["time_derivative"] == "finite_difference" and jvp.meta.extra["time_derivative"] == "jvp"
    err_fd, err_jvp = ((e.s - truth.s).abs() for e in (fd, jvp))  # truth.s spans about -1.3 .. -0.8
    # the finite difference's own error: the difference over a few steps (one at the low-noise end, where one
    # step spans up to 0.4 in lambda) against the derivative, plus the 2e-3 oscillation in the values
    assert float(err_fd.max()) < 0.2 and float(err_fd.mean()) < 0.03, err_fd
    assert float(err_jvp.mean()) > 1.0, err_jvp
    rough = [float((e.s[2:] - 2 * e.s[1:-1] + e.s[:-2]).abs().mean()) for e in (truth, fd, jvp)]
    assert rough[0] < rough[1] < 0.1 and rough[2] > 1.0, rough  # measured: 0.012, 0.032, 4.9


def test_gmm_finite_difference_and_jvp_agree():
    """On a continuous-time model both derivatives estimate the same thing (the issue's bound |ds| <= 0.05)."""
    bed_mix = GaussianMixture.random(16, 12, 4, seed=0, std_range=(0.1, 0.5))
    model = GMMModel(bed_mix, "linear")

    def data(idx):
        return torch.cat([bed_mix.sample(1, torch.Generator().manual_seed(100_000 + int(k))) for k in idx])

    kw = dict(n_grid=100, n_data=64, batch_size=64, progress=False)  # measured: max |ds| 0.031
    auto = compute_ems(model, data, "linear", **kw)
    fd = compute_ems(model, data, "linear", time_derivative="finite_difference", **kw)
    assert auto.meta.extra["time_derivative"] == "jvp"  # the GMM says continuous_time
    assert float((fd.s - auto.s).abs().max()) <= 0.05
    torch.testing.assert_close(fd.l, auto.l, rtol=0, atol=0)  # l has no time derivative


def test_auto_choice_and_option_checks():
    lin, flow = fewstep.make_schedule("linear"), fewstep.make_schedule("flow")
    assert resolve_time_derivative("auto", lambda x, t: x, lin) == "finite_difference"
    assert resolve_time_derivative("auto", lambda x, t: x, flow) == "jvp"
    assert resolve_time_derivative("auto", GMMModel(GaussianMixture.random(2, 2, seed=0), lin), lin) == "jvp"
    assert resolve_time_derivative("jvp", lambda x, t: x, lin) == "jvp"
    small = dict(n_grid=2, n_data=4, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="time_derivative='bad' must be one of auto, jvp, finite_difference"):
        compute_ems(synthetic_model(False), gaussian_data, "linear", time_derivative="bad", **small)
    with pytest.raises(ValueError, match="fd_step=0.1 needs time_derivative='finite_difference'"):
        compute_ems(synthetic_model(False), gaussian_data, "vp_linear", fd_step=0.1, **small)
    with pytest.raises(ValueError, match="fd_step=-1.0 must be a positive number"):
        compute_ems(synthetic_model(False), gaussian_data, "linear", fd_step=-1.0, **small)
    ems = compute_ems(synthetic_model(False), gaussian_data, "linear", fd_step=0.25, **small)
    assert ems.meta.extra["time_derivative"] == "finite_difference" and ems.meta.extra["fd_step"] == 0.25


def test_finite_difference_stencils_use_integer_timesteps_around_the_point():
    sched = fewstep.make_schedule("linear")
    lams = torch.linspace(float(sched.lambda_(torch.tensor(999.0))), float(sched.lambda_(torch.tensor(0.0))), 37,
                          dtype=torch.float64)
    for k, lam in enumerate(lams):
        t = float(sched.t_from_lambda(lam.reshape(1))[0])
        times, weights = _fd_stencil(sched, float(lam), 0.1)
        assert all(v == round(v) and 0 <= v <= 999 for v in times.tolist()) and len(set(times.tolist())) == len(times)
        x = sched.lambda_(times)
        # exact for linear and (at the ends, three points) quadratic functions of lambda
        assert abs(sum(weights)) < 1e-9 and abs(sum(w * float(v) for w, v in zip(weights, x)) - 1) < 1e-9
        if 0 < k < 36:
            assert len(times) == 2 and times[1] < times[0] and times[1] - 0.5 <= t <= times[0] + 0.5, (t, times)
        else:
            assert len(times) == 3 and abs(sum(w * float(v - lam) ** 2 for w, v in zip(weights, x))) < 1e-9


def _with_version(path, version, schedule):
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(path), "pt") as f:
        record = json.loads(f.metadata()["fewstep_artifact"])
    record["version"] = version
    record["meta"]["schedule"] = schedule
    save_file(load_file(str(path)), str(path), metadata={"fewstep_artifact": json.dumps(record)})


def test_format_1_on_a_discrete_time_schedule_is_refused_in_one_line(tmp_path):
    lam = torch.linspace(-3, 3, 5, dtype=torch.float64)
    stats = [torch.rand(5, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    ems = EMS(lam, *stats, ArtifactMeta(schedule=fewstep.make_schedule("linear").to_dict()), 8)
    assert ems.to_dict()["version"] == 2
    path = ems.save(tmp_path / "old.safetensors")
    _with_version(path, 1, fewstep.make_schedule("linear").to_dict())
    with pytest.raises(ArtifactError) as info:
        EMS.load(path)
    message = str(info.value)
    assert "\n" not in message and "old.safetensors" in message and "format 1" in message
    assert "recompute it with 'fewstep ems compute'" in message
    # format 1 of a continuous-time schedule: the pure JVP is still the method there, so it loads
    _with_version(path, 1, fewstep.make_schedule("vp_linear").to_dict())
    assert EMS.load(path).n_grid == 4


def test_cli_records_the_choice(tmp_path):
    from fewstep.cli import main

    out = tmp_path / "g.safetensors"
    assert main(["ems", "compute", "--model", "gmm", "--n-grid", "2", "--n-data", "4", "--batch-size", "4",
                 "--time-derivative", "finite_difference", "--fd-step", "0.5", "--out", str(out), "--no-progress"]) == 0
    extra = EMS.load(out).meta.extra
    assert extra["time_derivative"] == "finite_difference" and extra["fd_step"] == 0.5


@pytest.mark.slow
def test_digits_ems_is_smooth_in_lambda(tmp_path):
    """The digits UNet (trained at integer timesteps), the benchmark's EMS settings: mean |second difference of s|
    below 0.3 with the default (finite-difference) derivative (the old JVP files: 1.15-1.46)."""
    from fewstep.tuning.ems.command import EMSComputeConfig, run_ems_compute

    cfg = EMSComputeConfig(model="digits", out=str(tmp_path / "e.safetensors"), n_grid=50, n_data=64, batch_size=16,
                           progress=False)
    ems = run_ems_compute(cfg, log=lambda _: None)
    assert ems.meta.extra["time_derivative"] == "finite_difference"
    s = ems.s
    assert float((s[2:] - 2 * s[1:-1] + s[:-2]).abs().mean()) < 0.3


@pytest.mark.parametrize("final_sigma", ["zero", "min"])
def test_v3_endings(final_sigma):
    """``zero``: the last step is the jump to the data prediction; ``min``: it ends on the EMS grid's last point
    (t_min) with an ordinary v3 step on the statistics, as the official code does."""
    sched = fewstep.make_schedule("linear")
    lam = fewstep.samplers.ems.ems_lambda_grid(sched, 40)
    g = torch.Generator().manual_seed(0)
    l, s, b = (1.0 + 0.1 * torch.randn(41, 3, generator=g, dtype=torch.float64),
               0.2 * torch.randn(41, 3, generator=g, dtype=torch.float64),
               0.2 * torch.randn(41, 3, generator=g, dtype=torch.float64))
    ems = EMS(lam, l, s, b, ArtifactMeta(schedule=sched.to_dict()), 8)
    spec = fewstep.samplers.GridSpec("linspace", final_sigma=final_sigma, convention="multistep")
    plan = fewstep.make_plan(sched, "dpmv3", 5, spacing=spec, ems=ems, order=3)
    degenerate = fewstep.make_plan(sched, "dpmv3", 5, spacing=spec, ems=ems, order=3, degenerate=True)
    last = plan.info["ems_index"][-1]
    if final_sigma == "zero":
        assert last is None and math.isinf(float(plan.grid.lambda_[-1]))
        torch.testing.assert_close(plan.predict[-1, :2], torch.stack([plan.history_coef[-1, 0], -torch.ones(3,
                                   dtype=torch.float64)]))  # x_0 = the data prediction: no statistics involved
    else:
        assert last == ems.n_grid and float(plan.grid.t[-1]) == sched.t_min
        # the EMS shape the last step: e^{-int l} per dimension, unlike the degenerate (l = 1) step
        a, a_degenerate = plan.predict[-1, 0], degenerate.predict[-1, 0].expand(3)
        assert float(((a - a_degenerate) / a_degenerate).abs().min()) > 1e-3, (a, a_degenerate)


def test_corrector_max_steps_turns_the_corrector_off_on_longer_grids():
    sched = fewstep.make_schedule("linear")
    lam = fewstep.samplers.ems.ems_lambda_grid(sched, 40)
    ones = torch.ones(41, 2, dtype=torch.float64)
    ems = EMS(lam, ones, 0.1 * ones, 0.1 * ones, ArtifactMeta(schedule=sched.to_dict()), 8)
    for nfe, corrected in ((8, True), (9, False)):
        plan = fewstep.make_plan(sched, "dpmv3", nfe, ems=ems, order=2, corrector_max_steps=8)
        assert (max(plan.info["corrector_orders"]) > 0) == corrected
        same = fewstep.make_plan(sched, "dpmv3", nfe, ems=ems, order=2, corrector=corrected)
        h = same.predict.shape[1]  # the history without corrector is shorter (no pseudo-order point)
        torch.testing.assert_close(plan.predict[:, :h], same.predict, rtol=0, atol=0)
        torch.testing.assert_close(plan.correct[:, :h], same.correct, rtol=0, atol=0)
        assert corrected or float(plan.correct.abs().max()) == 0.0
    with pytest.raises(ValueError, match="corrector_max_steps=-1 .* out of range"):
        fewstep.get_solver("dpmv3", degenerate=True, corrector_max_steps=-1)
