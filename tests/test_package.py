"""Package surface: lazy attributes, optional extras, and loading the built-in files with clear errors."""

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fewstep
from fewstep._extras import MissingExtraError
from fewstep.cli import main
from fewstep.zoo import digits


def test_lazy_names_are_listed_and_resolve():
    listed = fewstep.__dir__()  # what dir() and tab completion show
    for name in ("FewstepScheduler", "UniPCScheduler", "DPMSolverPPScheduler", "DDIMSolverScheduler", "zoo",
                 "sample", "list_solvers"):
        assert name in listed
    assert fewstep.__getattr__("zoo").__name__ == "fewstep.zoo"  # `fewstep.zoo` without importing it first
    assert fewstep.__getattr__("UniPCScheduler").__name__ == "UniPCScheduler"
    assert {"digits", "gmm", "tiny"} <= set(fewstep.zoo.__dir__())
    assert fewstep.zoo.__getattr__("gmm").GaussianMixture is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fewstep.__getattr__("nope")


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    from fewstep.eval.testbeds import check_pipeline_folder

    with pytest.raises(MissingExtraError, match=r"pip install 'fewstep\[pipelines\]'"):
        check_pipeline_folder(folder)
    assert main(["compare", "--model", str(folder), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "needs the optional package 'transformers'" in capsys.readouterr().err


def test_compare_without_matplotlib_skips_the_plot_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    assert main(["compare", "--model", "gmm", "--solvers", "ddim", "--nfe", "2", "--num-samples", "16",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped quality_vs_nfe.png (pip install 'fewstep[plot]')" in out
    assert "quality_vs_nfe.png" not in out.strip().splitlines()[-1] and not (tmp_path / "run" / "quality_vs_nfe.png").exists()


def test_corrupt_classifier_files_are_named(tmp_path):
    # fuzz 25: untyped errors without the file name, and NaN weights accepted
    src = digits.CLASSIFIER_PATH
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = load_file(src)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{trunc} is not a readable safetensors file"):
        digits.load_digits_classifier(trunc)
    bad_meta = tmp_path / "meta.safetensors"
    save_file(state, bad_meta, metadata={**meta, "width": "abc"})
    with pytest.raises(ValueError, match=f"{bad_meta}: metadata width='abc' is not a whole number"):
        digits.load_digits_classifier(bad_meta)
    nan = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, nan, metadata=meta)
    with pytest.raises(ValueError, match=f"{nan}: weight 'body.0.weight' contains NaN or Inf"):
        digits.load_digits_classifier(nan)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other, metadata=meta)
    with pytest.raises(ValueError, match=f"{other} does not hold DigitsClassifier weights"):
        digits.load_digits_classifier(other)
    with pytest.raises(FileNotFoundError):
        digits.load_digits_classifier(tmp_path / "missing.safetensors")


def test_corrupt_data_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match=f"{garbage} is not a readable .npz file"):
        digits.load_digits_data(path=garbage)
    keys = tmp_path / "keys.npz"
    np.savez(keys, foo=np.zeros(3))
    with pytest.raises(ValueError, match=r"has no \['images', 'labels'\] array"):
        digits.load_digits_data(path=keys)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="is a single array"):
        digits.load_digits_data(path=single)
    bad = tmp_path / "range.npz"
    np.savez(bad, images=np.full((5, 8, 8), 255, np.uint8), labels=np.arange(5, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pixel values must be in 0..16, found 255..255"):
        digits.load_digits_data(path=bad)
    np.savez(bad, images=np.zeros((5, 8, 8), np.uint8), labels=np.array([0, 1, 2, 3, 99], np.uint8))
    with pytest.raises(ValueError, match=r"labels must be in 0..9, found 0..99"):
        digits.load_digits_data(path=bad)
    np.savez(bad, images=np.zeros((5, 4, 4), np.uint8), labels=np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"expected images \[N, 8, 8\]"):
        digits.load_digits_data(path=bad)


def test_pipeline_with_nan_weights_is_refused_on_load(tmp_path):
    shutil.copytree(digits.PIPELINE_DIR, tmp_path / "pipe")
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"weight '{key}' contains NaN or Inf"):
        digits.load_digits_pipeline(fewstep.UniPCScheduler, path=tmp_path / "pipe")
