"""Disk and memory estimate of an AGD run, before any work: ``fewstep distill estimate --config FILE``.

The trainer prints the same figures when it starts. Per process:

- disk: the trajectory collection (rows x (``x`` + ``target`` in ``trajectory_dtype`` + t, w, cond));
- host RAM: the pipeline as loaded (every component in the base dtype), the prompt-embedding
  table (kept on the host), and a fixed runtime baseline (Python, torch, CUDA context);
  training batches are read from the shards, so nothing grows with the collection;
- GPU: the frozen base (base dtype), the adapters with their gradients and AdamW state (float32;
  in ``mode=full`` the base's too), and the activations saved for backward times ``batch_size``;
  while the prompts are encoded (64 at a time), the denoiser, the text encoders (dropped
  afterwards) and the prompt table (moved to the host afterwards).

Activations per sample are *counted*, not guessed: one training forward (base + adapters, batch 1)
runs on the ``meta`` device for the real architecture at its latent size, and every tensor saved
for backward is summed (attention counted as flash / memory-efficient attention saves it: q, k,
v, output and log-sum-exp, not the L x L matrix the CPU math path keeps). With gradient
checkpointing, every unit diffusers checkpoints (a resnet, a transformer block) keeps only its
inputs, plus one unit recomputed in backward (the largest). The same counter on a real forward/backward of the tiny pipelines
gives the same bytes (``tests/test_distill_memory.py``). Scaling rule: activation memory is
linear in ``batch_size``; everything else is counted exactly for the architecture at hand.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["MemoryEstimate", "estimate", "count_saved_activations", "format_estimate"]

GIB = 1 << 30
RUNTIME_HOST_BYTES = 3 * GIB // 2  # Python + torch + diffusers imported, CUDA context's host side
RUNTIME_GPU_BYTES = GIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack (rule of thumb)
FITS_BYTES = 24 * 10**9  # "a 24 GB GPU": 24e9 bytes as sold

# Published architectures of the shipped recipes' hub ids (huggingface.co/<id>/*/config.json, architecture
# keys only), so the estimate needs no download. Text encoders: published parameter counts.
_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
_SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
_SD15 = {"denoiser": ("UNet2DConditionModel", _SD15_UNET), "encoders": {"CLIP-L": 123_060_480},
         "other": {"VAE": 83_653_863, "safety checker": 304_309_056}, "tokens": 77, "text_dim": 768, "pooled": 0}
KNOWN_PIPELINES: dict[str, dict[str, Any]] = {
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "denoiser": ("UNet2DConditionModel", _SDXL_UNET), "encoders": {"CLIP-L": 123_060_480, "OpenCLIP-bigG": 694_659_840},
        "other": {"VAE": 83_653_863}, "tokens": 77, "text_dim": 2048, "pooled": 1280},
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "denoiser": ("SD3Transformer2DModel", _SD3_MEDIUM),
        "encoders": {"CLIP-L": 123_650_304, "CLIP-G": 694_659_840, "T5-XXL encoder": 4_762_310_656},
        "other": {"VAE": 83_819_683}, "tokens": 333, "text_dim": 4096, "pooled": 2048},
}


@dataclass
class MemoryEstimate:
    """What a run needs, per process (bytes).

    Attributes:
        trajectory_disk: The trajectory collection on disk (0 for ``data=noised``).
        host: Host-RAM items (pipeline as loaded, prompt table, runtime).
        gpu: Device-memory items during training.
        gpu_encoding: Device memory while the prompts are encoded (denoiser + text encoders).
        activations_per_sample: Saved-for-backward bytes of one sample.
        notes: How each figure was obtained.
    """

    trajectory_disk: int
    host: dict[str, int]
    gpu: dict[str, int]
    gpu_encoding: int
    activations_per_sample: int
    notes: list[str] = field(default_factory=list)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_total(self) -> int:
        return max(sum(self.gpu.values()), self.gpu_encoding)

    def fits(self, budget: int = FITS_BYTES) -> bool:
        """Whether the GPU peak fits ``budget`` bytes."""
        return self.gpu_total <= budget

    def to_dict(self) -> dict[str, Any]:
        return {"trajectory_disk": self.trajectory_disk, "host": self.host, "host_total": self.host_total,
                "gpu": self.gpu, "gpu_encoding": self.gpu_encoding, "gpu_total": self.gpu_total,
                "activations_per_sample": self.activations_per_sample, "fits_24GB": self.fits(), "notes": self.notes}


# ------------------------------------------------------------------------- activation counter
class _FlashLike(torch.autograd.Function):
    """SDPA that saves what flash / memory-efficient attention saves on a GPU (q, k, v, out, logsumexp)."""

    @staticmethod
    def forward(ctx, q, k, v, sdpa):
        out = sdpa(q, k, v)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the counter never runs backward
        raise NotImplementedError


@contextmanager
def _flash_like_attention() -> Iterator[None]:
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention

    def counted(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or scale is not None or kwargs:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        return _FlashLike.apply(q, k, v, sdpa)

    functional.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = sdpa


def count_saved_activations(model: nn.Module, forward: Callable[[], Any], checkpointing: bool = False) -> int:
    """Bytes of the tensors one forward saves for backward (parameters excluded), flash-style attention.

    Args:
        model: The network (a diffusers model; its parameters are not counted).
        forward: Runs one training forward (grad enabled).
        checkpointing: Count as with diffusers' gradient checkpointing: every unit it checkpoints
            (a resnet, a transformer block) keeps only its inputs, and backward recomputes one
            unit at a time, so the largest unit's saved tensors are added once.

    Returns:
        The bytes (each storage counted once).
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, checkpoint unit or -1)
    unit_inputs: list[int] = []
    stack = [-1]

    def unit(module: nn.Module, *args: Any) -> Any:  # diffusers' gradient_checkpointing_func
        stack.append(len(unit_inputs))
        unit_inputs.append(sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor)))
        try:
            return module(*args)
        finally:
            stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), stack[-1])
        return t

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=unit)
    try:
        with _flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        if checkpointing:
            model.disable_gradient_checkpointing()
    if not checkpointing:
        return sum(b for b, _ in seen.values())
    outside = sum(b for b, where in seen.values() if where < 0)
    per_unit = [0] * len(unit_inputs)
    for b, where in seen.values():
        if where >= 0:
            per_unit[where] += b
    return outside + sum(unit_inputs) + max(per_unit, default=0)


