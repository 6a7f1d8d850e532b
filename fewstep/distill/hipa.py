"""HiPA: one-step generation with high-frequency-promoting low-rank adapters (first slice).

Zhang & Hooi. HiPA: Enabling One-Step Text-to-Image Diffusion Models via High-Frequency-Promoting
Adaptation. arXiv 2311.18158.

The student is the frozen base network with peft LoRA adapters, called ONCE at the first
timestep from pure noise; its x0 prediction is the sample. It is trained to match a multi-step
teacher's sample for the same noise and condition with a spatial term (MSE, plus features of a
given frozen network) and a high-frequency term (Fourier high-pass and Sobel/Laplacian edges).

- :class:`HiPAConfig`: adapter placement/rank and the loss weights.
- :func:`add_hipa_lora` / :func:`one_step_sample` / :func:`hipa_loss`: the student and its loss.
- :func:`digits_teacher_data` / :func:`train_hipa`: teacher triples and a small training loop
  (the built-in digits model; not yet the accelerate trainer of :mod:`fewstep.distill.train`).
- :func:`save_hipa_lora`: a diffusers-format ``pytorch_lora_weights.safetensors`` that
  ``pipe.load_lora_weights(path)`` reads; sample it with ``fewstep.OneStepScheduler``
  (defined in :mod:`fewstep.samplers.scheduler`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._extras import import_optional
from ..samplers.scheduler import FewstepScheduler

ADAPTER_NAME = "hipa"
# diffusers' attention projections (Attention.to_q/to_k/to_v/to_out[0]), in UNets and DiTs alike.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# ResNet block convolutions (diffusers' ResnetBlock2D), the optional wider placement.
RESNET_TARGETS = ("conv1", "conv2")
EDGE_OPERATORS = ("sobel", "laplacian")
TRAINABLE = ("lora", "full")


@dataclass
class HiPAConfig:
    """Adapter placement and loss weights of a HiPA student.

    Args:
        rank: LoRA rank.
        alpha: LoRA alpha (scale ``alpha / rank``); None means ``rank`` (scale 1).
        include_resnets: Also adapt the ResNet convolutions (``conv1``/``conv2``), not only
            the attention projections.
        mse_weight: Weight of the pixel (or latent) MSE.
        feature_weight: Weight of the feature MSE through ``feature_net`` (0 disables it).
        fourier_weight: Weight of the Fourier high-pass MSE (0 disables it).
        edge_weight: Weight of the edge-map MSE (0 disables it).
        cutoff: High-pass radius as a fraction of the Nyquist frequency, in [0, 1).
        edge_operator: ``"sobel"`` (both gradients) or ``"laplacian"``.
        clip_sample: If set, the one-step sample is clamped to ``[-clip_sample, clip_sample]``
            before the loss, as a pipeline that clamps its output does (digits: 1.0). Why: at
            t = 999 the x0 prediction multiplies the noise-prediction error by
            ``1 / sqrt(alpha_bar)`` (157 on digits), and an unclamped loss spends the adapter
            on shrinking out-of-range pixels the pipeline clamps anyway.
    """

    rank: int = 4
    alpha: float | None = None
    include_resnets: bool = False
    mse_weight: float = 1.0
    feature_weight: float = 0.0
    fourier_weight: float = 1.0
    edge_weight: float = 1.0
    cutoff: float = 0.5
    edge_operator: str = "sobel"
    clip_sample: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive whole number, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive (or None for alpha = rank), got {self.alpha!r}")
        for name in ("mse_weight", "feature_weight", "fourier_weight", "edge_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not 0.0 <= self.cutoff < 1.0:
            raise ValueError(f"cutoff must be in [0, 1) (fraction of Nyquist), got {self.cutoff!r}")
        if self.edge_operator not in EDGE_OPERATORS:
            raise ValueError(f"edge_operator must be one of {EDGE_OPERATORS}, got {self.edge_operator!r}")
        if self.clip_sample is not None and not (isinstance(self.clip_sample, (int, float)) and self.clip_sample > 0):
            raise ValueError(f"clip_sample must be a positive number or None, got {self.clip_sample!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HiPAConfig":
        """Builds a config, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HiPA setting(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def lora_config(config: HiPAConfig):
    """The peft ``LoraConfig`` of a HiPA student (B zero-initialised: starts as the base)."""
    LoraConfig = import_optional("peft", "HiPA adapters").LoraConfig

    targets = ATTENTION_TARGETS + (RESNET_TARGETS if config.include_resnets else ())
    return LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank, init_lora_weights=True,
                      target_modules=list(targets))


