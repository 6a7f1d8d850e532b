"""Fused solver-update kernels: Triton (CPU interpreter here, CUDA when present) against the PyTorch reference."""

import re
import subprocess
import sys

import pytest
import torch

from fewstep.kernels import linear_combination, linear_combinations
from fewstep.kernels.layout import coalesce, has_internal_overlap

NO_TRITON = "needs triton (pip install -e '.[kernels-test]'): its CPU interpreter runs the Triton kernels"
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in the CPU interpreter (read when a kernel is first built in a mode)."""
    pytest.importorskip("triton", reason=NO_TRITON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def exact(rows, tensors, biases=None):
    """float64 ground truth of every output."""
    outs = []
    for m, row in enumerate(rows):
        acc = sum(c.double() * t.double() for c, t in zip(row, tensors))
        if biases is not None and biases[m] is not None:
            acc = acc + biases[m].double()
        outs.append(acc)
    return outs


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def scalars(n, seed=1):
    return list(randn(n, seed=seed).unbind())


# --- reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_matches_float64_sum(dtype):
    xs = [randn(3, 4, 5, dtype=dtype, seed=k) for k in range(4)]
    cs = [torch.tensor(0.7), randn(4, 1, seed=9), randn(5, seed=10), randn(4, 5, seed=11)]
    bias = randn(5, seed=12)
    out = linear_combination(cs, xs, bias, backend="torch")
    assert out.dtype == dtype and out.shape == xs[0].shape
    assert rel_err(out, exact([cs], xs, [bias])[0]) <= TOL[dtype]


def test_reference_accumulates_half_precision_in_float32():
    big, small = torch.tensor([2048.0], dtype=torch.float16), torch.tensor([0.6], dtype=torch.float16)
    one = torch.tensor(1.0)
    out = linear_combination([one, one, -one], [big, small, big], backend="torch")
    naive = big * one + small * one - big * one  # float16 arithmetic: 2048 + 0.6 rounds to 2048
    assert naive.item() != small.item() and torch.equal(out, small)


def test_reference_writes_in_place_into_out():
    xs = [randn(6, 7, seed=k) for k in range(3)]
    out = torch.empty(6, 7)
    res = linear_combination(scalars(3), xs, out=out, backend="torch")
    assert res is out and rel_err(out, exact([scalars(3)], xs)[0]) <= 1e-6


def test_reference_is_differentiable():
    xs = [randn(2, 3, seed=k, dtype=torch.float64).requires_grad_() for k in range(3)]
    cs = [randn(3, seed=5, dtype=torch.float64).requires_grad_(), torch.tensor(0.3, dtype=torch.float64,
                                                                            requires_grad=True), torch.tensor(-2.0)]
    bias = randn(3, seed=6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: linear_combination(list(a[3:5]) + [cs[2]], list(a[:3]), a[5]),
                                    (*xs, *cs[:2], bias))


def test_reference_runs_on_meta_without_data():
    # The meta device has no values: any host read would fail. Elementwise table, step, bias and flag.
    xs = [torch.empty(2, 4, 8, 8, device="meta") for _ in range(3)]
    table, bias = torch.empty(5, 2, 3, 4, 1, 1, device="meta"), torch.empty(5, 2, 8, device="meta")
    step, flag = torch.zeros(1, dtype=torch.long, device="meta"), torch.zeros(5, dtype=torch.int32, device="meta")
    outs = linear_combinations(table, xs, bias, step=step, nonfinite=flag, dtype=[torch.float32, torch.bfloat16])
    assert [o.device.type for o in outs] == ["meta", "meta"] and outs[1].dtype == torch.bfloat16


# --- Triton kernel (interpreter) against the reference ------------------------------------------

@pytest.mark.parametrize("numel", [1, 7, 1023, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_odd_sizes(interpret, numel, dtype):
    K = {1: 1, 7: 2, 1023: 5, 4097: 3}[numel]
    xs = [randn(numel, dtype=dtype, seed=k) for k in range(K)]
    cs, bias = scalars(K), randn(seed=99)
    tri = linear_combination(cs, xs, bias, backend="triton")
    ref = linear_combination(cs, xs, bias, backend="torch")
    assert tri.dtype == dtype and rel_err(tri, ref) <= TOL[dtype]
    assert rel_err(tri, exact([cs], xs, [bias])[0]) <= TOL[dtype]


def _layouts(shape):
    """Contiguous, transposed, sliced, channels-last and expanded views of one [B, C, H, W] shape."""
    B, C, H, W = shape
    return [
        randn(B, C, H, W, seed=1),
        randn(B, C, W, H, seed=2).transpose(2, 3),
        randn(B, C + 2, H, 2 * W, seed=3)[:, 1:-1, :, ::2],
        randn(B, C, H, W, seed=4).to(memory_format=torch.channels_last),
        randn(1, C, H, W, seed=5).expand(B, C, H, W),
    ]


@pytest.mark.parametrize("coef_shape", [(), (3, 5, 7), (1, 3, 1, 1), (7,), (2, 1, 5, 1)])
def test_triton_non_contiguous_inputs_and_broadcast_coefficients(interpret, coef_shape):
    xs = _layouts((2, 3, 5, 7))
    cs = [randn(*coef_shape, seed=10 + k) for k in range(5)]
    bias = randn(*coef_shape, seed=20)
    tri = linear_combination(cs, xs, bias, backend="triton")
    ref = linear_combination(cs, xs, bias, backend="torch")
    assert rel_err(tri, ref) <= 1e-6 and rel_err(tri, exact([cs], xs, [bias])[0]) <= 1e-6


def test_triton_channels_last_coalesces_and_keeps_layout(interpret):
    xs = [randn(2, 3, 4, 5, seed=k).to(memory_format=torch.channels_last) for k in range(2)]
    tri = linear_combination(scalars(2), xs, backend="triton")
    assert tri.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(tri, exact([scalars(2)], xs)[0]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_multi_output_table_with_step(interpret, dtype):
    n, M, K = 6, 3, 4
    xs = [randn(2, 3, 9, dtype=dtype, seed=k) for k in range(K)]
    table, bias = randn(n, M, K, 3, 1, seed=30), randn(n, M, 9, seed=31)
    step, flag = torch.tensor([4]), torch.zeros(n, dtype=torch.int32)
    tri = linear_combinations(table, xs, bias, step=step, nonfinite=flag, backend="triton")
    ref = linear_combinations(table, xs, bias, step=step, backend="torch")
    truth = exact([list(table[4, m]) for m in range(M)], xs, list(bias[4]))
    for t, r, e in zip(tri, ref, truth):
        assert t.dtype == dtype and rel_err(t, r) <= TOL[dtype] and rel_err(t, e) <= TOL[dtype]
    assert flag.tolist() == [0] * n


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_coefficients_are_read_from_device_memory_each_call(interpret, backend):
    # A captured graph replays pointers, not values: editing the table or the step in place
    # must change the next result.
    xs = [randn(33, seed=k) for k in range(3)]
    table, step = randn(4, 2, 3, seed=40), torch.tensor(0)
    first = linear_combinations(table, xs, step=step, backend=backend)
    table[0].mul_(-3.0)
    second = linear_combinations(table, xs, step=step, backend=backend)
    step.fill_(2)
    third = linear_combinations(table, xs, step=step, backend=backend)
    for got, row in ((first, table[0] / -3.0), (second, table[0]), (third, table[2])):
        for m in range(2):
            assert rel_err(got[m], exact([list(row[m])], xs)[0]) <= 1e-6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_flag(interpret, backend):
    x, y = randn(5, 40, seed=1), randn(5, 40, seed=2)
    flag = torch.zeros(1, dtype=torch.int32)
    ones = [torch.tensor(1.0), torch.tensor(0.5)]
    linear_combination(ones, [x, y], nonfinite=flag, backend=backend)
    assert flag.item() == 0
    y[3, 17] = float("inf")  # enters with coefficient 0: 0 * inf = nan still shows in the output
    linear_combination([torch.tensor(1.0), torch.tensor(0.0)], [x, y], nonfinite=flag, backend=backend)
    assert flag.item() == 1
    y[3, 17] = 0.0
    linear_combination(ones, [x, y], nonfinite=flag, backend=backend)
    assert flag.item() == 1  # sticky: the executor reads it once at the end
    flag.zero_()
    big = torch.full((3,), 60000.0, dtype=torch.float16)  # finite inputs, the float16 output overflows
    linear_combination(ones[:1] * 2, [big, big], nonfinite=flag, backend=backend)
    assert flag.item() == 1
    flags, step = torch.zeros(3, dtype=torch.int32), torch.tensor([1])
    x[0, 0] = float("nan")
    linear_combinations(randn(3, 2, 2, seed=3), [x, y], step=step, nonfinite=flags, backend=backend)
    assert flags.tolist() == [0, 1, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_output_from_a_step_table(interpret, backend):
    n, K = 5, 3
    xs = [randn(4, 9, seed=k) for k in range(K)]
    table, bias = randn(n, K, 9, seed=70), randn(n, 1, seed=71)
    step, flag = torch.tensor(3, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    got = linear_combination(table, xs, bias, step=step, nonfinite=flag, backend=backend)
    assert rel_err(got, exact([list(table[3])], xs, [bias[3]])[0]) <= 1e-6 and flag.tolist() == [0] * n
    plain = linear_combination(table[1], xs, bias[1], backend=backend)  # [K, *S] without a step
    assert rel_err(plain, exact([list(table[1])], xs, [bias[1]])[0]) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_may_be_exactly_an_input(interpret, backend):
    # x_next over x and D_0 into a preallocated slot, from one pass.
    xs = [randn(3, 11, seed=k) for k in range(3)]
    rows = [scalars(3, seed=50), scalars(3, seed=51)]
    truth = exact(rows, xs)
    slot = torch.empty(3, 11)
    outs = linear_combinations(rows, xs, out=[xs[0], slot], backend=backend)
    assert outs[0] is xs[0] and outs[1] is slot
    assert rel_err(xs[0], truth[0]) <= 1e-6 and rel_err(slot, truth[1]) <= 1e-6


def test_triton_mixed_dtypes_and_explicit_output_dtypes(interpret):
    # bf16 sample and model output, fp32 history: D_0 kept in fp32, x_next back in bf16.
    xs = [randn(4, 50, dtype=torch.bfloat16, seed=1), randn(4, 50, dtype=torch.bfloat16, seed=2), randn(4, 50, seed=3)]
    rows = [scalars(3, seed=60), scalars(3, seed=61)]
    kw = dict(dtype=[torch.float32, torch.bfloat16])
    tri = linear_combinations(rows, xs, **kw, backend="triton")
    ref = linear_combinations(rows, xs, **kw, backend="torch")
    assert [t.dtype for t in tri] == [torch.float32, torch.bfloat16]
    assert rel_err(tri[0], ref[0]) <= 1e-6 and rel_err(tri[1], ref[1]) <= 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_pass_cfg_conversion_and_predictor(interpret, backend):
    # A guided DPM-Solver++(2M)-style step staged as the executor runs it today, then as one
    # fused combination over (x, uncond, cond, D_1) with rows composed in float64.
    x, u, c, d1 = (randn(2, 4, 6, 6, seed=k, dtype=torch.float64) for k in range(4))
    g, cx, co, a, b0, b1 = 3.0, 1.3, -0.8, 0.9, 0.4, -0.15
    out = u + g * (c - u)
    d0 = cx * x + co * out
    x_next = a * x + b0 * d0 + b1 * d1
    T = torch.tensor
    rows = [[T(cx), T(co * (1 - g)), T(co * g), T(0.0)],
            [T(a + b0 * cx), T(b0 * co * (1 - g)), T(b0 * co * g), T(b1)]]
    inputs = [t.float() for t in (x, u, c, d1)]
    d0_f, x_next_f = linear_combinations(rows, inputs, backend=backend)
    assert rel_err(d0_f, d0) <= 1e-6 and rel_err(x_next_f, x_next) <= 1e-6


def test_zero_size_inputs(interpret):
    xs = [torch.empty(0, 3), torch.empty(0, 3)]
    for backend in ("torch", "triton"):
        assert linear_combination(scalars(2), xs, backend=backend).shape == (0, 3)


# --- dispatch, errors, layout -----------------------------------------------------------------

def test_auto_picks_triton_only_for_cuda_without_autograd(monkeypatch):
    import fewstep.kernels.lincomb as lincomb

    monkeypatch.setattr(lincomb, "_triton_importable", lambda: True)
    assert lincomb.pick_backend("auto", torch.device("cuda"), False) == "triton"
    assert lincomb.pick_backend("auto", torch.device("cuda"), True) == "torch"
    assert [lincomb.pick_backend("auto", torch.device(d), False) for d in ("cpu", "meta", "mps")] == ["torch"] * 3
    monkeypatch.setattr(lincomb, "_triton_importable", lambda: False)
    assert lincomb.pick_backend("auto", torch.device("cuda"), False) == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason=NO_TRITON)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_combination(scalars(1), [randn(3)], backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_combination([torch.tensor(1.0, device="meta")], [torch.empty(3, device="meta")], backend="triton")
    with pytest.raises(ValueError, match="does not support autograd"):
        linear_combination(scalars(1), [randn(3).requires_grad_()], backend="triton")


def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fewstep.kernels as k\n"
        "x = torch.ones(3)\n"
        "assert k.linear_combination([torch.tensor(2.0)], [x]).tolist() == [2.0] * 3\n"
        "try:\n"
        "    k.linear_combination([torch.tensor(2.0)], [x], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the triton package' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


X = torch.zeros(2, 3)
C = torch.tensor(1.0)
BASE = torch.zeros(7)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: linear_combination([C], [X, X]), ValueError, "coefficients has 1, tensors has 2"),
        (lambda: linear_combination([1.0], [X]), TypeError, r"coefficients\[0\] is a float; coefficients must be tensors"),
        (lambda: linear_combination([C, C], [X, torch.zeros(3, 2)]), ValueError, r"tensors\[1\] has shape \(3, 2\)"),
        (lambda: linear_combination([C], [X.long()]), TypeError, r"tensors\[0\] has dtype torch.int64"),
        (lambda: linear_combination([C], []), ValueError, "1 to 8 tensors, got 0"),
        (lambda: linear_combination([C] * 9, [X] * 9), ValueError, "1 to 8 tensors, got 9"),
        (lambda: linear_combination([C], X), TypeError, "tensors must be a list or tuple"),
        (lambda: linear_combination([torch.zeros(4)], [X]), ValueError, r"shape \(4,\), which does not broadcast"),
        (lambda: linear_combination([torch.zeros(1, 2, 3)], [X]), ValueError, "does not broadcast"),
        (lambda: linear_combination([C.to("meta")], [X]), ValueError, r"coefficients\[0\] is on meta"),
        (lambda: linear_combination([C, C], [X, X.to("meta")]), ValueError, r"tensors\[1\] is on meta"),
        (lambda: linear_combination(torch.zeros(3), [X, X]), ValueError, r"coefficients has shape \(3,\) for K=2"),
        (lambda: linear_combination([C], [X], bias=torch.zeros(4)), ValueError, r"bias has shape \(4,\)"),
        (lambda: linear_combination([C], [X], backend="cuda"), ValueError, "backend='cuda' is not one of"),
        (lambda: linear_combination([C], [X], out=torch.zeros(3, 2)), ValueError, r"out must be a floating tensor of shape \(2, 3\)"),
        (lambda: linear_combination([C], [X], out=torch.zeros(3).expand(2, 3)), ValueError, "overlapping elements"),
        (lambda: linear_combination([C], [BASE[:6].view(2, 3)], out=BASE[1:7].view(2, 3)), ValueError,
         r"partially overlaps tensors\[0\]"),
        (lambda: linear_combination([C], [X], out=torch.zeros(2, 3), dtype=torch.float16), ValueError, "dtype=torch.float16 was requested"),
        (lambda: linear_combination([C], [X], dtype=torch.int32), TypeError, "dtype torch.int32 is not allowed"),
        (lambda: linear_combination([C], [X], step=torch.tensor(0)), TypeError, "step= needs coefficients as one tensor"),
        (lambda: linear_combination(torch.zeros(4, 1), [X], step=torch.tensor(0.0)), TypeError, "step must be a 1-element int"),
        (lambda: linear_combination([C], [X], nonfinite=torch.zeros(1)), TypeError, "nonfinite must be an int32 tensor"),
        (lambda: linear_combination([C], [X], nonfinite=torch.zeros(3, dtype=torch.int32)), ValueError, "one element"),
        (lambda: linear_combination(torch.zeros(4, 1), [X], step=torch.tensor(0), nonfinite=torch.zeros(1, dtype=torch.int32)),
         ValueError, r"nonfinite must have shape \[n\] = \[4\]"),
        (lambda: linear_combinations([[C]] * 5, [X]), ValueError, "1 to 4 rows, got 5"),
        (lambda: linear_combinations([[C], [C, C]], [X]), ValueError, r"coefficients\[1\] has 2, tensors has 1"),
        (lambda: linear_combinations(torch.zeros(2, 1), [X], bias=torch.zeros(3, 3)), ValueError, r"expected \[M=2, \*S\]"),
        (lambda: linear_combinations(torch.zeros(2, 1), [X], out=[torch.zeros(2, 3)]), TypeError, "out must be a list of 2"),
        (lambda: linear_combinations(torch.zeros(2, 1), [X], dtype=[torch.float32]), TypeError, "list of 2 dtypes"),
        (lambda: linear_combination([C], [X], bogus=1), TypeError, "unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_coalesce_merges_compatible_dimensions():
    shape = (2, 3, 4, 5)
    c = torch.empty(shape)
    cl = c.to(memory_format=torch.channels_last)
    assert coalesce(shape, [c.stride(), c.stride()]) == ((120,), [(1,), (1,)])
    assert coalesce(shape, [cl.stride(), cl.stride()]) == ((120,), [(1,), (1,)])
    # A [C, H, W] coefficient merges (C, H, W); a [1, C, 1, 1] one keeps C apart.
    chw = torch.empty(3, 4, 5).expand(shape).stride()
    assert coalesce(shape, [c.stride(), chw]) == ((2, 60), [(60, 1), (0, 1)])
    per_channel = torch.empty(1, 3, 1, 1).expand(shape).stride()
    assert coalesce(shape, [c.stride(), per_channel]) == ((2, 3, 20), [(60, 20, 1), (0, 1, 0)])
    assert coalesce((1, 1), [(1, 1)]) == ((1,), [(0,)])
    assert has_internal_overlap(torch.zeros(3).expand(2, 3)) and not has_internal_overlap(c.transpose(0, 3))


def test_large_tensors_switch_to_64_bit_offsets():
    pytest.importorskip("triton", reason=NO_TRITON)
    from fewstep.kernels import triton_lincomb

    def int64(numel):
        xs = [torch.empty(numel, device="meta")]
        return triton_lincomb.launch_arguments(torch.empty(1, 1, device="meta"), xs, None, xs, torch.float32,
                                               None, None)[1]["INT64"]

    assert not int64(2**31 - 4096) and int64(2**31)


# --- compiled kernel (no GPU needed to compile for one) ----------------------------------------

class _CompileOnlyDriver:
    """Enough of a Triton driver to compile for sm_90 on a machine without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _compile(table, xs, bias, outs, step=None, flag=None, acc=torch.float32):
    import triton

    from fewstep.kernels import triton_lincomb

    args, constexprs, grid = triton_lincomb.launch_arguments(table, xs, bias, outs, acc, step, flag)
    driver = triton.runtime.driver
    previous = driver._active  # reset_active() would build the default driver, which needs a GPU
    driver.set_active(_CompileOnlyDriver())
    try:
        kernel = triton.jit(triton_lincomb._lincomb_kernel)
        return kernel.warmup(*args, grid=grid, **constexprs, num_warps=triton_lincomb.NUM_WARPS,
                             enable_fp_fusion=True).asm["ptx"]
    finally:
        driver.set_active(previous)


