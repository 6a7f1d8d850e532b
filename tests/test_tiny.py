"""Tests for the tiny random-weight pipelines in fewstep.zoo.tiny."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from fewstep.zoo import tiny  # noqa: E402

PROMPT = "a photo of a cat"
STEPS = 2
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a small shared box
    # OpenMP workers spinning against other processes made each call ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny.build_tiny_sd_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny.build_tiny_sd3_pipeline(path, seed=0)
    return path


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import time, so also flip the
    # already-imported constant that its is_offline_mode() consults.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _generate(pipe, **kwargs):
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _assert_images(images, batch=1, size=SIZE):
    assert images.shape == (batch, 3, size, size)
    assert torch.isfinite(images).all()


def _state(pipe):
    return {
        f"{name}.{key}": value
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


def test_tokenizer_round_trip(tmp_path):
    tokenizer = tiny.write_clip_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert len(tokenizer) < 1000
    assert tokenizer.model_max_length == 77

    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    # Merges are applied ("cat</w>" is one token) and words end in </w>.
    assert "cat</w>" in tokenizer.convert_ids_to_tokens(ids)

    # Uppercase is folded; any byte is representable, so nothing maps to <unk>.
    ids = tokenizer("Café №5!").input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "café № 5 !"

    padded = tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert padded[:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_sd_reload_and_sample(sd_dir, offline):
    assert list(sd_dir.glob("unet/*.safetensors")) and not list(sd_dir.rglob("*.bin"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.clip_sample is False  # kept for DDIM-style swaps
    assert pipe.tokenizer(PROMPT).input_ids == tiny.write_clip_tokenizer(sd_dir / "tok")(PROMPT).input_ids

    images = _generate(pipe, guidance_scale=1.0)
    _assert_images(images)
    torch.testing.assert_close(_generate(pipe, guidance_scale=1.0), images)

    # Classifier-free guidance: negative prompt, two images per prompt, default 64x64.
    cfg = _generate(
        pipe, guidance_scale=7.5, negative_prompt="blurry", num_images_per_prompt=2, height=None, width=None
    )
    _assert_images(cfg, batch=2, size=64)


def test_sd3_reload_and_sample(sd3_dir, offline):
    index = json.loads((sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    # Diffusers will not reload a folder with a None component unless told.
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.patch_size == 2

    _assert_images(_generate(pipe, guidance_scale=1.0))
    _assert_images(_generate(pipe, guidance_scale=4.0, height=48, width=48), size=48)

    # User sigmas reach the scheduler, which applies its static shift (3.0) to them.
    _assert_images(_generate(pipe, guidance_scale=1.0, sigmas=[1.0, 0.5]))
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, 0.75, 0.0]))


def test_load_tiny_pipeline(sd_dir, sd3_dir, offline):
    assert isinstance(tiny.load_tiny_pipeline(sd_dir), diffusers.StableDiffusionPipeline)
    assert isinstance(tiny.load_tiny_pipeline(sd3_dir), diffusers.StableDiffusion3Pipeline)


def test_sd3_dynamic_shifting():
    pipe = tiny.build_tiny_sd3_pipeline(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        pipe.scheduler.set_timesteps(STEPS)
    # So a successful call proves the pipeline computed and passed mu.
    _assert_images(_generate(pipe, guidance_scale=1.0))


@pytest.mark.parametrize("build", [tiny.build_tiny_sd_pipeline, tiny.build_tiny_sd3_pipeline])
def test_deterministic_weights(build, sd_dir, sd3_dir):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first = _state(build(seed=0))
    torch.testing.assert_close(torch.rand(3), expected)  # caller's RNG stream untouched

    assert first.keys() == _state(build(seed=0)).keys()
    for key, value in _state(build(seed=0)).items():
        assert torch.equal(first[key], value), key
    assert any(not torch.equal(first[k], v) for k, v in _state(build(seed=1)).items())

    # The saved-and-reloaded copy is bit-identical too.
    saved = tiny.load_tiny_pipeline(sd_dir if build is tiny.build_tiny_sd_pipeline else sd3_dir)
    for key, value in _state(saved).items():
        assert torch.equal(first[key], value), key


def test_cli(tmp_path, capsys):
    out = tmp_path / "sd3"
    assert tiny.main(["sd3", str(out), "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("build", [tiny.build_tiny_sdxl_pipeline, tiny.build_tiny_dit_pipeline])
def test_sdxl_and_dit_builders_are_deterministic_and_reload(build, tmp_path, offline):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first = _state(build(tmp_path / "pipe", seed=0))
    torch.testing.assert_close(torch.rand(3), expected)  # caller's RNG stream untouched
    for key, value in _state(tiny.load_tiny_pipeline(tmp_path / "pipe")).items():
        assert torch.equal(first[key], value), key
    assert any(not torch.equal(first[k], v) for k, v in _state(build(seed=1)).items())
    pipe = tiny.load_tiny_pipeline(tmp_path / "pipe")
    if build is tiny.build_tiny_dit_pipeline:
        assert pipe.transformer.config.out_channels == 8  # learned variance, as DiT-XL/2
        images = pipe([1, 999], guidance_scale=4.0, num_inference_steps=2, output_type="np").images
        assert images.shape == (2, 64, 64, 3)
    else:
        assert pipe.unet.config.addition_embed_type == "text_time"
        _assert_images(_generate(pipe, guidance_scale=4.0, height=32, width=32), size=32)
