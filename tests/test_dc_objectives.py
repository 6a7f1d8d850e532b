"""DC calibration objectives (trajectory / final / auto) and the held-out guard of calibrate_dc."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.tuning.dc import calibrate as calibrate_module
from fewstep.tuning.dc.trajectory import ground_truth_trajectory, trajectory_grid
from fewstep.eval.holdout import paired_ratio, validation_record
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MIX = GaussianMixture.random(dim=4, components=3, num_classes=3, seed=0)
MODEL = GMMModel(MIX)
G = 3.0


def inputs(n, seed=0):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = torch.arange(n) % 3
    return dict(x_T=x, schedule="linear", guidance=G, cond=cond, uncond=torch.full_like(cond, -1))


def guided(labels):
    null = torch.full_like(labels, -1)

    def f(x, t):
        out = MODEL(torch.cat([x, x]), torch.full((2 * x.shape[0],), float(t), dtype=torch.float64),
                    torch.cat([labels, null]))
        eu, ec = out.chunk(2)[1], out.chunk(2)[0]
        return eu + G * (ec - eu)
    return f


# An independent transcription of the official greedy search (wl-zhao/DC-Solver ``search_dc`` /
# ``find_optim_ratio``) for UniPC-2 bh2 in data space, written from the algorithm, not from fewstep's plans.
def _coeffs(rks, hh, corrector):
    p = len(rks)
    hphi1 = math.expm1(hh)
    hphik, fac, R, b = hphi1 / hh - 1.0, 1, [], []
    for k in range(1, p + 1):
        R.append(np.asarray(rks) ** (k - 1))
        b.append(hphik * fac / hphi1)
        fac *= k + 1
        hphik = hphik / hh - 1.0 / fac
    R, b = np.array(R), np.array(b)
    if corrector:
        rho = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
    else:
        rho = np.zeros(0) if p == 1 else (np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]))
    return rho, hphi1


def official_greedy(f, x, grid, gt, iters, lr=0.1, wd=0.01):
    a, s, lam, ts, n = grid.alpha.tolist(), grid.sigma.tolist(), grid.lambda_.tolist(), grid.model_timesteps.tolist(), grid.n
    order = lambda i: min(2, n - i, i + 1)  # noqa: E731  (lower_order_final, warm-up)

    def update(i, x, hist, corrected_with=None):
        p, h = order(i), lam[i + 1] - lam[i]
        if math.isinf(h):
            return a[i + 1] * hist[-1]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
        rho, hphi1 = _coeffs(rks, -h, corrected_with is not None)
        m0 = hist[-1]
        res = sum(rho[k - 1] * (hist[-1 - k] - m0) / rks[k - 1] for k in range(1, p)) if p > 1 else 0.0
        if corrected_with is not None:
            res = res + rho[-1] * (corrected_with - m0)
        return s[i + 1] / s[i] * x - a[i + 1] * hphi1 * (m0 + res)

    def comp(hist, rho):
        tq = ts[len(hist) - 2] + rho * (ts[len(hist) - 1] - ts[len(hist) - 2])
        nodes, vals = ts[len(hist) - 3:len(hist)], hist[-3:]
        out = 0.0
        for j in range(3):
            w = 1.0
            for k in range(3):
                if k != j:
                    w = w * (tq - nodes[k]) / (nodes[j] - nodes[k])
            out = out + w * vals[j]
        return out

    x0 = lambda x, i: (x - s[i] * f(x, ts[i])) / a[i]  # noqa: E731
    ratios, hist = [1.0] * n, []
    with torch.no_grad():
        m = x0(x, 0)
    last = None
    for i in range(n):
        if i > 0:
            x = update(i - 1, last, hist, corrected_with=m).detach()
        hist.append(m)
        if i >= 2:
            p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd)
            for _ in range(iters):
                opt.zero_grad()
                h2 = hist[:-1] + [comp(hist, p)]
                xp = update(i, x, h2)
                if i + 1 < n:
                    xp = update(i, x, h2, corrected_with=x0(xp, i + 1))
                (xp - gt[i + 1]).pow(2).mean().backward()
                opt.step()
            ratios[i] = float(p.detach())
            with torch.no_grad():
                hist[-1] = comp(hist, ratios[i])
        last = x
        with torch.no_grad():
            x = update(i, x, hist)
            if i + 1 < n:
                m = x0(x, i + 1)
    return ratios


def test_trajectory_objective_equals_the_official_greedy_search():
    kw = inputs(5)
    nfe = 6
    r = fewstep.calibrate_dc(MODEL, **kw, nfe=nfe, objective="trajectory", iterations=8, reference_nfe=60)
    grid = fewstep.make_plan("linear", "dc", nfe).grid
    gt = ground_truth_trajectory(MODEL, kw["x_T"], grid, "epsilon", 60, guidance=G, cond=kw["cond"],
                                 uncond=kw["uncond"])
    expected = official_greedy(guided(kw["cond"]), kw["x_T"], grid, gt, iters=8)
    # Same float64 arithmetic in another order (and torch's AdamW vs ours): agreement to round-off.
    np.testing.assert_allclose(r.ratios, expected, rtol=0, atol=1e-9)
    assert r.ratios[:2] == [1.0, 1.0] and r.ratios[2:] != [1.0] * 4
    assert r.meta.extra["objective"] == "trajectory" and "validation" not in r.meta.extra


def test_ground_truth_trajectory_passes_through_the_grid_points():
    grid = fewstep.make_plan("linear", "unipc", 5).grid
    fine, marks = trajectory_grid(grid, 40)
    assert fine.n == 40 and marks == [0, 8, 16, 24, 32, 40]
    assert torch.equal(fine.t[marks], grid.t) and torch.equal(fine.sigma[-1:], grid.sigma[-1:])
    kw = inputs(3)
    states = ground_truth_trajectory(MODEL, kw["x_T"], grid, "epsilon", 40, guidance=G, cond=kw["cond"],
                                     uncond=kw["uncond"])
    end = fewstep.sample(MODEL, kw["x_T"], solver="ddim", timesteps=fine.model_timesteps.tolist(), guidance=G,
                         cond=kw["cond"], uncond=kw["uncond"])
    assert len(states) == 6 and torch.equal(states[0], kw["x_T"])
    torch.testing.assert_close(states[-1], end, rtol=0, atol=1e-12)  # same DDIM steps, one run vs. another


@pytest.mark.filterwarnings("ignore:validation")
def test_auto_keeps_the_objective_that_wins_on_validation_and_records_it():
    kw = inputs(9)
    r = fewstep.calibrate_dc(MODEL, **kw, nfe=6, iterations=6, reference_nfe=60, validation=4)
    e = r.meta.extra
    v = e["validation"]
    assert e["objective_requested"] == "auto" and set(e["ratios_by_objective"]) == {"trajectory", "final"}
    assert e["objective"] == min(v["objectives"], key=v["objectives"].get)
    assert v["samples"] == 4 and v["samples_held_out"] == [5, 9] and e["num_samples"] == 5
    lo, hi = v["interval95"]
    assert lo <= v["ratio"] <= hi and v["ratio"] == pytest.approx(v["tuned_value"] / v["baseline_value"])
    # the figures are the held-out samples' MSE to the reference, recomputable from the returned ratios
    ref = fewstep.sample(MODEL, kw["x_T"], solver="ddim", nfe=60, guidance=G, cond=kw["cond"], uncond=kw["uncond"])
    chosen = e["ratios_by_objective"][e["objective"]]
    out = fewstep.sample(MODEL, kw["x_T"], solver="dc", nfe=6, ratios=chosen, guidance=G, cond=kw["cond"],
                         uncond=kw["uncond"])
    assert (out - ref)[5:].pow(2).mean().item() == pytest.approx(v["tuned_value"], rel=1e-9)
    with pytest.raises(ValueError, match="objective='auto' chooses between"):
        fewstep.calibrate_dc(MODEL, **kw, nfe=6, validation=0)
    with pytest.raises(ValueError, match="objective must be one of"):
        fewstep.calibrate_dc(MODEL, **kw, nfe=6, objective="greedy")


def test_guard_writes_the_base_solver_when_the_ratios_lose_on_validation():
    kw = inputs(6)
    # A deliberately bad budget: 3 steps of a huge rate throw the per-step fit (last iterate kept) far off.
    bad = dict(nfe=5, objective="trajectory", iterations=3, lr=40.0, reference_nfe=40, validation=3)
    with pytest.warns(UserWarning, match="does not beat its baseline.*writing the baseline instead"):
        r = fewstep.calibrate_dc(MODEL, **kw, **bad)
    v = r.meta.extra["validation"]
    assert not v["beats_baseline"] and v["written"] == "baseline" and v["tuned_value"] > v["baseline_value"]
    assert r.ratios == [1.0] * 5  # DC with all-ones ratios is UniPC bitwise (tests/test_dc.py)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = fewstep.calibrate_dc(MODEL, **kw, **bad, keep_worse=True)
    assert kept.ratios != [1.0] * 5 and kept.meta.extra["validation"]["written"] == "tuned"


def test_trajectory_calibration_resumes_to_the_same_ratios(tmp_path, monkeypatch):
    kw = inputs(4)
    args = dict(nfe=6, objective="trajectory", iterations=4, reference_nfe=30)
    whole = fewstep.calibrate_dc(MODEL, **kw, **args)
    real_save, calls = calibrate_module._save_checkpoint, []

    def crash_after_two(path, state):
        real_save(path, state)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_module, "_save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        fewstep.calibrate_dc(MODEL, **kw, **args, checkpoint=tmp_path / "s.json")
    monkeypatch.setattr(calibrate_module, "_save_checkpoint", real_save)
    assert len(json.loads((tmp_path / "s.json").read_text())["ratios"]) == 4  # dc_order ones + two fitted steps
    resumed = fewstep.calibrate_dc(MODEL, **kw, **args, checkpoint=tmp_path / "s.json")
    assert resumed.ratios == whole.ratios
    with pytest.raises(ValueError, match="checkpoint of another calibration"):
        fewstep.calibrate_dc(MODEL, **kw, **{**args, "lr": 0.05}, checkpoint=tmp_path / "s.json")


def test_paired_ratio_interval():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g, dtype=torch.float64) + 0.5
    assert paired_ratio(base, base) == (1.0, 1.0, 1.0)
    ratio, lo, hi = paired_ratio(0.8 * base + 0.01 * torch.rand(200, generator=g, dtype=torch.float64), base)
    assert lo < ratio < hi and hi < 1 and 0.78 < lo
    assert paired_ratio(torch.tensor([1.0, math.inf]), torch.ones(2))[0] == math.inf
    rec = validation_record(2 * base, base, tuned_label="t", baseline_label="b", seeds=[10, 210])
    assert rec["written"] == "baseline" and rec["ratio"] == pytest.approx(2.0)
    assert validation_record(2 * base, base, tuned_label="t", baseline_label="b", seeds=[10, 210],
                             keep_worse=True)["written"] == "tuned"


def test_calibrate_cli_records_validation_seeds_and_objective(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["calibrate", "dc", "--model", "gmm", "--num-samples", "3", "--validation-samples", "4", "--iterations",
                 "2", "--reference-nfe", "10", "--no-progress", "--nfe", "5", "--objective", "trajectory",
                 "--out", str(out)]) == 0
    e = fewstep.DCRatios.load(out).meta.extra
    assert e["objective"] == "trajectory" and e["validation"]["seeds"] == [100003, 100007]
    assert "validation: " in capsys.readouterr().out
    # compare shows the recorded validation figures beside its own
    assert main(["compare", "--model", "gmm", "--solvers", "unipc", f"dc:dc_file={out}", "--nfe", "5",
                 "--num-samples", "8", "--no-plot", "--no-progress", "--out", str(tmp_path / "cmp")]) == 0
    line = f"dc(dc_file={out}): at tuning time, on 4 validation samples (seeds 100003..100006)"
    assert line in capsys.readouterr().out and line in (tmp_path / "cmp" / "results.md").read_text()
