"""Checks behind the README's FID numbers: FD precision/speed, Inception parity, batch independence.

    python benchmarks/fid_checks.py [--torch-fidelity-src DIR]

* FD at d = 2048 (full rank, one and both covariances singular), fewstep vs an exact reference built from known
  eigendecompositions, and vs torchmetrics' formula (eigenvalues of the non-symmetric S1 S2).
* With ``--torch-fidelity-src``: fewstep's FIDInceptionV3 and legacy resize against
  torch-fidelity's own code on the same random weights file (parameter names, features, resize).
  torch-fidelity cannot be installed here (it needs torchvision, which has no CPU build on PyPI),
  so point this at an unpacked wheel: ``pip download torch-fidelity==0.4.0 --no-deps -d /tmp/tf &&
  unzip -q /tmp/tf/*.whl -d /tmp/tf/src`` gives ``/tmp/tf/src/torch_fidelity``. Only its
  InceptionV3 module is loaded (its package ``__init__`` imports torchvision).
* Batch-size dependence of the Inception features on this CPU (batch 1 and 7 vs 32).

Writes ``benchmarks/results/fid_checks.json``. Runs on one thread (~4 min on 2 shared cores);
FD timings are medians of 3 interleaved repeats.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from fewstep.eval.metrics.fd import frechet_distance
from fewstep.eval.metrics.features import extract_features, feature_extractor, resize_images
from fewstep.eval.metrics.inception import random_fid_inception

RESULTS = Path(__file__).parent / "results" / "fid_checks.json"
REPEATS = 3


def _covariance(d: int, rank: int, rng: np.random.Generator, scale: float):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigenvalues = np.zeros(d)
    eigenvalues[:rank] = scale * rng.uniform(0.05, 1.0, rank) ** 2
    s = (q * eigenvalues) @ q.T
    return (s + s.T) / 2, q, eigenvalues


def _torchmetrics_fd(mu1, s1, mu2, s2) -> float:
    from torchmetrics.image.fid import _compute_fid

    t = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    return float(_compute_fid(*t))


def fd_precision() -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    d = 2048
    for rank1, rank2 in ((2048, 2048), (300, 2048), (300, 400)):
        s1, q1, a = _covariance(d, rank1, rng, 1.0)
        s2, _, _ = _covariance(d, rank2, rng, 3.0)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        keep = a > 0
        root = q1[:, keep] * np.sqrt(a[keep])
        inner = root.T @ s2 @ root
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
        exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        row = {"d": d, "rank_sigma1": rank1, "rank_sigma2": rank2}
        seconds = {"fewstep": [], "torchmetrics": []}
        for _ in range(REPEATS):  # interleaved, medians: the machine is shared
            for name, fn in (("fewstep", frechet_distance), ("torchmetrics", _torchmetrics_fd)):
                start = time.perf_counter()
                value = fn(mu1, s1, mu2, s2)
                seconds[name].append(time.perf_counter() - start)
                row[f"{name}_rel_error"] = float(abs(value - exact) / exact)
        for name, times in seconds.items():
            row[f"{name}_median_seconds"] = round(float(np.median(times)), 2)
        row["speedup"] = round(float(np.median(seconds["torchmetrics"]) / np.median(seconds["fewstep"])), 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def torch_fidelity_parity(src: Path, weights: Path) -> dict:
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(src)]
    sys.modules["torch_fidelity"] = package  # skip its __init__, which imports torchvision
    reference = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    tf1 = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    theirs = reference.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    ours = feature_extractor("inception", weights=weights)
    their_state, our_state = theirs.state_dict(), ours.network.state_dict()
    result = {
        "same_parameter_names_and_order": list(their_state) == list(our_state),
        "same_shapes": all(their_state[k].shape == our_state[k].shape for k in their_state),
        "tensors": len(our_state),
        "features_bitwise_equal": {},
        "legacy_resize_bitwise_equal": {},
    }
    g = torch.Generator().manual_seed(1)
    for size in (32, 64, 299, 512):
        images = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            (expected,) = theirs(images)
            result["features_bitwise_equal"][size] = torch.equal(ours(images), expected)
    for h, w in ((32, 32), (64, 48), (512, 512), (7, 1000)):
        x = torch.randint(0, 256, (1, 3, h, w), generator=g).float()
        expected = tf1.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        result["legacy_resize_bitwise_equal"][f"{h}x{w}"] = torch.equal(resize_images(x, 299, "legacy"), expected)
    print(result, flush=True)
    return result


def batch_independence(weights: Path) -> dict:
    extractor = feature_extractor("inception", weights=weights)
    images = torch.randint(0, 256, (32, 3, 48, 48), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    reference = extract_features(extractor, images, batch_size=32)
    result = {}
    for batch_size in (1, 7):
        diff = (extract_features(extractor, images, batch_size=batch_size) - reference).abs().max()
        result[f"batch_{batch_size}_vs_32_max_rel_diff"] = float(diff / reference.abs().max())
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-fidelity-src", type=Path, help="unpacked torch_fidelity package folder")
    parser.add_argument("--work", type=Path, default=Path("runs/fid_checks"), help="scratch folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    weights = args.work / "random-inception.pth"
    torch.save(random_fid_inception(seed=0).state_dict(), weights)
    results = {"threads": 1, "torch": torch.__version__, "fd_d2048": fd_precision()}
    if args.torch_fidelity_src:
        results["torch_fidelity_0.4.0_parity"] = torch_fidelity_parity(args.torch_fidelity_src, weights)
    results["inception_batch_independence"] = batch_independence(weights)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*not the standard FID InceptionV3 file")
    main()
