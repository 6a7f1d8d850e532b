"""CFG teacher trajectories for guidance distillation: sharded, resumable, split across processes.

AGD (Jensen & Sadat, TMLR 2025) trains adapters on the states a CFG-guided sampler
actually visits, not on forward-noised data. :func:`collect_trajectories` runs the frozen
teacher with real classifier-free guidance and any diffusers scheduler (fewstep's
:class:`~fewstep.FewstepScheduler` included), one guidance scale ``w ~ U[w_min, w_max]``
per trajectory, and records at every step

    x        the model input (after ``scale_model_input``)
    t        the timestep passed to the model
    cond     the index of the condition (class label or prompt) in the teacher's list
    w        the guidance scale
    target   ``out_u + w (out_c - out_u)``, the CFG-combined model output

Shard ``i`` holds ``shard_size`` trajectories drawn from ``seed + i`` alone, so the data
do not depend on how many processes collected them or how often the job was restarted:
process ``p`` of ``P`` writes the shards ``i % P == p``, every shard is written
atomically, and a rerun skips the shards already on disk. Conditions are stored as
indices; the :class:`Teacher` turns them into model inputs when training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .architectures import fingerprint
from .saving import _write_atomic

__all__ = [
    "Teacher", "LabelTeacher", "PromptTeacher", "TrajectorySpec", "build_scheduler",
    "collect_trajectories", "load_trajectories", "initial_noise", "model_input", "MANIFEST_NAME",
]

MANIFEST_NAME = "trajectories.json"
FORMAT = "fewstep-cfg-trajectories"
FORMAT_VERSION = 1
_TRANSFORMERS = ("SD3Transformer2DModel", "DiTTransformer2DModel")


class Teacher:
    """A frozen conditional denoiser, its conditions and its unconditional input.

    Subclasses define :meth:`condition` and :meth:`null_condition`; the denoiser call
    (positional ``(x, t)`` for UNets, ``hidden_states=`` / ``timestep=`` for transformers)
    is handled here.

    Args:
        denoiser: The base network.
        sample_shape: Shape of one model input ``(C, H, W)``.
        num_conditions: Number of conditions (labels or prompts) indices may point to.
    """

    def __init__(self, denoiser: nn.Module, sample_shape: Sequence[int], num_conditions: int) -> None:
        self.denoiser = denoiser
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_conditions = int(num_conditions)
        names = {cls.__name__ for cls in type(denoiser).__mro__}
        self._keywords = bool(names & set(_TRANSFORMERS))
        # A network that also predicts its variance (DiT-XL/2: out_channels = 2 x in) gives
        # [eps, variance]; as diffusers' DiTPipeline does, only eps is guided and sampled with.
        out_channels = getattr(getattr(denoiser, "config", None), "out_channels", None)
        self._learned_variance = out_channels == 2 * self.sample_shape[0]

    def condition(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditional keyword arguments of the denoiser for condition indices [B]."""
        raise NotImplementedError

    def null_condition(self, batch: int) -> dict[str, torch.Tensor]:
        """Unconditional keyword arguments for a batch of ``batch``."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor], module: nn.Module | None = None,
                 **extra: Any) -> torch.Tensor:
        """The raw model output for inputs ``x`` [B, ...], timesteps ``t`` [B] and conditions.

        Args:
            module: What to call instead of the bare denoiser (e.g. its guidance adapters).
            **extra: Further keyword arguments of ``module`` (``guidance_scale=``).
        """
        module = self.denoiser if module is None else module
        if self._keywords:
            out = module(hidden_states=x, timestep=t, **cond, **extra).sample
        else:
            out = module(x, t, **cond, **extra).sample
        return out[:, : self.sample_shape[0]] if self._learned_variance else out

    def guided(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The CFG output ``out_u + w (out_c - out_u)`` with one ``w`` per sample, in one doubled batch."""
        batch = x.shape[0]
        both = _stack(self.condition(index), self.null_condition(batch))
        out_c, out_u = self(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        w = w.to(out_c.dtype).view(-1, *([1] * (out_c.ndim - 1)))
        return out_u + w * (out_c - out_u)

    def describe(self) -> dict[str, Any]:
        """What identifies this teacher in a trajectory manifest."""
        return {"class": type(self).__name__, "model_class": type(self.denoiser).__name__,
                "fingerprint": fingerprint(self.denoiser), "sample_shape": list(self.sample_shape),
                "num_conditions": self.num_conditions}


def _stack(cond: Mapping[str, Any], null: Mapping[str, Any]) -> dict[str, Any]:
    # Conditional rows first, then the null rows, through nested kwargs (SDXL's added_cond_kwargs).
    return {k: _stack(v, null[k]) if isinstance(v, Mapping) else torch.cat([v, null[k]]) for k, v in cond.items()}


class LabelTeacher(Teacher):
    """A class-conditional denoiser (the digits ``UNet2DModel``, DiT) with a null label for CFG.

    Args:
        denoiser: The network (takes ``class_labels=``).
        num_classes: Labels ``0 .. num_classes - 1`` are the conditions.
        null_label: The label of the unconditional model.
        sample_shape: ``(C, H, W)``; defaults to the denoiser config's channels and size.
    """

    def __init__(self, denoiser: nn.Module, num_classes: int, null_label: int,
                 sample_shape: Sequence[int] | None = None) -> None:
        if sample_shape is None:
            cfg = denoiser.config
            sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        super().__init__(denoiser, sample_shape, num_classes)
        self.null_label = int(null_label)

    def condition(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"class_labels": index.long()}

    def null_condition(self, batch: int) -> dict[str, torch.Tensor]:
        device = next(self.denoiser.parameters()).device
        return {"class_labels": torch.full((batch,), self.null_label, dtype=torch.long, device=device)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "null_label": self.null_label}


class PromptTeacher(Teacher):
    """A text-conditional diffusers pipeline (Stable Diffusion, SDXL, SD3): prompts encoded once.

    The unconditional input is what the pipeline itself uses for CFG: the encoded
    ``negative_prompt`` (SDXL with ``force_zeros_for_empty_prompt`` and an empty negative
    prompt: zeros, as ``StableDiffusionXLPipeline`` does).

    Args:
        pipe: A ``StableDiffusionPipeline``-like (``unet``), ``StableDiffusionXLPipeline``-like
            (``unet`` with ``text_time`` added conditions: pooled text embeddings and size/crop
            time ids) or ``StableDiffusion3Pipeline``-like (``transformer``, pooled projections)
            pipeline with ``encode_prompt``.
        prompts: The conditions.
        negative_prompt: The unconditional prompt ("" as in CFG training).
        sample_shape: Latent shape ``(C, H, W)``; defaults to the denoiser config's.
        validation_prompts: Further prompts encoded for sampling only (:meth:`index_of`);
            not training conditions and not part of the teacher's identity.
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], negative_prompt: str = "",
                 sample_shape: Sequence[int] | None = None, validation_prompts: Sequence[str] = ()) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        cfg = denoiser.config
        if sample_shape is None:
            sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        super().__init__(denoiser, sample_shape, len(prompts))
        self.prompts, self.negative_prompt = list(prompts), negative_prompt
        extra = [p for p in dict.fromkeys(validation_prompts) if p not in self.prompts]
        self._texts = [*self.prompts, *extra]
        device = next(denoiser.parameters()).device
        with torch.no_grad():
            self._tables = self._encode(pipe, self._texts, negative_prompt, device)

    def _encode(self, pipe: Any, texts: list[str], negative: str, device: torch.device) -> dict[str, Any]:
        # One row per text, then the unconditional row last.
        if getattr(pipe, "transformer", None) is not None:  # SD3: embeddings + pooled
            all_texts = [*texts, negative]
            embeds, _, pooled, _ = pipe.encode_prompt(all_texts, all_texts, all_texts, device=device,
                                                      do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if getattr(self.denoiser.config, "addition_embed_type", None) == "text_time":  # SDXL
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=[negative] * len(texts) if negative else None)
            # original size + crop top-left + target size, in pixels, as the pipeline's defaults.
            height, width = (s * pipe.vae_scale_factor for s in self.sample_shape[1:])
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
            return {"encoder_hidden_states": torch.cat([embeds, neg[:1]]),
                    "added_cond_kwargs": {"text_embeds": torch.cat([pooled, neg_pooled[:1]]),
                                          "time_ids": time_ids.expand(len(texts) + 1, -1)}}
        embeds, _ = pipe.encode_prompt([*texts, negative], device, 1, False)
        return {"encoder_hidden_states": embeds}

    def index_of(self, prompt: str) -> int:
        """The condition index of a training or validation prompt.

        Raises:
            ValueError: If the prompt was not encoded.
        """
        if prompt not in self._texts:
            raise ValueError(f"prompt {prompt!r} is neither a training nor a validation prompt of this teacher")
        return self._texts.index(prompt)

    def condition(self, index: torch.Tensor) -> dict[str, Any]:
        return _rows(self._tables, lambda table: table[index.long()])

    def null_condition(self, batch: int) -> dict[str, Any]:
        return _rows(self._tables, lambda table: table[-1:].expand(batch, *table.shape[1:]))

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([self.prompts, self.negative_prompt]).encode()).hexdigest()[:16]
        return {**super().describe(), "prompts_sha256": digest}


def _rows(tables: Mapping[str, Any], take) -> dict[str, Any]:
    return {k: _rows(v, take) if isinstance(v, Mapping) else take(v) for k, v in tables.items()}


def build_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A scheduler from a name and the model's scheduler config.

    Args:
        name: ``fewstep:<solver>[:key=value,...]`` (a :class:`~fewstep.FewstepScheduler`
            running that registered solver with those options) or the name of a diffusers
            scheduler class (``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ...) of the
            model's family (flow matching or VP).
        base_config: The config of the model's own scheduler.

    Raises:
        ValueError: On an unknown name or solver option, or a scheduler of the other family.
    """
    import diffusers

    from fewstep.config import parse_spec
    from fewstep.samplers.diffusers_config import is_flow_config

    if not isinstance(name, str):
        raise TypeError(f"scheduler must be a name, got {type(name).__name__}")
    if name.startswith("fewstep:"):
        from fewstep.samplers.scheduler import FewstepScheduler

        solver, options = parse_spec(name.split(":", 1)[1], "teacher_scheduler")
        return FewstepScheduler.from_config(dict(base_config), solver=solver, solver_options=options or None)
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"unknown scheduler {name!r}: use fewstep:<solver> or a diffusers scheduler class name")
    # from_config builds a flow sampler for a VP model (and the reverse) without a word: wrong noise levels.
    flow_model, flow_scheduler = is_flow_config(dict(base_config)), name.startswith("FlowMatch")
    if flow_model != flow_scheduler:
        family = "flow-matching" if flow_model else "VP (betas)"
        raise ValueError(f"scheduler {name} is {'a flow-matching' if flow_scheduler else 'a VP (betas)'} scheduler "
                         f"but the model's scheduler config is {family}; use a {family} scheduler "
                         f"({'FlowMatchEulerDiscreteScheduler' if flow_model else 'DDIMScheduler, ...'}) "
                         "or fewstep:<solver>")
    return cls.from_config(dict(base_config))


