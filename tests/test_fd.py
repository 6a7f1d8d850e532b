"""Fréchet distance: float64 precision against independent numpy references, and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.eval.metrics.fd import feature_statistics, frechet_distance


class _Orthogonal:
    """A dense random orthogonal Q = H_1 ... H_k of Householder reflections, applied in O(k d^2)."""

    def __init__(self, d: int, rng: np.random.Generator, reflections: int = 4) -> None:
        self.vs = [v / np.linalg.norm(v) for v in rng.standard_normal((reflections, d))]

    def left(self, m: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``Q @ m`` (or ``Q.T @ m``)."""
        for v in (self.vs if transpose else self.vs[::-1]):
            m = m - 2 * np.outer(v, v @ m)
        return m

    def congruence(self, s: np.ndarray, transpose: bool = False) -> np.ndarray:
        """``Q s Q^T`` (or ``Q^T s Q``) for symmetric ``s``."""
        return self.left(self.left(s, transpose).T, transpose)


def _covariance(d: int, rank: int, rng: np.random.Generator, scale: float):
    """``(S, Q, eigenvalues)`` with ``S = Q diag(eigenvalues) Q^T`` of the given rank."""
    q = _Orthogonal(d, rng)
    eigenvalues = np.zeros(d)
    eigenvalues[:rank] = scale * rng.uniform(0.05, 1.0, rank) ** 2
    s = q.congruence(np.diag(eigenvalues))
    return (s + s.T) / 2, q, eigenvalues


def _reference_trace_sqrt(q1: _Orthogonal, a: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) with S1 = Q1 diag(a) Q1^T known by construction: numpy's eigenvalues of
    ``diag(sqrt(a)) Q1^T S2 Q1 diag(sqrt(a))`` on the range of S1."""
    keep = a > 0
    root = np.sqrt(a[keep])
    inner = q1.congruence(s2, transpose=True)[np.ix_(keep, keep)] * root[:, None] * root[None, :]
    return np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()


def _check_against_reference(d: int, rank1: int, rank2: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    s1, q1, a = _covariance(d, rank1, rng, scale=1.0)
    s2, q2, b = _covariance(d, rank2, rng, scale=3.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    # Factor the lower-rank side, so that the reference never takes square roots of round-off.
    tr_sqrt = _reference_trace_sqrt(q1, a, s2) if rank1 <= rank2 else _reference_trace_sqrt(q2, b, s1)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(reference, rel=1e-6)  # the requirement
    assert fd == pytest.approx(reference, rel=1e-11)  # what float64 delivers


def test_fd_matches_numpy_at_d2048():
    _check_against_reference(2048, 2048, 2048)


@pytest.mark.parametrize("d, rank1, rank2", [(512, 512, 512), (512, 60, 512), (512, 512, 60), (512, 60, 90)])
def test_fd_matches_numpy_rank_deficient(d, rank1, rank2):
    """Either or both covariances singular; both singular takes the eigendecomposition route."""
    _check_against_reference(d, rank1, rank2, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("rank1, rank2", [(300, 2048), (300, 400)])
def test_fd_matches_numpy_at_d2048_rank_deficient(rank1, rank2):
    _check_against_reference(2048, rank1, rank2, seed=2)


def _empirical_stats(seed: int, n: int = 200, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return feature_statistics(torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g))


def test_fd_matches_general_eigenvalues_of_product():
    """The textbook formula: tr sqrt(S1 S2) as the sum of sqrt of the eigenvalues of S1 S2."""
    a, b = _empirical_stats(1, d=64, n=400), _empirical_stats(2, d=64, n=300)
    (mu1, s1), (mu2, s2) = (tuple(t.numpy() for t in s) for s in (a, b))
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(*a, *b) == pytest.approx(reference, rel=1e-10)


def test_feature_statistics_matches_numpy():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.double().numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f.double().numpy(), rowvar=False), atol=1e-12)


def test_fd_identical_and_swapped():
    a, b = _empirical_stats(1), _empirical_stats(2)
    assert frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-10)
    assert frechet_distance(*a, *b) == pytest.approx(frechet_distance(*b, *a), rel=1e-12)


def test_fd_of_zero_covariances_is_the_mean_distance():
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    zero = np.zeros((3, 3))
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(9.0, rel=1e-15)


@pytest.mark.parametrize("mu1, s1, mu2, s2", [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -2.0, 4.0)])
def test_fd_of_1d_gaussians_matches_closed_form(mu1, s1, mu2, s2):
    fd = frechet_distance(np.array([mu1]), np.array([[s1**2]]), np.array([mu2]), np.array([[s2**2]]))
    assert fd == pytest.approx((mu1 - mu2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_fd_rejects_bad_input():
    mu, sigma = _empirical_stats(0, d=4)
    mu5, sigma5 = _empirical_stats(0, d=5)
    with pytest.raises(ValueError, match="equal size"):
        frechet_distance(mu, sigma, mu5, sigma5)
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        frechet_distance(mu, sigma, mu, sigma5)
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        frechet_distance(mu, sigma, mu, sigma[:, :3])
    with pytest.raises(ValueError, match="sigma1 contains NaN"):
        frechet_distance(mu, sigma * math.nan, mu, sigma)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))


class _TinyFeatures(nn.Module):
    """A small convolutional feature network; float64 output so torchmetrics reports float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).double()


def test_fd_matches_torchmetrics_on_a_custom_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from fewstep.eval.metrics.features import ModuleFeatureExtractor, extract_features
    from fewstep.eval.metrics.stats import FeatureStatistics

    g = torch.Generator().manual_seed(0)
    real = torch.rand(96, 3, 16, 16, generator=g)
    fake = (torch.rand(80, 3, 16, 16, generator=g) * 0.8 + 0.1) ** 2
    net = _TinyFeatures()
    metric = FrechetInceptionDistance(feature=net, normalize=True)
    for batch in real.split(40):
        metric.update(batch, real=True)
    for batch in fake.split(33):
        metric.update(batch, real=False)
    expected = metric.compute().item()

    extractor = ModuleFeatureExtractor(net, name="tiny")
    stats = [FeatureStatistics(block_size=32).update(extract_features(extractor, x, batch_size=25))
             for x in (real, fake)]
    ours = frechet_distance(*stats[0].result(), *stats[1].result())
    assert ours == pytest.approx(expected, rel=1e-9)
