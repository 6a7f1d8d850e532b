"""Evaluate a HiPA LoRA exported by `fewstep distill train --config configs/distill/hipa_digits.yaml` on digits.

    fewstep distill train --config configs/distill/hipa_digits.yaml output_dir=runs/hipa-digits
    python benchmarks/hipa_trainer_digits.py runs/hipa-digits

One-step samples (one network call, clamped as the pipeline clamps) of the evaluation noise (seeds
0..N-1, labels i mod 10; training data use data_seed 100000+) against the real digits and the
recipe's teacher (its scheduler, steps and CFG scale, read from the run's config.yaml): digits-FD,
classifier accuracy, FD to the teacher; the base at NFE 1 (the same one-step call without the LoRA)
for reference. Writes benchmarks/results/hipa_trainer_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from fewstep.config import load_config
from fewstep import OneStepScheduler
from fewstep.distill.hipa import one_step_sample
from fewstep.distill.hipa_train import load_hipa_lora
from fewstep.distill.settings import DistillConfig
from fewstep.distill.trajectories import build_scheduler
from fewstep.zoo.digits import DigitsPipeline, digits_fd, load_digits_classifier, load_digits_pipeline, reference_images

RESULTS = Path(__file__).parent / "results"


def _noise(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 10


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="output_dir of the training run")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--eval-seeds", type=int, default=3)
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_config(DistillConfig, run / "config.yaml")
    classifier = load_digits_classifier()
    real = reference_images("all") * 2 - 1
    pipe = load_digits_pipeline()
    teacher = DigitsPipeline(unet=pipe.unet, scheduler=build_scheduler(cfg.teacher_scheduler, pipe.scheduler.config))
    teacher.set_progress_bar_config(disable=True)
    one_step = OneStepScheduler.from_config(pipe.scheduler.config)
    student = load_hipa_lora(load_digits_pipeline().unet, run / "lora").eval()
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.eval_seeds):
        noise, labels = _noise(seed, args.num_samples)
        reference = teacher(labels, guidance_scale=cfg.hipa.guidance, num_inference_steps=cfg.trajectory_steps,
                            latents=noise, output_type="pt").images
        samples = {
            f"teacher {cfg.teacher_scheduler} NFE {cfg.trajectory_steps} (CFG {cfg.hipa.guidance:g})": reference,
            "base NFE 1 (x0 at t=999, no CFG)": one_step_sample(pipe.unet, one_step, noise,
                                                                class_labels=labels).clamp(-1, 1),
            "HiPA NFE 1 (trainer export)": one_step_sample(student, one_step, noise, class_labels=labels).clamp(-1, 1),
        }
        for name, images in samples.items():
            accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
            rows.setdefault(name, []).append({"fd_real": digits_fd(images, real, classifier), "accuracy": accuracy,
                                              "fd_teacher": digits_fd(images, reference, classifier)})
    summary = json.loads((run / "train_summary.json").read_text())
    out = {"args": vars(args), "threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg),
           "train_summary": summary, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hipa_trainer_digits.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["`fewstep distill train --config configs/distill/hipa_digits.yaml output_dir=RUN` (the recipe as "
             "shipped), then `python benchmarks/hipa_trainer_digits.py RUN`.", "",
             "| method | digits-FD to real | accuracy | FD to teacher |", "|---|---|---|---|"]
    for name, per_seed in rows.items():
        cells = []
        for key in ("fd_real", "accuracy", "fd_teacher"):
            values = [r[key] for r in per_seed]
            cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean [min, max] over evaluation seeds 0..{args.eval_seeds - 1} x {args.num_samples} samples; "
                 f"training: {summary['steps']} steps, {summary['training_seconds_this_session']:.0f} s, "
                 f"{summary['lora_parameters']} LoRA / {summary['base_parameters']} base parameters, "
                 f"{torch.get_num_threads()} torch thread(s); load average at evaluation "
                 f"{os.getloadavg()[0]:.1f} (training time depends on the machine's load).")
    (RESULTS / "hipa_trainer_digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
