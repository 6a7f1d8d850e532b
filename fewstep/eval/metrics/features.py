"""Feature extractors for Fréchet distances, chosen by name; weights are only read from disk.

Names: ``inception`` (the standard FID network, :mod:`fewstep.eval.metrics.inception`), ``dinov2`` and
``clip`` (FD_DINOv2 / FD_CLIP from local ``transformers`` checkpoints), ``digits`` (the built-in
digits classifier, registered by :mod:`fewstep.zoo.digits` through a lazy ``module:attribute``
entry, so this module never imports the zoo), any name added with
:func:`register_feature_extractor`, or ``"package.module:callable"`` returning an ``nn.Module``.

Input convention (every extractor): images ``[N, C, H, W]``, either ``uint8`` in 0..255 or
floating point in [0, 1]; :func:`extract_features` also takes [-1, 1] with
``value_range=(-1, 1)``. The image networks round float input to 8 bits first, as EDM and
clean-fid do, so in-memory samples and the PNG files written from them give the same features,
and expand grayscale to RGB. Extractors never leave eval mode and use no batch-dependent
operation: features do not depend on the batch size (to float32 round-off of the convolution
kernels, ~1e-6 relative).

Resize modes (to the network's input size):

* ``legacy``: TensorFlow 1.x ``resize_bilinear`` (``align_corners=False``, source pixel
  ``dst * in / out``, no half-pixel centres, no antialiasing), as in the original TTUR FID code and
  torch-fidelity; the default for ``inception``, so FIDs compare with published numbers.
  Downscaling aliases: a 598x598 one-pixel checkerboard comes out as a constant image.
* ``clean``: antialiased bicubic resampling (torch's ``antialias=True`` kernel, equal to PIL's
  float ``BICUBIC`` resize that clean-fid and dgm-eval use, to ~1e-5 of the 0..255 range) with
  half-pixel centres; the checkerboard comes out mid-grey. The default for ``dinov2``/``clip``.

torchmetrics >= 1.8 resizes with antialiased *bilinear* by default, which is neither: pass it
``antialias=False`` to reproduce ``legacy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewstep.eval.metrics.inception import load_fid_inception
from fewstep.infra.validation import check_count

__all__ = [
    "RESIZE_MODES",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "DINOv2FeatureExtractor",
    "CLIPFeatureExtractor",
    "ModuleFeatureExtractor",
    "feature_extractor",
    "parse_extractor_spec",
    "is_code_spec",
    "register_feature_extractor",
    "list_feature_extractors",
    "extract_features",
    "quantize_images",
    "as_float_images",
    "resize_images",
    "state_dict_sha256",
]

RESIZE_MODES = ("legacy", "clean")
_VALUE_RANGES = ((0.0, 1.0), (-1.0, 1.0))
_RANGE_SLACK = 1e-3  # float round-off allowed outside [0, 1] before input is called out of range


# --- preprocessing ----------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or floating point in [0, 1], got {images.dtype}")


def _check_unit_range(images: torch.Tensor) -> None:
    if images.is_floating_point() and images.numel():
        lo, hi = images.min().item(), images.max().item()
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; for images in "
                "[-1, 1] use extract_features(..., value_range=(-1, 1))"
            )


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """Float32 images in [0, 1] from ``uint8`` (divided by 255) or float [0, 1] input, not quantised.

    Raises:
        TypeError: On another dtype.
        ValueError: On a wrong shape or float values outside [0, 1].
    """
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.float() / 255
    _check_unit_range(images)
    return images.float()


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """8-bit pixel values of an image batch, as float32.

    Args:
        images: ``uint8`` [N, C, H, W], or float in [0, 1] (rounded to the nearest of 256 levels).

    Returns:
        float32 [N, C, H, W] holding integers 0..255.

    Raises:
        TypeError: On another dtype.
        ValueError: On a wrong shape or float values outside [0, 1].
    """
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.float()
    _check_unit_range(images)
    return (images.float() * 255).round_().clamp_(0, 255)


def _rgb_pixels(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # 8-bit RGB pixel values on the device and in the dtype of the network parameter ``like``.
    _check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    return quantize_images(images.to(like.device)).to(like.dtype).expand(-1, 3, -1, -1)


def _tf1_axis(n_in: int, n_out: int, device: torch.device):
    # TF 1.x maps output pixel i to source position i * n_in / n_out, computed in float32.
    pos = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(
        n_in / n_out, dtype=torch.float32, device=device
    )
    lo = pos.long()
    return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()


def _resize_legacy(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ylo, yhi, fy = _tf1_axis(x.shape[-2], size[0], x.device)
    xlo, xhi, fx = _tf1_axis(x.shape[-1], size[1], x.device)
    fx, fy = fx.to(x.dtype), fy.to(x.dtype)[:, None]
    top, bottom = x.index_select(-2, ylo), x.index_select(-2, yhi)
    top = top.index_select(-1, xlo) + (top.index_select(-1, xhi) - top.index_select(-1, xlo)) * fx
    bottom = bottom.index_select(-1, xlo) + (bottom.index_select(-1, xhi) - bottom.index_select(-1, xlo)) * fx
    return top + (bottom - top) * fy


def resize_images(x: torch.Tensor, size: int | tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes float images the way FID pipelines do (see the module docstring).

    Args:
        x: float [N, C, H, W] pixel values in 0..255.
        size: Output ``(height, width)``, or one int for a square.
        mode: ``"legacy"`` (TF 1.x bilinear, no antialiasing) or ``"clean"`` (antialiased
            bicubic, clamped to 0..255).

    Returns:
        float [N, C, *size]; the input itself when it already has that size.

    Raises:
        ValueError: On an unknown ``mode``.
    """
    _check_resize(mode)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "legacy":
        return _resize_legacy(x, size)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255)


