"""HiPA one-step LoRA adapters (fewstep.distill.hipa): student, losses, diffusers export."""

import pytest
import torch

pytest.importorskip("peft")

from fewstep import OneStepScheduler  # noqa: E402
from fewstep.distill.hipa import (  # noqa: E402
    HiPAConfig,
    add_hipa_lora,
    digits_teacher_data,
    edge_maps,
    radial_power_spectrum,
    fourier_highpass_loss,
    hipa_loss,
    one_step_sample,
    save_hipa_lora,
    train_hipa,
    trainable_share,
)


@pytest.fixture(scope="module")
def tiny_sd():
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline()
    pipe.scheduler = OneStepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)


def test_one_step_scheduler_starts_at_pure_noise_and_returns_x0(tiny_sd):
    sched = tiny_sd.scheduler
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]  # SD's own "leading" spacing would give t = 1
    x, eps = _inputs()[0], torch.randn(2, 4, 8, 8)
    a = sched.alphas_cumprod[999].double()
    x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    # float32 step vs float64 formula: rounding only
    torch.testing.assert_close(sched.step(eps, sched.timesteps[0], x).prev_sample.double(), x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        sched.set_timesteps(2)


def test_zero_lora_reproduces_base_exactly(tiny_sd):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    unet = build_tiny_sd_pipeline().unet
    x, emb = _inputs()
    with torch.no_grad():
        base = one_step_sample(unet, tiny_sd.scheduler, x, encoder_hidden_states=emb)
        params = add_hipa_lora(unet, HiPAConfig(rank=2, include_resnets=True))
        adapted = one_step_sample(unet, tiny_sd.scheduler, x, encoder_hidden_states=emb)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    # Same base kernels on the same batch; B = 0 adds an exact zero.
    assert torch.equal(base, adapted)
    lora, total = trainable_share(unet)
    assert 0 < lora < total


@pytest.mark.parametrize("include_resnets", [False, True])
def test_exported_lora_loads_into_stock_pipeline_and_unloads(tiny_sd, tmp_path, include_resnets):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    student = build_tiny_sd_pipeline().unet
    x, emb = _inputs(1)
    with torch.no_grad():
        base = one_step_sample(student, tiny_sd.scheduler, x, encoder_hidden_states=emb)
        add_hipa_lora(student, HiPAConfig(rank=2, alpha=4, include_resnets=include_resnets))
        g = torch.Generator().manual_seed(3)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        sample = one_step_sample(student, tiny_sd.scheduler, x, encoder_hidden_states=emb)
    assert not torch.allclose(sample, base)
    path = save_hipa_lora(student, tmp_path)
    assert path.endswith("pytorch_lora_weights.safetensors")

    tiny_sd.load_lora_weights(tmp_path)
    try:
        out = tiny_sd(prompt_embeds=emb, num_inference_steps=1, guidance_scale=1.0, latents=x,
                      output_type="latent").images
    finally:
        tiny_sd.unload_lora_weights()
    # The pipeline runs the same peft layers, kernels and batch as the student: bitwise.
    assert torch.equal(out, sample)
    restored = tiny_sd(prompt_embeds=emb, num_inference_steps=1, guidance_scale=1.0, latents=x,
                       output_type="latent").images
    assert torch.equal(restored, base)


def test_high_frequency_terms_zero_for_identical_positive_for_blur():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 1, 8, 8, generator=g)
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    cfg = HiPAConfig(mse_weight=0.0)
    assert fourier_highpass_loss(img, img.clone()).item() == 0.0
    assert fourier_highpass_loss(blur, img).item() > 0.0
    for op in ("sobel", "laplacian"):
        assert torch.equal(edge_maps(img, op), edge_maps(img.clone(), op))
        assert not torch.equal(edge_maps(blur, op), edge_maps(img, op))
    assert hipa_loss(img, img.clone(), cfg)["total"].item() == 0.0
    terms = hipa_loss(blur, img, cfg)
    assert terms["fourier"].item() > 0.0 and terms["edge"].item() > 0.0 and terms["mse"].item() == 0.0
    # A constant image has no high frequencies and no edges.
    flat = torch.full_like(img, 0.3)
    assert fourier_highpass_loss(flat, torch.zeros_like(img)).item() == pytest.approx(0.0, abs=1e-12)
    assert edge_maps(flat).abs().max().item() == 0.0
    spec = radial_power_spectrum(flat)
    assert spec[0].item() == pytest.approx(0.09 * 64) and spec[1:].abs().max().item() < 1e-20
    # Blurring removes power at the highest radius.
    assert radial_power_spectrum(blur)[-1] < radial_power_spectrum(img)[-1]


@pytest.mark.parametrize("cutoff", [0.0, 0.5, 0.9])
def test_fourier_term_is_the_mse_of_the_high_passed_images(cutoff):
    # The guide's definition (Parseval, ortho FFT), checked against a high-pass done by hand: keep
    # the coefficients whose radius (fraction of Nyquist, per axis) exceeds the cutoff, invert.
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    fy, fx = torch.fft.fftfreq(8, dtype=torch.float64) / 0.5, torch.fft.fftfreq(6, dtype=torch.float64) / 0.5
    keep = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff

    def high_pass(x):
        return torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * keep, norm="ortho").real

    expected = (high_pass(a) - high_pass(b)).pow(2).mean()
    torch.testing.assert_close(fourier_highpass_loss(a, b, cutoff), expected, rtol=1e-12, atol=0)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="rank"):
        HiPAConfig(rank=0)
    with pytest.raises(ValueError, match="cutoff"):
        HiPAConfig(cutoff=1.5)
    with pytest.raises(ValueError, match="edge_operator"):
        HiPAConfig(edge_operator="canny")
    with pytest.raises(ValueError, match="clip_sample"):
        HiPAConfig(clip_sample=0)
    with pytest.raises(ValueError, match="bogus"):
        HiPAConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="no 'hipa' adapter"):
        save_hipa_lora(torch.nn.Linear(2, 2), "unused")
    with pytest.raises(ValueError, match="feature_net"):
        hipa_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), HiPAConfig(feature_weight=1.0))


def test_few_training_steps_on_digits_reduce_the_loss():
    from fewstep.zoo.digits import load_digits_classifier, load_digits_pipeline

    pipe = load_digits_pipeline()
    data = digits_teacher_data(pipe, 64, solver="unipc", nfe=4, guidance=1.5, seed=123)
    assert data.samples.shape == data.noise.shape == (64, 1, 8, 8)
    sched = OneStepScheduler.from_config(pipe.scheduler.config)
    classifier = load_digits_classifier()
    cfg = HiPAConfig(rank=4, feature_weight=0.1, clip_sample=1.0)
    eval_cfg = HiPAConfig(feature_weight=0.0)

    def full_loss():
        with torch.no_grad():
            s = one_step_sample(pipe.unet, sched, data.noise, class_labels=data.labels).clamp(-1, 1)
            return hipa_loss(s, data.samples, eval_cfg)["total"].item()

    before = full_loss()
    history = train_hipa(pipe.unet, sched, data, cfg, steps=15, batch_size=32, lr=3e-3,
                         feature_net=classifier.features)
    assert len(history) == 15 and all(h["feature"] > 0 for h in history)
    after = full_loss()
    assert after < 0.9 * before, (before, after)
