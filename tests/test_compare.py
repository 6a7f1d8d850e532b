"""`fewstep compare` end to end on reduced settings: resume, reference cache, kill -9, locking, bad input."""

import json
import math
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fewstep
from fewstep.cli import main
from fewstep.eval.compare import CompareConfig, Method, run_compare
from fewstep.infra.io import lock_directory
from fewstep.eval.testbeds import GMMTestbed, Testbed, make_testbed
from fewstep.zoo import digits

QUIET = ["--no-progress"]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _numbers(run: Path) -> dict:
    """results.json without the wall times (the only numbers that may differ between runs)."""
    r = json.loads((run / "results.json").read_text())
    r["reference"].pop("time_s")
    for e in r["entries"]:
        e.pop("time_s")
    return r


def test_method_specs():
    m = Method.parse("unipc:order=3,variant=bh1,corrector=false")
    assert m.solver == "unipc" and m.option_dict == {"order": 3, "variant": "bh1", "corrector": False}
    assert m.label == "unipc(corrector=False,order=3,variant=bh1)"
    assert Method.parse("ddim").label == "ddim"
    assert Method.parse("unipc:order=2").canonical == Method.parse("unipc").canonical
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        Method.parse("dpm")
    with pytest.raises(ValueError, match="order=9 of solver 'unipc' is out of range"):
        Method.parse("unipc:order=9")
    with pytest.raises(ValueError, match="expected key=value"):
        Method.parse("unipc:order")
    with pytest.raises(ValueError, match="sets 'order' twice"):  # fuzz 21: the last one used to win silently
        Method.parse("unipc:order=1,order=3")


def test_config_errors():
    with pytest.raises(ValueError, match="reference_nfe"):
        CompareConfig(nfe=[5, 50], reference_nfe=20)
    with pytest.raises(ValueError, match="nfe=0 is out of range; allowed: 1 to 100000"):
        CompareConfig(nfe=[0])
    for bad in (math.nan, math.inf, -1.0):  # fuzz 20: NaN ran unguided, Inf cached a NaN reference
        with pytest.raises(ValueError, match=r"guidance=.* is not allowed; it must be a finite number in \[0, 10000\]"):
            CompareConfig(guidance=bad)
    with pytest.raises(ValueError, match="is not a device name"):  # fuzz 21: any string was accepted
        CompareConfig(device="not-a-device")
    with pytest.raises(ValueError, match="threads=0 is out of range; allowed: >= 1"):
        CompareConfig(threads=0)
    with pytest.raises(ValueError, match="not one of digits, gmm, gmm-flow or a pipeline folder"):
        make_testbed("/no/such/pipeline")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        make_testbed("gmm", "meta")
    with pytest.raises(ValueError, match="apply to text-to-image pipelines only"):
        make_testbed("gmm", prompts=["a cat"])


def test_duplicate_nfes_and_solvers_run_once():
    # fuzz 21: `--nfe 1 1` and `--solvers unipc unipc` were computed and stored twice
    cfg = CompareConfig(nfe=[5, 5, 6], solvers=["unipc", "ddim", "unipc", "unipc:order=2"])
    assert cfg.nfe == [5, 6]
    assert [m.label for m in cfg.methods] == ["unipc", "ddim"] and cfg.solvers == ["unipc", "ddim"]


def test_cli_digits_folder_end_to_end(tmp_path, capsys):
    # fuzz 22: the shipped (or an exported) digits pipeline folder crashed as --model
    out = tmp_path / "run"
    rc = main(["compare", "--model", str(digits.PIPELINE_DIR), "--num-samples", "20", "--nfe", "4", "6",
               "--reference-nfe", "12", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *QUIET])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| MSE to reference | NFE 4 | NFE 6 |" in printed and "| digits-FD |" in printed
    assert "| time (s), single run |" in printed
    results = json.loads((out / "results.json").read_text())
    assert {(e["method"], e["nfe"]) for e in results["entries"]} == {
        (s, n) for s in ("ddim", "dpmpp", "unipc") for n in (4, 6)}
    for e in results["entries"]:
        assert e["mse"] > 0 and e["fd"] > 0 and 0 <= e["accuracy"] <= 1 and e["time_s"] > 0
    assert results["floor"]["fd"] > 0 and results["reference"]["fd"] > 0
    written = ["config.yaml", "reference.safetensors", "results.json", "results.md", "quality_vs_nfe.png",
               "samples.png"]
    assert printed.strip().splitlines()[-1] == f"wrote {out}{os.sep}: {', '.join(written)}"
    umask = os.umask(0)
    os.umask(umask)
    for name in written:  # fuzz 24: results.json was 0600 (mkstemp)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask
    assert len(list((tmp_path / "cache" / "references").glob("digits-*.safetensors"))) == 1


