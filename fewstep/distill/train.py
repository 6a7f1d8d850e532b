"""Train guidance adapters (AGD) or HiPA one-step LoRA with accelerate:
``accelerate launch -m fewstep.distill.train --config FILE``.

Jensen & Sadat. Efficient Distillation of Classifier-Free Guidance using Adapters. TMLR 2025.

``method: hipa`` trains HiPA's one-step LoRA instead (Zhang & Hooi, arXiv 2311.18158;
:mod:`fewstep.distill.hipa_train` supplies its teacher triples, student, loss and export); the
run itself (config, lock, checkpoints, resume, mixed precision, validation) is the one below.

One trainer for AGD and its baselines:

- ``mode=adapters`` (AGD): the base is frozen, only the guidance adapters train;
  ``mode=full``: the whole network trains too, with ``w`` entering through the same
  adapters (a w-conditioned fine-tune of the whole model, the guidance-distillation
  baseline of Meng et al., CVPR 2023).
- ``data=trajectories`` (AGD): states of CFG-guided sampling trajectories, collected first
  with :func:`~fewstep.distill.trajectories.collect_trajectories` (split across the
  processes, resumable); ``data=noised``: forward-noised training images with the CFG
  target computed on the fly by a frozen copy of the teacher (the paper's ablation; needs
  a dataset, so only for ``model=digits``).

The loss is the MSE between the one-forward output at ``(x, t, c, w)`` and the CFG target
``out_u + w (out_c - out_u)``. AdamW, linear warm-up then cosine decay, gradient
accumulation and mixed precision come from accelerate (trainable weights stay float32:
the adapters are created in float32 and autocast only lowers the compute).
Batches are drawn by index from a generator seeded by (seed, micro-batch number), so a
run resumed with ``resume_from_checkpoint=latest`` sees exactly the batches an
uninterrupted run would have seen after the checkpoint, without replaying the earlier
ones. Checkpoints (``accelerator.save_state``, called on every rank) go to
``<output_dir>/checkpoints/checkpoint-<step>`` with ``fewstep_state.json`` (the step and the
run's identity: a run of other settings is refused there; nothing is pickled); the adapters to
``<output_dir>/adapters`` (:func:`~fewstep.distill.save_adapters`), the whole network of
``mode=full`` to ``<output_dir>/model`` as well. The output folder is locked for the run, a
non-finite loss or weight stops it (naming the step), and it starts by printing
``fewstep distill estimate``'s figures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import shutil
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterConfig, GuidanceAdapters
from .hipa_train import HiPASettings
from .saving import save_adapters
from .trajectories import (
    LabelTeacher, PromptTeacher, Teacher, TrajectoryShards, TrajectorySpec, build_scheduler, collect_trajectories,
    initial_noise, model_input,
)

__all__ = ["DistillConfig", "NonFiniteTrainingError", "build_teacher", "train", "latest_checkpoint", "main"]

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
        hipa: :class:`~fewstep.distill.hipa_train.HiPASettings` (the ``hipa:`` section).
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
def build_teacher(cfg: DistillConfig, device: torch.device) -> tuple[Teacher, Any]:
    """The teacher for ``cfg.model`` and the model's own scheduler config.

    Raises:
        ValueError: If a text model gets no prompts, or the pipeline is not supported.
    """
    dtype = cfg.base_dtype()
    if cfg.model == "digits":
        from fewstep.zoo.digits import NULL_LABEL, NUM_CLASSES, load_digits_pipeline

        pipe = load_digits_pipeline(device=device)
        if dtype != torch.float32:
            pipe.unet.to(dtype)
        return LabelTeacher(pipe.unet, NUM_CLASSES, NULL_LABEL), pipe.scheduler.config
    from diffusers import DiffusionPipeline

    from fewstep.zoo.tiny import load_tiny_pipeline

    # A local folder may hold components saved as None (SD3 without T5), which plain
    # from_pretrained refuses; load_tiny_pipeline passes them explicitly (any folder).
    # Loaded on the host in the base's dtype; only the denoiser and the text encoders go to
    # the device, and the encoders (with the rest of the pipeline) are dropped once the
    # prompts are encoded: the VAE and safety checker never occupy device memory.
    local = Path(cfg.model).is_dir()
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; 0.32 knows only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = load_tiny_pipeline(cfg.model, torch_dtype=dtype) if local else \
            DiffusionPipeline.from_pretrained(cfg.model, torch_dtype=dtype)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ValueError(f"{cfg.model}: the pipeline has no unet or transformer")
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and (component is denoiser or name.startswith("text_encoder")):
            component.to(device)
    if hasattr(pipe, "encode_prompt"):
        prompts = list(cfg.prompts)
        if cfg.prompts_file:
            if not Path(cfg.prompts_file).is_file():
                raise ValueError(f"prompts_file {cfg.prompts_file!r} does not exist")
            lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{cfg.model} is a text-conditional pipeline: give prompts=[...] or prompts_file=")
        if cfg.validation_steps and not cfg.validation_prompts:
            raise ValueError(f"{cfg.model} is a text-conditional pipeline and validation_steps={cfg.validation_steps} "
                             "samples validation_prompts, but none are given: set validation_prompts=[...] "
                             "or validation_steps=0")
        pipe.encode_prompt = _encode_in_chunks(pipe.encode_prompt)
        teacher = PromptTeacher(pipe, prompts, cfg.negative_prompt, validation_prompts=cfg.validation_prompts)
        return teacher, pipe.scheduler.config
    if cfg.prompts or cfg.prompts_file:
        raise ValueError(f"prompts/prompts_file are for text pipelines; {cfg.model} ({type(pipe).__name__}) is "
                         "class-conditional (validation_prompts picks the labels to sample)")
    if type(denoiser).__name__ == "DiTTransformer2DModel":
        classes = denoiser.config.num_embeds_ada_norm
        return LabelTeacher(denoiser, classes, classes), pipe.scheduler.config
    raise ValueError(f"{cfg.model}: unsupported pipeline {type(pipe).__name__}")


def _encode_in_chunks(encode: Callable[..., Any], size: int = 64) -> Callable[..., Any]:
    """``pipe.encode_prompt`` over at most ``size`` prompts at a time: the text encoders' activations
    grow with the batch (T5-XXL on thousands of prompts at once would need tens of GB).

    Every argument that is a list of the same ``n`` strings is split; tensor outputs are
    concatenated along the batch (None outputs stay None).
    """

    def texts(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)

    def call(*args: Any, **kwargs: Any) -> Any:
        n = next((len(v) for v in [*args, *kwargs.values()] if texts(v)), 0)
        if n <= size:
            return encode(*args, **kwargs)
        parts = []
        for start in range(0, n, size):
            def cut(value: Any) -> Any:
                return value[start:start + size] if texts(value) and len(value) == n else value

            parts.append(encode(*map(cut, args), **{k: cut(v) for k, v in kwargs.items()}))
        if isinstance(parts[0], tuple):
            return tuple(None if first is None else torch.cat([p[i] for p in parts])
                         for i, first in enumerate(parts[0]))
        return torch.cat(parts)

    return call


class _FullFineTune(nn.Module):
    """The whole network plus its adapters as one trainable module (``mode=full``)."""

    def __init__(self, adapters: GuidanceAdapters) -> None:
        super().__init__()
        self.adapters = adapters
        self.network = adapters.base
        self.network.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapters(*args, **kwargs)


CHECKPOINT_STATE = "fewstep_state.json"
_CHECKPOINT_FORMAT = "fewstep-agd-checkpoint"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def _checkpoint_state(path: Path, identity: dict[str, Any]) -> int:
    """The step of checkpoint ``path`` after checking that it belongs to the run ``identity``.

    Raises:
        ValueError: A folder without fewstep's JSON state (also every checkpoint of fewstep
            before this check, which pickled the step counter: never unpickled), or one of a run
            with other settings (the message names them).
    """
    from fewstep.infra.io import read_json

    file = path / CHECKPOINT_STATE
    if not file.is_file():
        raise ValueError(f"{path} is not a fewstep distill checkpoint ({CHECKPOINT_STATE} is missing; older "
                         "checkpoints kept their state in a pickle, which is never loaded): delete it")
    state = read_json(file)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT or not isinstance(state.get("run"), dict) \
            or isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError(f"{file} is not a valid {_CHECKPOINT_FORMAT} state: delete the checkpoint")
    pickles = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickles:  # fewstep registers no pickled objects; accelerate would unpickle these without weights_only
        raise ValueError(f"{path} holds {pickles[0]}, a pickle that fewstep does not write and will not load: "
                         "delete that file (or the checkpoint)")
    run = state["run"]
    differs = sorted(k for k in set(run) | set(identity) if run.get(k) != identity.get(k))
    if differs:
        raise ValueError(f"{path} belongs to a run with other settings (differs in: {differs}); resume with the "
                         "same settings, or use another output_dir (or delete its checkpoints) for a new run")
    return state["step"]


# -------------------------------------------------------------------------------------- data
class _TrajectoryBatches:
    """Micro-batch ``k`` of rank ``r``: rows drawn with replacement by a generator seeded with (seed, k).

    Each process reads only its own rows of each batch from the shard files.
    """

    def __init__(self, shards: TrajectoryShards, seed: int) -> None:
        self.shards, self.seed = shards, seed
        self.size = len(shards)

    def __call__(self, k: int, rank: int, processes: int, batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        rows = torch.randint(self.size, (batch * processes,), generator=g)[rank::processes]
        return self.shards.rows(rows)


class _NoisedBatches:
    """Forward-noised training digits with the CFG target of a frozen teacher copy."""

    def __init__(self, teacher: Teacher, scheduler_config: Any, cfg: DistillConfig) -> None:
        from diffusers import DDPMScheduler

        from fewstep.zoo.digits import load_digits_data

        self.images, self.labels = load_digits_data("train")
        self.teacher = teacher
        self.noise = DDPMScheduler.from_config(dict(scheduler_config))
        # Noise, timesteps and w are training data: drawn from data_seed, apart from evaluation seeds.
        self.seed, self.w_min, self.w_max = cfg.data_seed, cfg.w_min, cfg.w_max

    def __call__(self, k: int, rank: int, processes: int, batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        n = batch * processes
        rows = torch.randint(len(self.labels), (n,), generator=g)
        t = torch.randint(self.noise.config.num_train_timesteps, (n,), generator=g)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(n, generator=g)
        eps = torch.randn(n, *self.images.shape[1:], generator=g)
        mine = slice(rank, None, processes)
        rows, t, w, eps = rows[mine], t[mine], w[mine], eps[mine]
        x = self.noise.add_noise(self.images[rows], eps, t)
        device = next(self.teacher.denoiser.parameters()).device
        cond = self.labels[rows]
        with torch.no_grad():
            target = self.teacher.guided(x.to(device), t.to(device), cond.to(device), w.to(device))
        return {"x": x, "t": t.float(), "cond": cond, "w": w, "target": target}


# ---------------------------------------------------------------------------------- training
def _tracker(cfg: DistillConfig) -> str | None:
    if cfg.report_to != "tensorboard":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            print("fewstep distill train: TensorBoard logging is off: install tensorboard (pip install tensorboard) "
                  "or set report_to=none to silence this", file=sys.stderr)
            return None
    return "tensorboard"


@torch.no_grad()
def _sample(teacher: Teacher, runner: nn.Module, scheduler: Any, index: torch.Tensor, w: float, steps: int,
            seed: int) -> torch.Tensor:
    """One-forward-per-step sampling with the adapters at guidance ``w``."""
    param = next(teacher.denoiser.parameters())
    device, dtype = param.device, param.dtype  # a half-precision base takes half-precision inputs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), *teacher.sample_shape, generator=g).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(scheduler, x)
    cond = teacher.condition(index.to(device))
    for t in scheduler.timesteps:
        out = teacher(model_input(scheduler, x, t).to(dtype), t.to(device).expand(len(index)), cond, module=runner,
                      guidance_scale=w)
        x = scheduler.step(out.float(), t, x).prev_sample
    return x


def _validation_conditions(cfg: DistillConfig, teacher: Teacher) -> torch.Tensor:
    """The condition indices of ``cfg.validation_prompts`` (labels ``0..9`` by default for class models).

    Raises:
        ValueError: A label that is not an integer of the model's range, or a text model without
            validation prompts.
    """
    if isinstance(teacher, PromptTeacher):
        if not cfg.validation_prompts:
            raise ValueError("validation_prompts are needed to validate a text-conditional model")
        return torch.tensor([teacher.index_of(p) for p in cfg.validation_prompts])
    labels = cfg.validation_prompts or [str(i) for i in range(min(teacher.num_conditions, 10))]
    index = []
    for label in labels:
        text = str(label).strip()
        if not (text.lstrip("-").isdigit() and 0 <= int(text) < teacher.num_conditions):
            raise ValueError(f"validation_prompts of a class-conditional model are class labels 0 to "
                             f"{teacher.num_conditions - 1}, got {label!r}")
        index.append(int(text))
    return torch.tensor(index)


def _validate(cfg, teacher, method, runner, accelerator, step) -> None:
    from safetensors.torch import save_file

    from ..eval.report import validation_grid
    from .saving import _write_atomic

    index = _validation_conditions(cfg, teacher)
    samples = {name: images.float().cpu().contiguous()
               for name, images in method.validation_samples(runner, index).items()}
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.safetensors"
    _write_atomic(path, lambda tmp: save_file(samples, tmp))
    validation_grid(samples, path.with_suffix(".png"))  # the same samples to look at (image models)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and teacher.sample_shape[0] in (1, 3):
            for name, images in samples.items():
                tracker.writer.add_images(f"validation/{name}", (images.clamp(-1, 1) + 1) / 2, step)


class NonFiniteTrainingError(ValueError):
    """Training produced a NaN/Inf loss or weights; nothing of that step was saved."""


@contextmanager
def _run_lock(accelerator: Any, out: Path) -> Iterator[None]:
    """The output folder's lock, taken by the main process; every process fails alike if it is held."""
    from fewstep.infra.io import DirectoryLockedError, lock_directory

    with ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(lock_directory(out, "another fewstep distill train run"))
            except DirectoryLockedError as err:
                error = str(err)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise DirectoryLockedError(error)
        yield


