"""Files from elsewhere are data: configs never echo or run code, checkpoints never unpickle, tuned files
are checked against the model they are used on (issue 21 items 7 and 8)."""

import json
import os
from pathlib import Path

import pytest
import torch

from fewstep.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(list(argv))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, lines


def test_config_errors_name_the_file_never_its_content(capsys, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    binary = tmp_path / "blob"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [digits\nsecret_token: hunter2\n")
    long_value = tmp_path / "long.yaml"
    long_value.write_text("max_steps: " + "hunter2" * 40 + "\n")
    for path, expect in ((secret, "is not a settings file"), (binary, "is not a UTF-8 text file"),
                         (broken, "is not valid YAML"), (long_value, "could not be converted")):
        code, lines = _run(capsys, "distill", "train", "--config", str(path))
        assert code == 2 and len(lines) == 1 and str(path) in lines[0] and expect in lines[0], lines
        assert "root:x" not in lines[0] and "hunter2" * 10 not in lines[0] and "secret_token" not in lines[0]


def test_extractor_code_from_a_settings_file_needs_allow_code_and_is_type_checked(capsys, tmp_path):
    marker = tmp_path / "PWNED"
    settings = tmp_path / "settings.yaml"
    settings.write_text(f'source: digits\nextractor: "os:system:command=touch {marker}"\nout: {tmp_path}/ref.npz\n'
                        "allow_code: true\n")  # a file cannot allow itself
    code, lines = _run(capsys, "eval", "ref", "--config", str(settings))
    assert code == 2 and len(lines) == 1 and "allow_code=true on the command line" in lines[0], lines
    # Allowed from the command line, the callable is still checked before it is called: no builtins.
    for extra in (["allow_code=true"], ["--extractor", f"os:system:command=touch {marker}"]):
        code, lines = _run(capsys, "eval", "ref", "--config", str(settings), *extra)
        assert code == 2 and "must name an nn.Module class or a Python function" in lines[0], lines
    assert not marker.exists()
    from fewstep.eval.metrics.features import feature_extractor

    with pytest.raises(ValueError, match="is the class Path, not an nn.Module subclass"):
        feature_extractor("pathlib:Path")
    assert feature_extractor("torch.nn:Flatten").name == "torch.nn:Flatten"  # a module class: fine from the API


def test_digits_training_checkpoint_is_loaded_without_unpickling(tmp_path):
    from fewstep.zoo.digits_train import CHECKPOINT_NAME, train_diffusion

    kwargs = dict(steps=1, batch_size=4, warmup=1, checkpoint_every=1, progress=False)
    train_diffusion(tmp_path / "run", **kwargs)
    train_diffusion(tmp_path / "run", **{**kwargs, "steps": 2})  # its own checkpoint resumes (weights_only)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": Evil()}, tmp_path / "run" / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME} is not a readable digits training checkpoint"):
        train_diffusion(tmp_path / "run", **{**kwargs, "steps": 3})
    assert not marker.exists()


def test_tuned_file_of_another_model_is_refused_by_the_cli(capsys, tmp_path, monkeypatch):
    from fewstep.eval.testbeds import DigitsTestbed
    from fewstep.samplers import model_fingerprint

    bed = DigitsTestbed()
    # The testbeds hand fewstep.sample a bound method: it is fingerprinted by the network behind it.
    assert model_fingerprint(bed.model) == model_fingerprint(bed.unet) is not None
    schedule = {"kind": "vp_discrete", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                "beta_schedule": "linear", "rescale_betas_zero_snr": False}
    ratios = {"fewstep_artifact": "dc_ratios", "version": 1, "ratios": [1.0, 1.0, 1.1, 0.9, 1.0], "dc_order": 2,
              "meta": {"fingerprint": "gmm:dbff5543eeb2859b900c", "schedule": schedule, "nfe": 5, "guidance": 1.5,
                       "solver": "dc"}}
    path = tmp_path / "gmm-ratios.json"
    path.write_text(json.dumps(ratios))
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    code, lines = _run(capsys, "compare", "--model", "digits", "--solvers", f"dc:dc_file={path}", "--nfe", "5",
                       "--num-samples", "2", "--reference-nfe", "6", "--out", str(tmp_path / "cmp"), "--no-progress",
                       "--no-plot")
    assert code == 2 and len(lines) == 1, lines
    assert "tuned on model gmm:dbff5543eeb2859b900c" in lines[0] and "refused" in lines[0]
    # The same file made for this model runs.
    ratios["meta"]["fingerprint"] = model_fingerprint(bed.unet)
    path.write_text(json.dumps(ratios))
    code, lines = _run(capsys, "compare", "--model", "digits", "--solvers", f"dc:dc_file={path}", "--nfe", "5",
                       "--num-samples", "2", "--reference-nfe", "6", "--out", str(tmp_path / "cmp2"), "--no-progress",
                       "--no-plot")
    assert code == 0, lines


def test_pipeline_testbed_checks_the_tuned_file_against_its_denoiser(tmp_path):
    import warnings

    from fewstep.eval.testbeds import PipelineTestbed
    from fewstep.samplers import model_fingerprint
    from fewstep.samplers.artifacts import ArtifactModelWarning
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(tmp_path / "pipe")
    bed = PipelineTestbed(tmp_path / "pipe", prompts=["a cube"])
    assert model_fingerprint(bed.pipe) == model_fingerprint(pipe.unet)
    from fewstep.eval.testbeds import DiscreteVPSchedule  # the tiny SD pipeline's betas

    cfg = pipe.scheduler.config
    schedule = DiscreteVPSchedule.from_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                             cfg.beta_schedule).to_dict()
    ratios = {"fewstep_artifact": "dc_ratios", "version": 1, "ratios": [1.0, 1.0, 1.0], "dc_order": 2,
              "meta": {"fingerprint": "module:0123456789abcdef0123", "schedule": schedule, "nfe": 3,
                       "guidance": 3.0, "solver": "dc"}}
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps(ratios))
    x, cond = bed.initial_noise(1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArtifactModelWarning)  # as the CLIs do
        with pytest.raises(ArtifactModelWarning, match="tuned on model module:0123456789abcdef0123"):
            bed.generate("dc", {"dc_file": str(path)}, 3, x, cond, 3.0, None)
