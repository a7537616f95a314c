"""The Triton kernels compiled for a real GPU, against the torch references on the same device.

CI has no GPU, so these skip there; they run where CUDA is visible and TRITON_INTERPRET is off:

    TRITON_INTERPRET=0 pytest tests/test_kernels_gpu.py

The interpreter (tests/test_kernels.py) accepts programs a GPU compiler rejects, and it runs
every program in order, so races and unwritten outputs only show up here. Each output is
checked on fresh random inputs, on shapes that are not multiples of the blocks, after the
allocator's free memory was filled with NaN (an element the kernel forgets stays NaN).
"""
import os

import pytest
import torch

from tacq_lite import pack as P
from tacq_lite import quant
from tacq_lite.kernels import dequant_matmul, dequant_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels): TRITON_INTERPRET=0 pytest tests/test_kernels_gpu.py",
)]


def layer(rows, cols, *, bits, groupsize, kept_frac, seed):
    """A quantized layer on the GPU and its W_final in float64 from quant.dequantize + mask."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)  # [rows, cols]
    mask = torch.rand(rows, cols, generator=g) < kept_frac  # [rows, cols]
    if kept_frac:
        mask[3] = True  # a row with more kept entries than one CSR block
        mask[20:50] = False  # row blocks with none
    scale, zero = quant.find_params(W, bits=bits, groupsize=groupsize, mask=mask)
    codes = quant.quantize(W, scale, zero, bits=bits)  # uint8 [rows, cols]
    W_final = torch.where(mask, W.half().double(), quant.dequantize(codes, scale, zero).double())  # [rows, cols]
    kept = P.SparseKept(*(t.cuda() for t in P.pack_sparse(W, mask))) if kept_frac else None
    return P.pack(codes, bits=bits).cuda(), scale.cuda(), zero.cuda(), kept, W_final.cuda()


def poison_free_memory(nbytes: int) -> None:
    """Fill a freed block with NaN so the caching allocator hands NaN memory to the next output."""
    block = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    torch.cuda.synchronize()
    del block


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groupsize", [-1, 64, 128])
@pytest.mark.parametrize("kept_frac", [0.0, 0.0035, 0.05])
def test_dequant_kernel_on_gpu(bits, groupsize, kept_frac):
    rows, cols = 300, 640  # neither a multiple of the 32 x 64 block
    packed, scale, zero, kept, W_final = layer(rows, cols, bits=bits, groupsize=groupsize, kept_frac=kept_frac,
                                                 seed=bits * 7 + groupsize)
    for dtype in (torch.float32, torch.float16):
        kw = dict(bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
        poison_free_memory(rows * cols * 4)
        out = dequant_weight(packed, scale, zero, kept, backend="triton", **kw)
        torch.cuda.synchronize()
        assert out.is_cuda and out.dtype == dtype and not out.isnan().any()
        ref = dequant_weight(packed, scale, zero, kept, backend="torch", **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same decode, same rounding
        torch.testing.assert_close(out.double(), W_final.to(dtype).double(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("groupsize", [-1, 128])
@pytest.mark.parametrize("kept_frac", [0.0, 0.0035, 0.05])
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_kernel_on_gpu(bits, groupsize, kept_frac, M, dtype):
    rows, cols = 1000, 1152  # 1000 is not a multiple of 16 rows, 1152 not of 256 columns
    packed, scale, zero, kept, W_final = layer(rows, cols, bits=bits, groupsize=groupsize, kept_frac=kept_frac,
                                                 seed=M + bits)
    x = torch.randn(M, cols, device="cuda").to(dtype)  # [M, cols]
    poison_free_memory(M * rows * 4)
    y = dequant_matmul(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize, backend="triton")  # [M, rows]
    torch.cuda.synchronize()
    assert y.shape == (M, rows) and y.dtype == dtype and not y.isnan().any()
    ref = x.double() @ W_final.T  # [M, rows]
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    # fp32 accumulation: far under 1e-5; an fp16 output adds its own rounding (2^-11 relative)
    assert rel < (1e-5 if dtype == torch.float32 else 1e-3), rel


def test_gemv_on_llama_8b_shapes():
    """The benchmark's shapes, once each at 3 bits with TaCQ's 0.35 % kept: right before timed."""
    for rows, cols in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        packed, scale, zero, kept, W_final = layer(rows, cols, bits=3, groupsize=128, kept_frac=0.0035, seed=rows)
        x = torch.randn(1, cols, device="cuda", dtype=torch.float16)  # [1, cols]
        y = dequant_matmul(x, packed, scale, zero, kept, bits=3, groupsize=128, backend="triton")
        ref = x.double() @ W_final.T
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3
