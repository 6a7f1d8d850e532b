"""Built-in class-conditional pixel diffusion model on the 8x8 UCI digits.

Everything here runs offline from files shipped inside the package:

* ``data/digits.npz``: the 1797 UCI digits (``images`` uint8 [1797, 8, 8] with values
  0..16, ``labels`` uint8 [1797]), exported from scikit-learn's bundled copy.
* ``weights/digits/``: a diffusers pipeline folder (``model_index.json``, ``unet/``,
  ``scheduler/``) holding the EMA weights of a small class-conditional ``UNet2DModel``
  (epsilon prediction, DDPM linear betas 1e-4..0.02 over 1000 steps).
* ``weights/digits_classifier.safetensors``: a small CNN used to check conditional
  correctness and as the feature extractor of the digits-FD (:func:`digits_fd`; registered
  as the ``digits`` extractor of ``fewstep.eval.metrics.features``).

Class label 10 is the null label: it was used for label dropout during training and
drives classifier-free guidance.

The shipped artefacts were produced with these commands (seed 0, one torch thread so
the runs are bit-reproducible; 2 shared CPU cores, torch 2.13 CPU, diffusers 0.42.1)::

    python -m fewstep.zoo.digits_train export-data
    python -m fewstep.zoo.digits_train train-classifier --threads 1 --seed 0 \\
        --out fewstep/zoo/weights/digits_classifier.safetensors          # ~45 s
    python -m fewstep.zoo.digits_train train --threads 1 --seed 0 --steps 3000 \\
        --out runs/digits                                        # ~9 min
    python -m fewstep.zoo.digits_train train --threads 1 --seed 0 --steps 6000 \\
        --out runs/digits                                        # resumed, ~10 min
    python -m fewstep.zoo.digits_train train --threads 1 --seed 0 --steps 6000 \\
        --out runs/digits --export fewstep/zoo/weights/digits    # export only
    python -m fewstep.zoo.digits_train evaluate --threads 1 --nfe 100 --n 1000

Resuming is exact (see ``digits_train``), so the two ``train`` runs equal one
uninterrupted 6000-step run (batch 128, AdamW lr 5e-4, EMA 0.999, label dropout 0.15,
train split only). Classifier test accuracy: 0.9972. ``evaluate`` at the default
guidance 1.5 with DPM-Solver++ (100 steps, 1000 samples): accuracy 1.000 and digits-FD
0.28 vs all real digits, against 0.30 between two random halves of the real data.

Run ``python -m fewstep.zoo.digits_train --help`` for all options; the training and evaluation
code lives in ``fewstep.zoo.digits_train``.
"""

from __future__ import annotations

import inspect
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UNet2DModel,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from torch import nn

from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
from fewstep.eval.metrics.features import FeatureExtractor, as_float_images

__all__ = [
    "NUM_CLASSES",
    "NULL_LABEL",
    "DEFAULT_GUIDANCE_SCALE",
    "DATA_PATH",
    "PIPELINE_DIR",
    "CLASSIFIER_PATH",
    "load_digits_data",
    "to_model_range",
    "from_model_range",
    "digits_unet_config",
    "DigitsClassifier",
    "load_digits_classifier",
    "check_finite_weights",
    "DigitsPipelineOutput",
    "DigitsPipeline",
    "load_digits_pipeline",
    "DigitsFeatureExtractor",
    "digits_features",
    "digits_fd",
]

NUM_CLASSES = 10
NULL_LABEL = 10  # "no label": trained via label dropout, used for classifier-free guidance
# Guidance 1.5 already gives 100% classifier accuracy with digits-FD at the real-vs-real
# level; 1.0 gives ~99% and 2.0 doubles the FD (DPM-Solver++, 50-100 steps).
DEFAULT_GUIDANCE_SCALE = 1.5
MAX_PIXEL = 16  # UCI digits pixels are counts of on-bits in 4x4 blocks: 0..16

_HERE = Path(__file__).resolve().parent
DATA_PATH = _HERE / "data" / "digits.npz"
PIPELINE_DIR = _HERE / "weights" / "digits"
CLASSIFIER_PATH = _HERE / "weights" / "digits_classifier.safetensors"