@dataclass(frozen=True)
class TrajectorySpec:
    """What to collect.

    Attributes:
        num_shards: Number of shards.
        shard_size: Trajectories per shard (one sampling batch).
        num_inference_steps: Scheduler steps per trajectory (all of them are recorded).
        w_min, w_max: Range of the per-trajectory guidance scale (uniform).
        seed: Shard ``i`` uses seed ``seed + i`` (keep training seeds apart from evaluation seeds).
    """

    num_shards: int
    shard_size: int
    num_inference_steps: int
    w_min: float = 1.0
    w_max: float = 5.0
    seed: int = 100_000

    def __post_init__(self) -> None:
        for name in ("num_shards", "shard_size", "num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrajectorySpec.{name} must be an int >= 1, got {value!r}")
        if not (1.0 <= self.w_min <= self.w_max):
            raise ValueError(f"need 1 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")


def initial_noise(scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
    """Scales unit noise to the scheduler's first state (flow schedulers have no ``init_noise_sigma``)."""
    return noise * getattr(scheduler, "init_noise_sigma", 1.0)


def model_input(scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's input at state ``x`` (flow schedulers have no ``scale_model_input``)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def _scheduler_identity(scheduler: Any) -> dict[str, Any]:
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=str))}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST_NAME
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != manifest:
            diff = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
            raise ValueError(f"{folder} holds trajectories of another collection (differs in {diff}); "
                             "use another folder or delete it")
        return
    # Processes may race here; they all write the same text, atomically.
    text = json.dumps(manifest, indent=2) + "\n"
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@torch.no_grad()
def _collect_shard(teacher: Teacher, scheduler: Any, spec: TrajectorySpec, index: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed + index)
    n = spec.shard_size
    cond = torch.randint(teacher.num_conditions, (n,), generator=g)
    w = spec.w_min + (spec.w_max - spec.w_min) * torch.rand(n, generator=g)
    x = torch.randn(n, *teacher.sample_shape, generator=g).to(device)
    dtype = next(teacher.denoiser.parameters()).dtype
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    x = initial_noise(scheduler, x).to(dtype)
    cond_d, w_d = cond.to(device), w.to(device)
    records: dict[str, list[torch.Tensor]] = {"x": [], "t": [], "cond": [], "w": [], "target": []}
    for t in scheduler.timesteps:
        inputs = model_input(scheduler, x, t)
        t_batch = t.to(device).expand(n)
        target = teacher.guided(inputs, t_batch, cond_d, w_d)
        for key, value in (("x", inputs), ("t", t_batch), ("cond", cond), ("w", w), ("target", target)):
            records[key].append(value.detach().to("cpu"))
        x = scheduler.step(target, t, x).prev_sample
    out = {k: torch.cat(v).contiguous() for k, v in records.items()}
    out["t"] = out["t"].float()
    out["x"], out["target"] = out["x"].float(), out["target"].float()
    return out