def test_kernel_compiles_for_sm90_with_vectorized_access(monkeypatch, tmp_path):
    # The interpreter accepts more than the compiler: compile the real specialisations.
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    K, M = 5, 2
    xs, outs = [torch.empty(2, 4, 32, 32) for _ in range(K)], [torch.empty(2, 4, 32, 32) for _ in range(M)]
    ptx = _compile(torch.empty(M, K), xs, None, outs)
    # 128-bit loads and stores for contiguous fp32 operands with scalar coefficients.
    assert len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)) >= K
    assert len(re.findall(r"st\.global(\.\w+)*\.v4", ptx)) >= M
    # The graph-ready form: elementwise table, bias, step and non-finite flag, bf16 operands.
    bf = [t.bfloat16() for t in xs]
    ptx = _compile(torch.empty(7, M, K, 4, 1, 1), bf, torch.empty(7, M, 32), [o.bfloat16() for o in outs],
                   torch.zeros(1, dtype=torch.int64), torch.zeros(7, dtype=torch.int32))
    assert ".entry _lincomb_kernel" in ptx


# --- CUDA (skipped without a GPU) -------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    pytest.importorskip("triton", reason=NO_TRITON)
    xs = [t.cuda().to(dtype) for t in _layouts((2, 3, 33, 17))]
    table, bias = randn(3, 5, 3, 1, 1, seed=7).cuda(), randn(3, 17, seed=8).cuda()
    tri = linear_combinations(table, xs, bias)  # auto -> Triton on CUDA
    ref = linear_combinations(table, xs, bias, backend="torch")
    for t, r in zip(tri, ref):
        assert rel_err(t, r) <= TOL[dtype]


