"""Train guidance adapters (AGD) with accelerate: ``accelerate launch -m fewstep.distill.train --config FILE``.

Jensen & Sadat. Efficient Distillation of Classifier-Free Guidance using Adapters. TMLR 2025.

One trainer for the method and its baselines:

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
``<output_dir>/checkpoints/checkpoint-<step>``; the adapters to ``<output_dir>/adapters``
(:func:`~fewstep.distill.save_adapters`), the whole network of ``mode=full`` to
``<output_dir>/model`` as well.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterConfig, GuidanceAdapters
from .saving import save_adapters
from .trajectories import (
    LabelTeacher, PromptTeacher, Teacher, TrajectorySpec, build_scheduler, collect_trajectories, initial_noise,
    load_trajectories, model_input,
)

__all__ = ["DistillConfig", "build_teacher", "train", "latest_checkpoint", "main"]

_MODES = ("adapters", "full")
_DATA = ("trajectories", "noised")
_PRECISIONS = ("no", "bf16", "fp16")
_REPORT = ("tensorboard", "none")


@dataclass
class DistillConfig:
    """Settings of a distillation run (the schema of ``configs/distill/*.yaml``).

    Attributes:
        model: ``digits`` (the built-in model) or a diffusers pipeline folder / hub id
            (Stable Diffusion, SD3: text-conditional; DiT: class-conditional).
        prompts: Training prompts of a text pipeline (or give ``prompts_file``, one a line).
        prompts_file: A text file with one prompt per line.
        negative_prompt: The unconditional prompt of the CFG teacher.
        validation_prompts: Prompts (text models) or labels (class models, as strings) to sample.
        output_dir: Where checkpoints, logs, validation samples and the adapters go.
        mode: ``adapters`` (AGD) or ``full`` (fine-tune the whole network as well).
        data: ``trajectories`` (CFG sampling states) or ``noised`` (forward-noised data).
        width_ratio, head_dim, mlp_ratio, fourier_features, fourier_scale, conditions:
            :class:`~fewstep.distill.AdapterConfig` settings.
        trajectory_dir: Folder of the CFG trajectories (default ``<output_dir>/trajectories``);
            an existing finished collection with the same settings is reused.
        teacher_scheduler: ``fewstep:<solver>`` or a diffusers scheduler class name.
        trajectory_steps: Sampling steps of each teacher trajectory.
        num_shards, shard_size: Trajectories are collected in ``num_shards`` batches of ``shard_size``.
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
    mode: str = "adapters"
    data: str = "trajectories"
    width_ratio: float = 0.25
    head_dim: int = 64
    mlp_ratio: float = 4.0
    fourier_features: int = 128
    fourier_scale: float = 1.0
    conditions: Optional[List[str]] = None
    trajectory_dir: Optional[str] = None
    teacher_scheduler: str = "DDIMScheduler"
    trajectory_steps: int = 20
    num_shards: int = 8
    shard_size: int = 64
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
        choices = {"mode": _MODES, "data": _DATA, "mixed_precision": _PRECISIONS, "report_to": _REPORT}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "trajectory_steps", "num_shards",
                    "shard_size", "logging_steps", "validation_num_inference_steps", "head_dim", "fourier_features")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpointing_steps", "validation_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rates = [self.learning_rate] + ([] if self.base_learning_rate is None else [self.base_learning_rate])
        if not all(0 < r < math.inf for r in rates):
            raise ValueError(f"learning rates must be finite and > 0, got {rates}")
        if not (1.0 <= self.w_min <= self.w_max):
            raise ValueError(f"need 1 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest") and not Path(resume).is_dir():
            raise ValueError(f"resume_from_checkpoint must be 'latest' or a checkpoint folder, got {resume!r}")
        if self.data == "noised" and self.model != "digits":
            raise ValueError("data=noised needs training images; it is available for model=digits only")
        self.adapter_config()  # validates the adapter settings

    def adapter_config(self) -> AdapterConfig:
        """The :class:`AdapterConfig` of these settings."""
        return AdapterConfig(width_ratio=float(self.width_ratio), head_dim=self.head_dim,
                             mlp_ratio=float(self.mlp_ratio), fourier_features=self.fourier_features,
                             fourier_scale=float(self.fourier_scale), seed=self.seed,
                             conditions=None if self.conditions is None else tuple(self.conditions))

    def trajectory_spec(self) -> TrajectorySpec:
        """The :class:`TrajectorySpec` of these settings."""
        return TrajectorySpec(num_shards=self.num_shards, shard_size=self.shard_size,
                              num_inference_steps=self.trajectory_steps, w_min=float(self.w_min),
                              w_max=float(self.w_max), seed=self.data_seed)


# ------------------------------------------------------------------------------------- model
def build_teacher(cfg: DistillConfig, device: torch.device) -> tuple[Teacher, Any]:
    """The teacher for ``cfg.model`` and the model's own scheduler config.

    Raises:
        ValueError: If a text model gets no prompts, or the pipeline is not supported.
    """
    if cfg.model == "digits":
        from fewstep.zoo.digits import NULL_LABEL, NUM_CLASSES, load_digits_pipeline

        pipe = load_digits_pipeline(device=device)
        return LabelTeacher(pipe.unet, NUM_CLASSES, NULL_LABEL), pipe.scheduler.config
    from diffusers import DiffusionPipeline

    from fewstep.zoo.tiny import load_tiny_pipeline

    # A local folder may hold components saved as None (SD3 without T5), which plain
    # from_pretrained refuses; load_tiny_pipeline passes them explicitly (any folder).
    local = Path(cfg.model).is_dir()
    pipe = (load_tiny_pipeline(cfg.model) if local else DiffusionPipeline.from_pretrained(cfg.model)).to(device)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ValueError(f"{cfg.model}: the pipeline has no unet or transformer")
    if hasattr(pipe, "encode_prompt"):
        prompts = list(cfg.prompts)
        if cfg.prompts_file:
            lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"{cfg.model} is a text-conditional pipeline: give prompts=[...] or prompts_file=")
        return PromptTeacher(pipe, prompts, cfg.negative_prompt), pipe.scheduler.config
    if type(denoiser).__name__ == "DiTTransformer2DModel":
        classes = denoiser.config.num_embeds_ada_norm
        return LabelTeacher(denoiser, classes, classes), pipe.scheduler.config
    raise ValueError(f"{cfg.model}: unsupported pipeline {type(pipe).__name__}")


class _FullFineTune(nn.Module):
    """The whole network plus its adapters as one trainable module (``mode=full``)."""

    def __init__(self, adapters: GuidanceAdapters) -> None:
        super().__init__()
        self.adapters = adapters
        self.network = adapters.base
        self.network.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapters(*args, **kwargs)


class _Progress:
    """The optimizer-step counter, saved with the accelerate state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


# -------------------------------------------------------------------------------------- data
class _TrajectoryBatches:
    """Micro-batch ``k`` of rank ``r``: rows drawn with replacement by a generator seeded with (seed, k)."""

    def __init__(self, records: dict[str, torch.Tensor], seed: int) -> None:
        self.records, self.seed = records, seed
        self.size = records["x"].shape[0]

    def __call__(self, k: int, rank: int, processes: int, batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        rows = torch.randint(self.size, (batch * processes,), generator=g)[rank::processes]
        return {name: value[rows] for name, value in self.records.items()}


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
    device = next(teacher.denoiser.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), *teacher.sample_shape, generator=g).to(device)
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(scheduler, x)
    cond = teacher.condition(index.to(device))
    for t in scheduler.timesteps:
        out = teacher(model_input(scheduler, x, t), t.to(device).expand(len(index)), cond, module=runner,
                      guidance_scale=w)
        x = scheduler.step(out, t, x).prev_sample
    return x


def _validate(cfg, teacher, adapters, scheduler_config, accelerator, step) -> None:
    from safetensors.torch import save_file

    from ..eval.report import validation_grid
    from .saving import _write_atomic

    labels = cfg.validation_prompts or [str(i) for i in range(min(teacher.num_conditions, 10))]
    if isinstance(teacher, PromptTeacher):
        index = torch.tensor([teacher.prompts.index(p) if p in teacher.prompts else -1 for p in labels])
        if (index < 0).any():
            raise ValueError("validation_prompts must be among the training prompts")
    else:
        index = torch.tensor([int(v) for v in labels])
    scheduler = build_scheduler(cfg.teacher_scheduler, scheduler_config)
    samples = {f"w{w:g}": _sample(teacher, adapters, scheduler, index, w, cfg.validation_num_inference_steps,
                                  seed=0).float().cpu().contiguous() for w in cfg.validation_guidance}
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.safetensors"
    _write_atomic(path, lambda tmp: save_file(samples, tmp))
    validation_grid(samples, path.with_suffix(".png"))  # the same samples to look at (image models)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and teacher.sample_shape[0] in (1, 3):
            for name, images in samples.items():
                tracker.writer.add_images(f"validation/{name}", (images.clamp(-1, 1) + 1) / 2, step)


def train(cfg: DistillConfig, *, step_callback: Callable[[int], None] | None = None) -> Path:
    """Runs (or resumes) a distillation run.

    Args:
        cfg: The settings.
        step_callback: Called with the step number after every optimizer step (all ranks).

    Returns:
        The adapter folder ``<output_dir>/adapters``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    from fewstep.config import save_config

    out = Path(cfg.output_dir)
    tracker = _tracker(cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=tracker,
                              project_dir=str(out), gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    teacher, scheduler_config = build_teacher(cfg, accelerator.device)

    # Data first, while the base is still free of adapters (the teacher is the plain base).
    collection_started = time.perf_counter()
    if cfg.data == "trajectories":
        folder = Path(cfg.trajectory_dir or out / "trajectories")
        scheduler = build_scheduler(cfg.teacher_scheduler, scheduler_config)
        collect_trajectories(teacher, scheduler, cfg.trajectory_spec(), folder, process_index=accelerator.process_index,
                             num_processes=accelerator.num_processes, progress=cfg.progress)
        accelerator.wait_for_everyone()
        records, _ = load_trajectories(folder)
        batches = _TrajectoryBatches(records, cfg.seed)
    else:
        frozen = copy.deepcopy(teacher)  # stays the teacher while mode=full trains the base
        frozen.denoiser.requires_grad_(False)
        batches = _NoisedBatches(frozen, scheduler_config, cfg)
    collection_seconds = time.perf_counter() - collection_started

    adapters = GuidanceAdapters(teacher.denoiser, cfg.adapter_config())
    if cfg.mode == "full":
        module: nn.Module = _FullFineTune(adapters)
        groups = adapters.parameter_groups(cfg.weight_decay) + [
            {"params": list(adapters.base.parameters()), "weight_decay": cfg.weight_decay,
             "lr": cfg.base_learning_rate or cfg.learning_rate}]
    else:
        module, groups = adapters, adapters.parameter_groups(cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps * accelerator.num_processes,
                                                   cfg.max_steps * accelerator.num_processes)
    runner, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)

    if cfg.resume_from_checkpoint:
        path = latest_checkpoint(out) if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
        if path is None:
            accelerator.print(f"fewstep distill train: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        else:
            accelerator.load_state(str(path))
            accelerator.print(f"fewstep distill train: resumed from {path} at step {progress.step}")
    if tracker:
        accelerator.init_trackers("agd", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="AGD training",
               disable=not (cfg.progress and accelerator.is_local_main_process))
    runner.train()
    device, started, accumulated = accelerator.device, time.perf_counter(), []  # started: training only
    dtype = next(teacher.denoiser.parameters()).dtype
    while progress.step < cfg.max_steps:
        for micro in range(cfg.gradient_accumulation_steps):
            k = progress.step * cfg.gradient_accumulation_steps + micro
            batch = batches(k, accelerator.process_index, accelerator.num_processes, cfg.batch_size)
            batch = {name: value.to(device) for name, value in batch.items()}
            batch["x"] = batch["x"].to(dtype)  # a half-precision base takes half-precision inputs
            with accelerator.accumulate(runner):
                with accelerator.autocast():
                    out_ = teacher(batch["x"], batch["t"], teacher.condition(batch["cond"]), module=runner,
                                   guidance_scale=batch["w"])
                loss = F.mse_loss(out_.float(), batch["target"].float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(runner.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            accumulated.append(loss.detach())
        progress.step += 1
        bar.update(1)
        if progress.step % cfg.logging_steps == 0 or progress.step == cfg.max_steps:
            mean = accelerator.reduce(torch.stack(accumulated).mean(), reduction="mean").item()
            accumulated = []
            bar.set_postfix(loss=f"{mean:.4f}")
            accelerator.log({"loss": mean, "lr": lr_scheduler.get_last_lr()[0]}, step=progress.step)
        if cfg.checkpointing_steps and progress.step % cfg.checkpointing_steps == 0:
            _checkpoint(accelerator, out, progress.step)
        if cfg.validation_steps and progress.step % cfg.validation_steps == 0 and accelerator.is_main_process:
            _validate(cfg, teacher, accelerator.unwrap_model(runner), scheduler_config, accelerator, progress.step)
        if step_callback is not None:
            step_callback(progress.step)
    bar.close()

    accelerator.wait_for_everyone()
    folder = out / "adapters"
    if accelerator.is_main_process:
        if cfg.validation_steps and cfg.max_steps % cfg.validation_steps:
            _validate(cfg, teacher, accelerator.unwrap_model(runner), scheduler_config, accelerator, progress.step)
        save_adapters(adapters, folder)
        if cfg.mode == "full":
            adapters.base.save_pretrained(out / "model")
        summary = {"steps": progress.step, "training_seconds_this_session": time.perf_counter() - started,
                   "data_seconds_this_session": collection_seconds,
                   "adapter_parameters": adapters.num_parameters(),
                   "base_parameters": adapters.base_num_parameters(), "processes": accelerator.num_processes}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    accelerator.end_training()
    return folder


def _checkpoint(accelerator: Any, out: Path, step: int) -> None:
    # Every rank calls save_state (it gathers/writes per-rank RNG state); the folder is
    # renamed into place once all ranks are done, so `latest` never picks a torn one.
    final = out / "checkpoints" / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------ CLI
def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep distill train`` (also ``python -m fewstep.distill.train``)."""
    from fewstep.config import add_config_arguments

    group = sub.add_parser("distill", help="guidance distillation: train AGD adapters (distill train)",
                           description="Adapter guidance distillation (AGD).")
    inner = group.add_subparsers(dest="distill_command", required=True, metavar="SUBCOMMAND")
    p = inner.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train guidance adapters on CFG teacher trajectories (resumable; accelerate launch / torchrun)",
        description="Train guidance adapters (AGD) on CFG teacher trajectories. "
                    "Settings: see configs/distill/*.yaml; key=value items override the file.")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from fewstep.config import resolve_config

    args.resume_hint = "rerun with resume_from_checkpoint=latest to continue from the last checkpoint"
    folder = train(resolve_config(DistillConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:  # one line, from the main process
        print(f"wrote adapters to {folder}/ (load with fewstep.distill.load_adapters(pipe, {str(folder)!r}))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fewstep.distill.train`` / ``accelerate launch -m fewstep.distill.train``:
    the same command as ``fewstep distill train``."""
    from fewstep.cli import main as cli_main

    return cli_main(["distill", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