def collect_trajectories(
    teacher: Teacher,
    scheduler: Any,
    spec: TrajectorySpec,
    folder: str | os.PathLike,
    *,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: bool = True,
) -> Path:
    """Runs the CFG teacher and writes this process's missing shards to ``folder``.

    Args:
        teacher: The frozen model and its conditions.
        scheduler: Any diffusers scheduler (a fresh instance per process).
        spec: What to collect.
        folder: Output folder (created). A folder from another collection is an error.
        process_index, num_processes: This process's share; None asks ``accelerate``
            (one process when not launched by it).
        progress: Show a progress bar.

    Returns:
        The folder.

    Raises:
        ValueError: If the folder holds a different collection, or the process split is bad.
    """
    if process_index is None or num_processes is None:
        from accelerate import PartialState

        state = PartialState()
        process_index, num_processes = state.process_index, state.num_processes
    if not (0 <= process_index < num_processes):
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "spec": asdict(spec),
                "teacher": teacher.describe(), "scheduler": _scheduler_identity(scheduler)}
    _write_manifest(folder, manifest)

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    device = next(teacher.denoiser.parameters()).device
    mine = [i for i in range(spec.num_shards) if i % num_processes == process_index]
    todo = [i for i in mine if not _shard_path(folder, i).is_file()]
    bar = tqdm(todo, desc=f"CFG trajectories [{process_index}/{num_processes}]", disable=not progress,
               initial=len(mine) - len(todo), total=len(mine))
    for index in bar:
        shard = _collect_shard(teacher, scheduler, spec, index, device)
        _write_atomic(_shard_path(folder, index), lambda tmp: save_file(shard, tmp, metadata={"format": FORMAT}))
    return folder


def load_trajectories(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loads a finished collection into memory.

    Returns:
        ``(records, manifest)``: records ``x``, ``t``, ``cond``, ``w``, ``target`` concatenated
        over the shards in order, and the manifest.

    Raises:
        FileNotFoundError: If the manifest or a shard is missing (the collection is unfinished).
        ValueError: If the manifest is not a trajectory manifest.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_NAME}: not a trajectory folder")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT} manifest")
    spec = TrajectorySpec(**manifest["spec"])
    missing = [i for i in range(spec.num_shards) if not _shard_path(folder, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; "
                                "rerun the collection to finish it")
    shards = [load_file(str(_shard_path(folder, i))) for i in range(spec.num_shards)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}, manifest
