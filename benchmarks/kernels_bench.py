"""The fused solver-update kernel vs eager PyTorch.

    python benchmarks/kernels_bench.py                 # CPU, 1 thread -> benchmarks/results/kernels_cpu.md
    python benchmarks/kernels_bench.py --device cuda   # GPU -> benchmarks/results/kernels_cuda.md

Methods (same inputs, coefficients as 0-dim or elementwise device tensors):
  eager      the textbook expression ``c0*x0 + c1*x1 + ...`` (one temporary per operator)
  reference  ``fewstep.kernels`` with ``backend="torch"`` (in-place fp32 accumulation)
  triton     ``backend="triton"``, one launch for all outputs (CUDA only)

Every case is timed interleaved (method A, B, C, A, B, C, ...) and the median is reported.
Bandwidth counts each input read once and each output written once (the minimum traffic);
on CUDA it is also given as a fraction of the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fewstep.kernels import linear_combinations

RESULTS = Path(__file__).resolve().parent / "results"


def eager(rows, tensors, bias=None):
    outs = []
    for row in rows:
        y = row[0] * tensors[0]
        for c, t in zip(row[1:], tensors[1:]):
            y = y + c * t
        outs.append(y if bias is None else y + bias)
    return outs


def eager_guided_step(x, u, c, d1, k):
    """The executor's staged form of one guided multistep step: CFG, conversion, predictor."""
    out = u + k["g"] * (c - u)
    d0 = k["cx"] * x + k["co"] * out
    return d0, k["a"] * x + k["b0"] * d0 + k["b1"] * d1


def cases(device):
    """(name, shape, dtype, K, M, elementwise coefficients?, guided-step?)."""
    latents = [("SD 512px latents", (2, 4, 64, 64)), ("SDXL 1024px latents", (2, 4, 128, 128)),
               ("16-channel 1024px latents", (2, 16, 128, 128))]
    if device.type == "cuda":
        latents.append(("64M elements", (4, 16, 1024, 1024)))
    out = []
    for label, shape in latents:
        out += [
            (f"{label}, predictor K=3", shape, torch.float32, 3, 1, False, False),
            (f"{label}, K=5", shape, torch.float32, 5, 1, False, False),
            (f"{label}, K=3 bf16", shape, torch.bfloat16, 3, 1, False, False),
            (f"{label}, K=3 elementwise [C,H,W] coefficients", shape, torch.float32, 3, 1, True, False),
            (f"{label}, guided step: CFG + x0 + predictor (M=2, K=4)", shape, torch.float32, 4, 2, False, True),
        ]
    return out


def make_methods(name, shape, dtype, K, M, elementwise, guided, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    tensors = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(K)]
    coef_shape = (M, K, *shape[1:]) if elementwise else (M, K)
    table = torch.randn(coef_shape, generator=g).to(device)
    rows = [[table[m, k] for k in range(K)] for m in range(M)]
    methods = {}
    if guided:
        v = dict(g=3.0, cx=1.3, co=-0.8, a=0.9, b0=0.4, b1=-0.15)
        k = {n: torch.tensor(x, device=device) for n, x in v.items()}
        methods["eager"] = lambda: eager_guided_step(*tensors, k)
        # The same step as one pass over (x, uncond, cond, D_1), rows composed on the host.
        g_, cx, co, b0 = v["g"], v["cx"], v["co"], v["b0"]
        table = torch.tensor([[cx, co * (1 - g_), co * g_, 0.0],
                              [v["a"] + b0 * cx, b0 * co * (1 - g_), b0 * co * g_, v["b1"]]], device=device)
    else:
        methods["eager"] = lambda: eager(rows, tensors)
    methods["reference"] = lambda: linear_combinations(table, tensors, backend="torch")
    if device.type == "cuda":
        methods["triton"] = lambda: linear_combinations(table, tensors, backend="triton")
    traffic = (K + M) * tensors[0].numel() * tensors[0].element_size()
    return methods, traffic


def timer(device):
    if device.type == "cuda":
        def run(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / n
    else:
        def run(fn, n):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
    return run


def measure(methods, device, repeats, budget_s=0.05):
    run = timer(device)
    inner = {}
    for name, fn in methods.items():  # warm up (Triton compiles here) and size the inner loop
        fn()
        t = run(fn, 3)
        inner[name] = max(1, int(budget_s / max(t, 1e-7)))
    samples = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            samples[name].append(run(fn, inner[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(device, repeats):
    numel = (256 if device.type == "cuda" else 16) * 2**20 // 4
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    t = measure({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * numel * 4 / t


def check(methods):
    """The methods must agree before their times mean anything."""
    outs = {name: fn() for name, fn in methods.items()}
    ref = outs["reference"]
    for name, o in outs.items():
        o = o if isinstance(o, (list, tuple)) else [o]
        for a, b in zip(o, ref):
            err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
            tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
            assert err <= tol, f"{name} disagrees with the reference: {err:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: results/kernels_<device>.md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(1)

    copy_bw = copy_bandwidth(device, args.repeats)
    rows = []
    for case in cases(device):
        methods, traffic = make_methods(*case, device)
        check(methods)
        times = measure(methods, device, args.repeats)
        rows.append((case[0], traffic, times))
        print(case[0], {k: f"{v * 1e6:.1f}us" for k, v in times.items()}, flush=True)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    methods = list(rows[0][2])
    lines = [
        f"# Fused solver-update kernel vs eager PyTorch ({device.type})",
        "",
        f"`python benchmarks/kernels_bench.py --device {device.type}`: device {name}, torch {torch.__version__}, "
        f"triton {triton_version}, {torch.get_num_threads()} CPU thread(s), median of {args.repeats} interleaved "
        f"repeats. Measured copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s.",
        "",
        "| case | " + " | ".join(f"{m} (us)" for m in methods) + " | eager / reference | "
        + ("eager / triton | triton GB/s | triton / copy bandwidth |" if "triton" in methods else "reference GB/s |"),
        "|---|" + "---:|" * (len(methods) + (4 if "triton" in methods else 2)),
    ]
    for label, traffic, t in rows:
        cells = [f"{t[m] * 1e6:.1f}" for m in methods] + [f"{t['eager'] / t['reference']:.2f}x"]
        if "triton" in t:
            bw = traffic / t["triton"]
            cells += [f"{t['eager'] / t['triton']:.2f}x", f"{bw / 1e9:.0f}", f"{bw / copy_bw:.0%}"]
        else:
            cells += [f"{traffic / t['reference'] / 1e9:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = args.out or RESULTS / f"kernels_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
