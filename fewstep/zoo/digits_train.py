"""Training and evaluation commands for the built-in digits models.

Run as ``python -m fewstep.zoo.digits_train <command>`` (see ``--help``):

* ``export-data``: write ``data/digits.npz`` from scikit-learn's bundled UCI digits.
* ``train-classifier``: train the digits CNN on the train split, report test accuracy.
* ``train``: train the class-conditional diffusion UNet with periodic atomic checkpoints;
  re-running with the same ``--out`` resumes from the checkpoint. The learning-rate and
  EMA schedules depend only on the step index, so a run resumed at step k and carried to
  N steps gives the same weights as an uninterrupted N-step run (and ``--steps`` may be
  raised on resume to train longer).
* ``evaluate``: conditional accuracy and digits-FD of guided samples.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fewstep.config import add_threads_argument
from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
from fewstep.infra.validation import check_threads
from fewstep.zoo.digits import (
    CLASSIFIER_PATH,
    DATA_PATH,
    DEFAULT_GUIDANCE_SCALE,
    NULL_LABEL,
    NUM_CLASSES,
    DigitsClassifier,
    DigitsPipeline,
    digits_features,
    digits_unet_config,
    load_digits_classifier,
    load_digits_data,
    load_digits_pipeline,
)

__all__ = ["export_data", "train_classifier", "train_diffusion", "evaluate", "main"]

CHECKPOINT_NAME = "checkpoint.pt"
# Hyper-parameters that must match when resuming (``steps`` may change).
_RESUME_KEYS = ("seed", "batch_size", "lr", "warmup", "ema_decay", "label_dropout", "split")


def export_data(out: str | Path = DATA_PATH) -> Path:
    """Writes the UCI digits from scikit-learn to an npz file (needs scikit-learn).

    Args:
        out: Destination ``.npz`` path.

    Returns:
        The path written.
    """
    from .._extras import import_optional

    import_optional("sklearn", "export-data")  # names the extra to install if it is missing
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, images=digits.images.astype(np.uint8), labels=digits.target.astype(np.uint8)
    )
    return out


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Translate each image by up to one pixel, filling with background (-1).
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    grid = torch.arange(8)
    rows = (dy[:, None] + grid)[:, :, None]
    cols = (dx[:, None] + grid)[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``.

    Args:
        classifier: A digits classifier (put in eval mode by the caller).
        images: [N, 1, 8, 8] in [-1, 1].
        labels: [N] int labels.

    Returns:
        Accuracy in [0, 1].
    """
    predictions = torch.cat([classifier(b).argmax(dim=1) for b in images.split(1000)])
    return (predictions.cpu() == labels.cpu()).float().mean().item()