# ------------------------------------------------------------------------------ architecture
def _meta_denoiser(cls_name: str, config: dict[str, Any]) -> nn.Module:
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def _describe_pipeline(model: str) -> dict[str, Any]:
    """Denoiser (class, config), text-encoder and other parameter counts, prompt-embedding shape."""
    if model in KNOWN_PIPELINES:
        return KNOWN_PIPELINES[model]
    root = Path(model)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"cannot estimate model {model!r}: not a local pipeline folder and not one of the known "
                         f"hub ids {sorted(KNOWN_PIPELINES)}")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    name = "transformer" if "transformer" in index else "unet"
    config = json.loads((root / name / "config.json").read_text(encoding="utf-8"))
    cls_name = config.pop("_class_name")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    encoders, other = {}, {}
    for part, value in index.items():
        if part.startswith("_") or part == name or not isinstance(value, list) or value[0] is None:
            continue
        count = _parameters_from_config(root / part, value)
        if count:
            (encoders if part.startswith("text_encoder") else other)[part] = count
    den = config
    tokens = 77 + (256 if cls_name == "SD3Transformer2DModel" else 0)
    dim = den.get("joint_attention_dim") or den.get("cross_attention_dim") or 0
    pooled = den.get("pooled_projection_dim") or 0
    if den.get("addition_embed_type") == "text_time":  # SDXL: the pooled text embedding + 6 time ids, each embedded
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
    return {"denoiser": (cls_name, config), "encoders": encoders, "other": other, "tokens": tokens,
            "text_dim": int(dim), "pooled": int(pooled)}


