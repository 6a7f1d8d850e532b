"""Tiny random-weight diffusers pipelines for integration tests and smoke runs.

Everything is built from configs: no weights or tokenizer files are downloaded,
so the builders work offline. The pipelines are architecturally faithful
(same classes, scheduler configs and latent layout as Stable Diffusion 1.5,
SDXL, Stable Diffusion 3 and DiT, and SD inpainting, Flux, PixArt-Sigma, Sana and
Wan 2.1 for the pipeline matrix) with at most 1.4 million parameters each, so a
two-step sample at 32x32 takes a few hundredths of a second on a CPU. Text encoders
whose real tokenizers would be downloaded (T5, UMT5, Gemma 2) are built tiny
from configs and share the local CLIP BPE tokenizer (its vocabulary sizes them).

Usage::

    python -m fewstep.zoo.tiny sd  /tmp/tiny-sd
    python -m fewstep.zoo.tiny sd3 /tmp/tiny-sd3 --seed 1
    python -m fewstep.zoo.tiny sdxl /tmp/tiny-sdxl
    python -m fewstep.zoo.tiny dit /tmp/tiny-dit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # heavy imports stay lazy at runtime
    import diffusers
    import transformers

__all__ = [
    "write_clip_tokenizer",
    "build_tiny_sd_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd_inpaint_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_dit_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_pixart_sigma_pipeline",
    "build_tiny_sana_pipeline",
    "build_tiny_wan_pipeline",
    "load_tiny_pipeline",
    "main",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# scheduler_config.json of Stable Diffusion 1.5.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# scheduler_config.json of DiT-XL/2 (facebook/DiT-XL-2-256): DDIM over DiT's linear betas.
DIT_SCHEDULER_CONFIG = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}

# A handful of merges so the tokenizer exercises real BPE behaviour (multi-char
# tokens), listed in rank order: a merge may only use symbols created earlier.
_MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("o", "g</w>"),
    ("d", "og</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
)


def _byte_alphabet() -> list[str]:
    # CLIP's BPE runs on GPT-2 byte-level symbols (one printable char per byte).
    # Covering all 256 keeps every input representable, so no <unk> ever lands
    # mid-prompt, where it would alias <|endoftext|> and move CLIP's pooling.
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_clip_tokenizer(directory: str | os.PathLike) -> transformers.CLIPTokenizer:
    """Write a small, valid CLIP BPE tokenizer to ``directory`` and load it.

    The vocabulary has the 256 byte-level symbols, their ``</w>`` (end of word)
    variants, the tokens produced by a few merges and, last as in CLIP, the
    special tokens ``<|startoftext|>`` and ``<|endoftext|>`` (which doubles as
    the unknown and padding token). That is 529 entries.

    Args:
        directory: Folder to write ``vocab.json``, ``merges.txt`` and
            ``tokenizer_config.json`` into; created if missing.

    Returns:
        The tokenizer loaded back with ``CLIPTokenizer.from_pretrained``
        (``model_max_length`` 77).
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    symbols = _byte_alphabet()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}

    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Seed weight init without clobbering the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fresh_tokenizer() -> transformers.CLIPTokenizer:
    # The tokenizer is loaded from files, so write it to a throwaway folder; the
    # pipeline's save_pretrained stores its own copy.
    with tempfile.TemporaryDirectory(prefix="fewstep-tok-") as tmp:
        return write_clip_tokenizer(tmp)


def _tiny_vae(latent_channels: int, **config) -> diffusers.AutoencoderKL:
    from diffusers import AutoencoderKL

    # Four blocks give the usual 8x downsampling (vae_scale_factor 8), so latents
    # and default resolutions line up with the real SD models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        **config,
    )