def _has_hipa(model: torch.nn.Module) -> bool:
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def add_hipa_lora(model: torch.nn.Module, config: HiPAConfig) -> list[torch.nn.Parameter]:
    """Freezes ``model`` and attaches the HiPA LoRA adapter (diffusers ``add_adapter``).

    Args:
        model: A diffusers model with peft support (``UNet2DModel``, ``UNet2DConditionModel``, ...).
        config: Rank and placement.

    Returns:
        The trainable LoRA parameters.

    Raises:
        ValueError: If the model already carries a HiPA adapter.
    """
    if _has_hipa(model):
        raise ValueError(f"the model already has an adapter named {ADAPTER_NAME!r}")
    model.requires_grad_(False)
    peft_config = lora_config(config)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (UNet2DConditionModel, DiTs)
        model.add_adapter(peft_config, adapter_name=ADAPTER_NAME)
    else:  # e.g. UNet2DModel: peft directly; peft_config is what get_peft_model_state_dict reads
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
        model.peft_config = {ADAPTER_NAME: peft_config}
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def one_step_sample(model: torch.nn.Module, scheduler: FewstepScheduler, noise: torch.Tensor,
                    **model_kwargs) -> torch.Tensor:
    """The student's sample: one model call at the first timestep, its x0 prediction.

    Runs exactly what a diffusers pipeline does with ``num_inference_steps=1`` (scale the
    noise, ``scale_model_input``, one call, one ``scheduler.step``), with autograd on.

    Args:
        model: The network (with or without adapters).
        scheduler: A scheduler whose one-step grid starts at pure noise (:class:`~fewstep.samplers.scheduler.OneStepScheduler`).
        noise: Initial noise (before ``init_noise_sigma``).
        **model_kwargs: Condition passed to the network (``class_labels=...``,
            ``encoder_hidden_states=...``).

    Returns:
        The one-step sample, shaped like ``noise``.
    """
    scheduler.set_timesteps(1, device=noise.device)
    t = scheduler.timesteps[0]
    x = noise * scheduler.init_noise_sigma
    out = model(scheduler.scale_model_input(x, t), t, **model_kwargs).sample
    return scheduler.step(out, t, x).prev_sample


def _freq_radius(h: int, w: int, device) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device).abs()[:, None]
    fx = torch.fft.fftfreq(w, device=device).abs()[None, :]
    return torch.sqrt(fy**2 + fx**2) / 0.5  # 1 at the Nyquist frequency of each axis


