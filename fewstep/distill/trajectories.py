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

``TrajectorySpec.record="final"`` stores one row per trajectory instead (HiPA's teacher
triples, :mod:`fewstep.distill.hipa_train`): ``x`` the unit initial noise (before
``init_noise_sigma``; the teacher starts from exactly the stored, rounded noise), ``t`` the
first timestep, ``cond``, ``w`` and ``target`` the teacher's final sample.

Storage: ``x`` and ``target`` in ``TrajectorySpec.dtype`` (float16 by default: half the
disk and I/O of float32; the MSE target loses ~1e-3 relative precision, far below the
loss values training reaches). Every shard records the collection's identity (a hash of
the manifest) and its index in its safetensors metadata; :class:`TrajectoryShards` checks
both and every tensor's dtype and shape against the manifest before training, and then
reads the rows of each batch from the files (``os.pread``), so a process's memory does
not grow with the size of the collection.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    "collect_trajectories", "load_trajectories", "TrajectoryShards", "initial_noise", "model_input", "MANIFEST_NAME",
]

MANIFEST_NAME = "trajectories.json"
FORMAT = "fewstep-cfg-trajectories"
FORMAT_VERSION = 2  # 2: storage dtype in the spec, collection identity and index in every shard
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RECORDS = ("states", "final")
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
            tables = self._encode(pipe, self._texts, negative_prompt, device)
        # The table of every prompt stays in host memory; a batch's rows go to the device.
        self._tables = _rows(tables, lambda table: table.to("cpu"))

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
        device = next(self.denoiser.parameters()).device
        return _rows(self._tables, lambda table: table[index.long().cpu()].to(device))

    def null_condition(self, batch: int) -> dict[str, Any]:
        device = next(self.denoiser.parameters()).device
        return _rows(self._tables, lambda table: table[-1:].to(device).expand(batch, *table.shape[1:]))

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
        w_min, w_max: Range of the per-trajectory guidance scale (uniform, finite).
        seed: Shard ``i`` uses seed ``seed + i`` (keep training seeds apart from evaluation seeds).
        dtype: Storage dtype of ``x`` and ``target``: ``float16`` (default), ``bfloat16`` or ``float32``.
        record: ``states`` (every step's model input and CFG output, AGD) or ``final`` (one row per
            trajectory: unit initial noise and the final sample, HiPA).
    """

    num_shards: int
    shard_size: int
    num_inference_steps: int
    w_min: float = 1.0
    w_max: float = 5.0
    seed: int = 100_000
    dtype: str = "float16"
    record: str = "states"

    def __post_init__(self) -> None:
        for name in ("num_shards", "shard_size", "num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrajectorySpec.{name} must be an int >= 1, got {value!r}")
        if not (1.0 <= self.w_min <= self.w_max < math.inf):
            raise ValueError(f"need 1 <= w_min <= w_max < inf, got w_min={self.w_min}, w_max={self.w_max}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"trajectory dtype must be one of {list(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.record not in RECORDS:
            raise ValueError(f"TrajectorySpec.record must be one of {list(RECORDS)}, got {self.record!r}")

    @property
    def rows_per_shard(self) -> int:
        """Rows in one shard: every step of every trajectory (``states``) or one per trajectory (``final``)."""
        return self.shard_size * (self.num_inference_steps if self.record == "states" else 1)

    def identity(self) -> dict[str, Any]:
        """The spec as the manifest records it (``record`` only when not the default: AGD collections stay valid)."""
        values = asdict(self)
        if values["record"] == "states":
            del values["record"]
        return values


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


def collection_id(manifest: Mapping[str, Any]) -> str:
    """The identity of a collection: a hash of its manifest, recorded in every shard."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST_NAME
    if path.is_file():
        saved = _read_manifest(folder)
        if saved != manifest:
            diff = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
            raise ValueError(f"{folder} holds trajectories of another collection (differs in {diff}); "
                             "use another folder or delete it")
        return
    # Processes may race here; they all write the same text, atomically.
    text = json.dumps(manifest, indent=2) + "\n"
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_NAME}: not a trajectory folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the folder to collect again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')!r}; this fewstep reads "
                         f"{FORMAT_VERSION}: delete the folder (or choose another trajectory_dir) to collect again")
    return manifest


