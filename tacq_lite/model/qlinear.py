"""QuantLinear: a linear layer stored as packed low-bit codes plus CSR kept weights.

A TaCQ layer (arXiv 2504.07389) is W_final = where(mask, W_kept, W_hat): most weights are
integer codes on a per-row (or per-group) grid, W_hat = scale * (code - zero), and a few
"kept" weights are stored in fp16 with whatever value the fake-quantized model holds
there (by default the value GPTQ's compensation moved them to: algo/gptq.py). `QuantLinear` holds
exactly the tensors that go to disk:

    qweight       int32 [out, ceil(in / per_word)]   codes, `pack.pack` layout
    scale, zero   fp16  [out, n_groups]              the grid (zero is an integer in fp16)
    kept_row_ptr  int32 [out + 1]                    CSR of the kept weights
    kept_col_idx  int16 [nnz] (int32 when in > 32767)
    kept_values   fp16  [nnz]
    bias          the original bias, if any

`forward` calls `kernels.dequant_matmul`, the one dispatch point: the Triton kernels on CUDA,
the pure-torch reference elsewhere. Scales are stored in fp16, so a packed layer differs from
the float32 fake-quantized weights it came from by at most one fp16 rounding of the scale
(relative 2**-11); `dequantized_weight()` gives the exact float weights the layer computes with.

The on-disk format (safetensors + a JSON manifest) is in model/checkpoint.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.pack import SparseKept, check_kept, check_packed, index_dtype, pack, pack_sparse, packed_cols
from ..core.quant import check_bits, check_groupsize, dequantize, quantize
from . import walk


class QuantLinear(nn.Module):
    """y = x @ W_finalᵀ (+ bias) from packed codes and CSR kept weights. See the module docstring."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, groupsize: int = -1, nnz: int = 0,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        check_bits(bits)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: a QuantLinear needs at "
                             "least one input and one output feature.")
        gs = check_groupsize(groupsize, in_features)
        if nnz < 0 or nnz > in_features * out_features:
            raise ValueError(f"nnz={nnz} outside [0, {in_features * out_features}].")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize, self.backend = bits, groupsize, backend
        n_groups = in_features // gs
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits=bits),
                                                    dtype=torch.int32, **kw))
        self.register_buffer("scale", torch.zeros(out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("kept_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, **kw))
        self.register_buffer("kept_col_idx", torch.zeros(nnz, dtype=index_dtype(in_features), **kw))
        self.register_buffer("kept_values", torch.zeros(nnz, dtype=torch.float16, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None

    @property
    def nnz(self) -> int:
        return self.kept_values.numel()

    @property
    def kept(self) -> SparseKept | None:
        if self.nnz == 0:
            return None
        return SparseKept(self.kept_row_ptr, self.kept_col_idx, self.kept_values)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    groupsize: int = -1, mask: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                    backend: str = "auto") -> "QuantLinear":
        """Pack a fake-quantized linear: its weight must lie on the grid (scale, zero) except
        where `mask` is True (those weights are stored as W holds them, in fp16).

        codes: uint8 [out, in], the codes the quantizer chose (GPTQ's, RTN's); packed as given after
        a check that they reproduce W off the mask. None: derived from W and the grid."""
        W = linear.weight.detach().float()  # [out, in]
        out_f, in_f = W.shape
        if W.numel() == 0:
            raise ValueError(f"linear.weight is empty (shape {tuple(W.shape)}); only a linear with at least one "
                             "input and one output can be packed.")
        gs = check_groupsize(groupsize, in_f)
        if scale.shape != (out_f, in_f // gs) or zero.shape != scale.shape:
            raise ValueError(f"scale/zero shapes {tuple(scale.shape)}/{tuple(zero.shape)} do not fit a "
                             f"[{out_f}, {in_f}] weight with groupsize={groupsize}; expected [{out_f}, {in_f // gs}].")
        if codes is None:
            codes = quantize(W, scale.float(), zero.float(), bits=bits)  # [out, in], recovers the codes of W_hat
        elif codes.dtype != torch.uint8 or codes.shape != W.shape:
            raise ValueError(f"codes must be uint8 {tuple(W.shape)}, got {codes.dtype} {tuple(codes.shape)}.")
        # A bfloat16 / float16 model holds each grid value rounded to its dtype: compare in that dtype.
        on_grid = dequantize(codes, scale.float(), zero.float()).to(linear.weight.dtype).float()  # [out, in]
        off_grid = (on_grid - W).abs() > 1e-4 * W.abs().max().clamp_min(1e-12)  # [out, in]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != W.shape:
                raise ValueError(f"mask must be bool {tuple(W.shape)}, got {mask.dtype} {tuple(mask.shape)}.")
            off_grid &= ~mask
        if off_grid.any():
            raise ValueError(f"{int(off_grid.sum())} weights are off the given grid and not masked: pass the "
                             "(scale, zero) the layer was quantized with, and the keep-mask of a TaCQ model.")
        kept = pack_sparse(W, mask) if mask is not None and mask.any() else None
        q = cls(in_f, out_f, bits=bits, groupsize=groupsize, nnz=0 if kept is None else kept.values.numel(),
                bias=linear.bias is not None, device=W.device, dtype=linear.weight.dtype, backend=backend)
        q.qweight.copy_(pack(codes, bits=bits))
        q.scale.copy_(scale.half())
        q.zero.copy_(zero.half())
        if kept is not None:
            q.kept_row_ptr.copy_(kept.row_ptr)
            q.kept_col_idx.copy_(kept.col_idx)
            q.kept_values.copy_(kept.values)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

    STORED_FP16 = ("scale", "zero", "kept_values")  # stored in fp16 whatever the model computes in

    def _apply(self, fn, recurse=True):
        """Device moves apply to every buffer; dtype casts (`model.half()`, `.to(torch.bfloat16)`) reach
        only the bias. The fp16 grid and kept weights go through `fn` viewed as int16, which casts skip:
        a round trip through bfloat16 would round them, and the kernels take fp16 only."""
        for name in self.STORED_FP16:
            self._buffers[name] = self._buffers[name].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in self.STORED_FP16:
                self._buffers[name] = self._buffers[name].view(torch.float16)

    def check(self) -> None:
        """Raise if the buffers do not fit the declared shape (e.g. after loading)."""
        check_packed(self.qweight, self.scale, self.zero, bits=self.bits, cols=self.in_features,
                     groupsize=self.groupsize)
        if self.qweight.shape[0] != self.out_features:
            raise ValueError(f"qweight has {self.qweight.shape[0]} rows, expected {self.out_features}.")
        check_kept(SparseKept(self.kept_row_ptr, self.kept_col_idx, self.kept_values), self.out_features,
                   self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_final [out, in] as this layer computes it."""
        from ..kernels import dequant_weight

        return dequant_weight(self.qweight, self.scale, self.zero, self.kept, bits=self.bits,
                              cols=self.in_features, groupsize=self.groupsize, dtype=dtype, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import dequant_matmul

        if x.shape[-1] != self.in_features:  # shapes only, no sync
            raise ValueError(f"input has {x.shape[-1]} features (last dim) but this layer has "
                             f"in_features={self.in_features}; pass x of shape [..., {self.in_features}].")
        y = dequant_matmul(x, self.qweight, self.scale, self.zero, self.kept, bits=self.bits,
                           groupsize=self.groupsize, backend=self.backend)  # [..., out]
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        gs = "per channel" if self.groupsize == -1 else f"group {self.groupsize}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {gs}, "
                f"kept={self.nnz}, bias={self.bias is not None}")


def convert_model(model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], *, bits: int,
                  groupsize: int = -1, masks: dict[str, torch.Tensor] | None = None,
                  codes: dict[str, torch.Tensor] | None = None, backend: str = "auto") -> nn.Module:
    """Swap every targeted linear of a fake-quantized model for a QuantLinear, in place.

    grids: {linear: (scale, zero)} as `QuantizeResult.grids`; masks: {linear: bool mask} (TaCQ);
    codes: {linear: uint8 codes} as `QuantizeResult.codes` (None: derived from the weights).
    """
    linears = walk.named_linears(model)
    missing = sorted(set(linears) - set(grids))
    if missing:
        raise KeyError(f"no grid for {len(missing)} linears (first: {missing[0]}); pass QuantizeResult.grids "
                       "of the run that quantized this model.")
    masks, codes = masks or {}, codes or {}
    for name, linear in linears.items():
        scale, zero = grids[name]
        q = QuantLinear.from_linear(linear, scale=scale, zero=zero, bits=bits, groupsize=groupsize,
                                    mask=masks.get(name), codes=codes.get(name), backend=backend)
        walk.set_module(model, name, q)
    return model


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