def train_classifier(
    out: str | Path = CLASSIFIER_PATH,
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 2e-3,
    progress: bool = True,
) -> float:
    """Trains the digits CNN on the train split and saves it as safetensors.

    Args:
        out: Destination ``.safetensors`` file.
        seed: Seed for initialisation, batching and augmentation.
        steps: Optimisation steps (cosine learning-rate decay over them).
        batch_size: Images per step.
        lr: Peak AdamW learning rate.
        progress: Show a progress bar.

    Returns:
        Test-split accuracy of the trained classifier.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_data("train")
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        idx = torch.randint(0, len(y_train), (batch_size,), generator=generator)
        logits = model(_random_shift(x_train[idx], generator))
        loss = F.cross_entropy(logits, y_train[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    accuracy = classifier_accuracy(model, *load_digits_data("test"))
    metadata = {
        "width": str(model.width),
        "feature_dim": str(model.feature_dim),
        "seed": str(seed),
        "steps": str(steps),
        "test_accuracy": f"{accuracy:.4f}",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata)
    os.replace(tmp, out)
    return accuracy


def _atomic_save(obj: object, path: Path) -> None:
    # A crash mid-write must never leave a truncated checkpoint behind.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _ema_update(ema: UNet2DModel, model: UNet2DModel, decay: float, step: int) -> None:
    # Short memory early on so the average is not dominated by the random init.
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - d)


def _training_scheduler() -> DDPMScheduler:
    # clip_sample=False keeps DDPM/DDIM sampling the plain SDE/ODE that every other solver
    # integrates, so solver comparisons are like for like; "linspace" spacing (fewstep's
    # default grid) starts every scheduler built from this config at t=999, not t=960.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="linspace",
    )


def export_pipeline(unet: UNet2DModel, out: str | Path) -> Path:
    """Saves ``unet`` with the DDPM training scheduler as a diffusers pipeline folder.

    Args:
        unet: The (EMA) UNet to ship.
        out: Destination folder (``model_index.json``, ``unet/``, ``scheduler/``).

    Returns:
        The folder written.
    """
    DigitsPipeline(unet=unet, scheduler=_training_scheduler()).save_pretrained(out)
    return Path(out)


def train_diffusion(
    out: str | Path,
    seed: int = 0,
    steps: int = 6000,
    batch_size: int = 128,
    lr: float = 5e-4,
    warmup: int = 500,
    ema_decay: float = 0.999,
    label_dropout: float = 0.15,
    split: str = "train",
    checkpoint_every: int = 500,
    export: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Trains the class-conditional digits UNet (epsilon prediction, DDPM schedule).

    Resumes automatically from ``out/checkpoint.pt`` if present. Labels are replaced by
    the null label with probability ``label_dropout`` to enable classifier-free guidance.

    Args:
        out: Run folder holding the checkpoint.
        seed: Seed for initialisation and all training randomness.
        steps: Total optimisation steps.
        batch_size: Images per step.
        lr: AdamW learning rate after linear warm-up (then constant).
        warmup: Warm-up steps.
        ema_decay: Decay of the exponential moving average of the weights.
        label_dropout: Probability of training on the null label.
        split: Data split to train on (``"train"`` keeps the test split held out).
        checkpoint_every: Steps between checkpoints.
        export: Pipeline folder for the final EMA weights; defaults to ``out/pipeline``.
        progress: Show a progress bar.

    Returns:
        The exported pipeline folder.

    Raises:
        ValueError: If the checkpoint was written with different hyper-parameters.
    """
    hparams = {
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "ema_decay": ema_decay,
        "label_dropout": label_dropout,
        "split": split,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME

    torch.manual_seed(seed)
    model = UNet2DModel(**digits_unet_config())
    ema = UNet2DModel(**digits_unet_config())
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    if ckpt_path.exists():
        try:  # tensors, numbers and strings only: weights_only never runs code from the file
            ckpt = torch.load(ckpt_path, weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for a crafted file, others for a corrupt one
            raise ValueError(f"{ckpt_path} is not a readable digits training checkpoint "
                             f"({type(exc).__name__}); delete it to start over") from None
        changed = {k for k in _RESUME_KEYS if ckpt["hparams"][k] != hparams[k]}
        if changed:
            raise ValueError(f"{ckpt_path} was trained with different {sorted(changed)}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        step = ckpt["step"]

    alphas_cumprod = _training_scheduler().alphas_cumprod
    x_data, y_data = load_digits_data(split)
    model.train()
    with tqdm(total=steps, initial=step, desc="digits unet", disable=not progress) as bar:
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            idx = torch.randint(0, len(y_data), (batch_size,), generator=generator)
            x0, labels = x_data[idx], y_data[idx]
            t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            drop = torch.rand(batch_size, generator=generator) < label_dropout
            labels = labels.masked_fill(drop, NULL_LABEL)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(model(x_t, t, class_labels=labels).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            _ema_update(ema, model, ema_decay, step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % checkpoint_every == 0 or step == steps:
                state = {
                    "step": step,
                    "hparams": hparams,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                }
                _atomic_save(state, ckpt_path)
    return export_pipeline(ema.eval(), export or out / "pipeline")


@torch.no_grad()
def evaluate(
    nfe: int = 100,
    n: int = 1000,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    scheduler: str = "dpm",
    seed: int = 0,
    pipeline_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Conditional accuracy and digits-FD of guided samples (``n / 10`` per class).

    Args:
        nfe: Scheduler steps (a step is one guided UNet call on a doubled batch).
        n: Number of samples; rounded down to a multiple of 10.
        guidance_scale: Classifier-free guidance weight.
        scheduler: ``"dpm"`` (DPMSolverMultistep, 2nd order) or ``"ddim"``.
        seed: Seed for the initial noise and the random halving of the real data.
        pipeline_path: Pipeline folder; defaults to the shipped weights.
        progress: Show the sampling progress bar.

    Returns:
        ``accuracy``, ``min_class_accuracy``, ``fd_samples_vs_real`` (vs all 1797 real
        images), ``fd_real_half_vs_half`` (two random halves of the real data) and
        ``fd_samples_vs_real_half`` (samples vs the second half, same size as the halves).
    """
    scheduler_cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
    pipe = load_digits_pipeline(scheduler=scheduler_cls, path=pipeline_path)
    pipe.set_progress_bar_config(disable=not progress)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n // NUM_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    samples = pipe(labels, guidance_scale, nfe, generator=generator, output_type="pt").images

    classifier = load_digits_classifier()
    predictions = classifier(samples).argmax(dim=1)
    per_class = [(predictions[labels == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
    real, _ = load_digits_data("all")
    half = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half_a, half_b = real[half[: len(real) // 2]], real[half[len(real) // 2 :]]
    stats = {
        name: feature_statistics(digits_features(x, classifier))
        for name, x in (("samples", samples), ("real", real), ("a", half_a), ("b", half_b))
    }
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "min_class_accuracy": min(per_class),
        "fd_samples_vs_real": frechet_distance(*stats["samples"], *stats["real"]),
        "fd_samples_vs_real_half": frechet_distance(*stats["samples"], *stats["b"]),
        "fd_real_half_vs_half": frechet_distance(*stats["a"], *stats["b"]),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fewstep.zoo.digits_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # On a shared machine one thread per process avoids oversubscription stalls.
    common = argparse.ArgumentParser(add_help=False)
    add_threads_argument(common, "torch CPU threads (default: torch's own)")

    p = sub.add_parser("export-data", parents=[common], help="write data/digits.npz (sklearn)")
    p.add_argument("--out", default=str(DATA_PATH))

    p = sub.add_parser("train-classifier", parents=[common], help="train the digits classifier")
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)

    p = sub.add_parser("train", parents=[common], help="train the diffusion UNet (resumes)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt lives here)")
    p.add_argument("--export", default=None, help="pipeline folder (default OUT/pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.15)
    p.add_argument("--split", choices=("train", "all"), default="train")
    p.add_argument("--checkpoint-every", type=int, default=500)

    p = sub.add_parser("evaluate", parents=[common], help="accuracy and digits-FD of samples")
    p.add_argument("--nfe", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--scheduler", choices=("dpm", "ddim"), default="dpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline", dest="pipeline_path", help="pipeline folder (default: shipped)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of ``python -m fewstep.zoo.digits_train``.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).
    """
    args = vars(_parser().parse_args(argv))
    command, threads = args.pop("command"), args.pop("threads")
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    start = time.perf_counter()
    # Option names match the keyword arguments of the command functions.
    if command == "export-data":
        print(f"wrote {export_data(**args)}")
    elif command == "train-classifier":
        print(f"wrote {args['out']}; test accuracy {train_classifier(**args):.4f}")
    elif command == "train":
        print(f"exported EMA pipeline to {train_diffusion(**args)}")
    else:
        results = evaluate(**args)
        print(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=2))
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