@torch.no_grad()
def _collect_shard(teacher: Teacher, scheduler: Any, spec: TrajectorySpec, index: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed + index)
    n = spec.shard_size
    cond = torch.randint(teacher.num_conditions, (n,), generator=g)
    w = spec.w_min + (spec.w_max - spec.w_min) * torch.rand(n, generator=g)
    x = torch.randn(n, *teacher.sample_shape, generator=g)
    store = STORAGE_DTYPES[spec.dtype]
    if spec.record == "final":
        return _collect_final(teacher, scheduler, spec, index, x.to(store), cond, w, device)
    x = x.to(device)
    dtype = next(teacher.denoiser.parameters()).dtype
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    x = initial_noise(scheduler, x).to(dtype)
    cond_d, w_d = cond.to(device), w.to(device)
    records: dict[str, list[torch.Tensor]] = {"x": [], "t": [], "cond": [], "w": [], "target": []}
    for step, t in enumerate(scheduler.timesteps):
        inputs = model_input(scheduler, x, t)
        t_batch = t.to(device).expand(n)
        target = teacher.guided(inputs, t_batch, cond_d, w_d)
        for key, value in (("x", inputs), ("target", target)):
            # One check per step (a sync; collection is not the hot loop): a NaN/Inf never reaches a shard.
            stored = value.to(store)
            if not torch.isfinite(stored).all():
                cause = "is not finite" if not torch.isfinite(value).all() else f"overflows {spec.dtype} storage"
                raise ValueError(f"trajectory shard {index}, step {step} (t={float(t):g}): the CFG {key} {cause} "
                                 f"(guidance scales {float(w.min()):g}..{float(w.max()):g}); nothing of this "
                                 "shard was written")
            records[key].append(stored.to("cpu"))
        for key, value in (("t", t_batch), ("cond", cond), ("w", w)):
            records[key].append(value.detach().to("cpu"))
        x = scheduler.step(target, t, x).prev_sample
    out = {k: torch.cat(v).contiguous() for k, v in records.items()}
    out["t"], out["w"], out["cond"] = out["t"].float(), out["w"].float(), out["cond"].long()
    return out