def _parameters_from_config(folder: Path, entry: list) -> int:
    """Parameter count of a saved component, from its config on the meta device (0 if unknown)."""
    library, cls_name = entry
    if not (folder / "config.json").is_file():
        return 0
    try:
        module = __import__(library)
        cls = getattr(module, cls_name)
        with torch.device("meta"):
            if library == "transformers":
                from transformers import AutoConfig

                net = cls(AutoConfig.from_pretrained(str(folder)))
            else:
                net = cls.from_config(cls.load_config(str(folder)))
        return sum(p.numel() for p in net.parameters())
    except Exception:  # an unusual component: leave it out of the estimate (noted by its absence)
        return 0


def _inputs(den: nn.Module, dtype: torch.dtype, pipeline: dict[str, Any] | None) -> tuple[tuple, dict]:
    cfg = den.config
    size = cfg.sample_size
    with torch.device("meta"):
        x = torch.empty(1, cfg.in_channels, size, size, dtype=dtype)
        t = torch.full((1,), 500.0)
        name = type(den).__name__
        if name == "UNet2DModel":
            return (x, t), {"class_labels": torch.zeros(1, dtype=torch.long)}
        if name == "DiTTransformer2DModel":
            return (), {"hidden_states": x, "timestep": t, "class_labels": torch.zeros(1, dtype=torch.long)}
        ehs = torch.empty(1, pipeline["tokens"], pipeline["text_dim"], dtype=dtype)
        if name == "SD3Transformer2DModel":
            return (), {"hidden_states": x, "timestep": t, "encoder_hidden_states": ehs,
                        "pooled_projections": torch.empty(1, pipeline["pooled"], dtype=dtype)}
        kwargs = {"encoder_hidden_states": ehs}
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pipeline["pooled"], dtype=dtype),
                                           "time_ids": torch.empty(1, 6, dtype=dtype)}
        return (x, t), kwargs


def _activation_dtype(cfg: Any) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, cfg.base_dtype())


def activations_per_sample(den: nn.Module, cfg: Any, pipeline: dict[str, Any] | None) -> int:
    """Saved-for-backward bytes of one training sample through ``den`` with the run's adapters (meta device)."""
    from .adapters import GuidanceAdapters

    dtype = _activation_dtype(cfg)
    nn.Module.to(den, dtype)  # (not diffusers' override, which warns about float32 modules)
    adapters = nn.Module.to(GuidanceAdapters(den, cfg.adapter_config()), dtype)  # autocast computes them in dtype
    try:
        args, kwargs = _inputs(den, dtype, pipeline)
        guidance = torch.full((1,), 3.0, device="meta")
        return count_saved_activations(den, lambda: adapters(*args, guidance_scale=guidance, **kwargs),
                                       checkpointing=cfg.gradient_checkpointing)
    finally:
        adapters.remove()