@cuda
def test_cuda_graph_replays_current_coefficients():
    pytest.importorskip("triton", reason=NO_TRITON)
    xs = [randn(4, 1000, seed=k).cuda() for k in range(3)]
    table, step = randn(5, 2, 3, seed=9).cuda(), torch.zeros(1, dtype=torch.long, device="cuda")
    outs = [torch.empty(4, 1000, device="cuda") for _ in range(2)]
    linear_combinations(table, xs, out=outs, step=step)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear_combinations(table, xs, out=outs, step=step)
    for i in range(5):
        step.fill_(i)
        table[i].mul_(1.5)
        graph.replay()
        for m in range(2):
            assert rel_err(outs[m], exact([list(table[i, m])], xs)[0]) <= 1e-6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_flags_per_output_and_per_operand(interpret, backend):
    x, y = randn(4, 33, seed=5).abs() + 1, randn(4, 33, seed=6).abs() + 1
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3e38, 3e38]])  # out2 overflows float32, out0/out1 do not
    per_output = torch.zeros(3, dtype=torch.int32)
    linear_combinations(table, [x, y], nonfinite=per_output, backend=backend)
    assert per_output.tolist() == [0, 0, 1]
    per_operand = torch.zeros(5, dtype=torch.int32)  # 3 outputs, then the 2 inputs
    linear_combinations(table, [x, y], nonfinite=per_operand, backend=backend)
    assert per_operand.tolist() == [0, 0, 1, 0, 0]  # the update overflowed, no input was bad
    y[2, 7] = float("nan")  # a bad input reaches every output (0 * nan is nan) and is named itself
    flags, step = torch.zeros(2, 5, dtype=torch.int32), torch.tensor([1])
    linear_combinations(torch.stack([table, table]), [x, y], out=[None, None, y], step=step, nonfinite=flags,
                        backend=backend)
    assert flags.tolist() == [[0] * 5, [1, 1, 1, 0, 1]]  # input 1 is flagged although out2 overwrote it
    with pytest.raises(ValueError, match=r"\[M \+ K\] = \[5\]"):
        linear_combinations(table, [x, y], nonfinite=torch.zeros(4, dtype=torch.int32), backend=backend)
