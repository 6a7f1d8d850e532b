"""`fewstep distill estimate` for the shipped real-model recipes: the README's memory table.

Each recipe in configs/distill/ (sd15, sdxl where present, sd3) is estimated as shipped, with one
training prompt per trajectory (a prompts file of num_shards x shard_size lines), and with
gradient checkpointing off / a float32 base for comparison. SDXL without its own recipe file:
the SD-1.5 recipe's settings on the SDXL UNet. No weights are loaded (meta device).

    python benchmarks/distill_estimate.py
Writes benchmarks/results/distill_estimate.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fewstep.config import load_config
from fewstep.distill.estimate import GIB, estimate
from fewstep.distill.settings import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def recipes() -> list[tuple[str, Path, list[str]]]:
    found = []
    for name in ("sd15", "sdxl", "sd3"):
        path = ROOT / "configs" / "distill" / f"{name}.yaml"
        if path.is_file():
            found.append((name, path, []))
        elif name == "sdxl":
            found.append(("sdxl (sd15.yaml settings)", ROOT / "configs/distill/sd15.yaml", [f"model={SDXL}"]))
    return found


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, extra in recipes():
            base = load_config(DistillConfig, path, overrides=extra)
            prompts = Path(tmp) / f"{name.split()[0]}.txt"
            prompts.write_text("".join(f"prompt {i}\n" for i in range(base.num_shards * base.shard_size)))
            variants = {"as shipped": [], "no gradient checkpointing": ["gradient_checkpointing=false"],
                        "float32 base, no checkpointing": ["gradient_checkpointing=false", "torch_dtype=float32"]}
            for variant, more in variants.items():
                cfg = load_config(DistillConfig, path, overrides=[*extra, f"prompts_file={prompts}", *more])
                est = estimate(cfg)
                rows.append({"recipe": name, "variant": variant, "batch_size": cfg.batch_size,
                             "mixed_precision": cfg.mixed_precision, "base_dtype": str(cfg.base_dtype())[6:],
                             "gradient_checkpointing": cfg.gradient_checkpointing, **est.to_dict()})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_estimate.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| recipe | variant | trajectories on disk | host RAM / process | activations / sample | "
             "GPU peak / process | fits 24 GB |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['variant']} (batch {r['batch_size']}, base {r['base_dtype']}) | "
                     f"{r['trajectory_disk'] / GIB:.1f} GiB | {r['host_total'] / GIB:.1f} GiB | "
                     f"{r['activations_per_sample'] / GIB:.2f} GiB | {r['gpu_total'] / GIB:.1f} GiB | "
                     f"{'yes' if r['fits_24GB'] else 'no'} |")
    (RESULTS / "distill_estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
