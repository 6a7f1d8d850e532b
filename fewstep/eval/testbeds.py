"""Models ``fewstep compare`` can benchmark: built-in digits, analytic GMM, local diffusers pipelines.

A testbed draws the initial noise (per-sample seeds, so a smaller run is a prefix of a
larger one), generates samples with a given solver, produces its reference, and scores
samples with whatever metrics it supports.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch

from ..samplers import GridSpec, make_schedule, sample
from ..samplers.schedules import DiscreteVPSchedule
from .fd import feature_statistics, frechet_distance

__all__ = ["Testbed", "DigitsTestbed", "GMMTestbed", "PipelineTestbed", "make_testbed"]


def _common_grid(spacing: str | None, schedule) -> GridSpec:
    # One grid for every solver (the multistep convention), so NFE-for-NFE comparisons are fair.
    return GridSpec(spacing=spacing or schedule.default_spacing, convention="multistep")


def _per_sample_noise(shape: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """Sample i always gets the noise of seed + i."""
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


class Testbed(ABC):
    """What ``fewstep compare`` needs from a model."""

    name: str
    metrics: tuple[str, ...] = ()  # besides mse and time

    @abstractmethod
    def initial_noise(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_T, conditioning index per sample)."""

    @abstractmethod
    def generate(self, solver: str, options: dict[str, Any], nfe: int, x_T: torch.Tensor, cond: torch.Tensor,
                 guidance: float, spacing: str | None) -> torch.Tensor:
        """Samples (float32, CPU) for ``x_T`` with the given solver.

        Guidance follows diffusers: CFG when ``guidance > 1``, else one conditional pass.
        ``spacing`` None means the model's own default grid.
        """

    def reference(self, x_T: torch.Tensor, cond: torch.Tensor, guidance: float, spacing: str,
                  solver: str, options: dict[str, Any], nfe: int) -> torch.Tensor:
        """The ground truth the MSE is measured against (default: a high-NFE solver run)."""
        return self.generate(solver, options, nfe, x_T, cond, guidance, spacing)

    def reference_description(self, solver_label: str, nfe: int) -> str:
        return f"{solver_label} with {nfe} steps"

    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
        """Extra metrics (e.g. FD, accuracy)."""
        return {}

    def floor(self) -> dict[str, float]:
        """Metric values of real data against itself, to read the others against."""
        return {}

    def images(self, samples: torch.Tensor) -> torch.Tensor | None:
        """[N, H, W] grey images in [0, 1] for the sample grid, or None."""
        return None

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Identifies the model for caching references."""


class DigitsTestbed(Testbed):
    """The built-in class-conditional 8x8 digits model with its classifier metrics."""

    name = "digits"
    metrics = ("fd", "accuracy")

    def __init__(self, device: str = "cpu", path: str | Path | None = None):
        from diffusers import UNet2DModel

        from ..zoo import digits

        root = Path(path or digits.PIPELINE_DIR)
        self.root = root
        self.device = torch.device(device)
        self.unet = UNet2DModel.from_pretrained(root / "unet").to(self.device).eval()
        cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.schedule = DiscreteVPSchedule.from_betas(
            cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02),
            cfg.get("beta_schedule", "linear"), cfg.get("trained_betas"), cfg.get("rescale_betas_zero_snr", False),
        )
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.null_label = digits.NULL_LABEL
        self.classifier = digits.load_digits_classifier(device=self.device)
        real, _ = digits.load_digits_data("all")
        self._real_stats = feature_statistics(self._features(real))
        # FD between two random halves of the real data: the floor any sampler is read against.
        perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))
        half = real.shape[0] // 2
        self._floor = frechet_distance(*feature_statistics(self._features(real[perm[:half]])),
                                       *feature_statistics(self._features(real[perm[half:]])))

    @torch.inference_mode()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(b.to(self.device)) for b in x.split(1000)]).cpu()

    @torch.inference_mode()
    def _predicted_labels(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(feats.to(self.device)).argmax(1).cpu()

    def initial_noise(self, n, seed):
        return _per_sample_noise((1, 8, 8), n, seed), torch.arange(n) % 10

    @torch.inference_mode()
    def model(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        x_T, cond = x_T.to(self.device), cond.to(self.device)
        guided = guidance is not None and guidance > 1
        out = sample(
            self.model, x_T, schedule=self.schedule, prediction=self.prediction, solver=solver, nfe=nfe,
            spacing=_common_grid(spacing, self.schedule), guidance=guidance if guided else None, cond=cond,
            uncond=torch.full_like(cond, self.null_label) if guided else None, **options,
        )
        return out.float().cpu()

    def evaluate(self, samples, cond):
        feats = self._features(samples.clamp(-1, 1))
        acc = (self._predicted_labels(feats) == cond).float().mean().item()
        fd = frechet_distance(*feature_statistics(feats), *self._real_stats)
        return {"fd": fd, "accuracy": acc}

    def floor(self):
        return {"fd": self._floor}

    def images(self, samples):
        return ((samples.clamp(-1, 1) + 1) / 2)[:, 0]

    def fingerprint(self):
        return {"testbed": self.name, "weights": _folder_digest(self.root), "device": str(self.device)}


class GMMTestbed(Testbed):
    """A class-conditional Gaussian mixture: exact model, exact ODE reference."""

    name = "gmm"
    metrics = ("fd", "accuracy")

    def __init__(self, dim: int = 16, components: int = 12, num_classes: int = 4, seed: int = 0,
                 schedule: str = "linear"):
        from ..zoo.gmm import GaussianMixture, GMMModel

        self.args = dict(dim=dim, components=components, num_classes=num_classes, seed=seed, schedule=schedule)
        self.mixture = GaussianMixture.random(dim, components, num_classes, seed=seed, std_range=(0.1, 0.5))
        self.schedule = make_schedule(schedule)
        self.prediction = "flow" if schedule == "flow" else "epsilon"
        self.model = GMMModel(self.mixture, self.schedule, self.prediction)
        g = torch.Generator().manual_seed(seed + 1)
        labels = torch.arange(20000) % num_classes
        self._real = self.mixture.sample(20000, g, labels).float()
        self._real_stats = feature_statistics(self._real)
        self._floor = frechet_distance(*feature_statistics(self._real[:10000]),
                                       *feature_statistics(self._real[10000:]))

    def initial_noise(self, n, seed):
        x = _per_sample_noise((self.mixture.dim,), n, seed).double()
        return x, torch.arange(n) % self.mixture.num_classes

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        guided = guidance is not None and guidance > 1
        out = sample(
            self.model, x_T.double(), schedule=self.schedule, prediction=self.prediction, solver=solver, nfe=nfe,
            spacing=_common_grid(spacing, self.schedule), guidance=guidance if guided else None, cond=cond,
            uncond=torch.full_like(cond, -1) if guided else None, **options,
        )
        return out.float()

    def reference(self, x_T, cond, guidance, spacing, solver, options, nfe):
        a0, s0 = (float(v) for v in self.schedule.alpha_sigma(torch.tensor(self.schedule.t_max, dtype=torch.float64)))
        guided = guidance is not None and guidance > 1
        return self.mixture.ode_solution(x_T.double(), (a0, s0), (1.0, 0.0), labels=cond,
                                         guidance=guidance if guided else None, steps=500).float()

    def reference_description(self, solver_label, nfe):
        return "exact probability-flow ODE solution (RK4, 500 steps)"

    def evaluate(self, samples, cond):
        n_cls = self.mixture.num_classes
        logp = torch.stack([self.mixture.log_prob(samples.double(), 1.0, 0.0, torch.full_like(cond, c))
                            for c in range(n_cls)], 1)
        acc = (logp.argmax(1) == cond).float().mean().item()
        return {"fd": frechet_distance(*feature_statistics(samples), *self._real_stats), "accuracy": acc}

    def floor(self):
        return {"fd": self._floor}

    def fingerprint(self):
        return {"testbed": self.name, **self.args}


class PipelineTestbed(Testbed):
    """A local diffusers text-to-image pipeline (SD-style or flow); latents are compared."""

    name = "pipeline"

    def __init__(self, path: str | Path, prompts: Sequence[str], height: int = 64, width: int = 64,
                 device: str = "cpu", batch_size: int = 8):
        from ..samplers.scheduler import FewstepScheduler
        from ..zoo.tiny import load_tiny_pipeline

        self.path = Path(path)
        if not (self.path / "model_index.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a diffusers pipeline folder (no model_index.json)")
        self.pipe = load_tiny_pipeline(self.path).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_config = dict(self.pipe.scheduler.config)
        self.scheduler_cls = FewstepScheduler
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("a pipeline comparison needs at least one prompt")
        self.height, self.width, self.batch_size = height, width, batch_size
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer")
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        self.latent_shape = (denoiser.config.in_channels, height // factor, width // factor)

    def initial_noise(self, n, seed):
        return _per_sample_noise(self.latent_shape, n, seed), torch.arange(n) % len(self.prompts)

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        config = self.base_config if spacing is None else {**self.base_config, "timestep_spacing": spacing}
        self.pipe.scheduler = self.scheduler_cls.from_config(config, solver=solver, solver_options=options)
        outs = []
        for xs, cs in zip(x_T.split(self.batch_size), cond.split(self.batch_size)):
            out = self.pipe(
                prompt=[self.prompts[int(c)] for c in cs], latents=xs.to(self.pipe.device, self.pipe.dtype),
                num_inference_steps=nfe, guidance_scale=guidance, height=self.height, width=self.width,
                output_type="latent",
            ).images
            outs.append(out.float().cpu())
        return torch.cat(outs)

    def fingerprint(self):
        return {"testbed": self.name, "path": str(self.path.resolve()), "files": _folder_digest(self.path),
                "prompts": self.prompts, "height": self.height, "width": self.width}


def _file_digest(path: Path, whole_below: int = 64 << 20, chunk: int = 1 << 20) -> str:
    """Content hash; files above ``whole_below`` bytes hash their size, mtime and both ends."""
    h = hashlib.sha256()
    st = path.stat()
    with path.open("rb") as f:
        if st.st_size <= whole_below:
            h.update(f.read())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(chunk))
            f.seek(-chunk, 2)
            h.update(f.read(chunk))
    return h.hexdigest()


def _folder_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def make_testbed(model: str, device: str = "cpu", prompts: Sequence[str] = (), height: int = 64,
                 width: int = 64) -> Testbed:
    """``digits``, ``gmm`` (or ``gmm-flow``), or a path to a local diffusers pipeline folder."""
    if model == "digits":
        return DigitsTestbed(device)
    if model in ("gmm", "gmm-flow"):
        return GMMTestbed(schedule="flow" if model == "gmm-flow" else "linear")
    path = Path(model)
    if not path.exists():
        raise ValueError(f"--model {model!r} is not 'digits', 'gmm', 'gmm-flow' or an existing pipeline folder")
    return PipelineTestbed(path, prompts, height, width, device)
