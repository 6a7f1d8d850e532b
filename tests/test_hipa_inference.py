"""One-step inference of HiPA students: fewstep.OneStepScheduler, fewstep.sample(nfe=1), SD3 LoRA export."""

import pytest
import torch

pytest.importorskip("peft")

import fewstep  # noqa: E402
from fewstep.distill.hipa import (  # noqa: E402
    HiPAConfig,
    add_hipa_lora,
    digits_teacher_data,
    one_step_sample,
    save_hipa_lora,
    train_hipa,
)
from fewstep.samplers.scheduler import FewstepScheduler, OneStepScheduler  # noqa: E402


def _popular_configs():
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
    )

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "sd15-pndm-eps": PNDMScheduler(**sd, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1).config,
        "sdxl-euler-eps": EulerDiscreteScheduler(**sd, timestep_spacing="leading", steps_offset=1).config,
        "sd2-ddim-vpred": DDIMScheduler(**sd, prediction_type="v_prediction", set_alpha_to_one=False).config,
        "dpm-karras-eps": DPMSolverMultistepScheduler(**sd, use_karras_sigmas=True).config,
        "sd3-flow-shift3": FlowMatchEulerDiscreteScheduler(shift=3.0).config,
    }


def test_one_step_scheduler_is_one_class_exported_at_top_level():
    assert fewstep.OneStepScheduler is OneStepScheduler
    assert issubclass(OneStepScheduler, FewstepScheduler) and OneStepScheduler.default_solver == "ddim"
    assert "OneStepScheduler" in dir(fewstep)