def _clip_text_config(tokenizer, **extra) -> transformers.CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        # CLIP pools at the first eos id; must match the tokenizer (the legacy
        # default eos_token_id=2 would switch to argmax pooling instead).
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Saving/loading a dozen tiny files prints several progress bars and an
    # expected "text_encoder_3=None cannot be saved" warning; hide them, then
    # restore whatever the caller had configured.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    try:
        for lib, _, _ in saved:
            lib.set_verbosity(lib.ERROR)
            lib.disable_progress_bar()
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def load_tiny_pipeline(directory: str | os.PathLike, **kwargs) -> diffusers.DiffusionPipeline:
    """Load a pipeline saved by one of the ``build_tiny_*`` builders.

    Plain ``from_pretrained`` works for the SD folder, but diffusers refuses to
    load the SD3 folder unless the components saved as ``None`` (the dropped
    T5 encoder and its tokenizer) are passed explicitly; this does that.

    Args:
        directory: Folder written by ``save_pretrained`` (has ``model_index.json``).
        **kwargs: Forwarded to ``from_pretrained`` (e.g. ``torch_dtype``).

    Returns:
        The pipeline (class from ``model_index.json``), loaded offline,
        with its progress bar disabled.
    """
    import diffusers

    index = json.loads((Path(directory) / "model_index.json").read_text(encoding="utf-8"))
    for name, value in index.items():
        if not name.startswith("_") and value == [None, None]:
            kwargs.setdefault(name, None)
    with _quiet():
        pipe = getattr(diffusers, index["_class_name"]).from_pretrained(
            str(directory), local_files_only=True, **kwargs
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_and_reload(pipe, directory: str | os.PathLike | None):
    if directory is None:
        pipe.set_progress_bar_config(disable=True)
        return pipe
    with _quiet():
        pipe.save_pretrained(str(directory), safe_serialization=True)
    # Returning the reloaded copy proves the folder is complete and loads offline.
    return load_tiny_pipeline(directory)


def build_tiny_sd_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.StableDiffusionPipeline:
    """Build a tiny random-weight Stable Diffusion 1.5-style pipeline.

    Components: a two-level ``UNet2DConditionModel`` (32/64 channels, one cross
    attention level), an ``AutoencoderKL`` with 4 latent channels and
    ``vae_scale_factor`` 8, a 2-layer ``CLIPTextModel`` (hidden size 32), the
    tokenizer from :func:`write_clip_tokenizer` and SD-1.5's ``PNDMScheduler``
    config. The default resolution is 64x64; any multiple of 16 works.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32, without safety checker.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**_tiny_sd_components(seed, in_channels=4), requires_safety_checker=False)
    return _save_and_reload(pipe, directory)


def build_tiny_sd_inpaint_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.StableDiffusionInpaintPipeline:
    """Build a tiny random-weight SD inpainting pipeline (9-channel UNet: latents, mask, masked image).

    The components of :func:`build_tiny_sd_pipeline` with a UNet that also takes the mask
    and the masked image's latents, as ``runwayml/stable-diffusion-inpainting`` does.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32, without safety checker.
    """
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**_tiny_sd_components(seed, in_channels=9), requires_safety_checker=False)
    return _save_and_reload(pipe, directory)


def _tiny_sd_components(seed: int, in_channels: int) -> dict:
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _fresh_tokenizer()

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            # Despite its name this is the number of heads (diffusers issue #2011).
            attention_head_dim=2,
            norm_num_groups=32,
        )
    with _seeded(seed + 1):
        vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer)).eval()

    # from_config (not __init__) keeps clip_sample, which PNDM ignores but which
    # a DDIM/DPM scheduler built from this config must see as False.
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None)


def build_tiny_sd3_pipeline(
    directory: str | os.PathLike | None = None,
    seed: int = 0,
    shift: float = 3.0,
    use_dynamic_shifting: bool = False,
) -> diffusers.StableDiffusion3Pipeline:
    """Build a tiny random-weight Stable Diffusion 3-style (flow matching) pipeline.

    Components: a 2-layer ``SD3Transformer2DModel`` (patch size 2, 4 heads of
    dim 8), two ``CLIPTextModelWithProjection`` encoders (hidden 32,
    projection 32, so pooled projections are 64-d) sharing the tokenizer from
    :func:`write_clip_tokenizer`, no T5 encoder, an ``AutoencoderKL`` with 16
    latent channels and SD3's shift/scaling factors, and a
    ``FlowMatchEulerDiscreteScheduler``. The default resolution is 64x64; any
    multiple of 16 up to 512 works (``pos_embed_max_size`` 32 patches).

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.
        shift: Static timestep shift of the flow-matching scheduler.
        use_dynamic_shifting: Use resolution-dependent shifting instead; the
            pipeline then computes ``mu`` from the image sequence length.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = _fresh_tokenizer()

    latent_channels = 16
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            # Without T5 the pipeline zero-pads the concatenated CLIP hidden
            # states (32 + 32) up to joint_attention_dim, so it must be >= 64.
            joint_attention_dim=64,
            # The context stream shares the image stream's width (4 heads x 8).
            caption_projection_dim=32,
            # Concatenation of both CLIP text_embeds (32 + 32).
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
    with _seeded(seed + 1):
        vae = _tiny_vae(
            latent_channels=latent_channels,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    with _seeded(seed + 2):
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=32)).eval()
    with _seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=32)).eval()

    # base/max shift and image_seq_len bounds keep the scheduler defaults, which
    # the pipeline reads to compute mu when dynamic shifting is on.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=use_dynamic_shifting)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _save_and_reload(pipe, directory)


# scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def build_tiny_sdxl_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.StableDiffusionXLPipeline:
    """Build a tiny random-weight Stable Diffusion XL-style pipeline.

    Components: a two-level ``UNet2DConditionModel`` with SDXL's ``text_time``
    added conditioning (size/crop ids and the pooled text embedding), two CLIP
    text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden
    size 32 each, so the cross attention sees 64 channels) sharing the tokenizer
    from :func:`write_clip_tokenizer`, an ``AutoencoderKL`` with 4 latent
    channels and SDXL-base's ``EulerDiscreteScheduler`` config. The default
    resolution is 64x64; any multiple of 16 works. ``StableDiffusionXLImg2ImgPipeline.from_pipe``
    of it is the refiner-style half of a ``denoising_end`` / ``denoising_start`` split.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _fresh_tokenizer()
    time_embed_dim, projection_dim = 8, 32
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # six size/crop ids, each embedded in time_embed_dim, plus the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
            cross_attention_dim=64,  # both encoders' hidden states, concatenated (32 + 32)
            norm_num_groups=32,
        )
    with _seeded(seed + 1):
        vae = _tiny_vae(latent_channels=4, scaling_factor=0.13025)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer)).eval()
    with _seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer, projection_dim=projection_dim)).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        image_encoder=None,
        feature_extractor=None,
    )
    return _save_and_reload(pipe, directory)


def _tiny_t5(tokenizer, umt5: bool = False) -> transformers.PreTrainedModel:
    # T5 / UMT5 encoders sized by the local tokenizer (the real T5 tokenizers are downloads).
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, decoder_start_token_id=0,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return model_cls(config).eval()


def build_tiny_flux_pipeline(
    directory: str | os.PathLike | None = None,
    seed: int = 0,
    use_dynamic_shifting: bool = True,
) -> diffusers.FluxPipeline:
    """Build a tiny random-weight Flux-style (flow matching) pipeline.

    Components: a one-double-block, one-single-block ``FluxTransformer2DModel``
    (2 heads of 16, rotary axes 4/6/6), a CLIP text encoder for the pooled
    embedding and a tiny T5 encoder for the sequence, both on the tokenizer from
    :func:`write_clip_tokenizer`, an ``AutoencoderKL`` with 4 latent channels
    (packed 2x2 into 16 transformer channels) and the scheduler config of
    FLUX.1-dev (dynamic shifting) or, with ``use_dynamic_shifting=False``,
    FLUX.1-schnell. Resolutions: multiples of 16 (32x32 is 4 tokens).

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.
        use_dynamic_shifting: FLUX.1-dev's resolution-dependent shift (True) or
            FLUX.1-schnell's unshifted grid (False).

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = _fresh_tokenizer()
    latent_channels = 4
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 latent patches packed into channels
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP hidden size (pooled output)
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    with _seeded(seed + 1):
        vae = _tiny_vae(latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer)).eval()
    with _seeded(seed + 3):
        text_encoder_2 = _tiny_t5(tokenizer)
    if use_dynamic_shifting:  # FLUX.1-dev/scheduler/scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, transformer=transformer)
    return _save_and_reload(pipe, directory)


