"""Guidance-adapter parameter counts per architecture (default AdapterConfig).

Tiny models are the project's own builders; the real-size networks (SD-1.5 UNet, SD3-medium
and DiT-XL/2 transformers) are built from their published configs on the meta device, so
no weights are needed. Writes benchmarks/results/agd_param_counts.{json,md}.

    python benchmarks/agd_param_counts.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.distill import GuidanceAdapters

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
DIT_XL_2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
)
TINY_DIT = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
    patch_size=2, num_embeds_ada_norm=10,
)


def _models():
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from fewstep.zoo.digits import load_digits_pipeline
    from fewstep.zoo.tiny import build_tiny_sd3_pipeline, build_tiny_sd_pipeline

    yield "digits UNet2DModel (shipped)", load_digits_pipeline().unet
    yield "tiny SD UNet2DConditionModel", build_tiny_sd_pipeline().unet
    yield "tiny SD3Transformer2DModel", build_tiny_sd3_pipeline().transformer
    yield "tiny DiTTransformer2DModel", DiTTransformer2DModel(**TINY_DIT)
    with torch.device("meta"):
        yield "SD-1.5 UNet2DConditionModel (meta)", UNet2DConditionModel(**SD15_UNET)
        yield "SD3-medium SD3Transformer2DModel (meta)", SD3Transformer2DModel(**SD3_MEDIUM)
        yield "DiT-XL/2 DiTTransformer2DModel (meta)", DiTTransformer2DModel(**DIT_XL_2)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, model in _models():
        adapters = GuidanceAdapters(model)
        arch = adapters.architecture
        rows.append({
            "model": name,
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
