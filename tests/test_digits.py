"""Tests for the built-in digits data, diffusion pipeline, classifier and digits-FD (FD math: test_fd.py)."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file

from fewstep.zoo.digits import (
    DATA_PATH,
    PIPELINE_DIR,
    DigitsClassifier,
    DigitsPipeline,
    digits_fd,
    digits_unet_config,
    from_model_range,
    load_digits_classifier,
    load_digits_data,
    load_digits_pipeline,
    to_model_range,
)
from fewstep.zoo.digits_train import classifier_accuracy, main

# Measured: digits-FD of 200 guided samples (DPM-Solver++, 20 steps, seeds 0-2) vs all
# real digits is 0.46-0.55; 200 random real digits vs all real digits give 0.89.
FD_BOUND = 2.0


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return load_digits_classifier()


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    pipeline = load_digits_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def guided_samples(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(20)
    generator = torch.Generator().manual_seed(0)
    return labels, pipe(labels, num_inference_steps=20, generator=generator, output_type="pt").images


# --- data -------------------------------------------------------------------------------


def test_data_npz_shapes_and_ranges():
    with np.load(DATA_PATH) as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16
    assert set(labels.tolist()) == set(range(10))


def test_data_matches_sklearn():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = load_digits_data("all")
    np.testing.assert_array_equal(from_model_range(x[:, 0]).round().numpy(), digits.images)
    np.testing.assert_array_equal(y.numpy(), digits.target)


def test_data_splits_are_fixed_and_disjoint():
    x_all, y_all = load_digits_data("all")
    x_train, y_train = load_digits_data("train")
    x_test, y_test = load_digits_data("test")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.float32
    assert y_all.dtype == torch.int64
    assert len(y_train) == 1437 and len(y_test) == 360
    assert torch.equal(x_test, x_all[::5]) and torch.equal(y_test, y_all[::5])
    is_test = torch.arange(1797) % 5 == 0
    assert torch.equal(x_train, x_all[~is_test])
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    with pytest.raises(ValueError):
        load_digits_data("valid")


def test_pixel_mapping_round_trip():
    values = torch.arange(17)
    x = to_model_range(values)
    assert x[0] == -1.0 and x[8] == 0.0 and x[16] == 1.0
    assert torch.equal(from_model_range(x), values.float())


# --- shipped models ---------------------------------------------------------------------


def test_shipped_weights_load(pipe, classifier):
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    config = digits_unet_config()
    for key, value in config.items():
        got = pipe.unet.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    weights = PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    assert not pipe.unet.training and not classifier.training
    assert load_file(weights).keys() == pipe.unet.state_dict().keys()


def test_classifier_test_accuracy(classifier):
    assert classifier_accuracy(classifier, *load_digits_data("test")) >= 0.97
    assert classifier.features(torch.zeros(3, 1, 8, 8)).shape == (3, 64)


def test_guided_samples_are_the_requested_digits(guided_samples, classifier):
    labels, samples = guided_samples
    assert samples.shape == (200, 1, 8, 8)
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    assert classifier_accuracy(classifier, samples, labels) >= 0.90


def test_guided_samples_digits_fd(guided_samples, classifier):
    real, _ = load_digits_data("all")
    fd = digits_fd(guided_samples[1], real, classifier)
    assert math.isfinite(fd) and 0.0 < fd < FD_BOUND


def test_pipeline_output_types(pipe):
    pil = pipe([3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image)  # PIL by default, like diffusers pipelines
    pt = pipe([3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(np.asarray(pil[1]), np.round((pt[1, 0].numpy() + 1) / 2 * 255).astype(np.uint8))
    arr = pipe(5, num_inference_steps=3, output_type="np").images
    assert arr.shape == (1, 8, 8, 1) and arr.min() >= 0.0 and arr.max() <= 1.0
    pil = pipe(torch.tensor([1, 2]), num_inference_steps=3, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    (images,) = pipe([0], num_inference_steps=3, output_type="pt", return_dict=False)
    assert images.shape == (1, 1, 8, 8)
    for bad in (dict(class_labels=[11]), dict(class_labels=[-1]), dict(class_labels=[])):
        with pytest.raises(ValueError):
            pipe(**bad, num_inference_steps=2)
    with pytest.raises(ValueError):
        pipe([1], num_inference_steps=2, output_type="jpg")


@pytest.mark.parametrize(
    "scheduler_cls",
    [DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler],
)
def test_pipeline_works_with_any_scheduler(pipe, scheduler_cls):
    other = load_digits_pipeline(scheduler=scheduler_cls)
    other.set_progress_bar_config(disable=True)
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    guided = other([0, 1, 2, 10], num_inference_steps=4, latents=latents, output_type="pt").images
    again = other([0, 1, 2, 10], num_inference_steps=4, latents=latents, output_type="pt").images
    plain = other([0, 1, 2, 10], guidance_scale=1.0, num_inference_steps=4, latents=latents, output_type="pt").images
    assert torch.isfinite(guided).all() and torch.equal(guided, again)
    assert not torch.allclose(guided, plain)


# --- training commands ------------------------------------------------------------------


def _train(out, steps, *extra):
    args = ["--out", str(out), "--steps", str(steps), "--batch-size", "4", "--warmup", "2"]
    main(["train", *args, "--checkpoint-every", "1", *extra])


def test_train_command_resumes_exactly(tmp_path):
    _train(tmp_path / "resumed", 2)
    first = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert first["step"] == 2
    _train(tmp_path / "resumed", 4)  # picks up at step 2
    _train(tmp_path / "straight", 4)
    resumed = load_file(tmp_path / "resumed/pipeline/unet/diffusion_pytorch_model.safetensors")
    straight = load_file(tmp_path / "straight/pipeline/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not torch.equal(resumed["conv_in.weight"], first["ema"]["conv_in.weight"])
    trained = load_digits_pipeline(path=tmp_path / "resumed" / "pipeline")
    assert trained.unet.config.num_class_embeds == 11
    with pytest.raises(ValueError, match="different"):
        _train(tmp_path / "resumed", 5, "--seed", "1")


def test_train_classifier_command(tmp_path):
    out = tmp_path / "clf.safetensors"
    main(["train-classifier", "--out", str(out), "--steps", "3", "--batch-size", "8"])
    model = load_digits_classifier(out)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
