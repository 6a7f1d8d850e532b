"""`fewstep compare` end to end on reduced settings, resume after a crash, bad input."""

import json

import pytest
import torch

from fewstep.cli import main
from fewstep.eval.compare import CompareConfig, Method, run_compare
from fewstep.eval.testbeds import GMMTestbed, make_testbed


def test_method_specs():
    m = Method.parse("unipc:order=3,variant=bh1,corrector=false")
    assert m.solver == "unipc" and m.option_dict == {"order": 3, "variant": "bh1", "corrector": False}
    assert m.label == "unipc(corrector=False,order=3,variant=bh1)"
    assert Method.parse("ddim").label == "ddim"
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        Method.parse("dpm")
    with pytest.raises(ValueError, match="order=9 of solver 'unipc' is out of range"):
        Method.parse("unipc:order=9")
    with pytest.raises(ValueError, match="expected key=value"):
        Method.parse("unipc:order")


def test_config_errors():
    with pytest.raises(ValueError, match="--reference-nfe"):
        CompareConfig(nfes=(5, 50), reference_nfe=20)
    with pytest.raises(ValueError, match="--nfe values must be whole numbers >= 1"):
        CompareConfig(nfes=(0,))
    with pytest.raises(ValueError, match="not 'digits', 'gmm'"):
        make_testbed("/no/such/pipeline")


def test_cli_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["compare", "--num-samples", "20", "--nfe", "4", "6", "--reference-nfe", "12", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| MSE to reference | NFE 4 | NFE 6 |" in printed and "digits-FD" in printed
    results = json.loads((out / "results.json").read_text())
    assert {(e["method"], e["nfe"]) for e in results["entries"]} == {
        (s, n) for s in ("ddim", "dpmpp", "unipc") for n in (4, 6)}
    for e in results["entries"]:
        assert e["mse"] > 0 and e["fd"] > 0 and 0 <= e["accuracy"] <= 1 and e["time_s"] > 0
    assert results["floor"]["fd"] > 0 and results["reference"]["fd"] > 0
    for name in ("results.md", "quality_vs_nfe.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("digits-*.safetensors"))) == 1


class CountingGMM(GMMTestbed):
    """A small GMM testbed that counts generate calls and can crash on demand."""

    def __init__(self, crash_on=None):
        super().__init__(dim=4, components=4, num_classes=2)
        self.calls, self.crash_on = [], crash_on

    def generate(self, solver, options, nfe, *args):
        if (solver, nfe) == self.crash_on:
            raise RuntimeError("simulated crash")
        self.calls.append((solver, nfe))
        return super().generate(solver, options, nfe, *args)


def _cfg(methods, **kw):
    return CompareConfig(model="gmm", methods=[Method.parse(m) for m in methods], nfes=(3, 5), num_samples=16,
                         reference_nfe=20, **kw)


def test_resume_after_crash_keeps_finished_work(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    crashing = CountingGMM(crash_on=("unipc", 5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_compare(crashing, _cfg(["ddim", "unipc"]), out, cache, progress=False, plot=False, log=lambda s: None)
    saved = json.loads((out / "results.json").read_text())
    assert [(e["method"], e["nfe"]) for e in saved["entries"]] == [("ddim", 3), ("ddim", 5), ("unipc", 3)]

    again = CountingGMM()
    results = run_compare(again, _cfg(["ddim", "unipc"]), out, cache, progress=False, plot=False, log=lambda s: None)
    assert again.calls == [("unipc", 5)]  # only the missing pair is recomputed
    assert len(results["entries"]) == 4
    # Adding a solver later only runs the new one.
    more = CountingGMM()
    run_compare(more, _cfg(["ddim", "unipc", "dpmpp:order=3"]), out, cache, progress=False, plot=False,
                log=lambda s: None)
    assert more.calls == [("dpmpp", 3), ("dpmpp", 5)]


def test_mismatched_or_corrupt_results_are_reported(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_compare(CountingGMM(), _cfg(["ddim"]), out, cache, progress=False, plot=False, log=lambda s: None)
    with pytest.raises(ValueError, match=r"different configuration.*\['seed'\]"):
        run_compare(CountingGMM(), _cfg(["ddim"], seed=1), out, cache, progress=False, plot=False, log=lambda s: None)
    (out / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        run_compare(CountingGMM(), _cfg(["ddim"]), out, cache, progress=False, plot=False, log=lambda s: None)


def test_reference_cache_is_reused_and_survives_corruption(tmp_path):
    cache = tmp_path / "cache"
    logs = []
    run_compare(CountingGMM(), _cfg(["ddim"]), tmp_path / "a", cache, progress=False, plot=False, log=logs.append)
    run_compare(CountingGMM(), _cfg(["ddim"]), tmp_path / "b", cache, progress=False, plot=False, log=logs.append)
    assert any("cached" in line for line in logs)
    for f in cache.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    logs.clear()
    run_compare(CountingGMM(), _cfg(["ddim"]), tmp_path / "c", cache, progress=False, plot=False, log=logs.append)
    assert any("unreadable, recomputing" in line for line in logs)


def test_gmm_metrics_rank_solvers(tmp_path):
    cfg = CompareConfig(model="gmm", methods=[Method("ddim"), Method("unipc")], nfes=(8,), num_samples=64,
                        reference_nfe=20)
    results = run_compare(GMMTestbed(dim=4, components=4, num_classes=2), cfg, tmp_path, tmp_path / "c",
                          progress=False, plot=False, log=lambda s: None)
    mse = {e["method"]: e["mse"] for e in results["entries"]}
    assert mse["unipc"] < mse["ddim"]  # exact ground truth: a higher-order solver must be closer


def test_pipeline_testbed_on_tiny_sd(tmp_path):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    rc = main(["compare", "--model", str(tmp_path / "sd"), "--solvers", "ddim", "unipc:order=3", "--nfe", "2", "3",
               "--num-samples", "2", "--reference-nfe", "6", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["entries"]) == 4 and all(torch.isfinite(torch.tensor(e["mse"])) for e in results["entries"])
    assert "fd" not in results["entries"][0]


def test_cli_solvers_lists_every_solver_with_options(capsys):
    assert main(["solvers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == ["ddim", "dpmpp", "unipc"]
    unipc = listed[2]["options"]
    assert unipc["order"] == {"default": 2, "allowed": "1..3", "doc": unipc["order"]["doc"]}
    assert main(["compare", "--solvers", "nope", "--no-progress"]) == 2
    assert "unknown solver 'nope'" in capsys.readouterr().err


def test_pipeline_reference_cache_lives_in_cache_dir_and_tracks_weight_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    args = ["compare", "--model", str(tmp_path / "sd"), "--solvers", "ddim", "--nfe", "2", "--num-samples", "2",
            "--reference-nfe", "3", "--height", "32", "--width", "32", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").glob("sd-*.safetensors"))) == 1
    assert not list(tmp_path.glob("sd-*.safetensors"))  # not next to the pipeline folder
    # same-size edit of the weights: a new reference, not the stale one
    weights = next((tmp_path / "sd" / "unet").glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, weights)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "cache").glob("sd-*.safetensors"))) == 2