# -------------------------------------------------------------------------------------- main
def estimate(cfg: Any) -> MemoryEstimate:
    """The disk and per-process memory an AGD run of ``cfg`` (a :class:`~fewstep.distill.settings.DistillConfig`) needs.

    Raises:
        ValueError: If the model is neither ``digits``, a local pipeline folder, nor a known hub id, or the
            run is not AGD's (``method=hipa``).
    """
    from .adapters import GuidanceAdapters

    if getattr(cfg, "method", "agd") != "agd":  # HiPA's LoRA, one-row teacher data and one-step loss are not modelled
        raise ValueError(f"the estimate models AGD runs; method={cfg.method} is not estimated")
    base_dtype = cfg.base_dtype()
    base_bytes = base_dtype.itemsize
    if cfg.model == "digits":
        from fewstep.zoo.digits import PIPELINE_DIR

        pipeline = None
        config = json.loads((Path(PIPELINE_DIR) / "unet" / "config.json").read_text(encoding="utf-8"))
        den = _meta_denoiser("UNet2DModel", {k: v for k, v in config.items() if not k.startswith("_")})
        encoders, other, prompts = {}, {}, 0
    else:
        pipeline = _describe_pipeline(cfg.model)
        den = _meta_denoiser(*pipeline["denoiser"])
        encoders, other = pipeline["encoders"], pipeline["other"]
        prompts = len(cfg.prompts) + _count_lines(cfg.prompts_file)
    base_params = sum(p.numel() for p in den.parameters())
    adapters = GuidanceAdapters(den, cfg.adapter_config())
    adapter_params = adapters.num_parameters()
    adapters.remove()
    sample = den.config
    shape = (sample.in_channels, sample.sample_size, sample.sample_size)
    per_sample = activations_per_sample(den, cfg, pipeline)

    rows = cfg.num_shards * cfg.shard_size * cfg.trajectory_steps if cfg.data == "trajectories" else 0
    state_bytes = getattr(torch, cfg.trajectory_dtype).itemsize
    disk = rows * (2 * math.prod(shape) * state_bytes + 16)  # x, target; t, w (float32), cond (int64)

    table = (prompts + 1) * (pipeline["tokens"] * pipeline["text_dim"] + pipeline["pooled"]) * base_bytes \
        if pipeline and prompts else 0
    host = {"pipeline as loaded": (base_params + sum(encoders.values()) + sum(other.values())) * base_bytes,
            "prompt-embedding table": table, "runtime (Python, torch, CUDA context)": RUNTIME_HOST_BYTES}
    trainable = adapter_params + (base_params if cfg.mode == "full" else 0)
    gpu = {"frozen base" if cfg.mode == "adapters" else "base": base_params * base_bytes,
           "adapters" if cfg.mode == "adapters" else "adapters": adapter_params * 4,
           "gradients": trainable * 4, "AdamW state": trainable * 8,
           f"activations ({cfg.batch_size} x {per_sample / GIB:.3f} GiB)": cfg.batch_size * per_sample,
           "CUDA context and workspaces": RUNTIME_GPU_BYTES}
    if base_dtype == torch.float32 and cfg.mixed_precision != "no" and cfg.mode == "adapters":
        # autocast casts each frozen fp32 weight at every use and keeps the cast for backward
        gpu["autocast half-precision weight copies"] = base_params * 2
    # The prompts are encoded 64 at a time; their embeddings collect on the GPU until the end of encoding.
    encoding = (base_params + sum(encoders.values())) * base_bytes + table + RUNTIME_GPU_BYTES
    notes = [
        f"base {base_params / 1e6:,.0f}M parameters in {str(base_dtype).replace('torch.', '')}, adapters "
        f"{adapter_params / 1e6:,.1f}M (float32), text encoders {sum(encoders.values()) / 1e6:,.0f}M",
        f"activations: tensors saved for backward by one training forward, counted on the meta device for this "
        f"architecture at {shape[1]}x{shape[2]} latents in {str(_activation_dtype(cfg)).replace('torch.', '')}"
        f"{' with gradient checkpointing' if cfg.gradient_checkpointing else ''} (flash-style attention), "
        "times batch_size (linear in the batch)",
        "host RAM: training batches are read from the trajectory shards, independent of the collection size",
    ]
    return MemoryEstimate(disk, host, gpu, encoding, per_sample, notes)


def _count_lines(path: str | None) -> int:
    if not path:
        return 0
    try:
        return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0  # the trainer reports the missing file; the estimate counts the inline prompts only


def _gb(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def format_estimate(est: MemoryEstimate) -> str:
    """The estimate as the lines ``fewstep distill estimate`` and the trainer print."""
    lines = [f"trajectories on disk: {_gb(est.trajectory_disk)}",
             f"host RAM per process: {_gb(est.host_total)}"]
    lines += [f"  {k}: {_gb(v)}" for k, v in est.host.items()]
    lines.append(f"GPU memory per process: {_gb(est.gpu_total)} peak "
                 f"({'fits' if est.fits() else 'does NOT fit'} a 24 GB GPU)")
    lines += [f"  {k}: {_gb(v)}" for k, v in est.gpu.items()]
    lines.append(f"  while encoding prompts (denoiser + text encoders): {_gb(est.gpu_encoding)}")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
