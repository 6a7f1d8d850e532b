"""EMS computation and the EMS artifact: analytic check on the exact GMM, exactness of the plumbing
(guidance, parameterisations), kill-and-resume, 2-process equality, file validation, the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fewstep
from fewstep import EMS, ArtifactError, ArtifactMeta, compute_ems
from fewstep.cli import main as cli_main
from fewstep.samplers.ems import MOMENTS, ems_from_moments, ems_lambda_grid
from fewstep.zoo.gmm import GaussianMixture, GMMModel

SCHED = "vp_linear"  # smooth t(lambda), so the exact reference below can work in lambda alone
MIX = GaussianMixture.random(3, 3, seed=4, std_range=(0.3, 0.6))
T_RANGE = dict(t_start=0.5, t_end=0.15)  # lambda about -0.7 .. 1.0: a narrow window, fine spacing


def mixture_data(seed):
    def data(idx):
        return torch.cat([MIX.sample(1, torch.Generator().manual_seed(seed + int(k))) for k in idx])
    return data


def exact_statistics(lam0: float, m: int = 2000):
    """l, s, b at lambda0 from exact Jacobians and total derivatives (autograd on the exact denoiser).

    Independent of fewstep's EMS code: the VP identities alpha^2 = sigmoid(2 lambda), d x / d lambda =
    sigma^2 x - sigma eps, and l(lambda) = E[sigma diag(d eps / d x)] differentiated through the
    data path with the same x0, z at every lambda. Also returns the standard deviation of one
    datapoint's Rademacher estimate of l: Var_x(sigma J_ii) + E[sigma^2 sum_{j != i} J_ij^2].
    """
    g = torch.Generator().manual_seed(7)
    x0 = MIX.sample(m, g)
    z = torch.randn(m, 3, generator=g, dtype=torch.float64)

    def alpha_sigma(lam):
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    def eps_fn(x, lam):
        a, s = alpha_sigma(lam)
        return MIX.denoise(x[None], a, s)[1][0]

    def jacobians(lam):
        a, s = alpha_sigma(lam)
        return s * torch.func.vmap(torch.func.jacrev(eps_fn), in_dims=(0, None))(a * x0 + s * z, lam)

    lam = torch.tensor(lam0, dtype=torch.float64)
    l, dl = torch.func.jvp(lambda u: torch.diagonal(jacobians(u), dim1=1, dim2=2).mean(0), (lam,),
                           (torch.ones_like(lam),))
    jac = jacobians(lam)
    diag = torch.diagonal(jac, dim1=1, dim2=2)
    l_sd = (diag.var(0) + (jac.pow(2).sum(2) - diag.pow(2)).mean(0)).sqrt()
    a, s = alpha_sigma(lam)
    x = a * x0 + s * z

    def f_fn(x, u):
        au, su = alpha_sigma(u)
        eps = torch.func.vmap(eps_fn, in_dims=(0, None))(x, u)
        return (su * eps - (l + dl * (u - lam)) * x) / au

    eps = torch.func.vmap(eps_fn, in_dims=(0, None))(x, lam)
    f, df = torch.func.jvp(f_fn, (x, lam), (s**2 * x - s * eps, torch.ones_like(lam)))
    fc = f - f.mean(0)
    slope = (fc * (df - df.mean(0))).mean(0) / (fc * fc).mean(0)
    return {"l": l, "s": slope, "b": df.mean(0) - slope * f.mean(0), "l_sd": l_sd}


def test_gmm_l_matches_exact_diagonal_within_sampling_error():
    k = 512
    ems = compute_ems(GMMModel(MIX, SCHED), mixture_data(100_000), SCHED, n_grid=8, n_data=k, batch_size=k,
                      progress=False, **T_RANGE)
    for j in (2, 6):
        exact = exact_statistics(float(ems.lambdas[j]))
        se = exact["l_sd"] / math.sqrt(k)
        assert bool(((ems.l[j] - exact["l"]).abs() < 4 * se).all()), (j, ems.l[j], exact["l"], se)
        # sharp: a few % of l, and far from the degenerate value l = 1 in standard errors
        assert bool((se < 0.05 * exact["l"].abs()).all()) and bool(((exact["l"] - 1).abs() > 10 * se).all())


@pytest.mark.slow
def test_gmm_ems_matches_exact_statistics_within_sampling_error():
    """l, s and b of 8 independent runs (K = 1024 each) against the exact statistics: z-scores < 5."""
    model = GMMModel(MIX, SCHED)
    runs = [compute_ems(model, mixture_data(100_000 + 10_000 * r), SCHED, n_grid=24, n_data=1024, batch_size=1024,
                        seed=100_000 + r, progress=False, **T_RANGE) for r in range(8)]
    stats = {k: torch.stack([getattr(e, k) for e in runs]) for k in ("l", "s", "b")}
    for j in (6, 12, 18):
        exact = exact_statistics(float(runs[0].lambdas[j]), m=20000)
        for name, values in stats.items():
            mean, se = values[:, j].mean(0), values[:, j].std(0) / math.sqrt(len(runs))
            assert bool(((mean - exact[name]).abs() < 5 * se).all()), (name, j, mean, exact[name], se)
            assert bool((se < 0.2 * exact[name].abs().clamp(min=0.05)).all()), (name, j, se, exact[name])


def test_guided_ems_is_the_ems_of_the_guided_function():
    mix = GaussianMixture.random(3, 4, num_classes=2, seed=2)
    model = GMMModel(mix, "linear")

    def data(idx):
        labels = idx % 2
        return mix.sample(len(idx), torch.Generator().manual_seed(int(idx[0])), labels), labels, torch.full_like(labels, -1)

    def combined(x, t, labels):
        return model(x, t, -torch.ones_like(labels)) + 3.0 * (model(x, t, labels) - model(x, t, -torch.ones_like(labels)))

    # one time derivative for both: the closure does not carry the GMM's continuous_time flag
    kw = dict(n_grid=3, n_data=8, batch_size=8, progress=False, time_derivative="jvp")
    guided = compute_ems(model, data, "linear", guidance=3.0, **kw)
    plain = compute_ems(combined, lambda i: data(i)[:2], "linear", **kw)
    for k in ("l", "s", "b"):
        torch.testing.assert_close(getattr(guided, k), getattr(plain, k), rtol=1e-12, atol=1e-12)
    assert guided.meta.guidance == 3.0 and plain.meta.guidance is None


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_ems_does_not_depend_on_the_parameterisation(prediction):
    kw = dict(n_grid=3, n_data=8, batch_size=8, progress=False, **T_RANGE)
    ref = compute_ems(GMMModel(MIX, SCHED), mixture_data(0), SCHED, **kw)
    other = compute_ems(GMMModel(MIX, SCHED, prediction), mixture_data(0), SCHED, prediction=prediction, **kw)
    for k in ("l", "s", "b"):
        torch.testing.assert_close(getattr(other, k), getattr(ref, k), rtol=1e-9, atol=1e-9)


def test_moments_reduce_to_regression_of_explicit_f():
    """ems_from_moments against an explicit regression of f' on f, with l' from the same differences."""
    g = torch.Generator().manual_seed(0)
    lam = torch.linspace(-1, 1, 5, dtype=torch.float64)
    a, v, da, lr = (torch.randn(5, 50, 2, generator=g, dtype=torch.float64) for _ in range(4))
    terms = dict(lr=lr, a=a, v=v, da=da, aa=a * a, av=a * v, vv=v * v, ada=a * da, vda=v * da)
    sums = torch.stack([terms[k].sum(1) for k in MOMENTS], 1)
    l, s, b = ems_from_moments(lam, sums, 50)
    dl = torch.gradient(l, spacing=(lam,), dim=0, edge_order=2)[0]
    f = a - l[:, None] * v
    df = da + l[:, None] * a - dl[:, None] * v
    for j in range(5):
        X = torch.stack([f[j, :, 0], torch.ones(50, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(X, df[j, :, 0:1]).solution[:, 0]
        torch.testing.assert_close(torch.stack([s[j, 0], b[j, 0]]), coef, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- the artifact

def small_ems(**meta):
    lam = torch.linspace(-3, 3, 5, dtype=torch.float64)
    shape = (5, 2, 3)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    meta = ArtifactMeta(schedule=fewstep.make_schedule("linear").to_dict(), guidance=2.0, fingerprint="x", **meta)
    return EMS(lam, *tensors, meta=meta, n_data=16)


def write_raw(path, tensors, record):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"fewstep_artifact": json.dumps(record)})


def test_ems_file_round_trip(tmp_path):
    ems = small_ems()
    loaded = EMS.load(ems.save(tmp_path / "e.safetensors"))
    assert loaded == ems and loaded.meta == ems.meta and loaded.n_data == 16 and loaded.sample_shape == (2, 3)
    assert torch.equal(loaded.l, ems.l) and loaded.lambdas.dtype == torch.float64


@pytest.mark.parametrize("mutate,match", [
    (lambda t, r: t.update(l=t["l"][:4]), r"tensor 'l' has shape \(4, 2, 3\); expected \(5, 2, 3\)"),
    (lambda t, r: t.update(s=t["s"].reshape(5, 3, 2)), r"tensor 's' has shape \(5, 3, 2\)"),
    (lambda t, r: t["b"].__setitem__((2, 1, 1), float("nan")), "tensor 'b' contains NaN or Inf .first at grid point 2"),
    (lambda t, r: t.update(**{"lambda": t["lambda"].flip(0)}), "'lambda' must increase strictly"),
    (lambda t, r: t.pop("s"), r"missing tensor\(s\) \['s'\]"),
    (lambda t, r: r["meta"].update(schedule=None), "meta.schedule is missing"),
    (lambda t, r: r.update(n_grid=7), "n_grid=7 in the header does not match the tensors"),
])
def test_corrupt_ems_files_are_rejected_naming_the_problem(tmp_path, mutate, match):
    ems = small_ems()
    tensors, record = dict(ems.tensors()), ems.to_dict()
    tensors = {k: v.clone() for k, v in tensors.items()}
    mutate(tensors, record)
    write_raw(tmp_path / "bad.safetensors", tensors, record)
    with pytest.raises(ArtifactError, match=f"dpmv3_ems artifact .*bad.safetensors: .*{match}"):
        EMS.load(tmp_path / "bad.safetensors")


def test_ems_for_another_schedule_is_refused():
    ems = small_ems()
    with pytest.raises(ArtifactError, match=r"another noise schedule \(beta_end: 0.02 \(artifact\) vs 0.012"):
        fewstep.make_plan("scaled_linear", "dpmv3", 5, ems=ems)


def test_lambda_grid_nests_and_checks_its_range():
    sched = fewstep.make_schedule("linear")
    fine, coarse = ems_lambda_grid(sched, 12), ems_lambda_grid(sched, 4)
    assert torch.equal(fine[::3], coarse)
    assert float(fine[0]) == float(sched.lambda_(torch.tensor(999.0))) and float(fine[-1]) == float(
        sched.lambda_(torch.tensor(0.0)))
    flow = ems_lambda_grid(fewstep.make_schedule("flow"), 4)
    assert torch.isfinite(flow).all()
    with pytest.raises(ValueError, match="n_grid=0"):
        ems_lambda_grid(sched, 0)
    with pytest.raises(ValueError, match="t_start=10 .* must be larger|EMS grid end 1500 is outside"):
        ems_lambda_grid(sched, 4, t_start=1500)


def test_compute_ems_rejects_bad_input():
    model = GMMModel(MIX, SCHED)
    with pytest.raises(ValueError, match="n_data=1 is out of range; allowed: >= 2"):
        compute_ems(model, mixture_data(0), SCHED, n_grid=4, n_data=1)
    with pytest.raises(ValueError, match=r"data_sampler must return x0 \(a float tensor \[4, ...\]\)"):
        compute_ems(model, lambda i: torch.zeros(3, 3), SCHED, n_grid=4, n_data=4, progress=False)
    with pytest.raises(ValueError, match=r"with guidance, data_sampler must return \(x0, cond, uncond\)"):
        compute_ems(model, mixture_data(0), SCHED, n_grid=4, n_data=4, guidance=2.0, progress=False)


# ---------------------------------------------------------------------------- resume, processes, CLI

def slow_gmm_run(workdir, out, delay):
    """The run killed below: every model call and data draw sleeps ``delay`` seconds."""
    mix, model = GaussianMixture.random(3, 3, seed=4, std_range=(0.3, 0.6)), None

    def data(idx):
        time.sleep(delay)
        return torch.cat([mix.sample(1, torch.Generator().manual_seed(int(k))) for k in idx])

    def slow(x, t):
        time.sleep(delay)
        return model(x, t)

    model = GMMModel(mix, "linear")
    ems = compute_ems(slow, data, "linear", n_grid=11, n_data=6, batch_size=3, chunk_size=2, workdir=workdir,
                      progress=False)
    ems.save(out)


def test_interrupted_run_resumes_to_the_identical_statistics(tmp_path):
    """A run that dies mid-way (here: the model raises) keeps its finished chunks; the rerun uses them."""
    model, calls = GMMModel(MIX, SCHED), []

    def failing(x, t):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return model(x, t)

    kw = dict(n_grid=3, n_data=4, batch_size=2, chunk_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        compute_ems(failing, mixture_data(0), SCHED, workdir=tmp_path, **kw)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 1  # 8 calls = one chunk of 2 points x 2 blocks
    calls.clear()
    resumed = compute_ems(lambda x, t: calls.append(1) or model(x, t), mixture_data(0), SCHED, workdir=tmp_path, **kw)
    assert len(calls) == 2 * 2 * 2  # only the 2 unfinished grid points were computed
    fresh = compute_ems(lambda x, t: model(x, t), mixture_data(0), SCHED, **kw)
    assert resumed == fresh  # bitwise: tensors and record


@pytest.mark.slow
def test_kill_and_resume_gives_the_identical_file(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r}); import torch; " \
           f"torch.set_num_threads(1); from test_ems import slow_gmm_run; " \
           f"slow_gmm_run({str(tmp_path / 'w')!r}, {str(tmp_path / 'killed.safetensors')!r}, 0.05)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list((tmp_path / "w").glob("shard-*.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list((tmp_path / "w").glob("shard-*.safetensors"))) < 6
    assert not (tmp_path / "killed.safetensors").exists()
    slow_gmm_run(tmp_path / "w", tmp_path / "resumed.safetensors", 0.0)
    slow_gmm_run(None, tmp_path / "fresh.safetensors", 0.0)
    assert (tmp_path / "resumed.safetensors").read_bytes() == (tmp_path / "fresh.safetensors").read_bytes()


def test_workdir_of_another_run_is_refused(tmp_path):
    model = GMMModel(MIX, SCHED)
    compute_ems(model, mixture_data(0), SCHED, n_grid=3, n_data=4, workdir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"holds a partial EMS run with other settings \(differs in: \['n_data'\]\)"):
        compute_ems(model, mixture_data(0), SCHED, n_grid=3, n_data=6, workdir=tmp_path, progress=False)


def test_cli_writes_the_ems_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    assert cli_main(["ems", "compute", "--model", "gmm", "--n-grid", "4", "--n-data", "4", "--out", str(out),
                     "--no-progress", "batch_size=2"]) == 0
    ems = EMS.load(out)
    assert ems.n_grid == 4 and ems.n_data == 4 and ems.sample_shape == (16,) and ems.meta.extra["batch_size"] == 2
    assert not (tmp_path / "g.safetensors.parts").exists()
    assert "wrote" in capsys.readouterr().out
    for argv, match in ((["--model", "gmm"], "out .* is required"), (["--model", "nope", "--out", "x"], "'nope' is not"),
                        (["--model", "gmm", "--out", "x", "--data", "real", "n_grid=0"], "n_grid=0 is out of range; allowed: >= 1")):
        assert cli_main(["ems", "compute", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fewstep ems compute: error:") and __import__("re").search(match, err[0])


def test_cli_on_the_digits_model_records_the_unet_fingerprint(tmp_path):
    from fewstep.eval.testbeds import DigitsTestbed

    out = tmp_path / "d.safetensors"
    assert cli_main(["ems", "compute", "--model", "digits", "--n-grid", "2", "--n-data", "2", "--data", "real",
                     "--out", str(out), "--no-progress"]) == 0
    fingerprint = EMS.load(out).meta.fingerprint
    assert fingerprint is not None and fingerprint == fewstep.model_fingerprint(DigitsTestbed("cpu").unet)


def test_cli_on_a_pipeline_folder_uses_its_latents_and_fingerprint(tmp_path, capsys):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline, load_tiny_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "sd.safetensors"
    assert cli_main(["ems", "compute", "--model", str(tmp_path / "sd"), "--n-grid", "2", "--n-data", "2",
                     "--sample-nfe", "2", "--guidance", "2", "--out", str(out), "--no-progress"]) == 0
    ems = EMS.load(out)
    assert ems.sample_shape == (4, 8, 8) and ems.meta.fingerprint == fewstep.model_fingerprint(
        load_tiny_pipeline(tmp_path / "sd"))
    assert cli_main(["ems", "compute", "--model", str(tmp_path / "sd"), "--height", "60", "--out", str(out)]) == 2
    assert "height and width must be multiples of 8" in capsys.readouterr().err

def test_cli_presets_load():
    from pathlib import Path

    from fewstep.config import load_config
    from fewstep.tuning.ems.command import EMSComputeConfig

    root = Path(__file__).parent.parent / "configs" / "ems"
    cfg = load_config(EMSComputeConfig, root / "digits.yaml", overrides=["guidance=7.5"])
    assert (cfg.model, cfg.n_grid, cfg.n_data, cfg.guidance, cfg.data) == ("digits", 100, 256, 7.5, "real")
    cfg = load_config(EMSComputeConfig, root / "pipeline.yaml", overrides=["device=cpu", "model=x"])
    assert cfg.data == "samples" and cfg.guidance == 7.5


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(tmp_path):
    args = ["ems", "compute", "--model", "gmm", "--n-grid", "6", "--n-data", "10", "--batch-size", "3",
            "--guidance", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.safetensors"
    subprocess.run([sys.executable, "-m", "fewstep.cli", *args, "--out", str(one)], check=True, env=env)
    two = tmp_path / "two.safetensors"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "fewstep.cli", *args, "--out", str(two)], check=True, env=env)
    assert two.read_bytes() == one.read_bytes()


def test_a_work_folder_of_the_older_chunk_format_is_refused_by_name(tmp_path):
    # format 2 kept chunk_C.safetensors files, which this version does not read: refused, not silently redone
    (tmp_path / "run.json").write_text(json.dumps({"format": 2, "n_grid": 3}))
    with pytest.raises(ValueError, match=r"older fewstep \(format 2; .*delete the folder to recompute"):
        compute_ems(GMMModel(MIX, SCHED), mixture_data(0), SCHED, n_grid=3, n_data=4, batch_size=2,
                    workdir=tmp_path, progress=False)
