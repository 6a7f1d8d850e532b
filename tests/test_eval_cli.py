"""`fewstep eval`: 2-process equality, kill -9 and resume, batch-size independence, reference sources, CLI errors."""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.eval.metrics.fd import frechet_distance
from fewstep.eval.metrics.stats import GaussianStats
from fewstep.zoo import digits

SMALL = ["--model", "digits", "--solver", "ddim", "unipc", "--nfe", "2", "3", "--num-samples", "24",
         "--batch-size", "8", "--no-progress", "--no-plot"]
MSE = ["--reference-nfe", "6"]


def _env():
    path = os.pathsep.join([str(Path(fewstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _numbers(run: Path, key: str) -> list:
    """The metric of every entry (times excluded: they are the only numbers that may differ)."""
    r = json.loads((run / "results.json").read_text())
    return [(e["method"], e["nfe"], e[key], e.get("mse_ci95")) for e in r["entries"]]


def test_two_processes_give_the_same_fid_and_mse_as_one(tmp_path, capsys):
    """A real 2-process CPU torchrun (gloo): shards split across ranks, float64 reduction on rank 0."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "fid", *SMALL, *cache, "--out", str(tmp_path / "fid1")]) == 0
    assert main(["eval", "mse", *SMALL, *MSE, *cache, "--out", str(tmp_path / "mse1")]) == 0
    # One torchrun launch runs both commands in one process group (start-up paid once).
    script = tmp_path / "both.py"
    script.write_text(
        "import sys, torch.distributed as dist\nfrom fewstep.cli import main\n"
        "dist.init_process_group('gloo')\n"
        f"a = main(['eval', 'fid', *{SMALL!r}, *{cache!r}, '--out', {str(tmp_path / 'fid2')!r}])\n"
        f"b = main(['eval', 'mse', *{SMALL + MSE!r}, *{cache!r}, '--out', {str(tmp_path / 'mse2')!r}])\n"
        "dist.barrier()\ndist.destroy_process_group()\nsys.exit(a or b)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind, key in (("fid", "fd"), ("mse", "mse")):
        one, two = tmp_path / f"{kind}1", tmp_path / f"{kind}2"
        assert json.loads((two / "results.json").read_text())["processes"] == 2
        assert _numbers(two, key) == _numbers(one, key)  # bitwise, not approximately
        assert all(v[2] is not None and math.isfinite(v[2]) and v[2] > 0 for v in _numbers(one, key))
    # Each rank wrote its own shards (k % 2) into the one run folder.
    shards = sorted(p.name for p in (tmp_path / "fid2" / "shards" / "ddim-nfe2").iterdir())
    assert shards == [f"shard-{s:07d}-{s + 8:07d}.safetensors" for s in (0, 8, 16)]


def test_fid_does_not_depend_on_the_batch_size(tmp_path):
    args = ["eval", "fid", "--model", "digits", "--solver", "unipc", "--nfe", "3", "--num-samples", "24",
            "--no-progress", "--no-plot", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--batch-size", "24", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--batch-size", "5", "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = _numbers(tmp_path / "a", "fd"), _numbers(tmp_path / "b", "fd")
    # Same seeds per sample; only float32 convolution round-off can differ between batch shapes.
    assert a[2] == pytest.approx(b[2], rel=1e-4)


def _child(argv, log):
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    code = main(argv)
    sys.stdout.flush()
    os._exit(code)


@pytest.mark.parametrize("kind,extra,key", [("fid", [], "fd"), ("mse", MSE, "mse")])
def test_kill_9_then_resume_gives_identical_numbers(tmp_path, kind, extra, key):
    argv = ["eval", kind, *SMALL, *extra]
    assert main([*argv, "--out", str(tmp_path / "clean"), "--cache-dir", str(tmp_path / "clean-cache")]) == 0
    argv += ["--cache-dir", str(tmp_path / "cache")]  # the killed runs also compute (and cache) their reference
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    shards = lambda: sorted(run.glob("shards/*/*.safetensors"))  # noqa: E731
    for i, wanted in enumerate((1, 4)):  # killed after its first shard, then after a few more
        child = ctx.Process(target=_child, args=([*argv, "--out", str(run)], tmp_path / f"log{i}"))
        child.start()
        while len(shards()) < wanted and child.is_alive():
            time.sleep(0.005)
        assert child.is_alive(), (tmp_path / f"log{i}").read_text()
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, (tmp_path / f"log{i}").read_text()
    assert 1 <= len(shards()) < 12 and not (run / "results.json").exists()
    assert main([*argv, "--out", str(run)]) == 0
    assert _numbers(run, key) == _numbers(tmp_path / "clean", key)
    assert not list(run.rglob("*.tmp"))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fewstep eval {argv[1]}: error: "), err
    return err[0]


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = ["--out", str(tmp_path / "run")]
    assert "unknown solver 'dpm'" in _error(capsys, ["eval", "fid", "--solver", "dpm", *out])
    assert "nfe=0 is out of range; allowed: 1 to 100000" in _error(capsys, ["eval", "mse", "nfe=[0]", *out])
    assert "reference_nfe=6 must be at least the largest nfe (8)" in _error(capsys, ["eval", "mse", "--nfe", "8", "--reference-nfe", "6"])
    line = _error(capsys, ["eval", "fid", "--extractor", "inception", *out])
    assert "weights-inception-2015-12-05-6726825d.pth" in line and str(tmp_path / "torch") in line
    assert "6726825d" in line and "never downloads" in line
    assert "unknown feature extractor 'incepshun'" in _error(capsys, ["eval", "fid", "--extractor", "incepshun"])
    assert "needs an image model" in _error(capsys, ["eval", "fid", "--model", "gmm", "--no-progress", *out])
    assert not (tmp_path / "run").exists()  # refused before any folder is made
    assert "is not a built-in dataset" in _error(capsys, ["eval", "fid", "--ref", str(tmp_path / "nothing"),
                                                          "--no-progress", "--out", str(tmp_path / "r2")])
    (tmp_path / "bad.yaml").write_text("model: digits\nnum_sample: 10\n")
    assert "num_sample" in _error(capsys, ["eval", "mse", "--config", str(tmp_path / "bad.yaml")])
    # A folder holding another configuration is refused, naming what differs.
    small = [*SMALL, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "small")]
    assert main(["eval", "mse", *small, *MSE]) == 0
    assert "differs in: ['seed']" in _error(capsys, ["eval", "mse", *small, *MSE, "seed=1"])
    assert "not a fewstep eval fid run" in _error(capsys, ["eval", "fid", *small])
    # Statistics of different feature spaces are refused; files without metadata are accepted.
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    GaussianStats(np.zeros(3), np.eye(3), 5, {"extractor": "inception", "resize": "legacy"}).save(a)
    GaussianStats(np.ones(3), np.eye(3), 5, {"extractor": "inception", "resize": "clean"}).save(b)
    assert "resize differs" in _error(capsys, ["eval", "fd", str(a), str(b)])
    assert "does not exist" in _error(capsys, ["eval", "fd", str(a), str(tmp_path / "none.npz")])
    assert "no 'sigma'" in _error(capsys, ["eval", "fd", str(a), str(_npz(tmp_path / "c.npz", mu=np.zeros(3)))])


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_fd_prints_the_distance_alone_on_the_last_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((60, 4)) + 0.5
    a = _npz(tmp_path / "a.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))  # no metadata: accepted
    b = _npz(tmp_path / "b.npz", mu=y.mean(0), sigma=np.cov(y, rowvar=False))
    assert main(["eval", "fd", str(a), str(b)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert float(last) == expected and expected > 0.5


def test_ref_sources_agree_and_are_cached_by_content(tmp_path, capsys):
    from PIL import Image

    images = (digits.reference_images()[:40] * 255).round().to(torch.uint8)  # [40, 1, 8, 8]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    _npz(tmp_path / "nhwc.npz", images=images.permute(0, 2, 3, 1).numpy())
    cache = ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "7"]
    stats = {}
    for name, source in (("folder", folder), ("npz", tmp_path / "nhwc.npz")):
        assert main(["eval", "ref", str(source), *cache, "--out", str(tmp_path / f"{name}.npz")]) == 0
        stats[name] = GaussianStats.load(tmp_path / f"{name}.npz")
    assert np.array_equal(stats["folder"].mu, stats["npz"].mu) and stats["folder"].n == 40
    assert np.array_equal(stats["folder"].sigma, stats["npz"].sigma)
    assert stats["folder"].metadata["extractor"] == "digits" and "weights_hash" in stats["folder"].metadata
    # Precomputed features: the statistics of exactly those rows.
    feats = np.random.default_rng(1).standard_normal((30, 5))
    assert main(["eval", "ref", str(_npz(tmp_path / "f.npz", features=feats)), *cache, "--out",
                 str(tmp_path / "fs.npz")]) == 0
    fs = GaussianStats.load(tmp_path / "fs.npz")
    assert np.allclose(fs.mu, feats.mean(0), rtol=0, atol=1e-15) and np.allclose(fs.sigma, np.cov(feats, rowvar=False))
    capsys.readouterr()
    # Cached by content: the same folder is read from the cache; a changed image is recomputed.
    assert main(["eval", "ref", str(folder), *cache, "--out", str(tmp_path / "again.npz")]) == 0
    assert "cached" in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(folder / "000.png")
    assert main(["eval", "ref", str(folder), *cache, "--out", str(tmp_path / "changed.npz")]) == 0
    assert "cached" not in capsys.readouterr().out
    assert not np.array_equal(GaussianStats.load(tmp_path / "changed.npz").mu, stats["folder"].mu)


def test_fid_on_a_local_pipeline_folder_with_a_module_extractor(tmp_path):
    """A diffusers pipeline folder as --model: latents decoded by its VAE, any module:callable as extractor."""
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    rng = np.random.default_rng(0)
    ref = _npz(tmp_path / "ref.npz", features=rng.standard_normal((40, 12)))
    common = ["--model", str(tmp_path / "sd"), "--solver", "ddim", "--nfe", "2", "--num-samples", "4",
              "--batch-size", "2", "--no-progress", "--no-plot", "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "fid", *common, "--extractor", "tests.test_eval_cli:pooled_pixels", "--ref", str(ref),
                 "--out", str(tmp_path / "fid")]) == 0
    (entry,) = _numbers(tmp_path / "fid", "fd")
    assert math.isfinite(entry[2])
    assert main(["eval", "mse", *common, "--reference-nfe", "3", "--out", str(tmp_path / "mse")]) == 0
    assert "(latents)" in (tmp_path / "mse" / "results.md").read_text()


def pooled_pixels() -> torch.nn.Module:
    """A tiny extractor for the pipeline test: 12 pooled pixel statistics."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


def test_extractor_specs():
    from fewstep.eval.metrics.features import parse_extractor_spec

    assert parse_extractor_spec("digits") == ("digits", {})
    assert parse_extractor_spec("inception:resize=clean,weights=/w.pth") == (
        "inception", {"resize": "clean", "weights": "/w.pth"})
    assert parse_extractor_spec("pkg.nets:encoder") == ("pkg.nets:encoder", {})
    assert parse_extractor_spec("pkg.nets:encoder:dim=64") == ("pkg.nets:encoder", {"dim": 64})
    with pytest.raises(ValueError, match="sets 'dim' twice"):
        parse_extractor_spec("pkg.nets:encoder:dim=1,dim=2")


def test_a_diverged_solver_is_a_result_not_a_crash(tmp_path, monkeypatch):
    from fewstep.eval.testbeds import DigitsTestbed

    generate = DigitsTestbed.generate

    def explode_ddim(self, solver, *args):
        out = generate(self, solver, *args)
        return out * float("nan") if solver == "ddim" else out

    monkeypatch.setattr(DigitsTestbed, "generate", explode_ddim)
    args = [*SMALL, "--cache-dir", str(tmp_path / "cache"), "--nfe", "2"]
    assert main(["eval", "fid", *args, "--out", str(tmp_path / "fid")]) == 0
    assert main(["eval", "mse", *args, *MSE, "--out", str(tmp_path / "mse")]) == 0
    for kind, key in (("fid", "fd"), ("mse", "mse")):
        entries = {e["method"]: e for e in json.loads((tmp_path / kind / "results.json").read_text())["entries"]}
        assert entries["ddim"]["diverged"] and entries["ddim"][key] is None
        assert not entries["unipc"]["diverged"] and entries["unipc"][key] > 0
        assert "Diverged (no finite samples): ddim at NFE 2." in (tmp_path / kind / "results.md").read_text()


DIFFUSERS_DPM = "diffusers:DPMSolverMultistepScheduler"


def test_a_diffusers_scheduler_through_eval_mse_matches_fewstep_and_resumes(tmp_path, capsys):
    """diffusers' DPMSolverMultistepScheduler (2M, linspace, first-order last step) is fewstep's dpmpp."""
    argv = ["eval", "mse", "--model", "digits", "--solver", "dpmpp", DIFFUSERS_DPM, "--nfe", "3", "5",
            "--guidance", "3", "--num-samples", "16", "--batch-size", "8", *MSE, "--no-progress", "--no-plot",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    numbers = {(m, n): (mse, ci) for m, n, mse, ci in _numbers(tmp_path / "run", "mse")}
    for nfe in (3, 5):
        ours, theirs = numbers[("dpmpp", nfe)], numbers[(DIFFUSERS_DPM, nfe)]
        assert ours[0] > 1e-5 and theirs == pytest.approx(ours, rel=1e-4)
    # Resume: a lost shard of the diffusers run is recomputed, the others are read back as they are.
    shards = sorted((tmp_path / "run" / "shards").glob("diffusers_DPMSolverMultistepScheduler-nfe5/*.safetensors"))
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "shards").rglob("*.safetensors") if p != shards[1]}
    shards[1].unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming: 7 finished shard(s) of 8" in capsys.readouterr().out
    assert shards[1].exists() and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert {(m, n): (mse, ci) for m, n, mse, ci in _numbers(tmp_path / "run", "mse")} == numbers


def test_diffusers_scheduler_samples_and_model_calls():
    """Samples per seed (any batch split) equal fewstep's; NFE counts model calls (Heun: 2 per step but the first)."""
    from fewstep.eval.testbeds import DigitsTestbed

    testbed = DigitsTestbed()
    x_T, cond = testbed.initial_noise(6, seed=3)
    ours = testbed.generate("dpmpp", {}, 5, x_T, cond, 1.5, "linspace")
    theirs = testbed.generate(DIFFUSERS_DPM, {}, 5, x_T, cond, 1.5, "linspace")
    assert torch.allclose(theirs, ours, rtol=0, atol=2e-5) and ours.abs().max() > 0.5
    part = testbed.generate(DIFFUSERS_DPM, {}, 5, x_T[2:4], cond[2:4], 1.5, "linspace")
    # Not bitwise: the batch size picks the CPU conv/matmul kernel (AVX-512/AMX vs AVX2 blocking), whose
    # float32 sums differ in the last bits (~1e-6 after 5 steps); the per-seed noise is what must match.
    assert torch.allclose(part, theirs[2:4], rtol=0, atol=2e-5)
    assert not torch.allclose(part, theirs[:2], rtol=0, atol=1e-2)  # and it is per seed, not per position
    options = {"solver_order": 3}
    assert not torch.allclose(testbed.generate(DIFFUSERS_DPM, options, 5, x_T, cond, 1.5, "linspace"), theirs,
                              rtol=0, atol=1e-4)  # the option reaches the scheduler
    calls, model = [], testbed.model
    testbed.model = lambda x, t, labels: calls.append(t) or model(x, t, labels)
    out = testbed.generate("diffusers:HeunDiscreteScheduler", {}, 5, x_T, cond, 1.5, None)
    assert len(calls) == 5 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="NFE 4 is not reachable .*: 1, 3\\)"):
        testbed.check_solver("diffusers:HeunDiscreteScheduler", {}, [5, 4], None)


def test_diffusers_spec_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--no-progress"]
    line = _error(capsys, ["eval", "mse", "--solver", "diffusers:FooScheduler", *out])
    assert "unknown diffusers scheduler 'FooScheduler'; choose one of" in line and "UniPCMultistepScheduler" in line
    assert "stochastic" in _error(capsys, ["eval", "fid", "--solver", "diffusers:EulerAncestralDiscreteScheduler", *out])
    line = _error(capsys, ["eval", "mse", "--solver", f"{DIFFUSERS_DPM}:order=3", *out])
    assert "has no option 'order'; options:" in line and "solver_order" in line
    assert "'beta_end' is the model's" in _error(capsys, ["eval", "mse", "--solver", f"{DIFFUSERS_DPM}:beta_end=0.1"])
    assert "stochastic sampling" in _error(capsys, ["eval", "mse", "--solver",
                                                    f"{DIFFUSERS_DPM}:algorithm_type=sde-dpmsolver++"])
    assert "solver_order" in _error(capsys, ["eval", "mse", "--solver", f"{DIFFUSERS_DPM}:solver_order=x", *out])
    line = _error(capsys, ["eval", "mse", "--solver", "diffusers:FlowMatchEulerDiscreteScheduler", *out])
    assert "is a flow-matching scheduler but the model's scheduler config is VP (betas)" in line
    line = _error(capsys, ["eval", "mse", "--model", "gmm-flow", "--solver", "diffusers:EulerDiscreteScheduler", *out])
    assert "no diffusers scheduler config" in line
    line = _error(capsys, ["eval", "mse", "--model", "gmm", "--solver", "diffusers:KDPM2DiscreteScheduler",
                           "--nfe", "4", *out])
    assert "NFE 4 is not reachable" in line
    assert not (tmp_path / "run").exists()  # refused before any folder is made


def test_diffusers_flow_scheduler_on_a_flow_pipeline_folder(tmp_path):
    """A flow pipeline (tiny SD3) runs with the scheduler swapped in: FlowMatchEuler is fewstep's ddim (Euler)."""
    from fewstep.eval.testbeds import make_testbed
    from fewstep.zoo.tiny import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline(tmp_path / "sd3")
    testbed = make_testbed(str(tmp_path / "sd3"))
    x_T, cond = testbed.initial_noise(2, seed=0)
    ours = testbed.generate("ddim", {}, 3, x_T, cond, 3.0, None)
    theirs = testbed.generate("diffusers:FlowMatchEulerDiscreteScheduler", {}, 3, x_T, cond, 3.0, None)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5) and ours.abs().max() > 0.5
    with pytest.raises(ValueError, match="VP \\(betas\\) scheduler but the model's scheduler config is flow"):
        testbed.check_solver(DIFFUSERS_DPM, {}, [3], None)
