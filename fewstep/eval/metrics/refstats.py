"""Reference statistics for FD/FID: from an image folder, an ``.npz`` of images or features, or a built-in dataset.

Statistics are cached by content: the key is a digest of the source's bytes and the
extractor's metadata (name, weights hash, resize mode, input size), so a changed file or
different weights never reuse a stale cache entry. Built-in datasets are lazy
``module:callable`` entries (the zoo provides them), so this module imports no model.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fewstep.eval.metrics.features import FeatureExtractor
from fewstep.infra.shards import identity_digest
from fewstep.eval.metrics.stats import FeatureStatistics, GaussianStats

__all__ = ["BUILTIN_DATASETS", "IMAGE_SUFFIXES", "load_source", "reference_statistics", "is_stats_file",
           "real_vs_real"]

# name -> "module:callable" returning images [N, C, H, W] (uint8, or float in [0, 1]).
BUILTIN_DATASETS = {"digits": "fewstep.zoo.digits:reference_images"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_IMAGE_KEYS = ("images", "arr_0")


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(hashlib.sha256(chunk).digest())
    return h.hexdigest()


def _channels_first(images: np.ndarray, where: str) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be [N, H, W], [N, C, H, W] or [N, H, W, C], got {images.shape}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    # A fresh C-order copy: a transposed view with a size-1 axis counts as contiguous but keeps odd
    # strides, which send convolutions down another kernel (different float32 round-off).
    t = torch.from_numpy(np.array(images, order="C", copy=True))
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got {images.dtype}")
    return t


def _load_folder(folder: Path) -> tuple[torch.Tensor, bytes]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    raw = [f.read_bytes() for f in files]
    opened = [Image.open(io.BytesIO(b)) for b in raw]
    mode = "L" if all(im.mode in ("L", "1") for im in opened) else "RGB"
    arrays = [np.asarray(im.convert(mode)) for im in opened]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images differ in size ({sorted(sizes)[:3]}); resize them to one size first")
    names = "\n".join(f.relative_to(folder).as_posix() for f in files).encode()
    return _channels_first(np.stack(arrays), str(folder)), _digest(names, *raw).encode()


def load_source(source: str) -> tuple[str, torch.Tensor, str]:
    """Read a reference source.

    Args:
        source: A built-in dataset name (``digits``), an image folder, or an ``.npz`` with
            ``features`` [N, D] or ``images`` (``arr_0``) [N, H, W(, C)] / [N, C, H, W].

    Returns:
        ``(kind, data, content digest)``: kind is ``"images"`` or ``"features"``.

    Raises:
        ValueError: an unknown name, an unreadable file or unusable arrays (naming the source).
        OSError: a file cannot be read.
    """
    if source in BUILTIN_DATASETS:
        from fewstep.eval.metrics.features import _import_entry

        images = torch.as_tensor(_import_entry(BUILTIN_DATASETS[source])())
        data = images.contiguous().numpy().tobytes()
        return "images", images, _digest(source.encode(), str(tuple(images.shape)).encode(), data)
    path = Path(source)
    if path.is_dir():
        images, digest = _load_folder(path)
        return "images", images, digest.decode()
    if not path.exists():
        raise ValueError(f"reference source {source!r} is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}), "
                         "an image folder or an .npz file")
    raw = path.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
    digest = _digest(raw)
    if "features" in arrays:
        feats = arrays["features"]
        if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
            raise ValueError(f"{path}: 'features' must be a float array [N, D], got {feats.dtype} {feats.shape}")
        return "features", torch.from_numpy(feats), digest
    key = next((k for k in _IMAGE_KEYS if k in arrays), None)
    if key is None:
        raise ValueError(f"{path} has neither 'features' nor 'images' (found keys {sorted(arrays)}); "
                         "statistics files (mu, sigma) are used as references directly")
    return "images", _channels_first(arrays[key], str(path)), digest


def is_stats_file(source: str) -> bool:
    """True for an ``.npz`` holding ``mu`` and ``sigma`` (a statistics file, used as it is)."""
    path = Path(source)
    if source in BUILTIN_DATASETS or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "mu" in npz.files and "sigma" in npz.files
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, AttributeError):
        return False


def reference_statistics(source: str, extractor: FeatureExtractor, cache_dir: str | Path, batch_size: int = 100,
                         log: Callable[[str], None] = print, progress: bool = True) -> GaussianStats:
    """Statistics of a reference source under ``extractor``, from the cache when it holds them.

    Args:
        source: See :func:`load_source`; a statistics file is loaded as it is.
        extractor: Feature extractor (ignored for precomputed features).
        cache_dir: Cache folder (``<cache_dir>/<name>-<digest>.npz``).
        batch_size: Images per forward pass (features do not depend on it beyond float32 round-off).
        log: Where messages go.
        progress: Show a progress bar.

    Raises:
        ValueError: see :func:`load_source`; an unusable cached file is recomputed, not an error.
    """
    if is_stats_file(source):
        return GaussianStats.load(source)
    kind, data, digest = load_source(source)
    meta = {"source": source if source in BUILTIN_DATASETS else str(Path(source).resolve()), "content": digest}
    if kind == "images":
        meta.update(extractor.metadata())
    slug = "".join(c if c.isalnum() else "_" for c in Path(source).name) or "ref"
    cached = Path(cache_dir) / f"{slug}-{identity_digest({**meta, 'kind': kind}, 20)}.npz"
    if cached.is_file():
        try:
            stats = GaussianStats.load(cached)
            if {k: stats.metadata.get(k) for k in meta} == meta:
                log(f"reference statistics: cached {cached}")
                return stats
        except ValueError as exc:
            log(f"reference statistics: ignoring {cached}: {exc}")
    acc = FeatureStatistics()
    if kind == "features":
        acc.update(data, start=0)
    else:
        from tqdm.auto import tqdm

        with torch.inference_mode(), tqdm(total=data.shape[0], desc="reference features", unit="image",
                                          disable=not progress) as bar:
            for start in range(0, data.shape[0], batch_size):
                batch = data[start:start + batch_size]
                acc.update(extractor(batch).float().cpu(), start=start)
                bar.update(batch.shape[0])
    stats = acc.to_stats(**meta, kind=kind)
    try:
        stats.save(cached)
    except OSError as exc:
        log(f"warning: the statistics cache is not writable ({exc})")
    return GaussianStats(stats.mu, stats.sigma, stats.n, stats.metadata, source)


def real_vs_real(source: str, extractor: FeatureExtractor, batch_size: int = 100) -> float | None:
    """FD between the two halves of a built-in dataset under ``extractor``: the level below which a
    sampler's FD against that dataset means nothing (``fewstep compare`` draws the same line).

    Returns:
        None for other sources (folders and files can be large: their halves are not computed).
    """
    if source not in BUILTIN_DATASETS:
        return None
    from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
    from fewstep.eval.metrics.features import extract_features

    images = load_source(source)[1]
    feats = extract_features(extractor, images, batch_size=batch_size).double()
    half = feats.shape[0] // 2
    return frechet_distance(*feature_statistics(feats[:half]), *feature_statistics(feats[half:2 * half]))
