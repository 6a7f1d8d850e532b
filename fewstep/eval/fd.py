"""Fréchet distance between Gaussian fits of feature sets (FID-style), without scipy.

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``. The trace of the matrix
square root is computed as the sum of square roots of the eigenvalues of the symmetric
PSD matrix ``sqrt(S1) S2 sqrt(S1)``, which has the same spectrum as ``S1 S2``; symmetric
eigendecompositions in float64 keep this stable where a general ``sqrtm`` is not.

``digits_fd`` measures it in the penultimate feature space of the built-in digits
classifier (``fewstep.zoo.digits``): the "digits-FD".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fewstep.zoo.digits import DigitsClassifier

__all__ = ["feature_statistics", "frechet_distance", "digits_features", "digits_fd"]

ArrayLike = torch.Tensor | np.ndarray


def _f64(name: str, value: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def feature_statistics(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of a feature set, in float64.

    Args:
        features: [N, D] features, N >= 2.

    Returns:
        ``(mu, sigma)``: mean [D] and covariance [D, D], float64 on CPU.

    Raises:
        ValueError: If ``features`` is not 2-D with at least 2 rows, or is non-finite.
    """
    f = _f64("features", features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D], got {tuple(f.shape)}")
    mu = f.mean(dim=0)
    centered = f - mu
    sigma = centered.T @ centered / (f.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    # Symmetric square root; tiny negative eigenvalues are round-off on a PSD matrix.
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1: Mean [D] of the first Gaussian.
        sigma1: Covariance [D, D] of the first Gaussian (symmetric PSD).
        mu2: Mean [D] of the second Gaussian.
        sigma2: Covariance [D, D] of the second Gaussian (symmetric PSD).

    Returns:
        The squared Fréchet (2-Wasserstein) distance as a Python float (>= 0).

    Raises:
        ValueError: On mismatched or malformed shapes, or non-finite input.
    """
    mu1, mu2 = _f64("mu1", mu1), _f64("mu2", mu2)
    sigma1, sigma2 = _f64("sigma1", sigma1), _f64("sigma2", sigma2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"means must be 1-D of equal size, got {tuple(mu1.shape)} and {tuple(mu2.shape)}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {tuple(s.shape)}")
    # Symmetrise so that eigh sees exactly symmetric input despite round-off upstream.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)  # FD >= 0; a negative value is round-off


@torch.no_grad()
def digits_features(
    images: torch.Tensor,
    classifier: DigitsClassifier | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Penultimate digits-classifier features of 8x8 digit images.

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
        from fewstep.zoo.digits import load_digits_classifier

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
        from fewstep.zoo.digits import load_digits_classifier

        classifier = load_digits_classifier()
    stats_a = feature_statistics(digits_features(samples_a, classifier))
    stats_b = feature_statistics(digits_features(samples_b, classifier))
    return frechet_distance(*stats_a, *stats_b)
