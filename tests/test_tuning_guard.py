"""The held-out guard of the searches: a deliberately bad search budget must not reach the user unannounced."""

import math

import pytest

import fewstep
from fewstep.cli import main
from fewstep.tuning.search import search_timesteps, search_usf

# Two search samples: any tuning overfits them.
BAD = dict(nfe=4, num_samples=2, validation_samples=64, progress=False)
S3_BAD = dict(BAD, budget=60, init_screen=0, init_size=8, init_spacings=["time_quadratic"], pool=12, per_generation=3,
              warmup=10, random_init=3, seed=7)


pytestmark = pytest.mark.usefixtures("module_reference_cache")  # conftest: one cache per module

def _validation_mse(gmm, solver, options):
    x, cond = gmm.initial_noise(64, 100002)  # the validation seeds: right after the 2 search samples
    ref = gmm.reference(x, cond, 2.0, None, None, None, None)
    return (gmm.generate(solver, options, 4, x, cond, 2.0, None) - ref).pow(2).flatten(1).mean(1).mean().item()


def test_timestep_search_with_a_bad_budget_writes_the_untuned_grid(gmm, tmp_path):
    messages = []
    sched = search_timesteps(gmm, "unipc", out=tmp_path / "t.json", budget=30, log=messages.append, **BAD)
    v = sched.meta.extra["validation"]
    assert not v["beats_baseline"] and v["written"] == "baseline" and v["seeds"] == [100002, 100066]
    assert v["tuned_value"] > v["baseline_value"] and v["interval95"][0] <= v["ratio"] <= v["interval95"][1]
    assert sum("does not beat its baseline" in m and "writing the baseline" in m for m in messages) == 1
    assert sched.meta.extra["search"]["best_fitness"] < sched.meta.extra["search"]["start_fitness"]  # it did overfit
    # The written file runs the untuned solver (the same samples); the recorded figure was measured against the
    # search's stored float32 reference, this one against a fresh one, hence the tolerance.
    written = _validation_mse(gmm, "unipc", {"solver_schedule": str(tmp_path / "t.json")})
    assert written == _validation_mse(gmm, "unipc", {}) == pytest.approx(v["baseline_value"], rel=1e-5)
    kept = search_timesteps(gmm, "unipc", out=tmp_path / "k.json", budget=30, keep_worse=True,
                            log=lambda m: None, **BAD)
    assert kept.meta.extra["validation"]["written"] == "tuned" and kept.timesteps != sched.timesteps
    assert _validation_mse(gmm, "unipc", {"solver_schedule": str(tmp_path / "k.json")}) == \
        pytest.approx(v["tuned_value"], rel=1e-5)


def test_s3_with_a_bad_budget_writes_the_best_hand_set_solver(gmm, tmp_path):
    messages = []
    sched = search_usf(gmm, out=tmp_path / "u.json", log=messages.append, **S3_BAD)
    v, s = sched.meta.extra["validation"], sched.meta.extra["search"]
    assert v["written"] == "baseline" and v["tuned_value"] > v["baseline_value"]
    assert v["baseline"] == f"best hand-set {s['baseline']}" and "@" in s["baseline"]
    assert s["best_fitness"] < s["baseline_fitness"]  # better on the 2 search samples, worse held out
    assert any("writing the baseline instead" in m for m in messages)
    assert _validation_mse(gmm, "usf", {"solver_schedule": str(tmp_path / "u.json")}) == \
        pytest.approx(v["baseline_value"], rel=1e-5)