def _check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return resize


# --- extractors ---------------------------------------------------------------------------------


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's persistent state (names, dtypes, shapes and bytes, sorted by name).

    Args:
        module: Any module.

    Returns:
        64 hex digits; equal for equal weights however they were stored on disk.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """Base class: images -> [N, D] features, plus the metadata that identifies them.

    Subclasses keep their network in ``self.network``, set ``name`` (recorded in statistics
    files), ``feature_dim`` when known and ``resize`` / ``input_size`` when they resize, and
    implement ``forward`` on the input convention of this module. They never leave eval mode
    (``train()`` is a no-op), so batch norm and dropout cannot make features depend on the batch.
    """

    name: str = ""
    feature_dim: int | None = None
    resize: str | None = None
    input_size: int | None = None

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keeps the module in eval mode whatever ``mode`` is."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a parameter-free module)."""
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def weights_hash(self) -> str:
        """:func:`state_dict_sha256` of ``self.network``: the weights as stored, not the file's bytes."""
        return state_dict_sha256(getattr(self, "network", self))

    def metadata(self) -> dict[str, Any]:
        """Fields stored with feature statistics and compared before two are put side by side."""
        meta: dict[str, Any] = {"extractor": self.name, "weights_hash": self.weights_hash()}
        if self.resize is not None:
            meta.update(resize=self.resize, input_size=self.input_size)
        return meta