_SPLITS = ("all", "train", "test")
_TEST_EVERY = 5  # every 5th sample (index % 5 == 0) is held out: 360 test / 1437 train


def to_model_range(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Maps raw digit pixels 0..16 to the model range [-1, 1] via ``v / 8 - 1``.

    Args:
        values: Pixel values in [0, 16], any shape.

    Returns:
        A float32 tensor of the same shape with values in [-1, 1].
    """
    return torch.as_tensor(values, dtype=torch.float32) / (MAX_PIXEL / 2) - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`: maps [-1, 1] back to pixel values 0..16.

    Args:
        x: Values in the model range, any shape.

    Returns:
        A float tensor of pixel values (not rounded or clamped).
    """
    return (x + 1.0) * (MAX_PIXEL / 2)


def load_digits_data(
    split: str = "all", path: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads the shipped UCI digits with a fixed, deterministic train/test split.

    Args:
        split: ``"all"`` (1797 samples), ``"train"`` (1437) or ``"test"`` (360, every
            5th sample starting at index 0).
        path: Optional npz file to read instead of the shipped ``data/digits.npz``.

    Returns:
        ``(images, labels)``: float32 images [N, 1, 8, 8] in [-1, 1] and int64 labels [N].

    Raises:
        ValueError: If ``split`` is unknown, or the file is not a valid digits ``.npz``
            (named in the message).
        OSError: If the file cannot be opened.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    path = Path(path or DATA_PATH)
    try:
        data = np.load(path)  # OSError names a missing file
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, expected an .npz archive with 'images' and 'labels'")
    with data:
        missing = [k for k in ("images", "labels") if k not in data.files]
        if missing:
            raise ValueError(f"{path} has no {missing} array(s); expected 'images' and 'labels'")
        images, labels = data["images"], data["labels"]
    if images.ndim != 3 or images.shape[1:] != (8, 8) or labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: expected images [N, 8, 8] and labels [N], got {images.shape} and {labels.shape}")
    if images.size and (images.min() < 0 or images.max() > MAX_PIXEL):
        raise ValueError(f"{path}: pixel values must be in 0..{MAX_PIXEL}, found {images.min()}..{images.max()}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    is_test = np.arange(len(labels)) % _TEST_EVERY == 0
    keep = {"all": slice(None), "train": ~is_test, "test": is_test}[split]
    x = to_model_range(images[keep]).unsqueeze(1)
    return x, torch.from_numpy(labels[keep].astype(np.int64))


def digits_unet_config() -> dict[str, Any]:
    """Returns the ``UNet2DModel`` architecture of the built-in digits model.

    Three levels (8x8 -> 4x4 -> 2x2) with self-attention only at 2x2; about 1.1M
    parameters (4.3 MiB in float32). ``num_class_embeds`` is 11: digits 0-9 plus the
    null label 10.

    Returns:
        A fresh keyword dict for ``UNet2DModel(**config)``.
    """
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "num_class_embeds": NUM_CLASSES + 1,
    }


class DigitsClassifier(nn.Module):
    """Small CNN classifier for 8x8 digits; its penultimate layer is the FD feature space.

    Args:
        width: Channels of the first conv layer (later layers use ``2 * width``).
        feature_dim: Size of the penultimate (feature) layer.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.width = width
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            x: Images [N, 1, 8, 8] in [-1, 1].

        Returns:
            Features [N, feature_dim].
        """
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: Images [N, 1, 8, 8] in [-1, 1].

        Returns:
            Logits [N, 10].
        """
        return self.head(self.body(x))


def load_digits_classifier(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> DigitsClassifier:
    """Loads the shipped digits classifier (or one written by ``train-classifier``).

    Args:
        path: A ``.safetensors`` file; defaults to the shipped weights.
        device: Where to put the model.

    Returns:
        The classifier in eval mode.

    Raises:
        ValueError: If the file is not a readable classifier checkpoint (corrupt, wrong
            architecture metadata or tensors, non-finite weights); the message names it.
        OSError: If the file cannot be opened.
    """
    path = Path(path or CLASSIFIER_PATH)
    try:
        # The architecture hyper-parameters are stored as safetensors metadata.
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except OSError:
        raise
    except Exception as exc:  # safetensors' own error type for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    sizes = {}
    for key, default in (("width", 32), ("feature_dim", 64)):
        try:
            sizes[key] = int(meta.get(key, default))
        except ValueError:
            raise ValueError(f"{path}: metadata {key}={meta[key]!r} is not a whole number") from None
    model = DigitsClassifier(**sizes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not hold DigitsClassifier weights: {str(exc).splitlines()[0]}") from None
    check_finite_weights(model, path)
    return model.to(device).eval()


def check_finite_weights(module: nn.Module, source: str | Path) -> None:
    """Raises ValueError naming ``source`` and the first parameter holding NaN or Inf."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: weight {name!r} contains NaN or Inf")


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """Output of :class:`DigitsPipeline`.

    Attributes:
        images: ``"pil"`` (default): list of N grayscale 8x8 PIL images; ``"np"``: float32
            array [N, 8, 8, 1] in [0, 1]; ``"pt"``: tensor [N, 1, 8, 8] in [-1, 1].
    """

    images: Union[torch.Tensor, np.ndarray, list[PIL.Image.Image]]


def _label_tensor(class_labels: int | Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if labels.min() < 0 or labels.max() > NULL_LABEL:
        raise ValueError(f"class labels must be in 0..{NULL_LABEL} (10 = unconditional)")
    return labels


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampler for the digits UNet with classifier-free guidance.

    Works with any diffusers scheduler configured for the DDPM training schedule
    (DDIM, DPM-Solver++, UniPC, Euler, ...).

    Args:
        unet: Class-conditional ``UNet2DModel`` predicting epsilon.
        scheduler: Any diffusers scheduler.
    """

    # The guided forward pass stacks [conditional, null] (diffusers pipelines stack the
    # unconditional half first); wrappers that split the batch read this.
    guidance_batch_order = ("conditional", "unconditional")

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self._guidance_scale = DEFAULT_GUIDANCE_SCALE

    @property
    def guidance_scale(self) -> float:
        """The guidance weight of the current (or last) call, as in diffusers pipelines."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call runs the doubled CFG batch."""
        return self._guidance_scale > 1.0

    def _step_kwargs(self, generator) -> dict[str, Any]:
        # Only stochastic schedulers take a generator; UniPC/Euler-style ones reject it.
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> DigitsPipelineOutput | tuple:
        """Samples one digit per entry of ``class_labels``.

        Args:
            class_labels: Digit(s) 0-9 to draw; 10 draws unconditionally.
            guidance_scale: Classifier-free guidance weight ``w`` in
                ``eps = eps_null + w * (eps_cond - eps_null)``; ``<= 1`` runs a single
                conditional forward pass per step (no guidance).
            num_inference_steps: Number of scheduler steps.
            generator: Torch generator(s) for the initial noise (and stochastic steps).
            latents: Optional initial noise [N, 1, 8, 8] (before ``init_noise_sigma``).
            output_type: ``"pil"`` (default, as in diffusers pipelines), ``"np"`` or ``"pt"``
                (see :class:`DigitsPipelineOutput`).
            return_dict: Return a :class:`DigitsPipelineOutput` instead of a tuple.

        Returns:
            A :class:`DigitsPipelineOutput`, or ``(images,)`` if ``return_dict`` is False.

        Raises:
            ValueError: On bad labels, latents shape or output type.
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        device = self._execution_device
        labels = _label_tensor(class_labels, device)
        cfg = self.unet.config
        shape = (labels.numel(), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=self.unet.dtype)

        self._guidance_scale = guidance_scale
        guided = self.do_classifier_free_guidance
        if guided:  # one doubled batch: [conditional, null]
            labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, class_labels=labels).sample
            if guided:
                eps_cond, eps_null = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample

        images = latents.clamp(-1.0, 1.0)
        if output_type != "pt":
            images = ((images + 1.0) / 2.0).permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DigitsPipelineOutput(images=images)


def load_digits_pipeline(
    scheduler: SchedulerMixin | type[SchedulerMixin] | None = None,
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
) -> DigitsPipeline:
    """Builds a :class:`DigitsPipeline` from the shipped weights, fully offline.

    Args:
        scheduler: A scheduler instance (used as is), a scheduler class (built with
            ``from_config`` from the shipped DDPM scheduler config), or None for
            ``DPMSolverMultistepScheduler`` built from that config.
        device: Where to put the UNet.
        path: A pipeline folder written by ``train --export``; defaults to the shipped one.

    Returns:
        The pipeline, with the UNet in eval mode.

    Raises:
        OSError: If the weights cannot be read (diffusers names the file).
        ValueError: If the weights contain NaN or Inf.
    """
    root = Path(path or PIPELINE_DIR)
    unet = UNet2DModel.from_pretrained(root / "unet").eval()  # OSError naming the file if unreadable
    check_finite_weights(unet, root / "unet")
    if scheduler is None or isinstance(scheduler, type):
        scheduler_cls = scheduler or DPMSolverMultistepScheduler
        scheduler = scheduler_cls.from_pretrained(root / "scheduler")
    return DigitsPipeline(unet=unet, scheduler=scheduler).to(device)


# --- digits-FD: the classifier as a feature extractor ---------------------------------------


class DigitsFeatureExtractor(FeatureExtractor):
    """The ``digits`` feature extractor: 64-d penultimate features of the digits classifier.

    Takes the common extractor input (``fewstep.eval.metrics.features``): [N, 1, 8, 8] (or [N, 8, 8])
    images, ``uint8`` 0..255 or float in [0, 1], which are not quantised (the digits-FD of
    ``fewstep compare`` is computed on float samples).

    Args:
        weights: Classifier ``.safetensors``; defaults to the shipped one.
    """

    name = "digits"

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.network = load_digits_classifier(weights)
        self.feature_dim = self.network.feature_dim
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, 64] of [N, 1, 8, 8] images in [0, 1] (or uint8)."""
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(1)
        x = as_float_images(images)
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected digits images [N, 1, 8, 8], got {tuple(x.shape)}")
        return self.network.features(x.to(self.device) * 2 - 1)


def reference_images(split: str = "all") -> torch.Tensor:
    """The real digits as images [N, 1, 8, 8] in [0, 1]: the built-in ``digits`` dataset of ``fewstep eval``.

    Args:
        split: ``"all"``, ``"train"`` or ``"test"`` (see :func:`load_digits_data`).
    """
    x, _ = load_digits_data(split)
    return (x + 1) / 2


@torch.no_grad()
def digits_features(
    images: torch.Tensor,
    classifier: DigitsClassifier | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Penultimate digits-classifier features of 8x8 digit images in the model range.

    Args:
        images: [N, 1, 8, 8] (or [N, 8, 8]) images in [-1, 1].
        classifier: Feature extractor; defaults to the shipped digits classifier.
        batch_size: Images per forward pass.

    Returns:
        Features [N, D] on the classifier's device.

    Raises:
        ValueError: If ``images`` is not a batch of 8x8 single-channel images.
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected digits images [N, 1, 8, 8], got {tuple(images.shape)}")
    if classifier is None:
        classifier = load_digits_classifier()
    device = next(classifier.parameters()).device
    chunks = [
        classifier.features(batch.to(device=device, dtype=torch.float32))
        for batch in images.split(batch_size)
    ]
    return torch.cat(chunks)


def digits_fd(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    classifier: DigitsClassifier | None = None,
) -> float:
    """Digits-FD: Fréchet distance between two image sets in digits-classifier features.

    Args:
        samples_a: [N, 1, 8, 8] images in [-1, 1].
        samples_b: [M, 1, 8, 8] images in [-1, 1].
        classifier: Feature extractor; defaults to the shipped digits classifier.

    Returns:
        The Fréchet distance as a float.
    """
    if classifier is None:
        classifier = load_digits_classifier()
    stats_a = feature_statistics(digits_features(samples_a, classifier))
    stats_b = feature_statistics(digits_features(samples_b, classifier))
    return frechet_distance(*stats_a, *stats_b)

