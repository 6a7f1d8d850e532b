"""Adapter guidance distillation (AGD): fold classifier-free guidance into one forward pass.

Jensen & Sadat. Efficient Distillation of Classifier-Free Guidance using Adapters. TMLR 2025.

- :class:`GuidanceAdapters` / :class:`AdapterConfig`: adapters attached to a frozen diffusers
  network (``UNet2DConditionModel`` incl. SDXL's, ``UNet2DModel``, ``SD3Transformer2DModel``,
  ``DiTTransformer2DModel``), on the attention modules or (UNets) also every ResNet block.
- :func:`save_adapters` / :func:`load_adapters`: safetensors + JSON, validated against the model.
- :func:`enable_guidance_adapters` / :func:`disable_guidance_adapters`: one network call per
  step inside an unmodified diffusers pipeline, and back to real CFG.
- :func:`collect_trajectories` / :func:`load_trajectories`: CFG teacher trajectories
  (sharded, resumable, split across processes) for a :class:`LabelTeacher` or :class:`PromptTeacher`.
- :mod:`fewstep.distill.hipa`: HiPA one-step LoRA adapters (peft; imported on first use:
  ``from fewstep.distill.hipa import train_hipa, save_hipa_lora``; the one-step scheduler is
  ``fewstep.OneStepScheduler``).
- ``python -m fewstep distill train --config configs/distill/<name>.yaml``: the accelerate
  trainer (:mod:`fewstep.distill.train`).
"""

from .adapters import AdapterConfig, GuidanceAdapters
from .architectures import CONDITIONS, PLACEMENTS, SUPPORTED_MODELS, describe, fingerprint
from .inference import disable_guidance_adapters, enable_guidance_adapters
from .saving import load_adapters, save_adapters
from .trajectories import LabelTeacher, PromptTeacher, TrajectorySpec, collect_trajectories, load_trajectories

__all__ = [
    "AdapterConfig",
    "GuidanceAdapters",
    "CONDITIONS",
    "PLACEMENTS",
    "SUPPORTED_MODELS",
    "describe",
    "fingerprint",
    "save_adapters",
    "load_adapters",
    "enable_guidance_adapters",
    "disable_guidance_adapters",
    "LabelTeacher",
    "PromptTeacher",
    "TrajectorySpec",
    "collect_trajectories",
    "load_trajectories",
]
