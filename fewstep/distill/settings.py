"""The settings of a distillation run: the ``fewstep distill train`` config schema (AGD and HiPA).

One dataclass per YAML section, validated on construction (bad values name the key and what is
allowed); the trainer (:mod:`fewstep.distill.train`), the estimate and the HiPA method read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from .adapters import AdapterConfig
from .hipa import HiPAConfig
from .trajectories import TrajectorySpec

__all__ = ["DistillConfig", "HiPASettings"]


@dataclass
class HiPASettings(HiPAConfig):
    """The ``hipa:`` section of a distillation config (``method: hipa``): a :class:`~fewstep.distill.hipa.HiPAConfig`
    (LoRA rank/alpha/placement and the loss) plus the teacher's guidance.

    ``feature_weight`` > 0 uses the digits classifier's features (``model: digits`` only);
    ``clip_sample`` clamps the student's and the teacher's samples before the loss.

    Attributes:
        guidance: CFG scale of the teacher (the student runs one forward without CFG).
        guidance_range: ``[lo, hi]``: the teacher's scale is drawn from U[lo, hi] per sample and
            the student also gets AGD's guidance adapters (the config's adapter settings), so one
            LoRA covers the range; None: the fixed ``guidance``.
    """

    guidance: float = 1.5
    guidance_range: Optional[List[float]] = None

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:  # HiPAConfig names the field; the config key is hipa.<field>
            raise ValueError(f"hipa.{err}") from None
        if not 1.0 <= self.guidance < math.inf:
            raise ValueError(f"hipa.guidance (the teacher's CFG scale) must be finite and >= 1, got {self.guidance}")
        if self.guidance_range is not None:
            values = list(self.guidance_range)
            if len(values) != 2 or not 1.0 <= values[0] <= values[1] < math.inf:
                raise ValueError(f"hipa.guidance_range must be [lo, hi] with 1 <= lo <= hi < inf, got {values}")

    def w_range(self) -> tuple[float, float]:
        """The teacher's guidance range (``(guidance, guidance)`` without ``guidance_range``)."""
        lo, hi = self.guidance_range or (self.guidance, self.guidance)
        return float(lo), float(hi)

    def check_run(self, cfg: "DistillConfig") -> None:
        """Refuses the settings of a ``method: hipa`` run that HiPA does not use."""
        if cfg.mode != "adapters":
            raise ValueError(f"method=hipa trains LoRA adapters on the frozen base: mode must be 'adapters', "
                             f"got {cfg.mode!r}")
        if cfg.data != "trajectories":
            raise ValueError(f"method=hipa trains on teacher samples: data must be 'trajectories', got {cfg.data!r}")
        if self.feature_weight and cfg.model != "digits":
            raise ValueError("hipa.feature_weight > 0 needs a feature network; only model=digits ships one "
                             "(its classifier): set hipa.feature_weight=0")


_METHODS = ("agd", "hipa")
_MODES = ("adapters", "full")
_DATA = ("trajectories", "noised")
_PRECISIONS = ("no", "bf16", "fp16")
_REPORT = ("tensorboard", "none")
_DTYPES = ("auto", "float32", "float16", "bfloat16")
# Settings that do not change what a run computes: a resumed run may change them.
_NOT_IDENTITY = {"output_dir", "trajectory_dir", "resume_from_checkpoint", "report_to", "logging_steps",
                 "checkpointing_steps", "validation_steps", "validation_guidance", "validation_prompts",
                 "validation_num_inference_steps", "progress", "cpu"}


