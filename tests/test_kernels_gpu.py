"""The Triton kernels compiled for a real GPU, against the torch references on the same device.

CI has no GPU, so these skip there; they run where CUDA is visible and TRITON_INTERPRET is off:

    TRITON_INTERPRET=0 pytest tests/test_kernels_gpu.py

The interpreter (tests/test_kernels.py) accepts programs a GPU compiler rejects, and it runs
every program in order, so races and unwritten outputs only show up here. Each output is
checked on fresh random inputs, on shapes that are not multiples of the blocks, and allocated
while torch fills new memory with NaN (an element the kernel forgets stays NaN).
"""
import contextlib
import os

import pytest
import torch
from test_kernels import dense_final, make_layer  # tests/ is on sys.path (rootdir conftest)

from tacq_lite.core import pack as P
from tacq_lite.kernels import dequant_matmul, dequant_weight, tuning
from tacq_lite.kernels.gemv import gemv, gemv_configs

RUN_HINT = "TRITON_INTERPRET=0 pytest tests/test_kernels_gpu.py"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason=f"needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels): {RUN_HINT}",
)]


@pytest.fixture(autouse=True)
def untuned(request, monkeypatch):
    """The many-shape tests run the first configuration untimed (tuning would compile every configuration
    for every shape); tests marked `tuned` go through the tuner as a model does."""
    if "tuned" not in request.keywords:
        monkeypatch.setenv("TACQ_LITE_KERNEL_TUNING", "0")


def layer(rows, cols, *, bits, groupsize, kept_frac, seed):
    """test_kernels' quantized layer moved to the GPU, with its W_final in float64."""
    W, mask, codes, scale, zero, packed, kept = make_layer(bits=bits, groupsize=groupsize, kept_frac=kept_frac,
                                                           rows=rows, cols=cols, seed=seed)
    W_final = dense_final(W, mask, codes, scale, zero)  # [rows, cols]
    kept = P.SparseKept(*(t.cuda() for t in kept)) if kept is not None else None
    return packed.cuda(), scale.cuda(), zero.cuda(), kept, W_final.cuda()


@contextlib.contextmanager
def nan_filled_outputs():
    """Every torch.empty inside fills with NaN, so an output element no program writes stays NaN."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        probe = torch.empty(7, device="cuda")  # [7]
        assert probe.isnan().all(), "torch did not fill new memory with NaN; the unwritten-output check would be void"
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groupsize", [-1, 64, 128])
@pytest.mark.parametrize("kept_frac", [0.0, 0.0035, 0.05])
def test_dequant_kernel_on_gpu(bits, groupsize, kept_frac):
    rows = 300  # not a multiple of the 8-row block
    cols = 650 if groupsize == -1 else 640  # per channel: not a multiple of the 64-column block either
    packed, scale, zero, kept, W_final = layer(rows, cols, bits=bits, groupsize=groupsize, kept_frac=kept_frac,
                                                 seed=bits * 7 + groupsize)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kw = dict(bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
        with nan_filled_outputs():
            out = dequant_weight(packed, scale, zero, kept, backend="triton", **kw)  # [rows, cols]
        torch.cuda.synchronize()
        assert out.is_cuda and out.dtype == dtype and not out.isnan().any()
        ref = dequant_weight(packed, scale, zero, kept, backend="torch", **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same decode, same rounding
        torch.testing.assert_close(out.double(), W_final.to(dtype).double(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 128])
@pytest.mark.parametrize("kept_frac", [0.0, 0.05])
@pytest.mark.parametrize("M, dtype", [(1, torch.float32), (1, torch.float16), (1, torch.bfloat16), (2, torch.float16),
                                      (5, torch.bfloat16), (16, torch.float16), (16, torch.float32)])
def test_gemv_kernel_on_gpu(bits, groupsize, kept_frac, M, dtype):
    rows = 1002  # not a multiple of the 4- or 16-row blocks
    cols = 1100 if groupsize == -1 else 1152  # neither a multiple of 256 columns
    packed, scale, zero, kept, W_final = layer(rows, cols, bits=bits, groupsize=groupsize, kept_frac=kept_frac,
                                                 seed=M + bits)
    x = torch.randn(M, cols, device="cuda").to(dtype)  # [M, cols]
    with nan_filled_outputs():
        y = dequant_matmul(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize, backend="triton")  # [M, rows]
    torch.cuda.synchronize()
    assert y.shape == (M, rows) and y.dtype == dtype and not y.isnan().any()
    ref = x.double() @ W_final.T  # [M, rows]
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    # fp32 accumulation: far under 1e-5; a 16-bit output adds its own rounding (fp16 2^-11, bf16 2^-8 relative)
    assert rel < {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], rel


@pytest.mark.parametrize("bits", [3, 8])  # 10 codes as tiles of 8 and 2 lanes, and 4 lanes (the narrowest dot)
@pytest.mark.parametrize("groupsize", [-1, 128])
@pytest.mark.parametrize("M", [1, 16])
def test_every_gemv_configuration_on_gpu(bits, groupsize, M):
    """Each configuration the tuner may pick, compiled: split-K with atomics, tl.dot for M > 1 (fp16).
    Every bit width runs every configuration in the interpreter (tests/test_kernels.py); here two, to
    keep the compile count of a GPU session small."""
    rows, cols = 300, 1100 if groupsize == -1 else 1152
    packed, scale, zero, kept, W_final = layer(rows, cols, bits=bits, groupsize=groupsize, kept_frac=0.0035,
                                                 seed=bits + M)
    x = torch.randn(M, cols, device="cuda", dtype=torch.float16)  # [M, cols]
    ref = x.double() @ W_final.T  # [M, rows]
    configs = gemv_configs(rows, cols, bits, groupsize if groupsize > 0 else cols, M)
    assert any(c["SPLIT_K"] > 1 for c in configs)
    for cfg in configs:
        with nan_filled_outputs():
            y = gemv(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize, config=cfg)  # [M, rows]
        torch.cuda.synchronize()
        assert not y.isnan().any(), cfg
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-3, (cfg, rel)


@pytest.mark.tuned
def test_gemv_on_llama_8b_shapes():
    """The benchmark's shapes at 3 bits with TaCQ's 0.35 % kept, through the tuner, right before timed."""
    tuning.forget()
    for rows, cols in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        packed, scale, zero, kept, W_final = layer(rows, cols, bits=3, groupsize=128, kept_frac=0.0035, seed=rows)
        x = torch.randn(1, cols, device="cuda", dtype=torch.float16)  # [1, cols]
        with nan_filled_outputs():
            y = dequant_matmul(x, packed, scale, zero, kept, bits=3, groupsize=128, backend="triton")  # [1, rows]
        ref = x.double() @ W_final.T  # [1, rows]
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3
    assert len(tuning.chosen()) == 3  # one timed choice per shape