def fourier_highpass_loss(a: torch.Tensor, b: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """MSE of ``a`` and ``b`` high-passed above ``cutoff`` x Nyquist: ortho-FFT differences, the rest zeroed."""
    mask = (_freq_radius(a.shape[-2], a.shape[-1], a.device) > cutoff).to(a.dtype)
    diff = torch.fft.fft2(a - b, norm="ortho") * mask  # linear: the spectra of both, subtracted
    return diff.abs().pow(2).mean()


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum: mean |FFT|^2 (ortho) per integer frequency radius, over images and channels."""
    h, w = images.shape[-2:]
    power = torch.fft.fft2(images.double(), norm="ortho").abs().pow(2).mean(dim=tuple(range(images.ndim - 2)))
    fy = torch.fft.fftfreq(h, d=1.0 / h).abs()[:, None]
    fx = torch.fft.fftfreq(w, d=1.0 / w).abs()[None, :]
    radius = torch.sqrt(fy**2 + fx**2).round().long().flatten()
    total = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius, power.flatten())
    return total / torch.bincount(radius).double()


def edge_maps(x: torch.Tensor, operator: str = "sobel") -> torch.Tensor:
    """Per-channel Sobel gradients ([N, 2C, H, W]) or Laplacian ([N, C, H, W]), replicate-padded."""
    if operator not in EDGE_OPERATORS:
        raise ValueError(f"operator must be one of {EDGE_OPERATORS}, got {operator!r}")
    if operator == "sobel":
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([gx, gx.T])
    else:
        kernels = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]])
    c = x.shape[1]
    weight = kernels.to(x.dtype).to(x.device)[:, None].repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=c)


def hipa_loss(student: torch.Tensor, teacher: torch.Tensor, config: HiPAConfig,
              feature_net: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """HiPA loss terms between the one-step sample and the teacher's sample.

    Args:
        student: One-step samples [N, C, H, W].
        teacher: Teacher samples, same shape.
        config: Term weights and high-frequency settings.
        feature_net: Frozen feature network for the feature term (needed if its weight > 0).

    Returns:
        ``{"total", "mse", "feature", "fourier", "edge"}``; disabled terms are zero tensors.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    zero = student.new_zeros(())
    terms = {"mse": F.mse_loss(student, teacher) if config.mse_weight else zero}
    if config.feature_weight:
        if feature_net is None:
            raise ValueError("feature_weight > 0 needs a feature_net")
        terms["feature"] = F.mse_loss(feature_net(student), feature_net(teacher))
    else:
        terms["feature"] = zero
    terms["fourier"] = fourier_highpass_loss(student, teacher, config.cutoff) if config.fourier_weight else zero
    terms["edge"] = (F.mse_loss(edge_maps(student, config.edge_operator), edge_maps(teacher, config.edge_operator))
                     if config.edge_weight else zero)
    terms["total"] = (config.mse_weight * terms["mse"] + config.feature_weight * terms["feature"]
                      + config.fourier_weight * terms["fourier"] + config.edge_weight * terms["edge"])
    return terms


@dataclass
class TeacherData:
    """(noise, condition, teacher sample) triples.

    Attributes:
        noise: Initial noise [N, C, H, W].
        labels: Class labels [N] (the condition of the digits model).
        samples: The teacher's samples [N, C, H, W].
        solver, nfe, guidance: How the samples were made.
    """

    noise: torch.Tensor
    labels: torch.Tensor
    samples: torch.Tensor
    solver: str
    nfe: int
    guidance: float


@torch.no_grad()
def digits_teacher_data(pipe, n: int, *, solver: str = "unipc", nfe: int = 10, guidance: float = 1.5,
                        seed: int = 0, batch_size: int = 256) -> TeacherData:
    """Teacher triples from a :class:`~fewstep.zoo.digits.DigitsPipeline` with any fewstep solver.

    Args:
        pipe: The digits pipeline (its UNet must not carry a HiPA adapter yet).
        n: Number of triples; labels cycle through 0-9.
        solver: Registered fewstep solver name.
        nfe: Teacher steps.
        guidance: CFG weight of the teacher.
        seed: Seed of the noise (keep it disjoint from evaluation seeds).
        batch_size: Pipeline batch.

    Returns:
        The triples (samples clamped to [-1, 1], as the pipeline returns them).
    """
    from ..zoo.digits import DigitsPipeline

    scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver)
    teacher = DigitsPipeline(unet=pipe.unet, scheduler=scheduler)
    teacher.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    labels = torch.arange(n) % 10
    samples = torch.cat([
        teacher(labels[i:i + batch_size], guidance_scale=guidance, num_inference_steps=nfe,
                latents=noise[i:i + batch_size], output_type="pt").images
        for i in range(0, n, batch_size)])
    return TeacherData(noise, labels, samples, solver, nfe, guidance)