@dataclass
class DistillConfig:
    """Settings of a distillation run (the schema of ``configs/distill/*.yaml``).

    Attributes:
        model: ``digits`` (the built-in model) or a diffusers pipeline folder / hub id
            (Stable Diffusion, SD3: text-conditional; DiT: class-conditional).
        prompts: Training prompts of a text pipeline (or give ``prompts_file``, one a line).
        prompts_file: A text file with one prompt per line.
        negative_prompt: The unconditional prompt of the CFG teacher.
        validation_prompts: Prompts (text models: required when ``validation_steps`` > 0; encoded
            with the training prompts, they need not be among them) or class labels (class
            models, default ``0``-``9``) to sample at validation.
        output_dir: Where checkpoints, logs, validation samples and the adapters go.
        method: ``agd`` (guidance adapters) or ``hipa`` (one-step LoRA, settings in ``hipa``; it uses
            the ``trajectories`` settings for its teacher samples, ``hipa.guidance`` instead of
            ``w_min``/``w_max``, and the adapter settings only with ``hipa.guidance_range``).
        hipa: :class:`HiPASettings` (the ``hipa:`` section).
        mode: ``adapters`` (AGD) or ``full`` (fine-tune the whole network as well).
        data: ``trajectories`` (CFG sampling states) or ``noised`` (forward-noised data).
        width_ratio, head_dim, mlp_ratio, fourier_features, fourier_scale, conditions, placement:
            :class:`~fewstep.distill.AdapterConfig` settings (``placement``: ``attention`` or,
            for UNets, ``attention+resnet``).
        trajectory_dir: Folder of the CFG trajectories (default ``<output_dir>/trajectories``);
            an existing finished collection with the same settings is reused.
        teacher_scheduler: ``fewstep:<solver>`` or a diffusers scheduler class name.
        trajectory_steps: Sampling steps of each teacher trajectory.
        num_shards, shard_size: Trajectories are collected in ``num_shards`` batches of ``shard_size``.
        trajectory_dtype: Storage dtype of the trajectory states and targets
            (``float16``, ``bfloat16`` or ``float32``); training streams them from disk.
        w_min, w_max: Range of the guidance scale (training draws it uniformly).
        data_seed: Seed of the training data (trajectory shard i uses ``data_seed + i``);
            keep it apart from evaluation seeds.
        max_steps: Optimizer steps.
        batch_size: Samples per process per micro-batch.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        learning_rate: AdamW learning rate (of the adapters).
        base_learning_rate: Learning rate of the base network in ``mode=full`` (None: ``learning_rate``).
        weight_decay: AdamW weight decay of weight matrices.
        warmup_steps: Linear warm-up steps before the cosine decay.
        max_grad_norm: Gradient clipping (0 disables it).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (as accelerate).
        torch_dtype: dtype of the frozen base: ``auto`` (the ``mixed_precision`` dtype in
            ``mode=adapters``, so autocast keeps no half-precision weight copies alive through
            backward; float32 otherwise), ``float32``, ``float16`` or ``bfloat16``.
        gradient_checkpointing: Recompute the base's blocks in backward instead of storing
            their activations (diffusers ``enable_gradient_checkpointing``; same gradients).
        seed: Seed of the adapters' initialisation and the batch order.
        checkpointing_steps: Save the training state every this many steps (0: never).
        resume_from_checkpoint: ``latest``, a checkpoint folder, or None.
        report_to: ``tensorboard`` or ``none``.
        logging_steps: Log the loss every this many steps.
        validation_steps: Sample the validation conditions every this many steps and at the end (0: never).
        validation_guidance: Guidance scales of the validation samples.
        validation_num_inference_steps: Steps of the validation sampler (``teacher_scheduler``).
        cpu: Train on the CPU even if a GPU is there.
        progress: Show progress bars.
    """

    model: str = "digits"
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None
    negative_prompt: str = ""
    validation_prompts: List[str] = field(default_factory=list)
    output_dir: str = "runs/agd"
    method: str = "agd"
    hipa: HiPASettings = field(default_factory=HiPASettings)
    mode: str = "adapters"
    data: str = "trajectories"
    width_ratio: float = 0.25
    head_dim: int = 64
    mlp_ratio: float = 4.0
    fourier_features: int = 128
    fourier_scale: float = 1.0
    conditions: Optional[List[str]] = None
    placement: str = "attention"
    trajectory_dir: Optional[str] = None
    teacher_scheduler: str = "DDIMScheduler"
    trajectory_steps: int = 20
    num_shards: int = 8
    shard_size: int = 64
    trajectory_dtype: str = "float16"
    w_min: float = 1.0
    w_max: float = 5.0
    data_seed: int = 100_000
    max_steps: int = 1000
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    base_learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    torch_dtype: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpointing_steps: int = 500
    resume_from_checkpoint: Optional[str] = None
    report_to: str = "tensorboard"
    logging_steps: int = 10
    validation_steps: int = 0
    validation_guidance: List[float] = field(default_factory=lambda: [3.0])
    validation_num_inference_steps: int = 20
    cpu: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML reads a bare `no` as false; OmegaConf makes it "False"
            self.mixed_precision = "no"
        choices = {"method": _METHODS, "mode": _MODES, "data": _DATA, "mixed_precision": _PRECISIONS,
                   "report_to": _REPORT, "torch_dtype": _DTYPES, "trajectory_dtype": _DTYPES[1:]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "trajectory_steps", "num_shards",
                    "shard_size", "logging_steps", "validation_num_inference_steps", "head_dim", "fourier_features")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpointing_steps", "validation_steps", "weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "base_learning_rate"):
            rate = getattr(self, name)
            if rate is not None and not 0 < rate <= 1:  # AdamW overflows internally long before inf
                raise ValueError(f"{name} must be in (0, 1], got {rate}")
        if not (1.0 <= self.w_min <= self.w_max < math.inf):
            raise ValueError(f"need 1 <= w_min <= w_max < inf, got w_min={self.w_min}, w_max={self.w_max}")
        bad = [w for w in self.validation_guidance if not 1.0 <= w < math.inf]
        if bad:
            raise ValueError(f"validation_guidance values must be finite and >= 1, got {bad}")
        if self.mode == "full" and self.base_dtype() != torch.float32:
            raise ValueError(f"mode=full trains the base network: it needs torch_dtype float32 (or auto), "
                             f"got {self.torch_dtype!r}")
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest") and not Path(resume).is_dir():
            raise ValueError(f"resume_from_checkpoint must be 'latest' or a checkpoint folder, got {resume!r}")
        if self.data == "noised" and self.model != "digits":
            raise ValueError("data=noised needs training images; it is available for model=digits only")
        if self.model == "digits" and (self.prompts or self.prompts_file):
            raise ValueError("prompts/prompts_file are for text pipelines; model=digits is class-conditional "
                             "(its conditions are the labels 0-9; validation_prompts picks labels to sample)")
        if self.method == "hipa":
            self.hipa.check_run(self)
        self.adapter_config()  # validates the adapter settings

    def adapter_config(self) -> AdapterConfig:
        """The :class:`AdapterConfig` of these settings."""
        return AdapterConfig(width_ratio=float(self.width_ratio), head_dim=self.head_dim,
                             mlp_ratio=float(self.mlp_ratio), fourier_features=self.fourier_features,
                             fourier_scale=float(self.fourier_scale), seed=self.seed, placement=self.placement,
                             conditions=None if self.conditions is None else tuple(self.conditions))

    def trajectory_spec(self) -> TrajectorySpec:
        """The :class:`TrajectorySpec` of these settings."""
        if self.method == "hipa":  # (noise, condition, final sample) triples at HiPA's guidance
            w_min, w_max = self.hipa.w_range()
            return TrajectorySpec(num_shards=self.num_shards, shard_size=self.shard_size,
                                  num_inference_steps=self.trajectory_steps, w_min=w_min, w_max=w_max,
                                  seed=self.data_seed, dtype=self.trajectory_dtype, record="final")
        return TrajectorySpec(num_shards=self.num_shards, shard_size=self.shard_size,
                              num_inference_steps=self.trajectory_steps, w_min=float(self.w_min),
                              w_max=float(self.w_max), seed=self.data_seed, dtype=self.trajectory_dtype)

    def base_dtype(self) -> torch.dtype:
        """The dtype of the frozen base network (``torch_dtype`` with ``auto`` resolved)."""
        if self.torch_dtype != "auto":
            return getattr(torch, self.torch_dtype)
        if self.mode == "adapters" and self.mixed_precision != "no":
            return torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.float32

    def run_identity(self, num_processes: int) -> dict[str, Any]:
        """The settings that determine a run's results, recorded in its checkpoints."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}
        if self.method == "agd":  # as before HiPA joined: AGD checkpoints of earlier versions still resume
            del values["method"], values["hipa"]
        return {**values, "num_processes": int(num_processes)}


# ------------------------------------------------------------------------------------- model
