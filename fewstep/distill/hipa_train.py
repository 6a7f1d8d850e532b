"""HiPA as a method of the accelerate trainer: ``fewstep distill train`` with ``method: hipa``.

Zhang & Hooi. HiPA: Enabling One-Step Text-to-Image Diffusion Models via High-Frequency-Promoting
Adaptation. arXiv 2311.18158.

The run is :func:`fewstep.distill.train.train` (config, lock, checkpoints, bit-identical resume,
mixed precision, progress bar, validation samples); this module supplies what differs from AGD:

- :class:`HiPASettings`: the ``hipa:`` section of ``configs/distill/*.yaml``.
- Teacher data: the trajectory store with ``record="final"`` (one (unit noise, condition,
  final sample) row per CFG trajectory of ``teacher_scheduler`` at ``trajectory_steps`` NFE).
- :class:`HiPATraining`: the student (peft LoRA on the frozen base, one call at the first
  timestep, x0 = sample; with ``guidance_range`` also AGD's guidance adapters, so the student
  takes ``w``), the loss of :func:`~fewstep.distill.hipa.hipa_loss`, validation samples, and
  the export of ``<output_dir>/lora/pytorch_lora_weights.safetensors`` (+ ``<output_dir>/adapters``
  with a guidance range).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..samplers.scheduler import OneStepScheduler
from .hipa import ATTENTION_TARGETS, RESNET_TARGETS, HiPAConfig, add_hipa_lora, hipa_loss, save_hipa_lora

if TYPE_CHECKING:  # train.py imports this module
    from .settings import DistillConfig
    from .trajectories import Teacher

__all__ = ["HiPATraining", "HiPAStudent", "check_student_model", "load_hipa_lora", "LORA_FOLDER"]

LORA_FOLDER = "lora"
# The export writes diffusers' UNet LoRA format (save_lora_weights(unet_lora_layers=...)).
_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def check_student_model(denoiser: nn.Module, scheduler_config: Mapping[str, Any]) -> None:
    """Refuses a base HiPA cannot train and export (a transformer, or a flow-matching schedule).

    Raises:
        ValueError: Naming the model class or the schedule.
    """
    from fewstep.samplers.diffusers_config import is_flow_config

    name = type(denoiser).__name__
    if name not in _UNETS:
        raise ValueError(f"method=hipa supports UNet pipelines (digits, Stable Diffusion, SDXL); got a {name} "
                         "(the diffusers LoRA export is written for UNets)")
    if is_flow_config(dict(scheduler_config)):
        raise ValueError("method=hipa needs a VP (betas) noise schedule: its one-step sampler is DDIM's x0 "
                         "prediction at t = 999")


def _own(key: str) -> bool:
    return key.startswith("adapters.") or "lora_" in key


class HiPAStudent(nn.Module):
    """The one-step student: the adapted base called once at the first timestep; its x0 prediction.

    ``state_dict`` / ``load_state_dict`` cover the trainable part only (LoRA weights and the
    guidance adapters), so checkpoints hold no copy of the frozen base.

    Args:
        teacher: The base network with its conditions (the LoRA is already on its denoiser).
        scheduler: A :class:`~fewstep.samplers.scheduler.OneStepScheduler` of the model's schedule.
        adapters: AGD guidance adapters on the same base, or None (fixed guidance).
    """

    def __init__(self, teacher: "Teacher", scheduler: OneStepScheduler, adapters: nn.Module | None = None) -> None:
        super().__init__()
        self.network = teacher.denoiser
        self.adapters = adapters
        self.__dict__["_teacher"], self.__dict__["_scheduler"] = teacher, scheduler

    def forward(self, noise: torch.Tensor, cond: Mapping[str, Any], w: torch.Tensor | None = None) -> torch.Tensor:
        """One-step samples from unit ``noise`` [B, C, H, W], conditions and (with adapters) scales ``w`` [B]."""
        scheduler = self._scheduler
        scheduler.set_timesteps(1, device=noise.device)
        t = scheduler.timesteps[0]
        x = noise.float() * scheduler.init_noise_sigma
        dtype = next(self.network.parameters()).dtype
        extra = {} if self.adapters is None else {"guidance_scale": w}
        out = self._teacher(scheduler.scale_model_input(x, t).to(dtype), t.expand(len(x)), cond,
                            module=self.network if self.adapters is None else self.adapters, **extra)
        return scheduler.step(out.float(), t, x).prev_sample

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        own = OrderedDict((k, v) for k, v in state.items() if _own(k[len(prefix):]))
        if destination is None:
            return own
        destination.update(own)
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if strict:
            expected, given = set(self.state_dict()), set(state_dict)
            if expected != given:
                raise ValueError(f"HiPA student state: missing {sorted(expected - given)[:3]}, "
                                 f"unexpected {sorted(given - expected)[:3]}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        # The frozen base is not part of the state: its keys are not missing.
        return type(result)([k for k in result.missing_keys if _own(k)], result.unexpected_keys)


class HiPATraining:
    """HiPA's part of a :func:`~fewstep.distill.train.train` run (``method: hipa``).

    Attaches the LoRA (float32 weights whatever the base's dtype) and, with ``guidance_range``,
    AGD's guidance adapters; seeded by the run's ``set_seed``.

    Args:
        cfg: The run's settings.
        teacher: The frozen base and its conditions.
        scheduler_config: The model's scheduler config (for the one-step scheduler).
    """

    title = "HiPA"

    def __init__(self, cfg: "DistillConfig", teacher: "Teacher", scheduler_config: Any) -> None:
        from .adapters import GuidanceAdapters

        self.cfg, self.teacher, self.settings = cfg, teacher, cfg.hipa
        self.loss_config: HiPAConfig = cfg.hipa
        denoiser = teacher.denoiser
        check_student_model(denoiser, scheduler_config)
        self.lora = add_hipa_lora(denoiser, self.loss_config)
        for p in self.lora:
            p.data = p.data.float()  # trainable weights stay float32 (autocast lowers the compute only)
        self.adapters = None
        if cfg.hipa.guidance_range is not None:
            self.adapters = GuidanceAdapters(denoiser, cfg.adapter_config())
            for p in self.lora:  # attaching the adapters froze the whole base, LoRA included
                p.requires_grad_(True)
        scheduler = OneStepScheduler.from_config(dict(scheduler_config))
        self.module = HiPAStudent(teacher, scheduler, self.adapters)
        self.groups = [{"params": self.lora, "weight_decay": cfg.weight_decay}]  # LoRA A/B: all matrices
        if self.adapters is not None:
            self.groups += self.adapters.parameter_groups(cfg.weight_decay)
        self.feature_net = None
        if self.loss_config.feature_weight:
            from fewstep.zoo.digits import load_digits_classifier

            classifier = load_digits_classifier().to(next(denoiser.parameters()).device).eval()
            classifier.requires_grad_(False)
            self.feature_net = classifier.features

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        c = self.loss_config.clip_sample
        return x if c is None else x.clamp(-c, c)

    def loss(self, runner: nn.Module, batch: dict[str, torch.Tensor], accelerator: Any) -> torch.Tensor:
        """:func:`~fewstep.distill.hipa.hipa_loss` between the one-step sample and the teacher's sample."""
        cond = self.teacher.condition(batch["cond"])
        with accelerator.autocast():
            sample = runner(batch["x"], cond, batch["w"])
        student, target = self._clip(sample.float()), self._clip(batch["target"].float())
        return hipa_loss(student, target, self.loss_config, self.feature_net)["total"]

    @torch.no_grad()
    def validation_samples(self, runner: nn.Module, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One-step samples (unclamped, as ``output_type="latent"`` returns them) of unit noise from seed 0.

        Keys ``w<scale>``: ``validation_guidance`` with a guidance range, else the fixed ``guidance``.
        """
        param = next(self.teacher.denoiser.parameters())
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(len(index), *self.teacher.sample_shape, generator=g).to(param.device)
        cond = self.teacher.condition(index.to(param.device))
        scales = self.cfg.validation_guidance if self.adapters is not None else [self.settings.guidance]
        runner.eval()  # as a user samples (on digits train mode changes the last bits)
        try:
            return {f"w{w:g}": runner(noise, cond, torch.full((len(index),), float(w), device=param.device))
                    for w in scales}
        finally:
            runner.train()

    @staticmethod
    def export_folder(out: Path) -> Path:
        return out / LORA_FOLDER

    def export(self, out: Path) -> None:
        """``<out>/lora/pytorch_lora_weights.safetensors`` (+ the guidance adapters in ``<out>/adapters``)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from .saving import save_adapters

        denoiser = self.teacher.denoiser
        sdxl = getattr(denoiser.config, "addition_embed_type", None) == "text_time"
        final = self.export_folder(out)
        partial = final.with_name(f".{final.name}.partial")  # written whole, then renamed into place
        if partial.exists():
            shutil.rmtree(partial)
        save_hipa_lora(denoiser, partial, StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if self.adapters is not None:
            save_adapters(self.adapters, out / "adapters")

    def parameter_counts(self) -> dict[str, int]:
        lora = sum(p.numel() for p in self.lora)
        adapters = 0 if self.adapters is None else self.adapters.num_parameters()
        base = sum(p.numel() for n, p in self.teacher.denoiser.named_parameters() if "lora_" not in n)
        return {"lora_parameters": lora, "adapter_parameters": adapters, "base_parameters": base}


def done_message(folder: Path, cfg: "DistillConfig") -> str:
    """The CLI's last line after a HiPA run: how to load what it wrote (digits has no diffusers LoRA loader)."""
    load = (f"fewstep.distill.hipa_train.load_hipa_lora(pipe.unet, {str(folder)!r})" if cfg.model == "digits"
            else f"pipe.load_lora_weights({str(folder)!r})")
    if cfg.hipa.guidance_range is not None:  # the LoRA alone does not know w
        load += f" and fewstep.distill.enable_guidance_adapters(pipe, {str(Path(folder).parent / 'adapters')!r})"
    return f"wrote the HiPA LoRA to {folder}/ ({load}; sample with fewstep.OneStepScheduler and num_inference_steps=1)"


def load_hipa_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attaches an exported HiPA LoRA to a network without diffusers' LoRA loader (the digits ``UNet2DModel``).

    Pipelines with a loader use ``pipe.load_lora_weights(directory)`` instead; this reads the same file.

    Args:
        model: The base network the LoRA was trained on (it must not carry a HiPA adapter yet).
        directory: The export folder (``<output_dir>/lora``).

    Returns:
        ``model``, with the adapter on (sample it with :func:`~fewstep.distill.hipa.one_step_sample`).

    Raises:
        ValueError: If the file is not a HiPA export (other target modules, no LoRA config metadata).
    """
    import json

    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(directory) / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    targets = set(meta.get("unet.target_modules") or ())
    attention, resnets = set(ATTENTION_TARGETS), set(RESNET_TARGETS)
    if targets not in (attention, attention | resnets) or "unet.r" not in meta:
        raise ValueError(f"{path} is not a HiPA export (target modules {sorted(targets)}; expected "
                         f"{sorted(attention)}, optionally with {sorted(resnets)})")
    config = HiPAConfig(rank=int(meta["unet.r"]), alpha=meta.get("unet.lora_alpha"),
                        include_resnets=bool(targets & resnets))
    add_hipa_lora(model, config)
    # diffusers' names back to peft's: unet.<module>.lora.down/up.weight -> <module>.lora_A/B.weight
    peft_state = {k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
                  for k, v in state.items()}
    result = set_peft_model_state_dict(model, peft_state, adapter_name="hipa")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"{path} does not fit this model (missing {missing[:3]}, unexpected "
                         f"{list(getattr(result, 'unexpected_keys', []))[:3]})")
    model.requires_grad_(False)
    return model