class CountingGMM(GMMTestbed):
    """A small GMM testbed with a cheap solver-run reference that counts calls and crashes on demand."""

    batch_size = 8
    reference = Testbed.reference  # a high-NFE solver run through generate(): cheap and counted
    reference_description = Testbed.reference_description

    def __init__(self, crash_at=None, exc=RuntimeError("simulated crash")):
        super().__init__(dim=4, components=4, num_classes=2)
        self.calls, self.crash_at, self.exc = [], crash_at, exc

    def generate(self, solver, options, nfe, *args):
        if self.crash_at is not None and (solver, nfe) == self.crash_at[:2] and (
                len(self.crash_at) == 2 or sum(c == (solver, nfe) for c in self.calls) == self.crash_at[2]):
            raise self.exc
        self.calls.append((solver, nfe))
        return super().generate(solver, options, nfe, *args)


def _cfg(tmp_path, solvers, out="run", cache="cache", **kw):
    return CompareConfig(model="gmm", solvers=solvers, nfe=[3, 5], num_samples=16, reference_nfe=20,
                         out=str(tmp_path / out), cache_dir=str(tmp_path / cache), plot=False, progress=False, **kw)


def _quiet(_):
    pass


def test_resume_after_crash_keeps_finished_work(tmp_path):
    crashing = CountingGMM(crash_at=("unipc", 5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_compare(crashing, _cfg(tmp_path, ["ddim", "unipc"]), log=_quiet)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(e["method"], e["nfe"]) for e in saved["entries"]] == [("ddim", 3), ("ddim", 5), ("unipc", 3)]

    again = CountingGMM()
    results = run_compare(again, _cfg(tmp_path, ["ddim", "unipc"]), log=_quiet)
    assert again.calls == [("unipc", 5)] * 2  # only the missing pair (2 chunks of 8) is recomputed
    assert len(results["entries"]) == 4
    more = CountingGMM()  # adding a solver later only runs the new one
    run_compare(more, _cfg(tmp_path, ["ddim", "unipc", "dpmpp:order=3"]), log=_quiet)
    assert more.calls == [("dpmpp", 3)] * 2 + [("dpmpp", 5)] * 2


def test_interrupted_reference_keeps_its_finished_chunks(tmp_path):
    crashing = CountingGMM(crash_at=("dpmpp", 20, 1))  # the second chunk of the reference fails
    with pytest.raises(RuntimeError):
        run_compare(crashing, _cfg(tmp_path, ["ddim"]), log=_quiet)
    partial = load_file(tmp_path / "run" / "reference.partial.safetensors")["samples"]
    assert partial.shape == (8, 4)
    resumed = CountingGMM()
    run_compare(resumed, _cfg(tmp_path, ["ddim"]), log=_quiet)
    assert resumed.calls.count(("dpmpp", 20)) == 1  # only the unfinished chunk
    assert not (tmp_path / "run" / "reference.partial.safetensors").exists()
    run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"], out="clean", cache="cache2"), log=_quiet)
    assert torch.equal(load_file(tmp_path / "run" / "reference.safetensors")["samples"],
                       load_file(tmp_path / "clean" / "reference.safetensors")["samples"])
    assert _numbers(tmp_path / "run") == _numbers(tmp_path / "clean")


def test_mismatched_or_corrupt_results_are_reported(tmp_path):
    run = tmp_path / "run"
    run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"]), log=_quiet)
    with pytest.raises(ValueError, match=r"different configuration \(differs in: \['seed'\]\)"):
        run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"], seed=1), log=_quiet)
    # fuzz 19: these crashed with AttributeError / KeyError tracebacks
    for text in ("{not json", "[]", "null", '{"config": {}}'):
        (run / "results.json").write_text(text)
        with pytest.raises(ValueError, match="results.json is not"):
            run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"]), log=_quiet)


@pytest.mark.parametrize("damage", ["no samples", "nan", "other identity", "wrong shape", "garbage", "directory",
                                    "cache unwritable"])
def test_bad_cached_references_are_recomputed_never_reused(tmp_path, damage):
    # fuzz 23: a cache without 'samples' -> KeyError; a NaN cache was used; an unwritable cache lost the reference
    run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"], out="clean"), log=_quiet)
    good = next((tmp_path / "cache" / "references").glob("*.safetensors"))
    cache = tmp_path / "bad" / "references"  # cache="bad" below is fewstep's cache folder
    cache.mkdir(parents=True)
    bad = cache / good.name
    tensors = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    if damage == "no samples":
        save_file({"x": torch.zeros(1)}, bad, metadata=meta)
    elif damage == "nan":
        save_file({"samples": torch.full_like(tensors["samples"], math.nan)}, bad, metadata=meta)
    elif damage == "other identity":
        save_file({"samples": tensors["samples"] + 1}, bad, metadata={**meta, "identity": "{}"})
    elif damage == "wrong shape":
        save_file({"samples": tensors["samples"][:3]}, bad, metadata=meta)
    elif damage == "garbage":
        bad.write_bytes(b"garbage")
    elif damage == "directory":
        bad.mkdir()
    else:
        cache.rmdir()
        cache.write_text("a file where the cache folder should be")
    logs = []
    counting = CountingGMM()
    cfg = _cfg(tmp_path, ["ddim"], out="run", cache="bad")
    run_compare(counting, cfg, log=logs.append)
    assert counting.calls.count(("dpmpp", 20)) == 2  # recomputed (two chunks)
    assert _numbers(tmp_path / "run") == _numbers(tmp_path / "clean")
    assert torch.equal(load_file(tmp_path / "run" / "reference.safetensors")["samples"], tensors["samples"])
    if damage in ("directory", "cache unwritable"):
        assert any("reference cache is not writable" in line for line in logs)
    else:
        assert any(line.startswith(f"reference: ignoring {bad}") for line in logs)
        assert torch.equal(load_file(bad)["samples"], tensors["samples"])  # repaired


def test_reference_cache_is_reused(tmp_path):
    run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"], out="a"), log=_quiet)
    logs, counting = [], CountingGMM()
    run_compare(counting, _cfg(tmp_path, ["ddim"], out="b"), log=logs.append)
    assert any(line.startswith("reference: cached") for line in logs) and ("dpmpp", 20) not in counting.calls
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")


def test_diverged_solver_is_a_result(tmp_path):
    counting = CountingGMM(crash_at=("unipc", 3), exc=FloatingPointError("model output at step 2 is NaN"))
    results = run_compare(counting, _cfg(tmp_path, ["ddim", "unipc"], repeats=3), log=_quiet)
    entry = next(e for e in results["entries"] if (e["method"], e["nfe"]) == ("unipc", 3))
    assert entry["diverged"] and entry["mse"] is None and entry["time_s"] is None
    ok = next(e for e in results["entries"] if (e["method"], e["nfe"]) == ("ddim", 3))
    assert not ok["diverged"] and ok["time_runs"] == 3
    text = (tmp_path / "run" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # standard JSON
    assert "| time (s), median of 3 runs |" in (tmp_path / "run" / "results.md").read_text()


def test_gmm_metrics_rank_solvers(tmp_path):
    cfg = CompareConfig(model="gmm", solvers=["ddim", "unipc"], nfe=[8], num_samples=64, reference_nfe=20,
                        out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), plot=False, progress=False)
    results = run_compare(GMMTestbed(dim=4, components=4, num_classes=2), cfg, log=_quiet)
    mse = {e["method"]: e["mse"] for e in results["entries"]}
    assert mse["unipc"] < mse["ddim"]  # exact ground truth: a higher-order solver must be closer


def test_stale_temp_files_are_removed_and_only_written_files_are_listed(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    # what a kill -9 inside an atomic write leaves behind (fuzz 24)
    stale = [run / ".results.json.999999.0123abcd.tmp", run / "samples" / ".x.safetensors.1.89abcdef.tmp"]
    for f in stale:
        f.write_text("half")
    logs = []
    run_compare(CountingGMM(), _cfg(tmp_path, ["ddim"]), log=logs.append)
    assert not any(f.exists() for f in stale)
    # gmm has no images and plotting is off: no png is claimed (fuzz 24)
    assert logs[-1] == f"\nwrote {run}{os.sep}: config.yaml, reference.safetensors, results.json, results.md"


def _hold_lock(path, ready, release):
    with lock_directory(path):
        ready.set()
        release.wait(30)


def test_second_run_on_the_same_out_is_refused_and_a_killed_holder_releases_it(tmp_path, capsys):
    # fuzz 26: two runs on one --out silently dropped each other's finished results
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    assert ready.wait(30)
    args = ["compare", "--model", "gmm", "--solvers", "ddim", "--nfe", "2", "--num-samples", "16",
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-plot", *QUIET]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another fewstep compare" in err[0]
    os.kill(holder.pid, signal.SIGKILL)  # a stale lock must not block
    holder.join()
    assert main(args) == 0


def _progress(run: Path) -> list:
    """Sizes and times of the files that record finished work."""
    names = ("reference.partial.safetensors", "reference.safetensors", "results.json")
    return [(p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in (run / n for n in names)]


def _child(argv, log):
    # A forked child runs the CLI as a separate process, without paying for the imports again.
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    code = main(argv)
    sys.stdout.flush()
    os._exit(code)


def test_kill_9_at_random_points_resumes_with_identical_numbers_and_no_stray_files(tmp_path, monkeypatch):
    # Cheap reference and small chunks: a 1 s run with many points to be killed at.
    monkeypatch.setattr(GMMTestbed, "reference", Testbed.reference)
    monkeypatch.setattr(GMMTestbed, "batch_size", 8)
    args = ["compare", "--model", "gmm", "--solvers", "ddim", "dpmpp", "unipc", "--nfe", "2", "3", "5",
            "--num-samples", "128", "--reference-nfe", "40", *QUIET]
    clean, run = tmp_path / "clean", tmp_path / "run"
    assert main([*args, "--out", str(clean), "--cache-dir", str(tmp_path / "clean-cache")]) == 0
    ctx = multiprocessing.get_context("fork")
    timed = ctx.Process(target=_child, args=([*args, "--out", str(tmp_path / "timed"), "--cache-dir",
                                              str(tmp_path / "timed-cache")], tmp_path / "timed.log"))
    start = time.perf_counter()
    timed.start()
    timed.join()
    duration = time.perf_counter() - start  # of a whole run in a forked child (warm imports)
    argv = [*args, "--out", str(run), "--cache-dir", str(tmp_path / "cache")]
    rng = random.Random(0)
    killed = 0
    for i, sig in enumerate([signal.SIGKILL] * 5 + [signal.SIGINT]):
        before = _progress(run)
        child = ctx.Process(target=_child, args=(argv, tmp_path / f"log{i}"))
        child.start()
        while i > 0 and _progress(run) == before and child.is_alive():  # wait for this run's first
            time.sleep(0.002)                                             # finished work (the first
        time.sleep(rng.uniform(0.0, 0.15) * duration)  # kill lands in the start-up), then kill at random
        os.kill(child.pid, sig)
        child.join()
        killed += child.exitcode in (-signal.SIGKILL, 130)
        if sig == signal.SIGINT and child.exitcode == 130:  # Ctrl-C: one line saying how to resume
            last = (tmp_path / f"log{i}").read_text().strip().splitlines()[-1]
            assert last == f"fewstep compare: interrupted; finished results are kept in {run}; run the same " \
                           "command again to resume"
        assert "Traceback" not in (tmp_path / f"log{i}").read_text()
    assert killed >= 4  # the runs really were cut short, not just rerun
    assert main(argv) == 0
    assert _numbers(run) == _numbers(clean)
    assert torch.equal(load_file(run / "reference.safetensors")["samples"],
                       load_file(clean / "reference.safetensors")["samples"])
    assert _files(run) == _files(clean)
    assert _files(tmp_path / "cache") == _files(tmp_path / "clean-cache")


@pytest.mark.slow
def test_kill_9_real_processes_resume_with_identical_numbers(tmp_path):
    """The full-size check: real `fewstep compare` processes (exact GMM reference) killed at random points."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fewstep.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "fewstep.cli", "compare", "--model", "gmm", "--num-samples", "600",
            "--nfe", "2", "3", "4", "6", "8", *QUIET]
    clean, run = tmp_path / "clean", tmp_path / "run"
    start = time.perf_counter()
    subprocess.run([*args, "--out", str(clean), "--cache-dir", str(tmp_path / "c1")], env=env, check=True,
                   capture_output=True)
    duration = time.perf_counter() - start
    rng = random.Random(1)
    for _ in range(8):
        p = subprocess.Popen([*args, "--out", str(run), "--cache-dir", str(tmp_path / "c2")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 1.0) * duration)
        p.kill()
        p.wait()
    subprocess.run([*args, "--out", str(run), "--cache-dir", str(tmp_path / "c2")], env=env, check=True,
                   capture_output=True)
    assert _numbers(run) == _numbers(clean)
    assert _files(run) == _files(clean) and _files(tmp_path / "c2") == _files(tmp_path / "c1")


def test_pipeline_testbed_on_tiny_sd(tmp_path):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    rc = main(["compare", "--model", str(tmp_path / "sd"), "--solvers", "ddim", "unipc:order=3", "--nfe", "2", "3",
               "--num-samples", "2", "--reference-nfe", "6", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *QUIET])
    assert rc == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["entries"]) == 4 and all(math.isfinite(e["mse"]) for e in results["entries"])
    assert "fd" not in results["entries"][0]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "height: 32" in saved and "num_samples: 2" in saved and "guidance: 7.5" in saved


def test_pipeline_reference_cache_lives_in_cache_dir_and_tracks_weight_changes(tmp_path):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    args = ["compare", "--model", str(tmp_path / "sd"), "--solvers", "ddim", "--nfe", "2", "--num-samples", "2",
            "--reference-nfe", "3", "--height", "32", "--width", "32", "--cache-dir", str(tmp_path / "cache"),
            "--no-plot", *QUIET]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache" / "references").glob("sd-*.safetensors"))) == 1
    assert not list(tmp_path.glob("sd-*.safetensors"))  # not next to the pipeline folder
    # same-size edit of the weights: a new reference, not the stale one
    weights = next((tmp_path / "sd" / "unet").glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, weights)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "cache" / "references").glob("sd-*.safetensors"))) == 2


def test_a_run_killed_between_its_reference_copies_fills_the_cache_on_resume(tmp_path, monkeypatch):
    # kill -9 after the run folder's reference.safetensors but before the cache's copy: the rerun
    # (which reads the run folder's copy) must still leave the cache complete.
    monkeypatch.setattr(GMMTestbed, "reference", Testbed.reference)
    cache = tmp_path / "cache"
    argv = ["compare", "--model", "gmm", "--solvers", "ddim", "--nfe", "2", "--num-samples", "16",
            "--reference-nfe", "10", "--out", str(tmp_path / "run"), "--cache-dir", str(cache), *QUIET]
    assert main(argv) == 0
    refs = cache / "references"  # --cache-dir is fewstep's cache folder; reference samples go to references/
    cached = _files(refs)
    assert len(cached) == 1
    (refs / cached[0]).unlink()
    assert main(argv) == 0
    assert _files(refs) == cached
