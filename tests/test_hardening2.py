"""Regression tests for issue 21 (hardening round 2), items 10-18: errors, locks, leftovers,
progress, plots and start-up of the newer commands. NN in a test name is the reproducer
../shared/findings/hardening2/NN_*.
"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.cli import _COMMANDS, build_parser, main, parse_command_line
from fewstep.config import load_config
from fewstep.eval.testbeds import GMMTestbed

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda msg: None)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def _one_error_line(capsys, argv, command):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fewstep {command}: error: "), err
    return err[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no such process (pids are not reused this fast)


def _gmm_calibration(**kw):
    from fewstep.samplers import make_schedule
    from fewstep.zoo.gmm import GaussianMixture, GMMModel

    mix = GaussianMixture.random(16, 12, 4, seed=0, std_range=(0.1, 0.5))
    sch = make_schedule("linear")
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    args = dict(schedule=sch, nfe=4, iterations=2, reference_nfe=10)
    return GMMModel(mix, sch, "epsilon"), x, {**args, **kw}


# ------------------------------------------------------------------ 18: start-up time

def test_18_cli_import_and_top_level_help_load_no_torch():
    code = ("import sys, fewstep.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy', 'omegaconf', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fewstep" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]


def test_18_lazy_package_keeps_its_api():
    assert fewstep.sample is fewstep.samplers.sample
    assert set(fewstep.samplers.__all__) <= set(fewstep.__all__) and "DDIMSolverScheduler" in fewstep.__all__
    namespace = {}
    exec("from fewstep import *", namespace)
    assert namespace["calibrate_dc"] is fewstep.calibrate_dc
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fewstep.nope


def test_18_stub_help_lines_match_the_modules():
    _, sub = build_parser(True)
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert {name: line for name, (_, _, line) in _COMMANDS.items()} == {k: helps[k] for k in _COMMANDS}


# ------------------------------------------------------------------ 15: command line parsing and help

def test_15_key_value_items_after_list_flags_are_settings():
    args = parse_command_line(["compare", "--solvers", "ddim", "unipc", "num_samples=100", "--nfe", "5", "seed=1"])
    assert args.solvers == ["ddim", "unipc"] and args.nfe == [5] and args.overrides == ["num_samples=100", "seed=1"]
    args = parse_command_line(["eval", "mse", "--solver", "ddim", "unipc", "seed=1", "--nfe", "4", "5", "num_samples=9"])
    assert args.solvers == ["ddim", "unipc"] and args.nfe == [4, 5] and args.overrides == ["seed=1", "num_samples=9"]


def test_15_an_unknown_flag_is_reported_by_its_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ems", "compute", "--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "fewstep ems compute: error: unrecognized arguments: --bogus"
    line = _one_error_line(capsys, ["eval", "ref", "digits", "foo=1"], "eval ref")
    assert "'foo'" in line


def _leaves():
    """Every (command words, leaf parser) with a settings schema."""
    _, sub = build_parser(True)
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for word, leaf in (nested[0].choices.items() if nested else [(None, parser)]):
            if leaf.get_default("config_schema") is not None:
                yield " ".join(filter(None, [name, word])), leaf


def test_15_every_help_example_is_valid_for_its_command(monkeypatch):
    from fewstep.tuning.dc.command import _LIST

    monkeypatch.chdir(ROOT)  # the examples name the shipped configs/ relative to the project
    required = {"EMSComputeConfig": ["out=e.safetensors"]}
    checked = 0
    for words, leaf in _leaves():
        schema = leaf.get_default("config_schema")
        text = leaf.format_help()
        example = re.search(r"e\.g\.\s+(.*?)\n\n", text, re.S).group(1).split()
        load_config(schema, overrides=[*example, *required.get(schema.__name__, [])])
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith(f"fewstep {words} "):
                continue
            args = parse_command_line(shlex.split(line)[1:])
            args.overrides = [f"{m.group(1)}=[{m.group(2)}]" if (m := _LIST.match(o)) else o
                              for o in getattr(args, "overrides", [])]  # calibrate dc's nfe=5,6 form
            flags = {k: v for k, v in vars(args).items()
                     if k in {f.name for f in dataclasses.fields(schema)}}
            load_config(schema, args.config, flags, [*args.overrides, *required.get(schema.__name__, [])])
            checked += 1
    assert checked >= 8


def test_15_distill_help_lists_every_setting_and_a_run_says_where_the_adapters_are(monkeypatch, capsys, tmp_path):
    from fewstep.distill import train as train_module

    text = dict(_leaves())["distill train"].format_help()
    for f in dataclasses.fields(train_module.DistillConfig):
        assert re.search(rf"^  {f.name}=", text, re.M), f.name
    assert "Where checkpoints, logs, validation samples and the adapters go" in text
    monkeypatch.setattr(train_module, "train", lambda cfg: Path(cfg.output_dir) / "adapters")
    assert main(["distill", "train", f"output_dir={tmp_path}"]) == 0
    assert f"wrote adapters to {tmp_path / 'adapters'}" in capsys.readouterr().out


# ------------------------------------------------------------------ 10: calibrate / ems / search input errors

def test_10_01_calibrate_batch_size_accumulates_over_batches():
    model, x, kw = _gmm_calibration()
    whole = fewstep.calibrate_dc(model, x, **kw).ratios
    split = fewstep.calibrate_dc(model, x, batch_size=3, **kw).ratios
    # float64 GMM: only the order of the loss/gradient sums differs between the two runs.
    assert split == pytest.approx(whole, rel=1e-9, abs=1e-12)


def test_10_01_calibrate_cli_batch_size(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["calibrate", "dc", "--model", "gmm", "--nfe", "4", "--num-samples", "3", "--batch-size", "2",
                 "--iterations", "2", "--reference-nfe", "10", "--out", str(out), "--no-progress"]) == 0
    assert fewstep.DCRatios.load(out).meta.nfe == 4


def test_10_04_a_diverging_learning_rate_keeps_the_best_finite_ratios():
    model, x, kw = _gmm_calibration(iterations=3, lr=1e300)
    for objective in ("final", "trajectory", "auto"):  # trajectory keeps its last ratio with a finite loss
        result = fewstep.calibrate_dc(model, x, objective=objective, **kw)
        assert all(np.isfinite(result.ratios)), objective
        if result.meta.extra["objective"] == "final":  # the per-step objective records no single loss
            assert np.isfinite(result.meta.extra["loss"])


def test_10_03_05_calibrate_guidance_nan_and_huge_seed_are_named(tmp_path, capsys):
    base = ["calibrate", "dc", "--model", "gmm", "--nfe", "4", "--out", str(tmp_path / "r.json"), "--no-progress"]
    assert "guidance=nan is not allowed" in _one_error_line(capsys, [*base, "--guidance", "nan"], "calibrate dc")
    line = _one_error_line(capsys, [*base, "--seed", "99999999999999999999"], "calibrate dc")
    assert "seed=99999999999999999999 is out of range" in line
    line = _one_error_line(capsys, ["ems", "compute", "--model", "gmm", "--out", str(tmp_path / "e.safetensors"),
                                    "--seed", str(2**64)], "ems compute")
    assert f"seed={2**64} is out of range" in line
    assert not (tmp_path / "r.calibration").exists()


def test_10_calibrate_refuses_empty_and_differentiable_noise():
    model, x, kw = _gmm_calibration()
    with pytest.raises(ValueError, match="at least one sample"):
        fewstep.calibrate_dc(model, x[:0], **kw)
    with pytest.raises(ValueError, match="x_T requires grad"):
        fewstep.calibrate_dc(model, x.clone().requires_grad_(), **kw)
    with pytest.raises(TypeError, match="x_T must be a tensor"):
        fewstep.calibrate_dc(model, x.tolist(), **kw)


def test_10_07_ems_refuses_pipeline_settings_for_built_in_models(tmp_path, capsys):
    line = _one_error_line(capsys, ["ems", "compute", "--model", "gmm", "--n-grid", "4", "--n-data", "4", "--height",
                                    "64", "--prompts", "/etc/hostname", "--out", str(tmp_path / "e.safetensors"),
                                    "--no-progress"], "ems compute")
    assert "prompts, height apply to text-to-image pipelines only" in line


def test_10_07_search_refuses_reference_settings_the_gmm_ignores(tmp_path, capsys):
    base = ["search", "timesteps", "--model", "gmm", "--nfe", "4", "--budget", "2", "--num-samples", "4",
            "--out", str(tmp_path / "t.json"), "--no-progress"]
    assert "reference_nfe=0 is out of range" in _one_error_line(capsys, [*base, "reference_nfe=0"], "search timesteps")
    line = _one_error_line(capsys, [*base, "reference_nfe=10"], "search timesteps")
    assert "reference is exact" in line
    assert "reference is exact" in _one_error_line(capsys, [*base[:1], "usf", *base[2:], "reference=ddim"], "search usf")
    assert not (tmp_path / "t.run").exists()  # refused before the run folder is claimed


# ------------------------------------------------------------------ 11: torchrun, leftovers

@pytest.mark.parametrize("argv", [["calibrate", "dc", "--model", "gmm"], ["search", "usf", "--model", "gmm"],
                                  ["search", "timesteps", "--model", "gmm"]])
def test_11_16_single_process_commands_refuse_torchrun_in_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = [*argv, "--out", str(tmp_path / "o.json"), "--no-progress"]
    assert "runs as one process" in _one_error_line(capsys, argv, " ".join(argv[:2]))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and not capsys.readouterr().err  # the other ranks stay quiet
    assert not list(tmp_path.iterdir())


def _plant(folder: Path, name: str, pid: int) -> Path:
    path = folder / f".{name}.{pid}.0123abcd.tmp"
    path.write_text("{}")
    return path


def test_11_15_stray_temp_files_beside_outputs_are_cleaned(tmp_path, capsys):
    dead = _dead_pid()
    runs = {
        "calibrate": (["calibrate", "dc", "--model", "gmm", "--nfe", "4", "--num-samples", "2", "--iterations", "1",
                       "--reference-nfe", "10", "--out", str(tmp_path / "cal" / "r.json")], tmp_path / "cal", "r.json"),
        "search": (["search", "timesteps", "--model", "gmm", "--nfe", "4", "--budget", "2", "--num-samples", "4",
                    "--out", str(tmp_path / "s" / "t.json")], tmp_path / "s", "t.json"),
        "ems": (["ems", "compute", "--model", "gmm", "--n-grid", "2", "--n-data", "2", "--out",
                 str(tmp_path / "e" / "e.safetensors")], tmp_path / "e", "e.safetensors"),
        "eval": (["eval", "mse", "--model", "gmm", "--solver", "ddim", "--nfe", "3", "--num-samples", "4",
                  "--batch-size", "2", "--reference-nfe", "10", "--no-plot", "--out", str(tmp_path / "m")],
                 tmp_path / "m", "results.json"),
    }
    for name, (argv, folder, final) in runs.items():
        assert main([*argv, "--no-progress"]) == 0, name
        stale = _plant(folder, final, dead)
        other = _plant(folder, "someone-else.json", dead) if name != "eval" else None
        assert main([*argv, "--no-progress"]) == 0, name
        assert not stale.exists(), name
        if other is not None:  # beside an output in a shared folder: only that output's leftovers go
            assert other.exists()
    capsys.readouterr()


# ------------------------------------------------------------------ 12: extractors and statistics files

def test_12_06_extractor_mistakes_are_one_line(tmp_path, capsys):
    base = ["eval", "ref", "digits", "--out", str(tmp_path / "r.npz"), "--cache-dir", str(tmp_path / "c")]
    assert "unknown option(s) ['bogus']" in _one_error_line(capsys, [*base, "--extractor", "digits:bogus=1"], "eval ref")
    # a builtin is refused before any call (only nn.Module classes and Python functions are called) ...
    line = _one_error_line(capsys, [*base, "--extractor", "os:getcwd"], "eval ref")
    assert "must name an nn.Module class or a Python function" in line
    # ... and a Python function must return a module
    assert "returned str, not an nn.Module" in _one_error_line(capsys, [*base, "--extractor", "platform:system"],
                                                                "eval ref")
    line = _one_error_line(capsys, [*base, "--extractor", "json:loads"], "eval ref")
    assert "'json:loads' cannot be called with options {}" in line
    line = _one_error_line(capsys, ["eval", "fid", "--model", "digits", "--extractor", "digits:bogus=1", "--out",
                                    str(tmp_path / "f"), "--no-progress"], "eval fid")
    assert "unknown option(s)" in line and not (tmp_path / "f").exists()


def test_12_12_statistics_that_are_no_covariance_are_refused(tmp_path, capsys):
    from fewstep.eval.metrics.stats import GaussianStats

    rs = np.random.RandomState(0)
    w, v = np.linalg.eigh(np.cov(rs.randn(200, 16), rowvar=False))
    w[0] = -5.0
    feats = rs.randn(6, 16).astype(np.float32)  # rank 5 < 16, stored in float32: PSD up to round-off
    for name, sigma in {"neg": -np.eye(16), "oneneg": (v * w) @ v.T,
                        "lowrank": np.cov(feats, rowvar=False).astype(np.float32), "eye": np.eye(16)}.items():
        np.savez(tmp_path / f"{name}.npz", mu=np.zeros(16), sigma=sigma)
    for bad in ("neg", "oneneg"):
        with pytest.raises(ValueError, match=rf"{bad}.npz: sigma is not a covariance matrix"):
            GaussianStats.load(tmp_path / f"{bad}.npz")
        line = _one_error_line(capsys, ["eval", "fd", str(tmp_path / "eye.npz"), str(tmp_path / f"{bad}.npz")],
                               "eval fd")
        assert "not positive semi-definite" in line
    assert GaussianStats.load(tmp_path / "lowrank.npz").frechet_distance(GaussianStats.load(tmp_path / "eye.npz")) > 0


def test_12_fid_checks_the_extractor_against_the_model_before_sampling():
    from fewstep.eval.metrics.features import feature_extractor
    from fewstep.eval.runner import _check_images

    class RGB(GMMTestbed.__mro__[1]):  # a testbed with 3x16x16 images, like a pipeline's
        name = "rgb"

        def initial_noise(self, n, seed, start=0):
            return torch.zeros(n, 3, 16, 16), torch.zeros(n, dtype=torch.long)

        def pixels(self, samples):
            return samples.clamp(0, 1)

        def generate(self, *a):
            raise AssertionError("no sampling before the check")

        def fingerprint(self):
            return {}

    with pytest.raises(ValueError, match=r"the digits extractor cannot read the 3x16x16 images of rgb"):
        _check_images(RGB.__new__(RGB), feature_extractor("digits"))


@pytest.mark.slow
def test_12_fid_of_a_pipeline_with_the_digits_extractor_stops_before_sampling(tmp_path, capsys):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    build_tiny_sd_pipeline(tmp_path / "sd")
    assert main(["eval", "fid", "--model", str(tmp_path / "sd"), "--solver", "ddim", "--nfe", "2", "--num-samples",
                 "2", "--batch-size", "2", "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may warn before it)
    assert line.startswith("fewstep eval fid: error: ") and "the digits extractor cannot read the 3x64x64 images of sd" in line and not (tmp_path / "f").exists()


# ------------------------------------------------------------------ 13: search resume, messages, provenance

S3 = dict(nfe=4, num_samples=8, init_screen=4, init_size=4, init_spacings=["time_quadratic"], pool=6,
          per_generation=2, warmup=4, random_init=2)


def test_13_26_a_search_log_shorter_than_its_state_is_refused(gmm, tmp_path, capsys):
    from fewstep.tuning.search import search_usf

    out = tmp_path / "u.json"
    search_usf(gmm, out=out, budget=10, progress=True, **S3, **QUIET)
    assert "S3 screen NFE 4" in capsys.readouterr().err  # 16: the screen has its own progress bar
    state = json.loads((tmp_path / "u.run" / "state.json").read_text())
    log = tmp_path / "u.run" / "search_log.jsonl"
    assert state["logged"] >= 3
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match=r"holds 2 evaluations but .* says \d+ were logged"):
        search_usf(gmm, out=out, budget=10, progress=False, **S3, **QUIET)


def test_13_budget_within_the_start_is_reported(gmm, tmp_path):
    from fewstep.tuning.search import search_timesteps, search_usf

    messages = []
    search_usf(gmm, out=tmp_path / "u.json", budget=3, progress=False, **S3, log=messages.append)
    assert any("did not get past the initial population" in m for m in messages)
    messages.clear()
    sched = search_timesteps(gmm, nfe=4, budget=2, num_samples=4, out=tmp_path / "t.json", progress=False,
                             log=messages.append)
    assert any("was spent on the start spacings" in m for m in messages)
    # The GMM's reference is its exact ODE solution, and the provenance says so.
    fitness = sched.meta.extra["fitness"]
    assert fitness["reference"].startswith("exact probability-flow ODE") and fitness["reference_nfe"] is None


def test_13_05_a_tuned_file_of_another_nfe_is_named(gmm, tmp_path):
    from fewstep.tuning.search import search_timesteps

    model, x, kw = _gmm_calibration(nfe=5, iterations=0)
    fewstep.calibrate_dc(model, x, **kw).save(tmp_path / "r5.json")
    with pytest.raises(ValueError, match="made for NFE 5"):
        search_timesteps(gmm, solver=f"dc:dc_file={tmp_path / 'r5.json'}", nfe=4, budget=2, num_samples=4,
                         out=tmp_path / "t.json", progress=False, **QUIET)
    assert not (tmp_path / "t.run").exists()


# ------------------------------------------------------------------ 16: progress bars

def test_16_timesteps_bar_ends_full_when_the_search_converges_early(gmm, tmp_path, capsys):
    from fewstep.tuning.search import search_timesteps

    search_timesteps(gmm, nfe=3, budget=150, num_samples=4, out=tmp_path / "t.json", step=0.5, min_step=0.4,
                     progress=True, **QUIET)
    done, total = map(int, re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)[-1])
    assert done == total < 150


def test_16_eval_mse_counts_its_reference_and_warms_up_before_timing(tmp_path, capsys, monkeypatch):
    from fewstep.eval import runner

    calls = []
    real = GMMTestbed.generate
    monkeypatch.setattr(GMMTestbed, "generate", lambda self, s, o, nfe, x, *a: calls.append(x.shape[0]) or
                        real(self, s, o, nfe, x, *a))
    assert main(["eval", "mse", "--model", "gmm", "--solver", "ddim", "unipc", "--nfe", "3", "--num-samples", "4",
                 "--batch-size", "2", "--reference-nfe", "10", "--no-plot", "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert re.findall(r"(\d+)/(\d+) \[", err)[-1] == ("6", "6")  # 2 reference shards + 2 pairs x 2 shards
    assert calls[:2] == [1, 2]  # one untimed sample, then the first timed shard
    assert runner._Run.warm_up.__doc__


# ------------------------------------------------------------------ 17: plots

def test_17_sample_grid_labels_wrap_within_their_column():
    from PIL import Image, ImageDraw

    from fewstep.eval.report import _font, _wrap

    probe, font = ImageDraw.Draw(Image.new("L", (1, 1))), _font(13)
    label = "dc:dc_file=/a/very/long/folder/name/without/any/commas/calibrated-ratios-nfe5-g7.5.json"
    lines = _wrap(probe, label, font, 178)
    assert "".join(lines) == label and len(lines) > 1
    assert all(probe.textlength(line, font=font) <= 178 for line in lines)


def test_17_legend_fits_the_figure_and_fid_draws_real_vs_real(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fewstep.eval.report import fit_legend
    from fewstep.eval.metrics.features import feature_extractor
    from fewstep.eval.metrics.refstats import real_vs_real

    fig, ax = plt.subplots(figsize=(6, 3.9), layout="constrained")
    labels = [f"unipc(corrector=False,order={k},variant=bh1,space=noise,disable_corrector=[1])" for k in range(4)]
    handles = [ax.plot([0, 1], [k, k], label=lab)[0] for k, lab in enumerate(labels)]
    legend = fit_legend(fig, handles, labels, 3)
    fig.canvas.draw()
    assert legend.get_window_extent().width <= fig.get_window_extent().width
    plt.close(fig)
    floor = real_vs_real("digits", feature_extractor("digits"))
    assert 0 < floor < 5 and real_vs_real(str(tmp_path), feature_extractor("digits")) is None


def test_17_validation_samples_are_also_a_png(tmp_path):
    from PIL import Image

    from fewstep.eval.report import validation_grid

    samples = {"w1": torch.rand(3, 1, 8, 8) * 2 - 1, "w3": torch.rand(3, 1, 8, 8) * 2 - 1}
    assert validation_grid(samples, tmp_path / "v.png")
    assert Image.open(tmp_path / "v.png").size[1] >= 2 * 8 * 4
    assert not validation_grid({"w1": torch.rand(3, 16)}, tmp_path / "no.png") and not (tmp_path / "no.png").exists()


# ------------------------------------------------------------------ kill -9, resume, two processes on one folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(argv):
    return [sys.executable, "-m", "fewstep.cli", *argv, "--no-progress"]


def _wait(proc, ready, what, timeout=600):
    import time

    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"{what} finished before the kill point: raise its size"


def _calibrate(tmp, name):
    out = tmp / name / "r.json"
    argv = ["calibrate", "dc", "--model", "gmm", "--nfe", "5", "--num-samples", "4", "--iterations", "40",
            "--reference-nfe", "40", "--out", str(out)]
    return argv, lambda: len(list((tmp / name / "r.calibration").glob("state-*.json"))) > 0, \
        lambda: fewstep.DCRatios.load(out).ratios


def _timesteps(tmp, name):
    out = tmp / name / "t.json"
    argv = ["search", "timesteps", "--model", "gmm", "--nfe", "5", "--budget", "60", "--num-samples", "64",
            "--out", str(out)]
    log = tmp / name / "t.run" / "search_log.jsonl"
    return argv, lambda: log.exists() and len(log.read_text().splitlines()) >= 5, \
        lambda: fewstep.load_solver_schedule(out).timesteps


def _ems(tmp, name):
    out = tmp / name / "e.safetensors"
    argv = ["ems", "compute", "--model", "gmm", "--n-grid", "24", "--n-data", "64", "--batch-size", "16",
            "--chunk-size", "4", "--out", str(out)]
    parts = tmp / name / "e.safetensors.parts"
    return argv, lambda: len(list(parts.glob("shard-*.safetensors"))) >= 1, \
        lambda: {k: v.tolist() for k, v in fewstep.EMS.load(out).tensors().items()}


def _eval(tmp, name):
    out = tmp / name / "run"
    argv = ["eval", "mse", "--model", "gmm", "--solver", "ddim", "unipc", "--nfe", "4", "8", "--num-samples", "400",
            "--batch-size", "50", "--reference-nfe", "50", "--no-plot", "--cache-dir", str(tmp / name / "cache"),
            "--out", str(out)]
    return argv, lambda: len(list(out.glob("shards/*/*.safetensors"))) >= 2, \
        lambda: [(e["method"], e["nfe"], e["mse"]) for e in json.loads((out / "results.json").read_text())["entries"]]


@pytest.mark.slow
@pytest.mark.parametrize("job", [_calibrate, _timesteps, _ems, _eval], ids=["calibrate", "search", "ems", "eval"])
def test_kill_9_resume_and_a_second_process_on_the_folder(job, tmp_path):
    """A second process on a busy folder is refused in one line and changes nothing; the killed run
    resumes to exactly the clean run's result (same process kind and batch: bitwise)."""
    argv, _, result = job(tmp_path, "clean")
    assert subprocess.run(_cli(argv), env=ENV, capture_output=True).returncode == 0
    clean = result()
    argv, ready, result = job(tmp_path, "killed")
    first = subprocess.Popen(_cli(argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(first, ready, argv[0])
        first.send_signal(signal.SIGSTOP)  # holds its lock, mid-run, while the second one tries
        second = subprocess.run(_cli(argv), env=ENV, capture_output=True, text=True)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and "in use by another" in err[0], second.stderr[-500:]
    finally:
        first.kill()  # kill -9 (a stopped process dies on SIGKILL too)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    resumed = subprocess.run(_cli(argv), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert result() == clean
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_runtime_flags_are_declared_once():
    """--model/--device/--threads/--no-progress come from config.add_runtime_arguments in every job command."""
    for words, leaf in _leaves():
        if words in ("distill train", "distill estimate"):  # settings only (a YAML file and key=value items)
            continue
        group = next((g for g in leaf._action_groups if g.title == "model and run"), None)
        assert group is not None, words
        assert {"device", "threads", "progress"} <= {a.dest for a in group._group_actions}, words


def test_05_06_deep_json_and_a_full_disk_are_one_line(tmp_path, capsys, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text('{"fewstep_artifact": "dc_ratios", "version": 1, "ratios": ' + "[" * 100000 + "]" * 100000 + "}")
    line = _one_error_line(capsys, ["compare", "--model", "gmm", "--solvers", f"dc:dc_file={deep}", "--nfe", "4",
                                    "--num-samples", "4", "--out", str(tmp_path / "c"), "--no-progress"], "compare")
    assert "nested too deeply" in line
    line = _one_error_line(capsys, ["search", "usf", "--model", "gmm", "--nfe", "4", "--budget", "2", "--num-samples",
                                    "4", "--init", str(deep), "--out", str(tmp_path / "s.json"), "--no-progress"],
                           "search usf")
    assert "nested too deeply" in line

    def full(fd):
        raise OSError(28, "No space left on device")

    from fewstep.cli import _message
    from fewstep.tuning.search.runlog import SearchLog

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as exc:
        SearchLog(tmp_path / "search_log.jsonl").append({"i": 0})
    assert _message(exc.value) == f"{tmp_path / 'search_log.jsonl'}: No space left on device"
