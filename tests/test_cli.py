"""The `fewstep` command line: one-line errors for user mistakes, --version, --help, --config, pipes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.zoo import digits

ROOT = Path(__file__).resolve().parents[1]
GMM = ["compare", "--model", "gmm", "--num-samples", "20", "--nfe", "1", "--solvers", "ddim", "--no-progress",
       "--no-plot"]


def _env():
    path = os.pathsep.join([str(Path(fewstep.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "references"


def _error(capsys, argv) -> str:
    """Run the CLI, expect exit status 2 and exactly one error line; return it."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fewstep {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.out
    return lines[0]


def test_version_and_plain_text_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fewstep {fewstep.__version__}"
    for argv in (["--help"], ["compare", "--help"], ["solvers", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and "usage: fewstep" in text
    assert main.__module__ == "fewstep.cli"


def test_solvers_lists_every_solver_with_options(capsys):
    assert main(["solvers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed] == fewstep.list_solvers()
    unipc = next(s for s in listed if s["name"] == "unipc")["options"]
    assert unipc["order"] == {"default": 2, "allowed": "1..3", "doc": unipc["order"]["doc"]}
    assert "unknown solver 'nope'" in _error(capsys, ["compare", "--solvers", "nope"])


def test_output_into_a_closed_pipe_is_not_a_traceback():
    p = subprocess.Popen([sys.executable, "-m", "fewstep.cli", "solvers", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    p.stdout.close()  # the reader is gone before the first write, like `| head -0`
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""


def test_file_system_problems_are_one_line_errors_naming_the_file(tmp_path, capsys, cache):
    # fuzz 19: each of these was a traceback
    (tmp_path / "file").write_text("x")
    assert f"{tmp_path / 'file'}: exists and is not a directory" in _error(capsys, [*GMM, "--out", str(tmp_path / "file")])
    (tmp_path / "d1" / "results.json").mkdir(parents=True)
    assert f"{tmp_path / 'd1' / 'results.json'}: Is a directory" in _error(capsys, [*GMM, "--out", str(tmp_path / "d1")])
    for i, text in enumerate(("[]", "null", '{"config": {}}', "{broken")):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(text)
        assert f"{tmp_path / f'r{i}' / 'results.json'} is not" in _error(capsys, [*GMM, "--out", str(tmp_path / f"r{i}")])
    (tmp_path / "d5").mkdir()
    (tmp_path / "d5" / "samples").write_text("x")
    assert "samples is not a folder" in _error(capsys, [*GMM, "--out", str(tmp_path / "d5")])
    assert "missing.yaml: No such file or directory" in _error(capsys, ["compare", "--config", str(tmp_path / "missing.yaml")])


def test_read_only_output_folder(tmp_path, capsys, cache):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() != 0:
        assert f"{ro / 'run'}: Permission denied" in _error(capsys, [*GMM, "--out", str(ro / "run")])
        return
    if shutil.which("setpriv") is None:
        pytest.skip("root bypasses permissions and setpriv is not available to drop that")
    cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "fewstep.cli", *GMM,
           "--out", str(ro / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert p.returncode == 2 and p.stderr.strip() == f"fewstep compare: error: {ro / 'run'}: Permission denied"


def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, cache):
    out = tmp_path / "run"
    # fuzz 20: NaN guidance ran unguided and wrote NaN into results.json; Inf cached a NaN reference
    for g in ("nan", "inf", "-inf"):
        assert "must be a finite number in [0, 10000]" in _error(capsys, [*GMM, f"--guidance={g}", "--out", str(out)])
    # fuzz 21: any device string was accepted; a CUDA request on a CPU-only build was ignored
    assert "'not-a-device' is not a device name" in _error(capsys, [*GMM, "--device", "not-a-device"])
    if torch.version.cuda is None:
        assert "has no CUDA support" in _error(capsys, [*GMM, "--device", "cuda"])
    assert "sets 'order' twice" in _error(capsys, [*GMM, "--solvers", "unipc:order=1,order=3"])
    assert "Key 'nfee' not in 'CompareConfig'" in _error(capsys, [*GMM, "nfee=[4]"])
    assert not out.exists() and not cache.exists()


def test_duplicates_are_dropped(tmp_path, cache):
    # fuzz 21: `--nfe 1 1` and `--solvers unipc unipc` were computed and stored twice
    assert main([*GMM, "--nfe", "1", "1", "2", "--solvers", "unipc", "unipc", "--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [(e["method"], e["nfe"]) for e in results["entries"]] == [("unipc", 1), ("unipc", 2)]


def test_malformed_model_folders_are_one_line_errors(tmp_path, capsys, cache):
    # fuzz 22
    cases = {"{}": "must be a JSON object with a '_class_name'", "[]": "must be a JSON object with a '_class_name'",
             '{"_class_name": "StableDiffusionPipeline", ': "is not valid JSON",
             '{"_class_name": "NoSuchPipeline"}': "has no pipeline class 'NoSuchPipeline'"}
    for i, (text, expected) in enumerate(cases.items()):
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}" / "model_index.json").write_text(text)
        line = _error(capsys, [*GMM, "--model", str(tmp_path / f"m{i}")])
        assert f"{tmp_path / f'm{i}' / 'model_index.json'}" in line and expected in line
    pipe = tmp_path / "digits"
    shutil.copytree(digits.PIPELINE_DIR, pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert f"{weights} is truncated or corrupt" in _error(capsys, [*GMM, "--model", str(pipe)])


def test_config_presets_and_overrides_end_to_end(tmp_path, capsys, cache):
    out = tmp_path / "smoke"
    argv = ["compare", "--config", str(ROOT / "configs" / "compare" / "smoke.yaml"), "--no-progress",
            "num_samples=16", "nfe=[2,3]", f"out={out}", "--solvers", "ddim", "plot=false"]
    assert main(argv) == 0
    saved = (out / "config.yaml").read_text()
    assert "num_samples: 16" in saved and "- ddim" in saved and "model: gmm" in saved and "plot: false" in saved
    capsys.readouterr()
    # the saved config reruns the same thing: a resume with nothing left to do
    assert main(["compare", "--config", str(out / "config.yaml")]) == 0
    assert "resuming: 2 of 2 results already in" in capsys.readouterr().out
