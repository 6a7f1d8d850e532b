"""Measured GPU peak of AGD training steps vs `fewstep distill estimate` (needs a CUDA GPU).

A random-weight SD-1.5-size UNet (the published config; no download) is prepared as the trainer
does (base in the recipe's dtype, gradient checkpointing per the recipe), gets the recipe's
adapters and AdamW, and runs a few training steps of ``batch_size`` random latents / text
embeddings under bf16 autocast. ``torch.cuda.max_memory_allocated`` is compared with the
estimate's training items (base, adapters, gradients, AdamW state, activations; the CUDA context
allowance is not allocated memory and is left out of both).

    python benchmarks/distill_gpu_peak.py [--config configs/distill/sd15.yaml] [key=value ...]
Writes benchmarks/results/distill_gpu_peak.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.config import load_config
from fewstep.distill import GuidanceAdapters
from fewstep.distill.estimate import _SD15_UNET, estimate
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import _prepare_base

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/distill/sd15.yaml"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/distill_gpu_peak.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("distill_gpu_peak: needs a CUDA GPU")
    from diffusers import UNet2DConditionModel

    cfg = load_config(DistillConfig, args.config,
                      overrides=["prompts=[a]", "prompts_file=null", *args.overrides])
    est = estimate(cfg)
    device = torch.device("cuda")
    unet = UNet2DConditionModel(**_SD15_UNET).to(cfg.base_dtype())
    _prepare_base(unet, cfg)
    unet.to(device)
    adapters = GuidanceAdapters(unet, cfg.adapter_config())
    optimizer = torch.optim.AdamW(adapters.parameter_groups(cfg.weight_decay), lr=cfg.learning_rate)
    adapters.train()
    dtype = cfg.base_dtype()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.steps):
        b = cfg.batch_size
        x = torch.randn(b, 4, 64, 64, device=device, generator=g, dtype=dtype)
        ehs = torch.randn(b, 77, 768, device=device, generator=g, dtype=dtype)
        t = torch.randint(1000, (b,), device=device, generator=g).float()
        w = 1 + 11 * torch.rand(b, device=device, generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            out = adapters(x, t, encoder_hidden_states=ehs, guidance_scale=w).sample
        F.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    predicted = sum(v for k, v in est.gpu.items() if not k.startswith("CUDA context"))
    result = {"config": args.config, "overrides": args.overrides, "device": torch.cuda.get_device_name(),
              "batch_size": cfg.batch_size, "gradient_checkpointing": cfg.gradient_checkpointing,
              "base_dtype": str(cfg.base_dtype()), "measured_peak_allocated": measured,
              "estimated_training_items": predicted, "ratio_measured_over_estimate": measured / predicted,
              "estimate": est.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"measured peak {measured / 2**30:.2f} GiB, estimate {predicted / 2**30:.2f} GiB "
          f"(ratio {measured / predicted:.2f}) on {result['device']}")


if __name__ == "__main__":
    main()
