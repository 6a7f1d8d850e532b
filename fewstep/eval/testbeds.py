"""Models ``fewstep compare`` can benchmark: built-in digits, analytic GMM, local diffusers pipelines.

A testbed draws the initial noise (per-sample seeds, so a smaller run is a prefix of a
larger one), generates samples with a given solver, produces its reference, scores
samples with whatever metrics it supports, and states the defaults that keep a run on
it to minutes (sample count, reference NFE, batch size).
"""

from __future__ import annotations

import hashlib
import json
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from fewstep.samplers import Artifact, GridSpec, make_schedule, sample
from fewstep.samplers.schedules import DiscreteVPSchedule
from fewstep.eval.diffusers_schedulers import (
    build_diffusers_scheduler,
    diffusers_sample,
    is_diffusers_spec,
    steps_for_nfe,
)
from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
from fewstep.infra.io import read_json

__all__ = ["Testbed", "DigitsTestbed", "GMMTestbed", "PipelineTestbed", "make_testbed", "check_model", "model_identity",
           "check_pipeline_folder", "BUILTIN_MODELS"]

BUILTIN_MODELS = ("digits", "gmm", "gmm-flow")
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse",
                   "a red cube on a wooden table", "portrait of an old man, studio lighting")


def common_grid(spacing: str | None, schedule) -> GridSpec:
    """One grid for every solver (the multistep convention), so that NFE-for-NFE comparisons are fair."""
    return GridSpec(spacing=spacing or schedule.default_spacing, convention="multistep")