def test_cli_reports_the_guard_and_keeps_worse_on_request(tmp_path, capsys):
    args = ["search", "timesteps", "--model", "gmm", "--nfe", "4", "--num-samples", "2", "--validation-samples", "64",
            "--budget", "30", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert "writing the baseline instead (--keep-worse writes the tuned one)" in capsys.readouterr().out
    assert main([*args, "--keep-worse", "--out", str(tmp_path / "b.json")]) == 0
    b = fewstep.load_solver_schedule(tmp_path / "b.json")
    assert b.meta.extra["validation"]["written"] == "tuned"
    assert main([*args, "--validation-samples", "1", "--out", str(tmp_path / "c.json")]) == 2
    assert "validation_samples must be >= 2" in capsys.readouterr().err


# ---------------------------------------------------------------- S3's predictor earns its place

S3_SMALL = dict(nfe=4, budget=24, num_samples=8, init_screen=8, init_size=8, init_spacings=["time_quadratic"],
                pool=24, per_generation=3, warmup=10, random_init=3, seed=3, progress=False, validation_samples=4,
                polish_first=False, polish_every=0)


def _entries(run_dir):
    from fewstep.tuning.search.runlog import SearchLog

    return SearchLog(run_dir / "search_log.jsonl").entries


def test_predictor_below_its_rank_threshold_is_plain_evolution(gmm, tmp_path):
    quiet = dict(log=lambda m: None)
    search_usf(gmm, out=tmp_path / "off.json", predictor=False, **S3_SMALL, **quiet)
    search_usf(gmm, out=tmp_path / "gated.json", predictor_min_rank=1.0, **S3_SMALL, **quiet)  # never earned
    off, gated = _entries(tmp_path / "off.run"), _entries(tmp_path / "gated.run")
    assert [e["candidate"] for e in gated] == [e["candidate"] for e in off]
    assert all(e["predicted"] is None for e in gated)
    ranked = [e["origin"] for e in gated if "predictor rank" in e["origin"]]
    assert ranked and all(o.endswith(", off)") for o in ranked)  # the skill was measured and logged
    search_usf(gmm, out=tmp_path / "on.json", predictor_min_rank=-1.0, **S3_SMALL, **quiet)
    assert any(e["predicted"] is not None for e in _entries(tmp_path / "on.run"))
    with pytest.raises(ValueError, match="predictor_min_rank is a rank correlation"):
        search_usf(gmm, out=tmp_path / "bad.json", predictor_min_rank=2.0, **S3_SMALL, **quiet)


def test_predictor_skill_separates_signal_from_noise():
    import random

    from fewstep.tuning.search.s3 import predictor_skill
    from fewstep.tuning.search.space import LogSNRAxis, SearchSpace

    space = SearchSpace(LogSNRAxis(fewstep.make_schedule("linear")), 4)
    rng = random.Random(0)
    cands = [space.random(rng) for _ in range(64)]
    # Fitness that depends smoothly on the first timestep position, which the encoding holds: learnable.
    learnable = [(c, math.exp(3 * c.u[1])) for c in cands]
    noise = [(c, math.exp(rng.gauss(0, 1))) for c in cands]
    assert predictor_skill(learnable, 5, 0, 0) > 0.5
    assert abs(predictor_skill(noise, 5, 0, 0)) < 0.5


def test_ems_compute_records_dpmv3_against_its_base_on_held_out_seeds(tmp_path, capsys):
    from fewstep.samplers.ems import EMS

    out = tmp_path / "g.safetensors"
    assert main(["ems", "compute", "--model", "gmm", "--n-grid", "40", "--n-data", "32", "--guidance", "2",
                 "--validation-samples", "16", "--validation-nfe", "5", "8", "--out", str(out), "--no-progress"]) == 0
    v = EMS.load(out).meta.extra["validation"]
    assert v["seeds"] == [100032, 100048] and v["nfe"] == [5, 8] and set(v["ratio_by_nfe"]) == {"5", "8"}
    assert v["recommended_solver"] == ("dpmv3" if v["tuned_value"] < v["baseline_value"] else "dpmpp")
    assert v["interval95"][0] <= v["ratio"] <= v["interval95"][1]
    assert "validation: dpmv3/dpmpp MSE on 16 held-out samples (seeds 100032..100047)" in capsys.readouterr().out
    assert main(["ems", "compute", "--model", "gmm", "--n-grid", "4", "--n-data", "4", "--validation-nfe", "8",
                 "--out", str(tmp_path / "c.safetensors"), "--no-progress"]) == 0
    assert "validation skipped" in capsys.readouterr().out
    assert "validation" not in EMS.load(tmp_path / "c.safetensors").meta.extra
