"""How much of the CFG correction guidance adapters can learn on the digits model.

A capacity check of the adapter architecture, not the AGD training recipe (that needs the
trajectory trainer): adapters are fitted online to the CFG output
``eps_u + w (eps_c - eps_u)`` of the frozen digits UNet at noised training digits
(uniform timesteps, w ~ U[1, 5], AdamW, batch 128), and scored on noised held-out test
digits (fixed seed) by the share of the correction they reproduce:

    learned = 1 - MSE(adapters, CFG) / MSE(conditional model, CFG)

0 is the untrained (conditional) model, 1 is exact CFG in one forward. The "read-out only"
row is the official adapter design, which stops after the cross-attention read-out (fewstep's
adapters add a per-token MLP). Writes
benchmarks/results/agd_adapter_capacity.{json,md}; finished configurations are kept when
the script is rerun (delete the JSON to start over). One torch thread.

    python benchmarks/agd_adapter_capacity.py [--steps 750]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fewstep.distill import AdapterConfig, GuidanceAdapters
from fewstep.distill.adapters import BlockAdapter
from fewstep.zoo.digits import NULL_LABEL, load_digits_data, load_digits_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: (AdapterConfig arguments, official read-out-only blocks)
    "default (width_ratio 0.25)": ({}, False),
    "width_ratio 1.0": ({"width_ratio": 1.0}, False),
    "read-out only, width_ratio 0.25": ({}, True),
    "read-out only, width_ratio 1.0": ({"width_ratio": 1.0}, True),
}
W_RANGE = (1.0, 5.0)


class _ReadoutOnly(BlockAdapter):
    """The official adapter: cross-attention read-out straight into the zero-initialised output."""

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = self.to_q(self.norm(x))
        read = F.scaled_dot_product_attention(split(q), split(self.to_k(tokens)), split(self.to_v(tokens)))
        return self.to_out(read.transpose(1, 2).flatten(2))


def _batch(adapters, alphas_cumprod, data, n, generator):
    """Noised digits, their labels, per-sample w, the CFG target and the conditional output."""
    images, labels = data
    i = torch.randint(len(labels), (n,), generator=generator)
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator)
    a = alphas_cumprod[t].sqrt()[:, None, None, None]
    x = a * images[i] + (1 - a**2).sqrt() * torch.randn(n, 1, 8, 8, generator=generator)
    w = W_RANGE[0] + (W_RANGE[1] - W_RANGE[0]) * torch.rand(n, generator=generator)
    y = labels[i]
    with torch.no_grad(), adapters.disabled() as teacher:
        null = torch.full_like(y, NULL_LABEL)
        cond, uncond = teacher(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, null])).sample.chunk(2)
    return x, t, y, w, uncond + w[:, None, None, None] * (cond - uncond), cond


def _run(config: dict, readout_only: bool, steps: int) -> dict:
    pipe = load_digits_pipeline()
    alphas = pipe.scheduler.alphas_cumprod
    adapters = GuidanceAdapters(pipe.unet, AdapterConfig(**config))
    if readout_only:
        for block in adapters.blocks:
            block.__class__ = _ReadoutOnly
            del block.to_hidden
    evaluation = torch.Generator().manual_seed(1234)
    x, t, y, w, target, cond = _batch(adapters, alphas, load_digits_data("test"), 512, evaluation)
    baseline = F.mse_loss(cond, target).item()
    optimizer = torch.optim.AdamW(adapters.parameter_groups(0.0), lr=3e-3)
    train, generator = load_digits_data("train"), torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc=str(config or "default"), leave=False):
        bx, bt, by, bw, btarget, _ = _batch(adapters, alphas, train, 128, generator)
        loss = F.mse_loss(adapters(bx, bt, class_labels=by, guidance_scale=bw).sample, btarget)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        mse = F.mse_loss(adapters(x, t, class_labels=y, guidance_scale=w).sample, target).item()
    return {"config": config, "readout_only": readout_only, "steps": steps, "adapter_parameters": adapters.num_parameters(),
            "percent_of_base": round(100 * adapters.num_parameters() / adapters.base_num_parameters(), 2),
            "mse_conditional": baseline, "mse_adapters": mse, "learned": 1 - mse / baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=750)
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "agd_adapter_capacity.json"
    done = json.loads(out.read_text()) if out.exists() else {}
    for name, (config, readout_only) in CONFIGS.items():
        if name in done and done[name]["steps"] == args.steps:
            continue
        done[name] = _run(config, readout_only, args.steps)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(done, indent=2) + "\n")
        os.replace(tmp, out)
    lines = ["| adapters | params (% of base) | MSE to CFG: conditional | MSE to CFG: adapters | learned |",
             "|---|---:|---:|---:|---:|"]
    for name, r in done.items():
        lines.append(f"| {name}, {r['steps']} steps | {r['adapter_parameters']:,} ({r['percent_of_base']:.2f}%) | "
                     f"{r['mse_conditional']:.4f} | {r['mse_adapters']:.4f} | {r['learned']:.0%} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "agd_adapter_capacity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
