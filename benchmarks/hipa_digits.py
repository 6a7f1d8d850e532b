"""HiPA on the digits model: one-step LoRA student vs the base at NFE 1 and 2 (first slice).

Teacher: fewstep UniPC, ``--teacher-nfe`` steps, CFG w = 1.5, on ``--train`` noises drawn from
seed 100000 (labels i mod 10). Students (same steps, lr, batch, rank 4 on the attention
projections): ``hipa`` (MSE + 0.1 x classifier-feature MSE + Fourier high-pass + Sobel edges)
and ``hipa-no-hf`` (the same without the two high-frequency terms: the paper's ablation); the
student's sample is clamped to [-1, 1] before the loss, as the pipeline clamps its output
(``clip_sample=1.0``).
Evaluation: ``--eval-seeds`` seeds (0, 1, ...; disjoint from the training seed), ``--num-samples``
samples each, labels i mod 10; metrics per seed, reported as mean and min-max over seeds:
digits-FD to the 1797 real digits (shipped classifier's features), classifier accuracy on the
intended label, and FD to the teacher's samples of the same noise. The base rows use CFG
w = 1.5 (2 network evaluations per step); the students run one evaluation, no CFG.
Also the radially averaged power spectrum (a table, no plot) of the teacher, base NFE 1 and
both students on evaluation seed 0. Not measured yet: a full fine-tune at NFE 1, base NFE 4.

Writes benchmarks/results/hipa_digits.{json,md}.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/hipa_digits.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep import FewstepScheduler
from fewstep.distill.hipa import (
    HiPAConfig,
    OneStepScheduler,
    digits_teacher_data,
    radial_power_spectrum,
    one_step_sample,
    train_hipa,
    trainable_share,
)
from fewstep.zoo.digits import (
    DigitsPipeline,
    digits_fd,
    load_digits_classifier,
    load_digits_pipeline,
    reference_images,
)

RESULTS = Path(__file__).parent / "results"
GUIDANCE = 1.5
TRAIN_SEED = 100000


def _noise(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 10


@torch.no_grad()
def _base(pipe, solver: str, nfe: int, noise, labels, spacing: str | None = None) -> torch.Tensor:
    extra = {"timestep_spacing": spacing} if spacing else {}
    sched = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver, **extra)
    runner = DigitsPipeline(unet=pipe.unet, scheduler=sched)
    runner.set_progress_bar_config(disable=True)
    return runner(labels, guidance_scale=GUIDANCE, num_inference_steps=nfe, latents=noise, output_type="pt").images


@torch.no_grad()
def _student(unet, sched, noise, labels) -> torch.Tensor:
    return one_step_sample(unet, sched, noise, class_labels=labels).clamp(-1, 1)  # as the pipeline clamps


def _metrics(samples, labels, teacher, classifier, real) -> dict[str, float]:
    with torch.no_grad():
        acc = (classifier(samples).argmax(1) == labels).float().mean().item()
    return {"fd_real": digits_fd(samples, real, classifier), "accuracy": acc,
            "fd_teacher": digits_fd(samples, teacher, classifier)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--teacher-nfe", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier = load_digits_classifier()
    real = reference_images("all") * 2 - 1
    pipe = load_digits_pipeline()
    one_step = OneStepScheduler.from_config(pipe.scheduler.config)

    evals = [_noise(seed, args.num_samples) for seed in range(args.eval_seeds)]
    teachers = [_base(pipe, "unipc", args.teacher_nfe, n, lab) for n, lab in evals]
    rows: dict[str, list[dict[str, float]]] = {}

    def record(name, make):
        rows[name] = [_metrics(make(n, lab), lab, t, classifier, real) for (n, lab), t in zip(evals, teachers)]

    record(f"teacher unipc NFE {args.teacher_nfe} (CFG)", lambda n, lab: _base(pipe, "unipc", args.teacher_nfe, n, lab))
    def base_nfe1(n, lab):
        return _base(pipe, "ddim", 1, n, lab, spacing="trailing")

    record("base NFE 1 (one-step DDIM = x0 at t=999, CFG)", base_nfe1)
    spectra = {"teacher": radial_power_spectrum(teachers[0]).tolist(),
               "base NFE 1": radial_power_spectrum(base_nfe1(*evals[0])).tolist()}
    for solver in ("ddim", "dpmpp", "unipc"):
        record(f"base NFE 2 {solver} (CFG)", lambda n, lab, s=solver: _base(pipe, s, 2, n, lab))

    t0 = time.perf_counter()
    train_noise, train_labels = _noise(TRAIN_SEED, args.train)
    data = digits_teacher_data(pipe, args.train, solver="unipc", nfe=args.teacher_nfe, guidance=GUIDANCE,
                               seed=TRAIN_SEED)
    assert torch.equal(data.noise, train_noise) and torch.equal(data.labels, train_labels)
    teacher_s = time.perf_counter() - t0
    train_info = {"teacher_data_s": teacher_s}
    common = dict(rank=4, feature_weight=0.1, clip_sample=1.0)
    variants = {"HiPA NFE 1 (MSE + features + Fourier + Sobel)": HiPAConfig(**common),
                "HiPA NFE 1 without high-frequency term": HiPAConfig(**common, fourier_weight=0.0, edge_weight=0.0)}
    for name, cfg in variants.items():
        unet = load_digits_pipeline().unet
        t0 = time.perf_counter()
        hist = train_hipa(unet, one_step, data, cfg, steps=args.steps, batch_size=64, lr=args.lr,
                          feature_net=classifier.features, progress=True)
        lora, base = trainable_share(unet)
        train_info[name] = {"train_s": time.perf_counter() - t0, "lora_params": lora, "base_params": base,
                            "first_loss": hist[0]["total"], "last_loss": hist[-1]["total"], "config": vars(cfg)}
        record(name, lambda n, lab, u=unet: _student(u, one_step, n, lab))
        spectra[name] = radial_power_spectrum(_student(unet, one_step, *evals[0])).tolist()

    out = {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows, "training": train_info,
           "radial_power_spectrum_seed0": spectra}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hipa_digits.json").write_text(json.dumps(out, indent=1))
    lines = ["| method | digits-FD to real | accuracy | FD to teacher |", "|---|---|---|---|"]
    for name, per_seed in rows.items():
        cells = []
        for key in ("fd_real", "accuracy", "fd_teacher"):
            vals = [r[key] for r in per_seed]
            cells.append(f"{sum(vals) / len(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "hipa_digits.md").write_text("\n".join(lines) + "\n")
    lines = ["", "Radially averaged power spectrum (evaluation seed 0; radius in cycles per 8 pixels):", "",
             "| samples | " + " | ".join(f"r={r}" for r in range(len(spectra["teacher"]))) + " |",
             "|---|" + "---|" * len(spectra["teacher"])]
    lines += [f"| {k} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for k, vals in spectra.items()]
    with open(RESULTS / "hipa_digits.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print((RESULTS / "hipa_digits.md").read_text())
    print(json.dumps(train_info, indent=1))


if __name__ == "__main__":
    main()
