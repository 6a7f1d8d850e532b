"""The test command itself (issue 21 items 1 and 19): both CPU kernel settings in CI, bf16 rounding of the
Triton store, kernel tests that skip with a reason without triton, and no triton in the [test] extra."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
AVX2 = "MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2"


def test_ci_runs_the_suite_with_default_and_avx2_kernels():
    """Results differ by CPU kernel (AVX-512/AMX vs AVX2): CI runs every test under both."""
    runs = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
            if re.search(r"\bpython -m pytest\b", line) and not line.lstrip().startswith("#")]
    assert any(line.startswith("python -m pytest") for line in runs), runs
    assert any(line.startswith(AVX2 + " python -m pytest") for line in runs), runs
    assert "kernels-test" in (ROOT / ".ci" / "run").read_text()  # CI installs triton for the kernel tests


def test_the_test_extra_does_not_pull_triton():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+ to read pyproject.toml")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("triton") for dep in extras["test"])
    assert any(dep.startswith("triton") for dep in extras["kernels-test"])


def test_kernel_tests_skip_with_a_reason_without_triton():
    code = ("import sys, pytest; sys.modules['triton'] = None; "
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
            "'tests/test_kernels.py::test_triton_channels_last_coalesces_and_keeps_layout']))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "pip install -e '.[kernels-test]'" in out.stdout, out.stdout


def _store_rounding(x32: torch.Tensor, interpreted: bool) -> torch.Tensor:
    """float32 -> bfloat16 as the Triton store does it: round to nearest even on a GPU; the CPU
    interpreter (numpy) truncates the low 16 bits instead."""
    if not interpreted:
        return x32.to(torch.bfloat16)
    return (x32.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def test_bf16_store_rounds_exactly_like_its_reference(monkeypatch):
    """The bf16 kernel tests allow 1e-2, which no rounding-mode bug exceeds: compare the bf16 output bitwise
    against the kernel's own float32 result rounded the way the store rounds (same kernel, same sums)."""
    pytest.importorskip("triton", reason="needs triton (pip install -e '.[kernels-test]')")
    from fewstep.kernels import linear_combinations

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4097, generator=g).to(device, torch.bfloat16) for _ in range(3)]
    rows = [[torch.randn((), generator=g).to(device) for _ in range(3)]] * 2
    wide, narrow = linear_combinations(rows, xs, dtype=[torch.float32, torch.bfloat16], backend="triton")
    expect = _store_rounding(wide, interpreted=device == "cpu")
    assert torch.equal(narrow, expect)
    # The two roundings differ on about half the entries, so the check above tells them apart.
    other = _store_rounding(wide, interpreted=device != "cpu")
    assert (other != expect).float().mean() > 0.2
    # Values exactly between and just above bf16 neighbours: 1 + 3 * 2^-9 rounds up to nearest, truncates down.
    x = torch.tensor([1 + 3 * 2 ** -9, -(1 + 3 * 2 ** -9), 1 + 2 ** -8], device=device)
    one = [[torch.tensor(1.0, device=device)]]
    (out,) = linear_combinations(one, [x], dtype=[torch.bfloat16], backend="triton")
    assert torch.equal(out, _store_rounding(x, interpreted=device == "cpu"))