def per_sample_noise(shape: Sequence[int], seeds: Iterable[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` for each seed, stacked: a sample's noise depends on its seed alone."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _per_sample_noise(shape: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """Sample i always gets the noise of seed + i."""
    return per_sample_noise(shape, range(seed, seed + n))


class Testbed(ABC):
    """What ``fewstep compare`` needs from a model."""

    name: str
    metrics: tuple[str, ...] = ()  # besides mse and time
    fd_name: str = "FD"
    # Defaults of a run on this model; batch_size also fixes the reference's chunks.
    default_guidance: float = 7.5
    default_num_samples: int = 1000
    default_reference_nfe: int = 200
    exact_reference: bool = False  # the reference is no solver run: reference solver/steps do not apply
    batch_size: int = 100
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def initial_noise(self, n: int, seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_T, conditioning index per sample) of samples ``start .. start + n - 1``.

        Sample i gets the noise of seed ``seed + i`` and a condition that depends on i only,
        so any split of the samples into shards or processes sees the same noise.
        """

    @abstractmethod
    def generate(self, solver: str, options: dict[str, Any], nfe: int, x_T: torch.Tensor, cond: torch.Tensor,
                 guidance: float, spacing: str | None) -> torch.Tensor:
        """Samples (float32, CPU) for one batch ``x_T`` with the given solver.

        Guidance follows diffusers: CFG when ``guidance > 1``, else one conditional pass.
        ``spacing`` None means the model's own default grid. ``solver`` may also be a diffusers
        scheduler (``diffusers:ClassName``, see :meth:`generate_diffusers`).

        Raises:
            FloatingPointError: the model output became non-finite (the solver diverged).
        """

    def scheduler_config(self) -> dict[str, Any]:
        """The model's diffusers scheduler config, from which ``diffusers:`` specs are built."""
        raise ValueError(f"the {self.name} model has no diffusers scheduler config; use a fewstep solver")

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float | None) -> torch.Tensor:
        """The model output at timestep ``t`` for diffusers' loop, CFG-combined when ``guidance > 1``."""
        raise NotImplementedError(f"the {self.name} testbed cannot run diffusers schedulers")

    def generate_diffusers(self, solver: str, options: dict[str, Any], nfe: int, x_T: torch.Tensor,
                           cond: torch.Tensor, guidance: float | None, spacing: str | None) -> torch.Tensor:
        """:meth:`generate` with a diffusers scheduler: diffusers' standard loop, ``nfe`` model calls."""
        scheduler = build_diffusers_scheduler(solver, options, self.scheduler_config(), spacing)
        x_T, cond = x_T.to(self.device), cond.to(self.device)
        return diffusers_sample(scheduler, lambda x, t: self.denoise(x, t, cond, guidance), x_T, nfe).float().cpu()

    def check_solver(self, solver: str, options: dict[str, Any], nfes: Sequence[int], spacing: str | None) -> None:
        """Refuse, before any sampling, a diffusers scheduler the model's config rejects or an NFE it cannot reach.

        Fewstep solvers are validated when their spec is parsed; this checks what needs the model.

        Raises:
            ValueError: naming the scheduler and the reachable NFEs.
        """
        if not is_diffusers_spec(solver):
            return
        scheduler = build_diffusers_scheduler(solver, options, self.scheduler_config(), spacing)
        for nfe in nfes:
            steps_for_nfe(scheduler, nfe, solver)

    @property
    def default_spacing(self) -> str | None:
        """The grid used when none is given (None: the pipeline's scheduler config decides)."""
        schedule = getattr(self, "schedule", None)
        return schedule.default_spacing if schedule is not None else None

    def reference(self, x_T: torch.Tensor, cond: torch.Tensor, guidance: float, spacing: str | None,
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

    def pixels(self, samples: torch.Tensor) -> torch.Tensor | None:
        """[N, C, H, W] images in [0, 1] for feature extractors, or None for non-image models."""
        grey = self.images(samples)
        return None if grey is None else grey.unsqueeze(1)

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Identifies the model for caching references."""


class DigitsTestbed(Testbed):
    """The built-in class-conditional 8x8 digits model with its classifier metrics."""

    name = "digits"
    metrics = ("fd", "accuracy")
    fd_name = "digits-FD"
    default_guidance = 1.5  # the model's own default (fewstep.zoo.digits.DEFAULT_GUIDANCE_SCALE)

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None):
        from diffusers import UNet2DModel

        from fewstep.zoo import digits

        root = Path(path or digits.PIPELINE_DIR)
        self.root = root
        self.device = torch.device(device)
        self.unet = UNet2DModel.from_pretrained(root / "unet").to(self.device).eval()
        digits.check_finite_weights(self.unet, root / "unet")
        cfg = read_json(root / "scheduler" / "scheduler_config.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{root / 'scheduler' / 'scheduler_config.json'} must hold a JSON object")
        self.schedule = DiscreteVPSchedule.from_betas(
            cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02),
            cfg.get("beta_schedule", "linear"), cfg.get("trained_betas"), cfg.get("rescale_betas_zero_snr", False),
        )
        self.prediction = cfg.get("prediction_type", "epsilon")
        self._scheduler_config = cfg
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

    def initial_noise(self, n, seed, start=0):
        return _per_sample_noise((1, 8, 8), n, seed + start), (torch.arange(n) + start) % 10

    @torch.inference_mode()
    def model(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample

    def scheduler_config(self):
        return dict(self._scheduler_config)

    def denoise(self, x, t, cond, guidance):
        if guidance is None or guidance <= 1:
            return self.model(x, t, cond)
        # The DigitsPipeline's guidance: one doubled batch [conditional, null].
        eps_cond, eps_null = self.model(torch.cat([x, x]), t, torch.cat([cond, torch.full_like(cond, self.null_label)])
                                        ).chunk(2)
        return eps_null + guidance * (eps_cond - eps_null)

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        if is_diffusers_spec(solver):
            return self.generate_diffusers(solver, options, nfe, x_T, cond, guidance, spacing)
        x_T, cond = x_T.to(self.device), cond.to(self.device)
        guided = guidance is not None and guidance > 1
        out = sample(
            self.model, x_T, schedule=self.schedule, prediction=self.prediction, solver=solver, nfe=nfe,
            spacing=common_grid(spacing, self.schedule), guidance=guidance if guided else None, cond=cond,
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
        return {"testbed": self.name, "weights": _folder_digest(self.root)}


class GMMTestbed(Testbed):
    """A class-conditional Gaussian mixture: exact model, exact ODE reference (CPU, float64)."""

    name = "gmm"
    metrics = ("fd", "accuracy")
    default_guidance = 2.0
    exact_reference = True
    batch_size = 250  # the float64 posterior's working set falls out of cache above this

    def __init__(self, dim: int = 16, components: int = 12, num_classes: int = 4, seed: int = 0,
                 schedule: str = "linear"):
        from fewstep.zoo.gmm import GaussianMixture, GMMModel

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

    def initial_noise(self, n, seed, start=0):
        x = _per_sample_noise((self.mixture.dim,), n, seed + start).double()
        return x, (torch.arange(n) + start) % self.mixture.num_classes

    def scheduler_config(self):
        if not isinstance(self.schedule, DiscreteVPSchedule):
            raise ValueError(f"the {self.name} model's {type(self.schedule).__name__} has no diffusers scheduler "
                             "config; diffusers schedulers run on gmm, digits and pipeline folders")
        return {**{k: v for k, v in self.schedule.to_dict().items() if k != "kind"}, "prediction_type": "epsilon"}

    def denoise(self, x, t, cond, guidance):
        if guidance is None or guidance <= 1:
            return self.model(x, t, cond)
        eps_cond, eps_null = self.model(torch.cat([x, x]), t, torch.cat([cond, torch.full_like(cond, -1)])).chunk(2)
        return eps_null + guidance * (eps_cond - eps_null)

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        if is_diffusers_spec(solver):
            return self.generate_diffusers(solver, options, nfe, x_T.double(), cond, guidance, spacing)
        guided = guidance is not None and guidance > 1
        out = sample(
            self.model, x_T.double(), schedule=self.schedule, prediction=self.prediction, solver=solver, nfe=nfe,
            spacing=common_grid(spacing, self.schedule), guidance=guidance if guided else None, cond=cond,
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
    default_num_samples = 16  # with the defaults, 16 x (100 + 3 x 29) = 3k guided denoiser calls
    default_reference_nfe = 100
    batch_size = 8

    def __init__(self, path: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS, height: int | None = None,
                 width: int | None = None, device: str | torch.device = "cpu"):
        from fewstep.samplers.scheduler import FewstepScheduler
        from fewstep.zoo.tiny import load_tiny_pipeline

        self.path = Path(path)
        self.device = torch.device(device)
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("a pipeline comparison needs at least one prompt")
        check_pipeline_folder(self.path)
        try:
            self.pipe = load_tiny_pipeline(self.path).to(device)
        except (ValueError, KeyError) as exc:  # diffusers' reactions to odd component configs
            raise ValueError(f"cannot load the pipeline in {self.path}: {exc}") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.base_config = dict(self.pipe.scheduler.config)
        self.scheduler_cls = FewstepScheduler
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        if denoiser is None:
            raise ValueError(f"{self.path}: the pipeline has neither a unet nor a transformer to sample with")
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        size = denoiser.config.sample_size * factor  # the pipeline's own default resolution
        self.height, self.width = height or size, width or size
        if self.height % factor or self.width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this pipeline, "
                             f"got {self.height}x{self.width}")
        self.latent_shape = (denoiser.config.in_channels, self.height // factor, self.width // factor)

    def initial_noise(self, n, seed, start=0):
        return _per_sample_noise(self.latent_shape, n, seed + start), (torch.arange(n) + start) % len(self.prompts)

    @torch.inference_mode()
    def pixels(self, samples):
        # The pipelines' own decoding: latents / scaling_factor (+ shift_factor for SD3), VAE, [-1, 1] -> [0, 1].
        vae = self.pipe.vae
        latents = samples.to(vae.device, vae.dtype) / vae.config.scaling_factor
        latents = latents + (getattr(vae.config, "shift_factor", None) or 0.0)
        return (vae.decode(latents).sample.float().cpu() / 2 + 0.5).clamp(0, 1)

    def scheduler_config(self):
        return dict(self.base_config)

    def generate(self, solver, options, nfe, x_T, cond, guidance, spacing):
        if is_diffusers_spec(solver):
            return self.generate_diffusers(solver, options, nfe, x_T, cond, guidance, spacing)
        scheduler = self.scheduler_cls.from_config(self._config(spacing), solver=solver, solver_options=options)
        for value in scheduler.solver.config.values():  # the scheduler cannot see the model: check here
            if isinstance(value, Artifact):
                value.check_model(self.pipe)
        return self._run_pipeline(scheduler, nfe, x_T, cond, guidance)

    def generate_diffusers(self, solver, options, nfe, x_T, cond, guidance, spacing):
        # The pipeline's own loop with the diffusers scheduler swapped in; its steps give nfe model calls.
        scheduler = build_diffusers_scheduler(solver, options, self.base_config, spacing)
        return self._run_pipeline(scheduler, steps_for_nfe(scheduler, nfe, solver), x_T, cond, guidance)

    def _config(self, spacing):
        return self.base_config if spacing is None else {**self.base_config, "timestep_spacing": spacing}

    def _run_pipeline(self, scheduler, steps, x_T, cond, guidance):
        self.pipe.scheduler = scheduler
        out = self.pipe(
            prompt=[self.prompts[int(c)] for c in cond], latents=x_T.to(self.pipe.device, self.pipe.dtype),
            num_inference_steps=steps, guidance_scale=guidance, height=self.height, width=self.width,
            output_type="latent",
        ).images
        return out.float().cpu()

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


def _check_safetensors(path: Path) -> None:
    # The header says where every tensor's bytes end; a truncated or padded file fails here,
    # with its name, instead of deep inside a loader.
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = f.read(n) if 0 < n <= size - 8 else b""
    try:
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise ValueError(f"{path} is not a readable safetensors file (bad header)") from None
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, "
                         f"the file has {size}")


def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """Validate a diffusers pipeline folder before loading it; returns its ``model_index.json``.

    Raises:
        ValueError: naming the file that is missing, malformed or truncated.
        MissingExtraError: a component needs an optional package that is not installed.
    """
    from fewstep._extras import EXTRAS, import_optional

    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ValueError(f"{index_path} must be a JSON object with a '_class_name' (the pipeline class)")
    if index["_class_name"] != "DigitsPipeline":
        import diffusers

        if index["_class_name"] not in dir(diffusers):  # dir(): no import of the pipeline modules
            raise ValueError(f"{index_path}: diffusers {diffusers.__version__} has no pipeline class "
                             f"{index['_class_name']!r}")
    for component, value in index.items():
        if not component.startswith("_") and isinstance(value, list) and value and value[0] in EXTRAS:
            import_optional(value[0], f"the pipeline component {component!r} in {path}")
    for f in sorted(path.rglob("*.safetensors")):
        _check_safetensors(f)
    return index


def check_model(model: str) -> dict[str, Any] | None:
    """Validate a ``model`` argument without loading it.

    Returns:
        None for a built-in model, else the folder's ``model_index.json``.

    Raises:
        ValueError: neither a built-in model nor a usable pipeline folder (see :func:`check_pipeline_folder`).
    """
    if model in BUILTIN_MODELS:
        return None
    if not Path(model).is_dir():
        raise ValueError(f"model {model!r} is not one of {', '.join(BUILTIN_MODELS)} or a pipeline folder")
    return check_pipeline_folder(Path(model))


def model_identity(model: str) -> str:
    """A ``--model`` value as run identities record it: the built-in name, or the folder's absolute path."""
    return model if model in BUILTIN_MODELS else str(Path(model).resolve())


def refuse_pipeline_settings(model: str, **settings: Any) -> None:
    """Refuse settings that only a text-to-image pipeline reads (``prompts``, ``height``...) for ``model``.

    Raises:
        ValueError: naming the settings given.
    """
    given = [k for k, v in settings.items() if v]
    if given:
        raise ValueError(f"the settings {', '.join(given)} apply to text-to-image pipelines only, not to {model!r}")


def make_testbed(model: str, device: str | torch.device = "cpu", prompts: Sequence[str] | None = None,
                 height: int | None = None, width: int | None = None) -> Testbed:
    """``digits``, ``gmm`` (or ``gmm-flow``), or a path to a local diffusers pipeline folder.

    A folder holding a ``DigitsPipeline`` (the shipped one, or one exported by
    ``python -m fewstep.zoo.digits_train train --export DIR``) gets the digits metrics.

    Raises:
        ValueError: unknown model, unusable folder, or a device the model cannot use.
    """
    device = torch.device(device)
    index = check_model(model)
    if index is not None and index["_class_name"] != "DigitsPipeline":
        return PipelineTestbed(model, prompts or DEFAULT_PROMPTS, height, width, device)
    refuse_pipeline_settings(model, prompts=prompts, height=height, width=width)
    if model in ("gmm", "gmm-flow"):
        if device.type != "cpu":
            raise ValueError(f"the {model} testbed is exact and tiny and runs on the CPU only, not on {device}")
        return GMMTestbed(schedule="flow" if model == "gmm-flow" else "linear")
    return DigitsTestbed(device, None if index is None else model)