def _collect_final(teacher: Teacher, scheduler: Any, spec: TrajectorySpec, index: int, noise: torch.Tensor,
                   cond: torch.Tensor, w: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """One row per trajectory: the stored (rounded) unit noise the teacher started from and its final sample."""
    dtype = next(teacher.denoiser.parameters()).dtype
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    x = initial_noise(scheduler, noise.to(device).float()).to(dtype)
    cond_d, w_d, n = cond.to(device), w.to(device), len(cond)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher.guided(model_input(scheduler, x, t), t.to(device).expand(n), cond_d, w_d),
                           t, x).prev_sample
    final = x.to(STORAGE_DTYPES[spec.dtype])
    if not torch.isfinite(final).all():
        cause = "is not finite" if not torch.isfinite(x).all() else f"overflows {spec.dtype} storage"
        raise ValueError(f"trajectory shard {index}: the teacher's final sample {cause} (guidance scales "
                         f"{float(w.min()):g}..{float(w.max()):g}); nothing of this shard was written")
    first = scheduler.timesteps[0].detach().float().cpu().expand(n)
    return {"x": noise.contiguous(), "t": first.contiguous(), "cond": cond.long(), "w": w.float(),
            "target": final.cpu().contiguous()}


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
        ValueError: If the folder holds a different collection, a shard there is corrupt or
            belongs to another collection, a CFG state is not finite, or the process split is bad.
    """
    if process_index is None or num_processes is None:
        from accelerate import PartialState

        state = PartialState()
        process_index, num_processes = state.process_index, state.num_processes
    if not (0 <= process_index < num_processes):
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec.identity(),
                "teacher": teacher.describe(), "scheduler": _scheduler_identity(scheduler)}
    _write_manifest(folder, manifest)
    identity = {"format": FORMAT, "collection": collection_id(manifest)}

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    device = next(teacher.denoiser.parameters()).device
    mine = [i for i in range(spec.num_shards) if i % num_processes == process_index]
    todo = []
    for i in mine:
        if _shard_path(folder, i).is_file():
            _shard_layout(_shard_path(folder, i), manifest, i)  # a finished shard must be this collection's
        else:
            todo.append(i)
    bar = tqdm(todo, desc=f"CFG trajectories [{process_index}/{num_processes}]", disable=not progress,
               initial=len(mine) - len(todo), total=len(mine))
    for index in bar:
        shard = _collect_shard(teacher, scheduler, spec, index, device)
        # One metadata entry: safetensors writes several in no fixed order, and shards must be byte-stable.
        meta = {"fewstep": json.dumps({**identity, "index": index}, sort_keys=True)}
        _write_atomic(_shard_path(folder, index), lambda tmp: save_file(shard, tmp, metadata=meta))
    return folder


# ------------------------------------------------------------------------------ reading shards
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32}


@dataclass(frozen=True)
class _Field:
    offset: int  # of the tensor's first byte in the file
    row_bytes: int
    dtype: torch.dtype
    row_shape: tuple[int, ...]


def _expected_fields(manifest: Mapping[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    spec = TrajectorySpec(**manifest["spec"])
    store, shape = STORAGE_DTYPES[spec.dtype], tuple(manifest["teacher"]["sample_shape"])
    return {"x": (store, shape), "target": (store, shape), "t": (torch.float32, ()), "cond": (torch.int64, ()),
            "w": (torch.float32, ())}


def _shard_layout(path: Path, manifest: Mapping[str, Any], index: int) -> dict[str, _Field]:
    """Validates one shard's header against the manifest (no tensor data is read).

    Raises:
        ValueError: naming the shard: unreadable or truncated, from another collection or slot,
            or a tensor of another dtype or shape.
    """
    fix = "delete it and rerun to collect it again"
    spec = TrajectorySpec(**manifest["spec"])
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 1 << 24):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"trajectory shard {path} is not a readable safetensors file ({err}); {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"trajectory shard {path} has a malformed header; {fix}")
    try:
        meta = json.loads((header.pop("__metadata__", None) or {}).get("fewstep", "{}"))
    except (AttributeError, TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("format") != FORMAT or meta.get("collection") != collection_id(manifest):
        raise ValueError(f"trajectory shard {path} belongs to another collection than {path.parent / MANIFEST_NAME} "
                         f"(collection {meta.get('collection')!r}, expected {collection_id(manifest)!r}); {fix}")
    if meta.get("index") != index:
        raise ValueError(f"trajectory shard {path} holds shard {meta.get('index')!r} of this collection, "
                         f"not shard {index}; {fix}")
    rows, start, end, fields = spec.rows_per_shard, 8 + n, 8 + n, {}
    for name, (dtype, row_shape) in _expected_fields(manifest).items():
        info = header.get(name)
        try:
            got_dtype, shape = _SAFETENSORS_DTYPES.get(info["dtype"]), tuple(int(v) for v in info["shape"])
            begin, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"trajectory shard {path} has no valid tensor {name!r}; {fix}") from None
        if got_dtype != dtype or shape != (rows, *row_shape):
            raise ValueError(f"trajectory shard {path}: {name} is {info['dtype']} {list(shape)}, the manifest says "
                             f"{dtype} {[rows, *row_shape]}; {fix}")
        row_bytes = math.prod(row_shape) * dtype.itemsize
        if begin < 0 or stop - begin != rows * row_bytes:
            raise ValueError(f"trajectory shard {path} has a malformed header ({name}); {fix}")
        fields[name] = _Field(start + begin, row_bytes, dtype, row_shape)
        end = max(end, start + stop)
    if end != size:
        raise ValueError(f"trajectory shard {path} is truncated or has trailing data ({size} bytes, its header "
                         f"says {end}); {fix}")
    return fields


class TrajectoryShards:
    """A finished collection, validated against its manifest and read row by row from the files.

    Nothing is loaded up front: :meth:`rows` reads just the requested states, so memory stays
    at one batch whatever the size of the collection (the OS page cache does the caching).

    Args:
        folder: A folder written by :func:`collect_trajectories`.

    Raises:
        FileNotFoundError: If the manifest or a shard is missing (the collection is unfinished).
        ValueError: If the manifest is not a trajectory manifest of this version, or a shard is
            corrupt, truncated, of another collection or slot, or of another dtype or shape.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.spec = TrajectorySpec(**self.manifest["spec"])
        missing = [i for i in range(self.spec.num_shards) if not _shard_path(self.folder, i).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are "
                                    "missing; rerun the collection to finish it")
        self._layouts = [_shard_layout(_shard_path(self.folder, i), self.manifest, i)
                         for i in range(self.spec.num_shards)]

    def __len__(self) -> int:
        return self.spec.num_shards * self.spec.rows_per_shard

    def _read(self, shard: int, rows: list[int], out: dict[str, memoryview], at: list[int]) -> None:
        path = _shard_path(self.folder, shard)
        runs = []  # (first row, first position, length): consecutive rows are one read
        for row, pos in zip(rows, at):
            if runs and row == runs[-1][0] + runs[-1][2] and pos == runs[-1][1] + runs[-1][2]:
                runs[-1][2] += 1
            else:
                runs.append([row, pos, 1])
        with open(path, "rb", buffering=0) as f:
            for name, field in self._layouts[shard].items():
                rb = field.row_bytes
                for row, pos, length in runs:
                    f.seek(field.offset + row * rb)
                    if f.readinto(out[name][pos * rb:(pos + length) * rb]) != length * rb:
                        raise ValueError(f"trajectory shard {path} was truncated while training; "
                                         "delete it and rerun to collect it again")

    def rows(self, index: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The states at global row indices ``index`` (shard-major order), as stored.

        Returns:
            ``x``, ``target`` [N, C, H, W] in the storage dtype; ``t``, ``w`` float32 [N]; ``cond`` int64 [N].
        """
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)})")
        per = self.spec.rows_per_shard
        shard, row = (index // per).tolist(), (index % per).tolist()
        fields = self._layouts[0]
        buffers = {name: bytearray(len(index) * f.row_bytes) for name, f in fields.items()}
        views = {name: memoryview(b) for name, b in buffers.items()}
        by_shard: dict[int, list[int]] = {}
        for pos, s in enumerate(shard):
            by_shard.setdefault(s, []).append(pos)
        for s, positions in sorted(by_shard.items()):
            self._read(s, [row[p] for p in positions], views, positions)
        return {name: (torch.frombuffer(buffers[name], dtype=f.dtype) if buffers[name] else
                       torch.empty(0, dtype=f.dtype)).reshape(len(index), *f.row_shape)
                for name, f in fields.items()}


def load_trajectories(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loads a finished collection into memory (for inspection; training streams it with :class:`TrajectoryShards`).

    Returns:
        ``(records, manifest)``: records ``x``, ``t``, ``cond``, ``w``, ``target`` concatenated
        over the shards in order (``x`` and ``target`` as float32), and the manifest.

    Raises:
        FileNotFoundError: If the manifest or a shard is missing (the collection is unfinished).
        ValueError: If the manifest is not a trajectory manifest, or a shard is invalid (see :class:`TrajectoryShards`).
    """
    shards = TrajectoryShards(folder)
    records = shards.rows(torch.arange(len(shards)))
    records["x"], records["target"] = records["x"].float(), records["target"].float()
    return records, shards.manifest