class InceptionFeatureExtractor(FeatureExtractor):
    """FID features: 2048-d pool features of the TF InceptionV3 graph at 299x299.

    Args:
        weights: Local ``weights-inception-2015-12-05-6726825d.pth``; defaults to
            ``$TORCH_HOME/hub/checkpoints/`` (the torchmetrics / torch-fidelity cache).
        resize: ``"legacy"`` (default, TF-compatible, comparable with published FIDs) or ``"clean"``.

    Raises:
        FileNotFoundError: If the weights file is missing; the message says what to put where.
    """

    name = "inception"
    feature_dim = 2048
    input_size = 299

    def __init__(self, weights: str | Path | None = None, resize: str = "legacy") -> None:
        super().__init__()
        self.resize = _check_resize(resize)
        self.network = load_fid_inception(weights)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, 2048] of uint8 / [0, 1] images [N, 1 or 3, H, W]."""
        x = _rgb_pixels(images, next(self.network.parameters()))
        return self.network((resize_images(x, self.input_size, self.resize) - 128) / 128)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def _load_vision_checkpoint(kind: str, checkpoint: str | Path, model_cls, model_types: tuple[str, ...]):
    folder = Path(checkpoint)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{kind} checkpoint folder {folder} has no config.json; pass a local transformers "
            "checkpoint folder (save_pretrained output or a Hugging Face snapshot directory). "
            "fewstep never downloads weights at run time."
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in model_types:
        raise ValueError(f"{folder} holds a {model_type!r} model; the {kind} extractor needs one of {model_types}")
    with _quiet_transformers():
        try:
            model, info = model_cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        except OSError as exc:
            raise FileNotFoundError(f"{kind} checkpoint {folder}: {exc}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise ValueError(f"{folder} lacks weights for the {kind} model: {bad[:5]}")
    return model.float()  # half-precision checkpoints are upcast exactly


class _TransformersFeatureExtractor(FeatureExtractor):
    """A ViT from a local transformers checkpoint; features are its pooled output (final CLS)."""

    _kind: str
    _model_types: tuple[str, ...]
    _mean: tuple[float, float, float]
    _std: tuple[float, float, float]

    def __init__(self, checkpoint: str | Path, resize: str, image_size: int | None) -> None:
        super().__init__()
        self.resize = _check_resize(resize)
        self.network = _load_vision_checkpoint(self.name, checkpoint, self._model_class(), self._model_types)
        self.input_size = int(image_size or self.network.config.image_size)
        self.feature_dim = int(self.network.config.hidden_size)
        self.register_buffer("mean", torch.tensor(self._mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @staticmethod
    def _model_class():
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, hidden_size] of uint8 / [0, 1] images [N, 1 or 3, H, W]."""
        x = _rgb_pixels(images, next(self.network.parameters()))
        x = resize_images(x, self.input_size, self.resize) / 255
        return self.network(pixel_values=(x - self.mean) / self.std).pooler_output


class DINOv2FeatureExtractor(_TransformersFeatureExtractor):
    """FD_DINOv2 features: the final-layer CLS token (after layer norm) of a DINOv2 ViT.

    Stein et al. Exposing flaws of generative model evaluation metrics and their unfair treatment
    of diffusion models. NeurIPS 2023: ViT-L/14, images resized to 224x224 (bicubic), ImageNet
    mean/std.

    Args:
        checkpoint: Local folder of a transformers ``Dinov2Model`` (e.g. ``facebook/dinov2-large``).
        resize: ``"clean"`` (default, as dgm-eval) or ``"legacy"``.
        image_size: Square network input size; default 224.
    """

    name = "dinov2"
    _model_types = ("dinov2",)
    _mean = (0.485, 0.456, 0.406)
    _std = (0.229, 0.224, 0.225)

    def __init__(self, checkpoint: str | Path, resize: str = "clean", image_size: int = 224) -> None:
        super().__init__(checkpoint, resize, image_size)

    @staticmethod
    def _model_class():
        from transformers import Dinov2Model

        return Dinov2Model


class CLIPFeatureExtractor(_TransformersFeatureExtractor):
    """FD_CLIP features: the final CLS token after ``post_layernorm`` of a CLIP vision tower.

    As in dgm-eval (Stein et al. 2023): no projection head, images resized to the model's input
    size, CLIP's mean/std.

    Args:
        checkpoint: Local folder of a transformers CLIP model (full ``CLIPModel`` or vision only).
        resize: ``"clean"`` (default) or ``"legacy"``.
        image_size: Square network input size; default the checkpoint's ``image_size``.
    """

    name = "clip"
    _model_types = ("clip", "clip_vision_model")
    _mean = (0.48145466, 0.4578275, 0.40821073)
    _std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, checkpoint: str | Path, resize: str = "clean", image_size: int | None = None) -> None:
        super().__init__(checkpoint, resize, image_size)

    @staticmethod
    def _model_class():
        from transformers import CLIPVisionModel

        return CLIPVisionModel


