"""AGD on the digits model: 1 forward per step with adapters vs 2 with real CFG, and the ablations.

Trains (with ``python -m fewstep distill train --config configs/distill/digits.yaml``, same
budget for every run):

- ``agd``: adapters on CFG teacher trajectories (the method);
- ``agd-noised``: adapters on forward-noised training digits (the paper's ablation);
- ``full``: the whole network fine-tuned with w through the same adapters (baseline);
- ``agd-wide``: AGD with ``width_ratio=1.0`` (13% extra parameters instead of 5%);
- ``agd-traj40``: AGD on 40-step instead of 10-step teacher trajectories (4x the states,
  40 distinct timesteps instead of 10), same training budget;
- ``agd-res``: adapters on the attention modules and every ResNet block
  (``placement=attention+resnet``) at ``width_ratio=0.25`` (fewer parameters than ``agd``);
- ``agd-res-noised``: the same on forward-noised training digits (the ablation at that placement);

then samples every method with the ``DigitsPipeline`` and fewstep's UniPC scheduler at
w = 1.5, 3, 5 and 5 / 10 / 20 steps: CFG runs the network on 2 samples per sample and step
(one doubled batch), the adapters on 1 (counted). Evaluation noise: sample i uses seed i
(i < N), labels i mod 10; the training data use seeds >= 100000 (``data_seed``). Metrics:
digits-FD to the 1797 real digits (features of the shipped classifier), classifier accuracy
on the intended label, and, for the one-forward methods, digits-FD and pixel MSE to the CFG
samples of the same w, steps and noise (FD to real data alone rewards under-guided samples:
the conditional model, w = 1, has the lowest). Also reported: the conditional model (w = 1),
training wall time (one torch thread, the machine's load average) and the trainable-parameter
share.

Writes benchmarks/results/agd_digits.{json,md}; finished trainings (runs/agd-bench/<name>)
and evaluations are reused when rerun, an interrupted training resumes from its last
checkpoint. Runs whose training and every sample cell are already in the JSON (same
``--max-steps`` / ``--num-samples``) are not redone: adding a run costs only that run.

    nice -n 10 python benchmarks/agd_digits.py [--max-steps 800] [--num-samples 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fewstep import UniPCScheduler
from fewstep.distill import disable_guidance_adapters, enable_guidance_adapters
from fewstep.zoo.digits import DigitsPipeline, digits_fd, load_digits_classifier, load_digits_data, load_digits_pipeline
from fewstep.zoo.digits_train import classifier_accuracy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {  # name: overrides of configs/distill/digits.yaml
    "agd": [],
    "agd-noised": ["data=noised"],
    "full": ["mode=full", "base_learning_rate=1e-4"],
    "agd-wide": ["width_ratio=1.0"],
    "agd-traj40": ["trajectory_steps=40", "trajectory_dir={runs}/trajectories-40"],
    "agd-res": ["placement=attention+resnet", "width_ratio=0.25"],
    "agd-res-noised": ["placement=attention+resnet", "width_ratio=0.25", "data=noised"],
}
GUIDANCE = (1.5, 3.0, 5.0)
STEPS = (5, 10, 20)


def _train(name: str, overrides: list[str], max_steps: int, runs: Path) -> dict:
    out = runs / name
    if (out / "adapters" / "adapter_config.json").is_file() and (out / "timing.json").is_file():
        return json.loads((out / "timing.json").read_text())
    command = [sys.executable, "-m", "fewstep", "distill", "train", "--config", str(ROOT / "configs/distill/digits.yaml"),
               f"output_dir={out}", f"max_steps={max_steps}", "resume_from_checkpoint=latest", "report_to=none",
               "progress=false", f"trajectory_dir={runs / 'trajectories'}", *(o.format(runs=runs) for o in overrides)]
    load = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    timing = {"seconds": time.perf_counter() - start, "loadavg_before": load[0], "loadavg_after": os.getloadavg()[0],
              "threads": 1, **json.loads((out / "train_summary.json").read_text())}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    return timing


class _Counter:
    """Counts the samples the network is run on (a CFG call on a doubled batch counts twice)."""

    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]


def _pipeline(name: str, runs: Path) -> DigitsPipeline:
    pipe = load_digits_pipeline()
    if name == "full":
        from diffusers import UNet2DModel

        pipe = DigitsPipeline(unet=UNet2DModel.from_pretrained(runs / name / "model").eval(), scheduler=pipe.scheduler)
    pipe.scheduler = UniPCScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _sample(pipe: DigitsPipeline, w: float, steps: int, n: int) -> tuple[torch.Tensor, float]:
    """Samples i < n from seed i with label i mod 10, and the network rows run per sample and step."""
    counter = _Counter(pipe.unet)
    latents = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    images = pipe(torch.arange(n) % 10, guidance_scale=w, num_inference_steps=steps, latents=latents,
                  output_type="pt").images
    counter.handle.remove()
    return images, counter.rows / (n * steps)


def _metrics(images, forwards, real, classifier, cfg_images=None) -> dict:
    labels = torch.arange(len(images)) % 10
    result = {"fd": digits_fd(images, real, classifier),
              "accuracy": 100 * classifier_accuracy(classifier, images, labels), "forwards_per_step": forwards}
    if cfg_images is not None:  # how close to the CFG samples from the same noise
        result["fd_to_cfg"] = digits_fd(images, cfg_images, classifier)
        result["mse_to_cfg"] = (images - cfg_images).square().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "agd-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "agd_digits.json"
    key = {"max_steps": args.max_steps, "num_samples": args.num_samples}
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("settings") != key:
        results = {"settings": key, "training": {}, "samples": {}}

    def done(method: str) -> bool:
        return all(f"{method}|{w}|{steps}" in results["samples"] for w in GUIDANCE for steps in STEPS)

    for name, overrides in RUNS.items():
        if name in results["training"] and done(name):
            continue
        results["training"][name] = _train(name, overrides, args.max_steps, runs)
        path.write_text(json.dumps(results, indent=2))

    real, _ = load_digits_data("all")
    classifier = load_digits_classifier().eval()
    cfg_images = {}
    pipe = _pipeline("cfg", runs)
    for w in GUIDANCE:  # the CFG reference samples (cheap to redo; the metrics are cached)
        for steps in STEPS:
            cfg_images[w, steps], forwards = _sample(pipe, w, steps, args.num_samples)
            results["samples"][f"cfg|{w}|{steps}"] = _metrics(cfg_images[w, steps], forwards, real, classifier)
            print(f"cfg|{w}|{steps}", results["samples"][f"cfg|{w}|{steps}"], flush=True)
    path.write_text(json.dumps(results, indent=2))
    methods = {"conditional": None, **{name: name for name in RUNS}}
    conditional = {}  # w = 1 samples do not depend on the w they are compared at
    for method, run in methods.items():
        if done(method):
            continue
        pipe = _pipeline(run or "cfg", runs)
        if run is not None:
            enable_guidance_adapters(pipe, runs / run / "adapters")
        for w in GUIDANCE:
            for steps in STEPS:
                label = f"{method}|{w}|{steps}"
                if label in results["samples"]:
                    continue
                if method == "conditional":
                    if steps not in conditional:
                        conditional[steps] = _sample(pipe, 1.0, steps, args.num_samples)
                    images, forwards = conditional[steps]
                else:
                    images, forwards = _sample(pipe, w, steps, args.num_samples)
                results["samples"][label] = _metrics(images, forwards, real, classifier, cfg_images[w, steps])
                print(label, results["samples"][label], flush=True)
                path.write_text(json.dumps(results, indent=2))
        if run is not None:
            disable_guidance_adapters(pipe, remove=True)
    (RESULTS / "agd_digits.md").write_text(_table(results))
    print(_table(results))


def _cell(r: dict) -> str:
    return f"{r['fd']:.3f} / {r['fd_to_cfg']:.3f} / {r['mse_to_cfg']:.4f} / {r['accuracy']:.1f}%"


def _table(results: dict) -> str:
    samples, training = results["samples"], results["training"]
    settings = results["settings"]
    lines = ["| w | steps | CFG, 2 fwd/step: FD / acc | AGD, 1 fwd/step: FD / FD to CFG / MSE to CFG / acc "
             "| conditional (w=1), 1 fwd/step: same |", "|---:|---:|---|---|---|"]
    for w in GUIDANCE:
        for steps in STEPS:
            c = samples[f"cfg|{w}|{steps}"]
            lines.append(f"| {w:g} | {steps} | {c['fd']:.3f} / {c['accuracy']:.1f}% | "
                         f"{_cell(samples[f'agd|{w}|{steps}'])} | {_cell(samples[f'conditional|{w}|{steps}'])} |")
    names = [name for name in RUNS if name not in ("agd", "agd-res", "agd-res-noised")]
    lines += ["", "| w | steps | AGD (trajectories) | " + " | ".join(names) + " |",
              "|---:|---:|---|" + "---|" * len(names)]
    for w in GUIDANCE:
        for steps in STEPS:
            cells = [_cell(samples[f"{name}|{w}|{steps}"]) for name in ("agd", *names)]
            lines.append(f"| {w:g} | {steps} | " + " | ".join(cells) + " |")
    placements = ("agd", "agd-res", "agd-noised", "agd-res-noised")
    lines += ["", "Share of the conditional model's gap to CFG closed, `1 - d(method, CFG) / d(conditional, CFG)` "
              "(FD / MSE to the CFG samples):", "",
              "| w | steps | attention, trajectories (agd) | attention+resnet, trajectories (agd-res) "
              "| attention, noised (agd-noised) | attention+resnet, noised (agd-res-noised) |",
              "|---:|---:|---|---|---|---|"]
    for w in GUIDANCE:
        for steps in STEPS:
            base = samples[f"conditional|{w}|{steps}"]
            cells = []
            for name in placements:
                r = samples[f"{name}|{w}|{steps}"]
                closed_fd, closed_mse = 1 - r["fd_to_cfg"] / base["fd_to_cfg"], 1 - r["mse_to_cfg"] / base["mse_to_cfg"]
                cells.append(f"{r['fd_to_cfg']:.3f} / {r['mse_to_cfg']:.4f} ({closed_fd:.0%} / {closed_mse:.0%})")
            lines.append(f"| {w:g} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", "| run | trainable params (% of base) | steps | data collection | training (1 thread) "
              "| load avg before / after |", "|---|---:|---:|---:|---:|---|"]
    for name, t in training.items():
        trainable = t["adapter_parameters"] + (t["base_parameters"] if name == "full" else 0)
        lines.append(f"| {name} | {trainable:,} ({100 * trainable / t['base_parameters']:.2f}%) | {t['steps']} | "
                     f"{t['data_seconds_this_session']:.0f} s | {t['training_seconds_this_session'] / 60:.1f} min | "
                     f"{t['loadavg_before']:.1f} / {t['loadavg_after']:.1f} |")
    n = settings["num_samples"]
    lines += ["", f"Cells: digits-FD to the 1797 real digits / digits-FD to the CFG samples of the same w and steps / "
              f"pixel MSE to those CFG samples (same noise) / classifier accuracy. {n} samples per cell "
              f"(seed i, label i mod 10, i < {n}); {settings['max_steps']} training steps per run; fewstep UniPC "
              "scheduler; the CFG teacher's forward count per sample and step is 2, the others' 1 (counted)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
