"""Streaming feature statistics (batching/sharding/merging/resume invariance) and statistics files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fewstep.eval.metrics.fd import feature_statistics, frechet_distance
from fewstep.infra.io import load_tensors, save_tensors
from fewstep.eval.metrics.stats import FeatureStatistics, GaussianStats, check_compatible

N, D, BLOCK = 1000, 24, 64


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Non-zero mean and correlated columns, float32 as networks produce them.
    return (torch.randn(N, D, generator=g) @ torch.randn(D, D, generator=g) + 3.0).float()


@pytest.fixture(scope="module")
def single_pass(features) -> tuple[torch.Tensor, torch.Tensor]:
    return FeatureStatistics(block_size=BLOCK).update(features).result()


def _assert_bitwise(result, expected) -> None:
    assert all(torch.equal(a, b) for a, b in zip(result, expected))


def test_result_matches_two_pass_float64(features, single_pass):
    mu, sigma = feature_statistics(features)
    torch.testing.assert_close(single_pass[0], mu, rtol=1e-13, atol=0)
    torch.testing.assert_close(single_pass[1], sigma, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 333])
def test_batch_size_does_not_change_a_bit(features, single_pass, batch_size):
    stats = FeatureStatistics(block_size=BLOCK)
    for batch in features.split(batch_size):
        stats.update(batch)
    _assert_bitwise(stats.result(), single_pass)


def test_out_of_order_batches_give_the_same_bits(features, single_pass):
    stats = FeatureStatistics(block_size=BLOCK)
    starts = list(range(0, N, 37))
    for start in np.random.default_rng(0).permutation(starts):
        stats.update(features[start: start + 37], start=start)  # numpy ints are fine
    assert stats.spans() == [(0, N)]
    _assert_bitwise(stats.result(), single_pass)


@pytest.mark.parametrize("cuts", [[256, 512, 768], [100, 101, 555, 999], [1]])
def test_merged_shards_equal_the_single_pass(features, single_pass, cuts):
    """Aligned and unaligned shard boundaries, merged in a shuffled order."""
    bounds = [0, *cuts, N]
    shards = [
        FeatureStatistics(block_size=BLOCK).update(features[a:b], start=a) for a, b in zip(bounds, bounds[1:])
    ]
    order = np.random.default_rng(len(cuts)).permutation(len(shards))
    merged = FeatureStatistics(block_size=BLOCK)
    for i in order:
        merged.merge(shards[i])
    assert merged.count == N
    _assert_bitwise(merged.result(), single_pass)


def test_resume_from_saved_state_is_bitwise(features, single_pass, tmp_path):
    stats = FeatureStatistics(block_size=BLOCK).update(features[:450])  # ends inside a block
    save_tensors(tmp_path / "state.safetensors", stats.state_dict())
    resumed = FeatureStatistics.from_state_dict(load_tensors(tmp_path / "state.safetensors"))
    assert resumed.next_index == 450 and resumed.spans() == [(0, 450)]
    resumed.update(features[450:])
    _assert_bitwise(resumed.result(), single_pass)


def test_two_processes_merge_to_the_single_process_bits(features, single_pass, tmp_path):
    """A shard accumulated in another process and merged here changes nothing."""
    torch.save(features, tmp_path / "features.pt")
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from fewstep.infra.io import save_tensors
        from fewstep.eval.metrics.stats import FeatureStatistics
        f = torch.load({str(tmp_path / "features.pt")!r})
        stats = FeatureStatistics(block_size={BLOCK}).update(f[333:], start=333)
        save_tensors({str(tmp_path / "shard.safetensors")!r}, stats.state_dict())
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    here = FeatureStatistics(block_size=BLOCK).update(features[:333])
    here.merge(FeatureStatistics.from_state_dict(load_tensors(tmp_path / "shard.safetensors")))
    _assert_bitwise(here.result(), single_pass)


def test_accumulator_rejects_bad_input(features):
    stats = FeatureStatistics(block_size=BLOCK).update(features[:100])
    with pytest.raises(ValueError, match="samples 50..59 were already added"):
        stats.update(features[:10], start=50)
    with pytest.raises(ValueError, match=r"shape \[B, 24\]"):
        stats.update(features[:, :5])
    with pytest.raises(ValueError, match="finite"):
        stats.update(torch.full((2, D), float("nan")))
    with pytest.raises(ValueError, match="block_size"):
        stats.merge(FeatureStatistics(block_size=32).update(features[200:210], start=200))
    with pytest.raises(ValueError, match="already added"):
        stats.merge(FeatureStatistics(block_size=BLOCK).update(features[90:110], start=90))
    assert stats.spans() == [(0, 100)]  # refused updates and merges change nothing
    with pytest.raises(ValueError, match="start must be a non-negative int"):
        stats.update(features[:2], start=-1)
    with pytest.raises(ValueError, match="block_size"):
        FeatureStatistics(block_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics().update(features[:1]).result()
    with pytest.raises(ValueError, match="not a FeatureStatistics state"):
        FeatureStatistics.from_state_dict({"block_size": torch.tensor(4)})


# --- statistics files ---------------------------------------------------------------------------


META = {"extractor": "inception", "weights_hash": "ab" * 32, "resize": "legacy", "input_size": 299}


def _stats(seed: int = 0, d: int = 6, **metadata) -> GaussianStats:
    g = torch.Generator().manual_seed(seed)
    mu, sigma = feature_statistics(torch.randn(50, d, generator=g))
    return GaussianStats(mu.numpy(), sigma.numpy(), n=50, metadata={**META, **metadata})


def test_stats_file_round_trip(tmp_path):
    stats = _stats(source="folder/of/images")
    stats.save(tmp_path / "ref.npz")
    loaded = GaussianStats.load(tmp_path / "ref.npz")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 50 and dict(loaded.metadata) == {**META, "source": "folder/of/images"}
    assert loaded.source == str(tmp_path / "ref.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary left behind


def test_accumulator_to_stats_and_fd_between_files(tmp_path, features):
    a = FeatureStatistics().update(features[:500]).to_stats(**META)
    b = FeatureStatistics().update(features[500:] * 1.1).to_stats(**META)
    a.save(tmp_path / "a.npz"), b.save(tmp_path / "b.npz")
    fd = GaussianStats.load(tmp_path / "a.npz").frechet_distance(GaussianStats.load(tmp_path / "b.npz"))
    expected = frechet_distance(*feature_statistics(features[:500]), *feature_statistics(features[500:] * 1.1))
    assert fd == pytest.approx(expected, rel=1e-10)


def test_plain_npz_without_metadata_is_accepted(tmp_path):
    """EDM / clean-fid reference files hold only mu and sigma (sometimes float32)."""
    stats = _stats()
    np.savez(tmp_path / "edm.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))
    plain = GaussianStats.load(tmp_path / "edm.npz")
    assert plain.metadata == {} and plain.n is None and plain.mu.dtype == np.float64
    assert plain.frechet_distance(stats) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field, value", [
    ("extractor", "dinov2"), ("weights_hash", "cd" * 32), ("resize", "clean"), ("input_size", 224),
])
def test_metadata_mismatch_is_refused(tmp_path, field, value):
    a, b = _stats(0), _stats(1, **{field: value})
    a.save(tmp_path / "a.npz"), b.save(tmp_path / "b.npz")
    a, b = GaussianStats.load(tmp_path / "a.npz"), GaussianStats.load(tmp_path / "b.npz")
    with pytest.raises(ValueError, match=rf"{field} differs .*a\.npz.*b\.npz"):
        a.frechet_distance(b)
    check_compatible(a, _stats(2, source="another set"))  # fields outside the compared set may differ


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="6-d features .* 7-d"):
        _stats(0).frechet_distance(_stats(1, d=7))


@pytest.mark.parametrize("arrays, message", [
    (dict(mu=np.zeros(3)), "has no 'sigma'"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), r"need mu \[D\] and sigma \[D, D\]"),
    (dict(mu=np.array([0.0, np.inf, 0.0]), sigma=np.eye(3)), "mu contains NaN or Inf"),
    (dict(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]])), "not symmetric"),
    (dict(mu=np.zeros(2), sigma=np.eye(2), metadata=np.array("{not json")), "not valid JSON"),
    (dict(mu=np.zeros(2), sigma=np.eye(2), metadata=np.array('{"format": 99}')), "unsupported statistics format"),
    (dict(mu=np.zeros(2), sigma=np.eye(2), n=np.array([3, 4])), "integer scalar"),
])
def test_malformed_files_are_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        GaussianStats.load(path)
    assert "bad.npz" in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz"):
        GaussianStats.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        GaussianStats.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "objects.npz", mu=np.array([object()]), sigma=np.eye(1))
    with pytest.raises(ValueError, match="objects.npz"):
        GaussianStats.load(tmp_path / "objects.npz")