def _prepare_base(denoiser: nn.Module, cfg: DistillConfig) -> None:
    """The base as training sees it: the run's dtype, frozen in ``mode=adapters``, gradient checkpointing."""
    if next(denoiser.parameters()).dtype != cfg.base_dtype():
        denoiser.to(cfg.base_dtype())
    if cfg.gradient_checkpointing:
        if not getattr(denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(denoiser).__name__} does not support it")
        denoiser.enable_gradient_checkpointing()


def _check_finite(accelerator: Any, step: int, loss_bad: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Stops every process alike when a loss (on any process) or a trainable weight is not finite."""
    weights_bad = ~torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()
    flags = torch.stack([loss_bad.float(), weights_bad.float()])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.clone(), reduction="sum")
    loss_flag, weights_flag = (bool(v) for v in flags.cpu())  # one sync per optimizer step
    if loss_flag or weights_flag:
        cause = "the training loss is not finite" if loss_flag else "the trainable weights are not finite"
        raise NonFiniteTrainingError(
            f"training stopped at step {step}: {cause}; nothing of this step was saved (check learning_rate, "
            "w_min/w_max, weight_decay and mixed_precision)")


def train(cfg: DistillConfig, *, step_callback: Callable[[int], None] | None = None) -> Path:
    """Runs (or resumes) a distillation run.

    The output folder is locked for the run (a second run on it is refused); a checkpoint
    records the run's settings and is resumed only by a run with the same ones.

    Args:
        cfg: The settings.
        step_callback: Called with the step number after every optimizer step (all ranks).

    Returns:
        The export folder: ``<output_dir>/adapters`` (AGD) or ``<output_dir>/lora`` (HiPA).

    Raises:
        ValueError: On bad settings or data, a checkpoint of another run, a folder in use
            (:class:`~fewstep.infra.io.DirectoryLockedError`), or a non-finite loss or weight
            (:class:`NonFiniteTrainingError`, naming the step).
    """
    from accelerate import Accelerator

    out = Path(cfg.output_dir)
    tracker = _tracker(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=tracker,
                              project_dir=str(out), gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    with _run_lock(accelerator, out):
        return _train(cfg, accelerator, tracker, out, step_callback)


def _train(cfg: DistillConfig, accelerator: Any, tracker: str | None, out: Path,
           step_callback: Callable[[int], None] | None) -> Path:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    from fewstep.config import save_config

    identity = cfg.run_identity(accelerator.num_processes)
    resume = None
    if cfg.resume_from_checkpoint:
        resume = latest_checkpoint(out) if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
    for path in sorted((out / "checkpoints").glob("checkpoint-*")):  # before any work: refuse a foreign run
        if path.is_dir() and not path.name.endswith(".partial"):
            _checkpoint_state(path, identity)
    if resume is not None and resume.parent != out / "checkpoints":
        _checkpoint_state(resume, identity)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    if accelerator.is_main_process and cfg.method == "agd":  # the estimate models AGD's adapters
        from .estimate import estimate, format_estimate

        try:  # what `fewstep distill estimate` prints for this config
            accelerator.print(format_estimate(estimate(cfg)))
        except ValueError as err:  # e.g. a hub id the estimate does not know: train anyway
            accelerator.print(f"fewstep distill train: no memory estimate: {err}")
    teacher, scheduler_config = build_teacher(cfg, accelerator.device)
    gc.collect()  # the pipeline's text encoders, VAE and safety checker are unreferenced now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if cfg.validation_steps:
        _validation_conditions(cfg, teacher)  # bad labels fail now, not after collection and training
    build_scheduler(cfg.teacher_scheduler, scheduler_config)  # so does a scheduler of the wrong family
    if cfg.method == "hipa":
        from .hipa_train import check_student_model

        check_student_model(teacher.denoiser, scheduler_config)  # before the teacher samples are made

    # Data first, while the base is still free of adapters (the teacher is the plain base).
    collection_started = time.perf_counter()
    if cfg.data == "trajectories":
        folder = Path(cfg.trajectory_dir or out / "trajectories")
        scheduler = build_scheduler(cfg.teacher_scheduler, scheduler_config)
        collect_trajectories(teacher, scheduler, cfg.trajectory_spec(), folder, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, progress=cfg.progress)
        accelerator.wait_for_everyone()
        batches = _TrajectoryBatches(TrajectoryShards(folder), cfg.seed)
    else:
        frozen = copy.deepcopy(teacher)  # stays the teacher while mode=full trains the base
        frozen.denoiser.requires_grad_(False)
        batches = _NoisedBatches(frozen, scheduler_config, cfg)
    collection_seconds = time.perf_counter() - collection_started

    _prepare_base(teacher.denoiser, cfg)
    if cfg.method == "hipa":
        from .hipa_train import HiPATraining

        method: Any = HiPATraining(cfg, teacher, scheduler_config)
    else:
        method = _AGDTraining(cfg, teacher, scheduler_config)
    optimizer = torch.optim.AdamW(method.groups, lr=cfg.learning_rate)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps * accelerator.num_processes,
                                                   cfg.max_steps * accelerator.num_processes)
    runner, optimizer, lr_scheduler = accelerator.prepare(method.module, optimizer, lr_scheduler)
    step = 0
    if cfg.resume_from_checkpoint:
        if resume is None:
            accelerator.print(f"fewstep distill train: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        else:
            step = _checkpoint_state(resume, identity)
            # Only safetensors and weights_only torch.load: no custom (pickled) objects are registered.
            accelerator.load_state(str(resume))
            accelerator.print(f"fewstep distill train: resumed from {resume} at step {step}")
    if tracker:
        accelerator.init_trackers(cfg.method, config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{method.title} training",
               disable=not (cfg.progress and accelerator.is_local_main_process))
    runner.train()
    device, started, accumulated = accelerator.device, time.perf_counter(), []  # started: training only
    trainable = [p for p in runner.parameters() if p.requires_grad]
    while step < cfg.max_steps:
        loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            k = step * cfg.gradient_accumulation_steps + micro
            batch = batches(k, accelerator.process_index, accelerator.num_processes, cfg.batch_size)
            batch = {name: value.to(device) for name, value in batch.items()}
            with accelerator.accumulate(runner):
                loss = method.loss(runner, batch, accelerator)
                loss_bad |= ~torch.isfinite(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(runner.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            accumulated.append(loss.detach())
        step += 1
        _check_finite(accelerator, step, loss_bad, trainable)
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            mean = accelerator.reduce(torch.stack(accumulated).mean(), reduction="mean").item()
            accumulated = []
            bar.set_postfix(loss=f"{mean:.4f}")
            accelerator.log({"loss": mean, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            _checkpoint(accelerator, out, step, identity)
        if cfg.validation_steps and step % cfg.validation_steps == 0 and accelerator.is_main_process:
            _validate(cfg, teacher, method, accelerator.unwrap_model(runner), accelerator, step)
        if step_callback is not None:
            step_callback(step)
    bar.close()

    accelerator.wait_for_everyone()
    folder = method.export_folder(out)
    if accelerator.is_main_process:
        if cfg.validation_steps and cfg.max_steps % cfg.validation_steps:
            _validate(cfg, teacher, method, accelerator.unwrap_model(runner), accelerator, step)
        method.export(out)
        summary = {"steps": step, "training_seconds_this_session": time.perf_counter() - started,
                   "data_seconds_this_session": collection_seconds, **method.parameter_counts(),
                   "processes": accelerator.num_processes}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    accelerator.end_training()
    return folder


class _AGDTraining:
    """AGD's part of a run: the guidance adapters (and, ``mode=full``, the base) regress the CFG output."""

    title = "AGD"

    def __init__(self, cfg: DistillConfig, teacher: Teacher, scheduler_config: Any) -> None:
        self.cfg, self.teacher, self.scheduler_config = cfg, teacher, scheduler_config
        self.adapters = adapters = GuidanceAdapters(teacher.denoiser, cfg.adapter_config())
        if cfg.mode == "full":
            self.module: nn.Module = _FullFineTune(adapters)
            self.groups = adapters.parameter_groups(cfg.weight_decay) + [
                {"params": list(adapters.base.parameters()), "weight_decay": cfg.weight_decay,
                 "lr": cfg.base_learning_rate or cfg.learning_rate}]
        else:
            self.module, self.groups = adapters, adapters.parameter_groups(cfg.weight_decay)
        self.dtype = next(teacher.denoiser.parameters()).dtype

    def loss(self, runner: nn.Module, batch: dict[str, torch.Tensor], accelerator: Any) -> torch.Tensor:
        """MSE between the one-forward output at ``(x, t, c, w)`` and the stored CFG output."""
        x = batch["x"].to(self.dtype)  # the base's dtype (stored half-precision states are upcast)
        with accelerator.autocast():
            out = self.teacher(x, batch["t"], self.teacher.condition(batch["cond"]), module=runner,
                               guidance_scale=batch["w"])
        return F.mse_loss(out.float(), batch["target"].float())

    def validation_samples(self, runner: nn.Module, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples of the validation conditions with the teacher's scheduler, one forward per step."""
        cfg = self.cfg
        scheduler = build_scheduler(cfg.teacher_scheduler, self.scheduler_config)
        return {f"w{w:g}": _sample(self.teacher, runner, scheduler, index, w, cfg.validation_num_inference_steps,
                                   seed=0) for w in cfg.validation_guidance}

    @staticmethod
    def export_folder(out: Path) -> Path:
        return out / "adapters"

    def export(self, out: Path) -> None:
        """The adapters to ``<out>/adapters``; ``mode=full``: the network to ``<out>/model`` too."""
        save_adapters(self.adapters, self.export_folder(out))
        if self.cfg.mode == "full":
            self.adapters.base.save_pretrained(out / "model")

    def parameter_counts(self) -> dict[str, int]:
        return {"adapter_parameters": self.adapters.num_parameters(),
                "base_parameters": self.adapters.base_num_parameters()}

    @staticmethod
    def done_message(folder: Path) -> str:
        return f"wrote adapters to {folder}/ (load with fewstep.distill.load_adapters(pipe, {str(folder)!r}))"


def _checkpoint(accelerator: Any, out: Path, step: int, identity: dict[str, Any]) -> None:
    # Every rank calls save_state (it gathers/writes per-rank RNG state); the folder is
    # renamed into place once all ranks are done, so `latest` never picks a torn one.
    from fewstep.infra.io import write_json

    final = out / "checkpoints" / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / CHECKPOINT_STATE, {"format": _CHECKPOINT_FORMAT, "version": 1, "step": step,
                                                "run": identity})
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ CLI
def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep distill train`` (also ``python -m fewstep.distill.train``)."""
    from fewstep.config import add_config_arguments

    group = sub.add_parser("distill", help="distillation: train AGD guidance adapters or HiPA one-step LoRA "
                                           "(distill train | estimate)",
                           description="Adapter guidance distillation (AGD) and HiPA one-step adapters.")
    inner = group.add_subparsers(dest="distill_command", required=True, metavar="SUBCOMMAND")
    p = inner.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train AGD guidance adapters or (method=hipa) HiPA one-step LoRA on CFG teacher data "
             "(resumable; accelerate launch / torchrun)",
        description="Train guidance adapters (AGD) on CFG teacher trajectories, or with method=hipa a one-step "
                    "LoRA (HiPA) on CFG teacher samples. "
                    "Settings: see configs/distill/*.yaml; key=value items override the file.")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=_cmd_train)
    from .estimate import add_estimate_parser

    add_estimate_parser(inner)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from fewstep.config import resolve_config

    args.resume_hint = "rerun with resume_from_checkpoint=latest to continue from the last checkpoint"
    cfg = resolve_config(DistillConfig, args)
    folder = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, from the main process
        if cfg.method == "hipa":
            from .hipa_train import done_message
        else:
            done_message = _AGDTraining.done_message
        print(done_message(folder))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fewstep.distill.train`` / ``accelerate launch -m fewstep.distill.train``:
    the same command as ``fewstep distill train``."""
    from fewstep.cli import main as cli_main

    return cli_main(["distill", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