@pytest.mark.parametrize("name", list(_popular_configs()))
def test_one_step_scheduler_from_popular_configs_returns_x0_at_pure_noise(name):
    config = _popular_configs()[name]
    sched = OneStepScheduler.from_config(config)
    sched.set_timesteps(1)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[0]
    x64, out64 = x.double(), out.double()
    prediction = sched.config.prediction_type
    if name.startswith("sd3"):
        assert t.item() == 1000.0 and sched.sigmas[0].item() == 1.0  # sigma 1 = pure noise, whatever the shift
        x0 = x64 - out64  # flow: x = (1 - s) x0 + s eps, v = eps - x0, at s = 1
    else:
        assert t.item() == config["num_train_timesteps"] - 1  # the config's own spacing would start lower
        a = sched.alphas_cumprod[-1].double()
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x0 = (x64 - sigma * out64) / alpha if prediction == "epsilon" else alpha * x64 - sigma * out64
    assert sched.init_noise_sigma == 1.0
    # float32 step vs float64 formula: rounding only (x 1/alpha = 15 for SD's epsilon).
    torch.testing.assert_close(sched.step(out, t, x).prev_sample.double(), x0, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        sched.set_timesteps(4)


@pytest.mark.parametrize("name", ["sd15-pndm-eps", "sd3-flow-shift3"])
def test_one_step_scheduler_save_pretrained_round_trip(name, tmp_path):
    sched = OneStepScheduler.from_config(_popular_configs()[name])
    sched.save_pretrained(tmp_path)
    again = OneStepScheduler.from_pretrained(tmp_path)
    drop = "_use_default_values"  # diffusers' bookkeeping of which keys were defaulted
    assert {k: v for k, v in again.config.items() if k != drop} == {k: v for k, v in sched.config.items() if k != drop}
    sched.set_timesteps(1)
    again.set_timesteps(1)
    assert torch.equal(again.timesteps, sched.timesteps)


def _digits_student(seed=0, include_resnets=False):
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    add_hipa_lora(pipe.unet, HiPAConfig(rank=2, include_resnets=include_resnets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-trivial adapter (B = 0 would be the base)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return pipe


def test_zero_lora_on_digits_unet_is_the_base():
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    x, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.arange(4)
    with torch.no_grad():
        base = pipe.unet(x, 999, class_labels=labels).sample
        add_hipa_lora(pipe.unet, HiPAConfig(rank=2, include_resnets=True))  # peft's inject path (UNet2DModel)
        assert any("lora_" in n for n, _ in pipe.unet.named_parameters())
        adapted = pipe.unet(x, 999, class_labels=labels).sample
    # Each wrapped layer returns its base output bitwise (B = 0), yet this UNet's output moves in the
    # last bits once peft wraps its layers (measured 3.6e-7 here; the tiny SD UNet's stays bitwise):
    # a tolerance on the network output, far below the changes training makes.
    torch.testing.assert_close(adapted, base, atol=1e-5, rtol=0)


def test_functional_sample_at_nfe_1_is_the_students_one_call_sample():
    pipe = _digits_student(include_resnets=True)
    unet, sched = pipe.unet, OneStepScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4)
    calls = []

    def model(x, t, c):
        calls.append(t)
        return unet(x, t, class_labels=c).sample

    with torch.no_grad():
        student = one_step_sample(unet, sched, x, class_labels=labels)
        functional = fewstep.sample(model, x, nfe=1, cond=labels)
        with _disabled(unet):
            without = fewstep.sample(model, x, nfe=1, cond=labels)
    assert len(calls) == 2 and calls[0].tolist() == [999] * 4
    # Same network call and batch, the same x0 coefficients from the same plan code: bitwise.
    assert torch.equal(functional, student)
    assert not torch.allclose(without, student)  # the adapters were on


@pytest.mark.parametrize("solver", ["ddim", "unipc", "dpmpp", "dc"])
@pytest.mark.parametrize("spacing", [None, "linspace", "leading", "trailing", "logsnr", "karras"])
def test_sample_at_nfe_1_calls_the_model_at_pure_noise_or_refuses(solver, spacing):
    # diffusers' DDIM linspace/leading one-step grids are t = 0 (multistep leading: t = 500): from
    # pure noise that "sample" is garbage, so fewstep.sample refuses it, naming the fix.
    x, calls = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    try:
        out = fewstep.sample(model, x, solver=solver, nfe=1, spacing=spacing)
    except ValueError as e:
        assert "nfe=1" in str(e) and "spacing='trailing'" in str(e) and "not at pure noise (t=999)" in str(e)
        assert not calls
        return
    assert [c.tolist() for c in calls] == [[999.0, 999.0]]
    alpha = fewstep.make_schedule("linear").alphas_cumprod[-1].sqrt().float()
    torch.testing.assert_close(out, x / alpha)  # the x0 prediction of eps = 0 at t = 999


def test_one_step_scheduler_starts_at_pure_noise_by_default_and_refuses_other_spacings():
    default = OneStepScheduler()  # the plain constructor too, not only from_config
    default.set_timesteps(1)
    assert default.config.timestep_spacing == "trailing" and default.timesteps.tolist() == [999]
    for spacing, t in (("leading", 0), ("linspace", 0)):
        for sched in (OneStepScheduler(timestep_spacing=spacing),
                      OneStepScheduler.from_config(default.config, timestep_spacing=spacing)):
            with pytest.raises(ValueError, match=f"timestep_spacing='{spacing}' calls the model only at t={t}, not "
                                                 r"at pure noise \(t=999\).*use timestep_spacing='trailing'"):
                sched.set_timesteps(1)
            assert sched.grid is None and sched.plan is None  # a failed call leaves no half-built state
    explicit = OneStepScheduler(timestep_spacing="leading")
    explicit.set_timesteps(1, timesteps=[999])  # an explicit grid is the caller's
    assert explicit.timesteps.tolist() == [999]


class _disabled:
    """Turns peft-injected adapters off for a block (UNet2DModel has no diffusers adapter methods)."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


def test_exported_transformer_lora_loads_into_stock_sd3_pipeline_and_unloads(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from fewstep.zoo.tiny import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline()
    pipe.scheduler = OneStepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    student = build_tiny_sd3_pipeline().transformer
    cfg = student.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    emb = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)

    def student_sample():
        sched = OneStepScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(1)
        t = sched.timesteps[0]
        out = student(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=emb,
                      pooled_projections=pooled).sample
        return sched.step(out, t, x).prev_sample

    def pipeline_sample():
        return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=1, guidance_scale=1.0,
                    latents=x, height=64, width=64, output_type="latent").images

    with torch.no_grad():
        base = student_sample()
        pipe_base = pipeline_sample()
        weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        add_hipa_lora(student, HiPAConfig(rank=2, alpha=4))
        # B = 0 adds exact zeros: bitwise on AVX-512, last-bit moves with MKL's AVX2 kernels (as below).
        torch.testing.assert_close(student_sample(), base, atol=1e-5, rtol=0)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        sample = student_sample()
        assert not torch.allclose(sample, base)
        save_hipa_lora(student, tmp_path, pipeline_cls=StableDiffusion3Pipeline)
        pipe.load_lora_weights(tmp_path)
        try:
            out = pipeline_sample()
        finally:
            pipe.unload_lora_weights()
        restored = pipeline_sample()
    # The pipeline runs the same peft layers, kernels and batch as the student: bitwise.
    assert torch.equal(out, sample)
    assert torch.equal(pipe_base, base)
    # Unloading restores the weights bitwise; the output can still move in the last bit, since the
    # re-created layers sit at other addresses and MKL's AVX2 kernels depend on alignment.
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert set(weights) == set(pipe.transformer.state_dict())
    torch.testing.assert_close(restored, pipe_base, atol=1e-5, rtol=0)


def test_save_names_a_pipeline_class_without_a_denoiser_lora_keyword(tmp_path):
    pipe = _digits_student()
    with pytest.raises(ValueError, match="unet_lora_layers or transformer_lora_layers"):
        save_hipa_lora(pipe.unet, tmp_path, pipeline_cls=object)


def test_full_fine_tune_trains_every_weight_and_no_adapter():
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    data = digits_teacher_data(pipe, 16, solver="unipc", nfe=2, guidance=1.5, seed=123)
    sched = OneStepScheduler.from_config(pipe.scheduler.config)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    history = train_hipa(pipe.unet, sched, data, HiPAConfig(clip_sample=1.0), steps=2, batch_size=8, lr=1e-4,
                         trainable="full")
    assert len(history) == 2 and not getattr(pipe.unet, "peft_config", None)
    after = dict(pipe.unet.named_parameters())
    assert set(after) == set(before)  # no LoRA weights were added
    assert all(p.requires_grad for p in after.values())
    changed = sum(not torch.equal(before[n], p) for n, p in after.items())
    assert changed > 0.9 * len(before), (changed, len(before))  # AdamW moves every weight with a gradient
    with pytest.raises(ValueError, match="trainable must be one of"):
        train_hipa(pipe.unet, sched, data, HiPAConfig(), steps=1, trainable="all")
    student = _digits_student()
    with pytest.raises(ValueError, match="already carries a HiPA adapter"):
        train_hipa(student.unet, sched, data, HiPAConfig(), steps=1, trainable="full")