class ModuleFeatureExtractor(FeatureExtractor):
    """Wraps any ``nn.Module``: it receives float32 images in [0, 1] and returns [N, ...] features.

    Args:
        module: The network; its output is flattened to [N, D].
        name: Name recorded in statistics metadata (the ``module:callable`` spec).
        options: Options the module was built with, recorded in the metadata.
    """

    def __init__(self, module: nn.Module, name: str, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.network = module
        self.name = name
        self.options = dict(options or {})
        self.feature_dim = getattr(module, "num_features", None)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, D] of uint8 / [0, 1] images."""
        out = self.network(as_float_images(images).to(self.device))
        if out.ndim < 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"{self.name} returned shape {tuple(out.shape)} for {images.shape[0]} images")
        return out.flatten(1)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        if self.options:
            meta["options"] = self.options
        return meta


# --- registry -------------------------------------------------------------------------------------

# Values are factories or lazy "module:attribute" strings (imported only when asked for).
_REGISTRY: dict[str, Callable[..., nn.Module] | str] = {
    "inception": InceptionFeatureExtractor,
    "dinov2": DINOv2FeatureExtractor,
    "clip": CLIPFeatureExtractor,
    "digits": "fewstep.zoo.digits:DigitsFeatureExtractor",
}


def register_feature_extractor(name: str, factory: Callable[..., nn.Module] | str | None = None):
    """Registers a feature extractor under ``name``; usable as a decorator.

    Args:
        name: Registry name (no ``:``).
        factory: A callable returning an ``nn.Module`` (a :class:`FeatureExtractor` or any network,
            then wrapped in :class:`ModuleFeatureExtractor`), or a lazy ``"module:attribute"``.

    Returns:
        ``factory``, or a decorator when ``factory`` is omitted.

    Raises:
        ValueError: On a malformed or already registered name.
    """
    if not name or ":" in name:
        raise ValueError(f"feature extractor names must be non-empty and contain no ':', got {name!r}")

    def add(f):
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"feature extractor {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def list_feature_extractors() -> list[str]:
    """Registered names (``module:callable`` specs are accepted besides these)."""
    return sorted(_REGISTRY)


def _import_entry(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:callable', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for feature extractor {spec!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (feature extractor {spec!r})")
        obj = getattr(obj, part)
    # Checked before anything is called: an nn.Module class or a plain Python function (whose
    # result is checked after the call); never a builtin such as os.system or another class.
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ValueError(f"feature extractor {spec!r} is the class {obj.__name__}, not an nn.Module subclass")
    if not isinstance(obj, type) and not inspect.isfunction(obj):
        raise ValueError(f"feature extractor {spec!r} must name an nn.Module class or a Python function returning "
                         f"one, not a {type(obj).__name__}")
    return obj


def is_code_spec(spec: str) -> bool:
    """Whether an extractor spec imports code (``package.module:callable``) rather than naming a registered extractor."""
    try:
        name, _ = parse_extractor_spec(spec)
    except ValueError:  # malformed: refused by whoever parses it
        return False
    return name not in _REGISTRY


def _check_options(name: str, factory: Callable, options: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"feature extractor {name!r} got unknown option(s) {unknown}; allowed: {allowed}")


def _signature_mismatch(factory: Callable, options: dict[str, Any]) -> bool:
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        return True
    except ValueError:  # no signature (some builtins): assume the call itself failed
        return True
    return False


def feature_extractor(name: str, **options: Any) -> FeatureExtractor:
    """Builds a feature extractor by name, offline.

    Args:
        name: A registered name (``inception``, ``dinov2``, ``clip``, ``digits``, ...) or
            ``"package.module:callable"``.
        **options: Options of that extractor, e.g. ``weights=`` and ``resize=`` for ``inception``,
            ``checkpoint=`` for ``dinov2`` / ``clip``.

    Returns:
        A :class:`FeatureExtractor` in eval mode on CPU.

    Raises:
        ValueError: On an unknown name or an import failure of a ``module:callable``.
        TypeError: On unknown options, or a callable that does not return an ``nn.Module``.
        FileNotFoundError: If the extractor's weights are not on disk.
    """
    entry = _REGISTRY.get(name)
    if entry is None and ":" not in name:
        raise ValueError(
            f"unknown feature extractor {name!r}; choose one of {list_feature_extractors()} "
            "or give 'package.module:callable'"
        )
    if entry is None or isinstance(entry, str):
        factory = _import_entry(entry or name)
    else:
        factory = entry
    _check_options(name, factory, options)
    try:
        model = factory(**options)
    except TypeError as exc:
        if not _signature_mismatch(factory, options):
            raise  # raised inside the factory: not a question of how it was called
        raise TypeError(f"feature extractor {name!r} cannot be called with options {options}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"feature extractor {name!r} returned {type(model).__name__}, not an nn.Module")
    if not isinstance(model, FeatureExtractor):
        model = ModuleFeatureExtractor(model, name=name, options=options)
    return model.eval()


def build_extractor(name: str, options: dict[str, Any]) -> FeatureExtractor:
    """:func:`feature_extractor` for a spec a user typed: every failure to build it is a ``ValueError``.

    Unknown options, a ``module:callable`` that needs arguments or returns no ``nn.Module`` are
    ``TypeError`` in the API; on the command line they are the user's to fix (one line, no traceback).
    """
    try:
        return feature_extractor(name, **options)
    except TypeError as exc:
        msg = " ".join(str(exc).split())  # the messages above name the extractor; a factory's own may not
        raise ValueError(msg if repr(name) in msg else f"feature extractor {name!r}: {msg}") from None


def parse_extractor_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value,...]`` or ``package.module:callable[:key=value,...]`` -> (name, options).

    Example: ``inception:resize=clean,weights=/models/inception.pth``, ``mypkg.nets:encoder:dim=64``.

    Raises:
        ValueError: a malformed option list (see :func:`fewstep.config.parse_spec`).
    """
    from fewstep.config import parse_spec

    head, _, rest = str(spec).partition(":")
    first, _, options = rest.partition(":")
    if rest and "=" not in first:  # module:callable, options after a second colon
        name, parsed = parse_spec(f"{head}:{options}", "extractor spec")
        return f"{head}:{first}", parsed
    return parse_spec(spec, "extractor spec")


@torch.inference_mode()
def extract_features(
    extractor: nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Features of an image batch, computed ``batch_size`` images at a time.

    Args:
        extractor: A :class:`FeatureExtractor` (or any module taking the same input).
        images: [N, C, H, W] ``uint8`` images, or float ones in ``value_range``.
        batch_size: Images per forward pass; the features do not depend on it.
        value_range: ``(0, 1)`` or ``(-1, 1)`` for float images (ignored for ``uint8``).

    Returns:
        float32 features [N, D] on CPU.

    Raises:
        TypeError: ``batch_size`` is not a whole number.
        ValueError: On a bad ``batch_size`` or ``value_range``, or images of the wrong shape/range.
    """
    if tuple(float(v) for v in value_range) not in _VALUE_RANGES:
        raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
    batch_size = check_count("batch_size", batch_size)
    images = torch.as_tensor(images)
    _check_images(images)
    if images.is_floating_point() and value_range[0] < 0:
        images = (images + 1) / 2
    chunks = [extractor(batch).float().cpu() for batch in images.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, getattr(extractor, "feature_dim", None) or 0)