def train_hipa(model: torch.nn.Module, scheduler: FewstepScheduler, data: TeacherData, config: HiPAConfig, *,
               steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               feature_net: Callable[[torch.Tensor], torch.Tensor] | None = None,
               progress: bool = False, trainable: str = "lora") -> list[dict[str, float]]:
    """Trains the HiPA adapter of a class-conditional model (the digits UNet) on teacher triples.

    A small single-process loop (AdamW on the LoRA parameters only); adds the adapter if the
    model has none. ``trainable="full"`` instead fine-tunes every weight of the model with the
    same loss (the full fine-tune reference; no adapter).

    Args:
        model: Class-conditional network (``class_labels=`` keyword), base weights frozen.
        scheduler: The one-step scheduler (:class:`~fewstep.samplers.scheduler.OneStepScheduler`).
        data: Teacher triples.
        config: Adapter and loss settings.
        steps: Optimiser steps.
        batch_size: Triples per step (drawn with a seeded generator).
        lr: AdamW learning rate.
        seed: Seed of the batch order.
        feature_net: Frozen feature network for the feature term.
        progress: Show a progress bar.
        trainable: ``"lora"`` (the HiPA adapter) or ``"full"`` (all weights, no adapter).

    Returns:
        One dict of loss terms (floats) per step.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "full":
        if _has_hipa(model):
            raise ValueError("trainable='full' fine-tunes the model itself; it already carries a HiPA adapter")
        params = list(model.requires_grad_(True).parameters())
    else:
        if not _has_hipa(model):
            add_hipa_lora(model, config)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), disable=not progress, desc="hipa"):
        idx = torch.randint(len(data.noise), (min(batch_size, len(data.noise)),), generator=gen)
        sample = one_step_sample(model, scheduler, data.noise[idx], class_labels=data.labels[idx])
        if config.clip_sample is not None:
            sample = sample.clamp(-config.clip_sample, config.clip_sample)
        terms = hipa_loss(sample, data.samples[idx], config, feature_net)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    model.eval()
    return history


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(LoRA parameters, base parameters) of an adapted model."""
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return lora, sum(p.numel() for p in model.parameters()) - lora


def _lora_component(pipeline_cls) -> str:
    """``"unet"`` or ``"transformer"``: the denoiser keyword of the pipeline class's ``save_lora_weights``."""
    import inspect

    params = inspect.signature(getattr(pipeline_cls, "save_lora_weights", None) or (lambda: None)).parameters
    for component in ("unet", "transformer"):
        if f"{component}_lora_layers" in params:
            return component
    raise ValueError(f"{getattr(pipeline_cls, '__name__', pipeline_cls)!r} has no save_lora_weights taking "
                     "unet_lora_layers or transformer_lora_layers")


def save_hipa_lora(model: torch.nn.Module, directory: str | os.PathLike, pipeline_cls=None) -> str:
    """Writes the HiPA adapter as diffusers' ``pytorch_lora_weights.safetensors``.

    Args:
        model: The adapted UNet.
        directory: Output folder.
        pipeline_cls: A diffusers pipeline class whose ``save_lora_weights`` takes
            ``unet_lora_layers`` (default ``StableDiffusionPipeline``; SDXL's works too) or
            ``transformer_lora_layers`` (``StableDiffusion3Pipeline`` and other DiT pipelines).

    Returns:
        The path of the written file; ``pipe.load_lora_weights(directory)`` reads it (the
        LoRA config, alpha included, travels as the file's adapter metadata).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not _has_hipa(model):
        raise ValueError(f"the model has no {ADAPTER_NAME!r} adapter to save")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    component = _lora_component(pipeline_cls)
    pipeline_cls.save_lora_weights(directory, safe_serialization=True, **{
        f"{component}_lora_layers": state,
        f"{component}_lora_adapter_metadata": model.peft_config[ADAPTER_NAME].to_dict()})
    return os.path.join(os.fspath(directory), "pytorch_lora_weights.safetensors")
