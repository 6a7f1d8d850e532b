"""S3 and the timestep search on the exact GMM: determinism, crash/resume equality, files, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.tuning.search import search_timesteps, search_usf
from fewstep.tuning.search.fitness import Fitness
from fewstep.tuning.search.predictor import FitnessPredictor
from fewstep.tuning.search.runlog import SearchLog
from fewstep.tuning.search.space import (
    Candidate,
    LogSNRAxis,
    SearchSpace,
    logits_from_positions,
    positions_from_logits,
)

# Small but complete: initial population, predictor rounds, polish rounds.
S3 = dict(nfe=4, budget=34, num_samples=24, init_screen=8, init_size=8, init_spacings=["time_quadratic"], pool=12,
          per_generation=3, warmup=10, random_init=3, progress=False, predictor_min_rank=-1.0)
QUIET = dict(log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("module_reference_cache")  # conftest: one cache per module

def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "search_log.jsonl").read_text().splitlines()]


def _core(s):
    """What a schedule runs (its provenance, with wall times and paths, differs between runs)."""
    return s.timesteps, s.steps, s.analytic_first_step, s.final_sigma, s.meta.extra["search"]["best_fitness"]


def _strip(entries):
    return [{k: v for k, v in e.items() if k not in ("seconds", "elapsed")} for e in entries]


@pytest.fixture(scope="module")
def reference_run(gmm, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3") / "ref.json"
    sched = search_usf(gmm, out=out, seed=7, **S3, **QUIET)
    return sched, out


def test_s3_is_deterministic_and_its_file_reproduces_the_logged_fitness(gmm, reference_run, tmp_path):
    sched, out = reference_run
    again = search_usf(gmm, out=tmp_path / "again.json", seed=7, **S3, **QUIET)
    assert _core(again) == _core(sched) and fewstep.load_solver_schedule(out) == sched
    assert _strip(_log(tmp_path / "again.run")) == _strip(_log(out.with_suffix(".run")))
    origins = {e["origin"].split()[0] for e in _log(out.with_suffix(".run"))}
    assert {"mutation", "polish"} <= origins and any("@" in o for o in origins)  # every phase ran
    assert any(e["predicted"] is not None for e in _log(out.with_suffix(".run")))
    # The written file is the schedule that was scored: re-scoring it gives the logged best.
    x, cond = gmm.initial_noise(S3["num_samples"], 100000)
    ref = gmm.reference(x, cond, 2.0, None, None, None, None)
    y = gmm.generate("usf", {"solver_schedule": str(out)}, S3["nfe"], x, cond, 2.0, None)
    best = min(e["fitness"] for e in _log(out.with_suffix(".run")) if e["fitness"] is not None)
    assert (y - ref).pow(2).flatten(1).mean(1).mean().item() == pytest.approx(best, rel=1e-6)
    assert sched.meta.extra["search"]["best_fitness"] == pytest.approx(best)
    assert sched.meta.nfe == S3["nfe"] and sched.meta.solver == "usf" and sched.meta.guidance == 2.0
    assert sched.meta.extra["search"]["search_seeds"] == [100000, 100000 + S3["num_samples"]]
    search_usf(gmm, out=tmp_path / "s8.json", seed=8, **{**S3, "budget": 14}, **QUIET)
    assert _strip(_log(tmp_path / "s8.run")) != _strip(_log(out.with_suffix(".run"))[:14])


def test_s3_resumes_after_a_crash_to_the_same_result(gmm, reference_run, tmp_path, monkeypatch):
    sched, out = reference_run
    real = SearchLog.append

    def crashing(self, entry):
        if len(self) == 20:  # mid-search: the evaluation in flight is lost
            raise RuntimeError("simulated crash")
        real(self, entry)

    monkeypatch.setattr(SearchLog, "append", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        search_usf(gmm, out=tmp_path / "r.json", seed=7, **S3, **QUIET)
    monkeypatch.setattr(SearchLog, "append", real)
    log_path = tmp_path / "r.run" / "search_log.jsonl"
    assert len(_log(tmp_path / "r.run")) == 20
    with open(log_path, "a") as f:
        f.write('{"i": 20, "generation": 3, "fitn')  # a torn last line, as a kill -9 mid-write leaves
    messages = []
    resumed = search_usf(gmm, out=tmp_path / "r.json", seed=7, **S3, log=messages.append)
    assert any("resuming: 20 of 34" in m for m in messages)
    assert _core(resumed) == _core(sched)
    assert _strip(_log(tmp_path / "r.run")) == _strip(_log(out.with_suffix(".run")))
    # A larger budget continues the finished search instead of starting over.
    more = search_usf(gmm, out=tmp_path / "r.json", seed=7, **{**S3, "budget": 40}, **QUIET)
    assert len(_log(tmp_path / "r.run")) == 40 and more.meta.extra["search"]["best_fitness"] <= \
        sched.meta.extra["search"]["best_fitness"]
    with pytest.raises(ValueError, match=r"holds a search with other settings \(differs in: \['seed'\]\)"):
        search_usf(gmm, out=tmp_path / "r.json", seed=9, **S3, **QUIET)


@pytest.mark.slow
def test_s3_resumes_after_kill_9(reference_run, tmp_path):
    sched, _ = reference_run
    out = tmp_path / "k.json"
    args = [sys.executable, "-m", "fewstep.cli", "search", "usf", "--model", "gmm", "--out", str(out), "--seed", "7",
            *[f"{k}={v}" for k, v in S3.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = tmp_path / "k.run" / "search_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_path.exists() or len(log_path.read_text().splitlines()) < 18):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 18 <= len(log_path.read_text().splitlines()) < S3["budget"]
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    assert _core(fewstep.load_solver_schedule(out)) == _core(sched)


def test_predictor_off_is_the_plain_evolutionary_search(gmm, tmp_path):
    search_usf(gmm, out=tmp_path / "off.json", seed=7, predictor=False, **S3, **QUIET)
    entries = _log(tmp_path / "off.run")
    assert len(entries) == S3["budget"] and all(e["predicted"] is None for e in entries)


def test_predictor_ranks_unseen_schedules(gmm, tmp_path):
    """Trained on 80 evaluated schedules, it ranks 40 unseen ones clearly better than chance."""
    import random

    fitness = Fitness(gmm, 4, 2.0, 16, 100000, "mse", tmp_path, log=lambda m: None)
    space = SearchSpace(LogSNRAxis(fitness.schedule), 4)
    rng = random.Random(0)
    cands = [space.random(rng) for _ in range(6)]
    while len(cands) < 120:
        cands.append(space.mutate(rng, rng.choice(cands[-20:])))
    fit = [fitness("usf", {"solver_schedule": space.schedule(c)}) for c in cands]
    p = FitnessPredictor(5, seed=0).fit(cands[:80], fit[:80])
    pred, truth = torch.tensor(p.predict(cands[80:])), torch.tensor(fit[80:])
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(pred), rank(truth)]))[0, 1].item()
    assert rho > 0.3, rho
    print(f"predictor rank correlation on unseen schedules: {rho:.2f}")


def test_search_space_moves_stay_valid():
    import random

    for free_start in (False, True):
        space = SearchSpace(LogSNRAxis(fewstep.make_schedule("linear")), nfe=5, free_start=free_start)
        rng = random.Random(0)
        pop = [space.random(rng) for _ in range(10)]
        for _ in range(300):
            c = space.mutate(rng, space.crossover(rng, rng.choice(pop), rng.choice(pop)))
            s = space.schedule(c)  # validates every strategy at its position
            assert s.nfe == 5 and all(b > a for a, b in zip(c.u, c.u[1:])) and 0 <= c.u[0] and c.u[-1] < 1
            assert free_start or c.u[0] == 0.0
            pop.append(c)
        assert free_start == any(c.u[0] > 0 for c in pop)
        for z in ([0.3, -1.2, 2.0], [0.0, 0.0, 0.0]):
            u = positions_from_logits(z, free_start)
            assert len(u) == 4 - free_start and logits_from_positions(u, free_start) == pytest.approx(z, abs=1e-12)


def test_timestep_search_improves_and_resumes_by_replay(gmm, tmp_path):
    kw = dict(nfe=3, num_samples=16, progress=False, **QUIET)
    full = search_timesteps(gmm, "unipc", out=tmp_path / "full.json", budget=24, **kw)
    info = full.meta.extra["search"]
    assert info["best_fitness"] < info["start_fitness"] and not full.has_strategies
    assert full.meta.solver == "unipc"
    interior = search_timesteps(gmm, "unipc", out=tmp_path / "interior.json", budget=12, free_start=False, **kw)
    assert interior.timesteps[0] == 999.0  # only the interior timesteps moved
    part = search_timesteps(gmm, "unipc", out=tmp_path / "part.json", budget=12, **kw)
    assert part.meta.extra["search"]["evaluations"] == 12
    cont = search_timesteps(gmm, "unipc", out=tmp_path / "part.json", budget=24, **kw)
    assert cont.timesteps == full.timesteps
    y = fewstep.sample(gmm.model, torch.zeros(2, 16, dtype=torch.float64), schedule=gmm.schedule, solver="unipc",
                       solver_schedule=tmp_path / "full.json")
    assert torch.isfinite(y).all()


def test_cli_end_to_end_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "t.yaml"
    rc = main(["search", "timesteps", "--model", "gmm", "--solver", "dpmpp", "--out", str(out), "--no-progress",
               "nfe=3", "budget=8", "num_samples=8"])
    assert rc == 0 and fewstep.load_solver_schedule(out).meta.solver == "dpmpp"
    assert (tmp_path / "t.run" / "config.yaml").is_file()
    rc = main(["search", "usf", "--model", "gmm", "--out", str(tmp_path / "u.json"), "--predictor", "off",
               "--no-progress", "nfe=2", "budget=5", "num_samples=8", "random_init=0", "init_spacings=[logsnr]"])
    assert rc == 0 and fewstep.load_solver_schedule(tmp_path / "u.json").has_strategies
    capsys.readouterr()
    for argv, match in [
        (["search", "usf", "--nfe", "0"], "nfe=0 is out of range; allowed: 1 to 100000"),
        (["search", "usf", "--out", "x.txt"], "must name a .json or .yaml solver schedule file"),
        (["search", "timesteps", "--solver", "usf"], "search them with `fewstep search usf`"),
        (["search", "usf", "budget=many"], "budget"),
        (["search", "timesteps", "--data-seed", "7"], "data_seed must be >= 100000"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fewstep search {argv[1]}: error:") and match in err[0], err


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="per_generation \\(9\\) cannot exceed pool \\(4\\)"):
        search_usf("gmm", pool=4, per_generation=9)
    with pytest.raises(ValueError, match="metric 'psnr' is not one of mse, fd"):
        search_usf("gmm", metric="psnr")
    with pytest.raises(TypeError):
        search_usf("gmm", bogus=1)
    # Search data never overlaps the evaluation seeds 0..N-1.
    for search in (search_usf, search_timesteps):
        with pytest.raises(ValueError, match=r"data_seed must be >= 100000 \(seeds below are evaluation seeds\), got 0"):
            search("gmm", data_seed=0)


def test_shipped_search_configs_load(tmp_path):
    from fewstep.config import load_config
    from fewstep.tuning.search import TimestepSearchConfig, USFSearchConfig

    root = Path(__file__).resolve().parents[1] / "configs" / "search"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"usf-gmm.yaml", "usf-digits.yaml", "timesteps-gmm.yaml", "timesteps-digits.yaml"}
    for f in files:
        schema = USFSearchConfig if f.name.startswith("usf") else TimestepSearchConfig
        cfg = load_config(schema, f, overrides=[f"out={tmp_path / 'x.json'}"])
        assert cfg.nfe == 5 and cfg.budget >= 100


def test_fd_fitness(gmm, tmp_path):
    sched = search_timesteps(gmm, "ddim", nfe=3, budget=3, num_samples=24, metric="fd", out=tmp_path / "fd.json",
                             progress=False, **QUIET)
    assert sched.meta.extra["search"]["metric"] == "fd" and sched.meta.extra["search"]["best_fitness"] > 0


def test_fitness_reference_is_shared_through_the_cache_and_resumes_after_a_crash(gmm, tmp_path, monkeypatch):
    monkeypatch.setattr(gmm, "batch_size", 4)
    args = (gmm, 4, 2.0, 10, 100000, "mse")
    clean = Fitness(*args, tmp_path / "clean", cache_dir=tmp_path / "cache0", **QUIET).reference
    exact = gmm.reference
    calls = []

    def crashing(x_T, *rest):
        calls.append(x_T.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return exact(x_T, *rest)

    monkeypatch.setattr(gmm, "reference", crashing)
    with pytest.raises(KeyboardInterrupt):
        Fitness(*args, tmp_path / "a", cache_dir=tmp_path / "cache", **QUIET)
    resumed = Fitness(*args, tmp_path / "a", cache_dir=tmp_path / "cache", **QUIET).reference
    assert calls == [4, 4, 2, 2] and torch.equal(resumed, clean)  # the resumed run computed the last chunk only
    shared = Fitness(*args, tmp_path / "b", cache_dir=tmp_path / "cache", **QUIET).reference  # another run folder
    assert len(calls) == 4 and torch.equal(shared, clean) and (tmp_path / "b" / "reference.safetensors").is_file()


def test_work_folder_lock_cleans_what_killed_writers_left(tmp_path):
    # the run setup of the searches and calibrate dc: every temporary file in the locked folder is
    # stale; beside OUT only OUT's own, of writers that are gone (pid 999999 is not running)
    from fewstep.infra.io import lock_work_folder

    work, out = tmp_path / "s.run", tmp_path / "s.json"
    work.mkdir()
    mine = work / f".state.json.{os.getpid() + 1}.0123abcd.tmp"  # a live-looking pid: still stale in our folder
    dead_out, other = tmp_path / ".s.json.999999.0123abcd.tmp", tmp_path / ".t.json.999999.0123abcd.tmp"
    for f in (mine, dead_out, other):
        f.write_text("half")
    with lock_work_folder(work, out, "another test") as held:
        assert held == work and not mine.exists() and not dead_out.exists() and other.exists()
