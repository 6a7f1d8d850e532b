"""Guidance-adapter parameter counts per architecture (default AdapterConfig).

Tiny models are the project's own builders; the real-size networks (SD-1.5 and SDXL UNets,
SD3-medium and DiT-XL/2 transformers) are built from their published configs on the meta
device, so no weights are needed. Rows marked ``attention+resnet`` use that placement
(UNets only), the others the default attention placement. Writes benchmarks/results/agd_param_counts.{json,md}.

    python benchmarks/agd_param_counts.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.distill import AdapterConfig, GuidanceAdapters

RESULTS = Path(__file__).resolve().parent / "results"

# Published configs (huggingface.co/<repo>/<subfolder>/config.json), architecture keys only.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
DIT_XL_2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
)


def _models():
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from fewstep.zoo.digits import load_digits_pipeline
    from fewstep.zoo.tiny import (
        build_tiny_dit_pipeline, build_tiny_sd3_pipeline, build_tiny_sd_pipeline, build_tiny_sdxl_pipeline,
    )

    yield "digits UNet2DModel (shipped)", "attention", load_digits_pipeline().unet
    yield "digits UNet2DModel (shipped)", "attention+resnet", load_digits_pipeline().unet
    yield "tiny SD UNet2DConditionModel", "attention", build_tiny_sd_pipeline().unet
    yield "tiny SDXL UNet2DConditionModel", "attention", build_tiny_sdxl_pipeline().unet
    yield "tiny SD3Transformer2DModel", "attention", build_tiny_sd3_pipeline().transformer
    yield "tiny DiTTransformer2DModel", "attention", build_tiny_dit_pipeline().transformer
    with torch.device("meta"):
        yield "SD-1.5 UNet2DConditionModel (meta)", "attention", UNet2DConditionModel(**SD15_UNET)
        yield "SD-1.5 UNet2DConditionModel (meta)", "attention+resnet", UNet2DConditionModel(**SD15_UNET)
        yield "SDXL UNet2DConditionModel (meta)", "attention", UNet2DConditionModel(**SDXL_UNET)
        yield "SD3-medium SD3Transformer2DModel (meta)", "attention", SD3Transformer2DModel(**SD3_MEDIUM)
        yield "DiT-XL/2 DiTTransformer2DModel (meta)", "attention", DiTTransformer2DModel(**DIT_XL_2)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, placement, model in _models():
        adapters = GuidanceAdapters(model, AdapterConfig(placement=placement))
        arch = adapters.architecture
        rows.append({
            "model": name + ("" if placement == "attention" else f", {placement}"),
            "base_parameters": adapters.base_num_parameters(),
            "adapter_parameters": adapters.num_parameters(),
            "percent": round(100 * adapters.num_parameters() / adapters.base_num_parameters(), 2),
            "injection_points": len(arch.points),
            "block_widths": sorted({p.width for p in arch.points}),
            "embed_dim": adapters.config.embed_dim,
            "conditions": list(adapters.config.conditions),
        })
        adapters.remove()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agd_param_counts.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| model | base params | adapter params | % | points | block widths | conditions |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base_parameters']:,} | {r['adapter_parameters']:,} | {r['percent']:.2f} | "
            f"{r['injection_points']} | {', '.join(map(str, r['block_widths']))} | {', '.join(r['conditions'])} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "agd_param_counts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
