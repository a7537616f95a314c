"""Model passes: RTN and true-sequential GPTQ over every targeted linear of a model, and the
bits accounting of the result.

Each pass quantizes in place and returns what it learned as plain data (the grids, GPTQ's
losses and Hessian diagonals); the TaCQ recipe (`run/tacq.py`) runs `gptq_quantize` twice, the
second time with a keep-mask, and `experiment.quantize_model` picks the method.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from ..config import QuantConfig
from ..core.bits import BitsReport, average_bits
from ..core.quant import dequantize, find_params, quantize
from ..model import walk


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in walk.named_linears(model).items()}


def bits_report(model: nn.Module, config: QuantConfig, n_kept: dict[str, int] | None = None) -> BitsReport:
    """The bits accounting of `model` quantized with `config` (16 for full precision)."""
    shapes = linear_shapes(model)
    targeted = sum(r * c for r, c in shapes.values())
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - targeted
    if config.method == "fp":
        return average_bits(shapes, bits=16, scale_bits=0, zero_bits=0, other_params=other)
    return average_bits(shapes, bits=config.bits, groupsize=config.groupsize, n_kept=n_kept, other_params=other)


class RTNPass(NamedTuple):
    """What round-to-nearest leaves besides the quantized weights, per linear (packing needs both)."""

    grids: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (scale, zero), each fp32 [rows, n_groups]
    codes: dict[str, torch.Tensor]  # uint8 [rows, cols]


class GPTQPass(NamedTuple):
    """What one true-sequential GPTQ pass leaves besides the quantized weights, per linear."""

    loss: dict[str, float]  # GPTQ's objective on the calibration inputs
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (scale, zero), each fp32 [rows, n_groups]
    codes: dict[str, torch.Tensor]  # uint8 [rows, cols]; at kept positions unused (the CSR value wins)
    H_diag: dict[str, torch.Tensor]  # [cols] diagonal of the layer-input Hessian (activation selector)
    Hinv_diag: dict[str, torch.Tensor]  # [cols] diagonal of its damped inverse (hessian selector)


@torch.no_grad()
def rtn_quantize(model: nn.Module, config: QuantConfig) -> RTNPass:
    """Round-to-nearest every targeted linear in place; returns each linear's grid and codes."""
    out = RTNPass({}, {})

    def rtn(name: str, W: torch.Tensor) -> torch.Tensor:
        scale, zero = find_params(W, bits=config.bits, sym=config.sym, groupsize=config.groupsize, mse=config.mse)
        codes = quantize(W, scale, zero, bits=config.bits)  # uint8 [rows, cols]
        out.grids[name], out.codes[name] = (scale, zero), codes
        return dequantize(codes, scale, zero).to(W.dtype)

    walk.apply_to_linears(model, rtn)
    return out


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> GPTQPass:
    """True-sequential GPTQ in place; returns each linear's loss, grid and Hessian diagonals.

    masks: {linear: bool [rows, cols]} of weights to keep in 16-bit (TaCQ's second pass; what they
    store: config.keep_value).
    """
    from ..algo.gptq import GPTQ

    out = GPTQPass({}, {}, {}, {}, {})
    masks = masks or {}

    def finish(name: str, linear: nn.Linear, gptq) -> None:
        H_diag = torch.diag(gptq.H).clone()  # [cols]
        res = gptq.quantize(
            bits=config.bits, groupsize=config.groupsize, sym=config.sym, mse=config.mse,
            blocksize=config.blocksize, percdamp=config.percdamp, actorder=config.actorder,
            mask=masks.get(name), keep_value=config.keep_value,
        )
        linear.weight.data.copy_(res.W_hat.to(linear.weight.dtype))
        out.loss[name], out.grids[name], out.codes[name] = res.loss, (res.scale, res.zero), res.codes
        out.H_diag[name], out.Hinv_diag[name] = H_diag, res.Hinv_diag

    walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=progress)
    return out


def float_copy(model: nn.Module) -> nn.Module:
    """An independent copy of `model` (the full-precision reference for KL)."""
    return copy.deepcopy(model).eval()
