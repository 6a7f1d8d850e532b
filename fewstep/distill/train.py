"""Train guidance adapters (AGD) or HiPA one-step LoRA with accelerate:
``accelerate launch -m fewstep distill train --config FILE``.

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

import copy
import dataclasses
import gc
import json
import shutil
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.infra.seeds import derived_seed

from .adapters import GuidanceAdapters
from .saving import save_adapters
from .settings import DistillConfig
from .trajectories import (
    LabelTeacher, PromptTeacher, Teacher, TrajectoryShards, build_scheduler, collect_trajectories,
    initial_noise, model_input,
)

__all__ = ["NonFiniteTrainingError", "build_teacher", "train", "latest_checkpoint"]

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
        g = torch.Generator().manual_seed(derived_seed(self.seed, k))
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
        g = torch.Generator().manual_seed(derived_seed(self.seed, k))
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
        except Exception as err:  # advisory only (e.g. a hub id it does not know): never stops the training
            accelerator.print(f"fewstep distill train: no memory estimate: {type(err).__name__}: {err}")
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
