"""Kernels for packed TaCQ weights, and the one place that picks Triton or pure torch.

`choose_backend` is the single dispatch decision: Triton when the tensors are on CUDA (or
when asked explicitly under TRITON_INTERPRET=1, as the tests do), the torch reference
otherwise. Kernel modules, and with them triton, are imported only when first used, so
`import tacq_lite.kernels` works without triton and TRITON_INTERPRET may be set late.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..core.pack import SparseKept

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for tensors living where x lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}.")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' but triton is not installed (pip install triton).")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported.")
    return "triton"


def dequant_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    cols: int,
    groupsize: int,
    dtype: torch.dtype = torch.float16,
    backend: str = "auto",
) -> torch.Tensor:
    """Dense W_final [rows, cols] in `dtype` from packed codes (+ kept weights)."""
    from . import dequant

    fn = dequant.dequantize_packed if choose_backend(packed, backend) == "triton" else dequant.dequantize_packed_ref
    return fn(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    groupsize: int,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., rows] = x [..., cols] @ W_finalᵀ; fused GEMV for up to 16 rows of x on Triton."""
    from . import gemv

    lead, cols = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, cols)  # [M, cols]
    M = x2.shape[0]
    if choose_backend(x2, backend) == "torch":
        y = gemv.gemv_ref(x2, packed, scale, zero, kept, bits=bits, groupsize=groupsize)
    elif 1 <= M <= gemv.MAX_M:
        y = gemv.gemv(x2, packed, scale, zero, kept, bits=bits, groupsize=groupsize)
    else:  # large batch: decode once, then a regular (tensor-core) matmul
        W = dequant_weight(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize,
                           dtype=x.dtype, backend="triton")  # [rows, cols]
        y = torch.nn.functional.linear(x2, W)
    return y.reshape(*lead, y.shape[-1])  # [..., rows]


__all__ = ["BACKENDS", "choose_backend", "dequant_matmul", "dequant_weight", "triton_available"]