def build_tiny_pixart_sigma_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.PixArtSigmaPipeline:
    """Build a tiny random-weight PixArt-Sigma-style pipeline.

    Components: a 2-layer ``PixArtTransformer2DModel`` (adaLN-single, learned
    variance: 8 output channels for 4 latent ones), a tiny T5 encoder on the
    tokenizer from :func:`write_clip_tokenizer`, an ``AutoencoderKL`` with 4
    latent channels and PixArt-Sigma's released ``DPMSolverMultistepScheduler``
    config. Pass ``use_resolution_binning=False`` with small resolutions.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = _fresh_tokenizer()
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        ).eval()
    with _seeded(seed + 1):
        vae = _tiny_vae(latent_channels=4, scaling_factor=0.13025)
    with _seeded(seed + 2):
        text_encoder = _tiny_t5(tokenizer)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", lower_order_final=True, variance_type=None)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    return _save_and_reload(pipe, directory)


def build_tiny_sana_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.SanaPipeline:
    """Build a tiny random-weight Sana-style pipeline.

    Components: a one-layer ``SanaTransformer2DModel`` (linear attention), a tiny
    ``AutoencoderDC`` (4 latent channels, 2x downsampling), a one-layer Gemma 2
    text encoder on the tokenizer from :func:`write_clip_tokenizer` and Sana's
    released scheduler (DPM-Solver++ with ``use_flow_sigmas``, ``flow_shift`` 3).
    Pass ``complex_human_instruction=None`` and ``use_resolution_binning=False``.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _fresh_tokenizer()
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=32,
        )
    with _seeded(seed + 1):
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    with _seeded(seed + 2):
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=64, head_dim=16, num_attention_heads=2,
            num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
        )).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            solver_order=2, algorithm_type="dpmsolver++")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    return _save_and_reload(pipe, directory)


def build_tiny_wan_pipeline(
    directory: str | os.PathLike | None = None, seed: int = 0
) -> diffusers.WanPipeline:
    """Build a tiny random-weight Wan 2.1-style text-to-video pipeline.

    Components: a 2-layer ``WanTransformer3DModel``, a tiny ``AutoencoderKLWan``
    (16 latent channels, 8x spatial / 4x temporal compression), a tiny UMT5
    encoder on the tokenizer from :func:`write_clip_tokenizer` and Wan 2.1's
    released ``UniPCMultistepScheduler`` config (``use_flow_sigmas``, ``flow_shift`` 3).
    Videos: ``num_frames`` = 4k + 1, height/width multiples of 16.

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _fresh_tokenizer()
    with _seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    with _seeded(seed + 1):
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    with _seeded(seed + 2):
        text_encoder = _tiny_t5(tokenizer, umt5=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000, solver_order=2, solver_type="bh2")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    return _save_and_reload(pipe, directory)


def build_tiny_dit_pipeline(directory: str | os.PathLike | None = None, *, seed: int = 0) -> diffusers.DiTPipeline:
    """Build a tiny random-weight DiT-style (class-conditional transformer) pipeline.

    Components: a 2-layer ``DiTTransformer2DModel`` (patch size 2, 2 heads of
    dim 8) with learned variance as DiT-XL/2 (8 output channels: noise and
    variance for 4 latent channels) and 1000 classes (``DiTPipeline`` uses
    label 1000 as the null class), an ``AutoencoderKL`` with 4 latent
    channels and DiT-XL/2's ``DDIMScheduler`` config. The latent is 8x8
    (64x64 images).

    Args:
        directory: If given, the pipeline is saved there (safetensors) and the
            returned pipeline is the one reloaded from it.
        seed: Seed for weight initialisation; equal seeds give equal weights.

    Returns:
        The pipeline, on CPU in float32.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with _seeded(seed):
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,  # learned sigma
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    with _seeded(seed + 1):
        vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler.from_config(DIT_SCHEDULER_CONFIG))
    return _save_and_reload(pipe, directory)


_BUILDERS = {
    "sd": build_tiny_sd_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "sd-inpaint": build_tiny_sd_inpaint_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
    "pixart-sigma": build_tiny_pixart_sigma_pipeline,
    "sana": build_tiny_sana_pipeline,
    "wan": build_tiny_wan_pipeline,
    "dit": build_tiny_dit_pipeline,
}


def main(argv: list[str] | None = None) -> int:
    """Build a tiny pipeline, save it to a folder and print the folder.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status (0).
    """
    parser = argparse.ArgumentParser(
        prog="python -m fewstep.zoo.tiny",
        description="Build and save a tiny random-weight diffusers pipeline.",
    )
    parser.add_argument("kind", choices=sorted(_BUILDERS), help="pipeline family")
    parser.add_argument("directory", help="output folder (loadable with from_pretrained)")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    args = parser.parse_args(argv)

    _BUILDERS[args.kind](args.directory, seed=args.seed)
    print(args.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
