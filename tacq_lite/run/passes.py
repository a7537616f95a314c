"""Model passes: RTN and true-sequential GPTQ over every targeted linear of a model, and the
bits accounting of the result.

Each pass quantizes in place and returns what it learned as plain data (the grids, GPTQ's
losses and Hessian diagonals); the TaCQ recipe (`run/tacq.py`) runs `gptq_quantize` twice, the
second time with a keep-mask, and `experiment.quantize_model` picks the method.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import NamedTuple

import torch
from torch import nn

from ..config import QuantConfig
from ..core.bits import BitsReport, average_bits
from ..core.quant import dequantize, find_params, quantize
from ..model import walk
from .parallel import trim_heap


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
    codes: dict[str, torch.Tensor]  # uint8 [rows, cols]; at kept positions unused (the CSR value wins); {} if restore
    H_diag: dict[str, torch.Tensor]  # [cols] diagonal of the layer-input Hessian (activation selector)
    Hinv_diag: dict[str, torch.Tensor]  # [cols] diagonal of its damped inverse (hessian selector)
    errors: dict[str, torch.Tensor]  # [rows, cols] Q(W) − W in error_dtype, on the host (restore=True only, else {})


def rtn_weight(W: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest one weight [rows, cols]: (dequantized in W's dtype, scale, zero, uint8 codes)."""
    scale, zero = find_params(W, bits=config.bits, sym=config.sym, groupsize=config.groupsize, mse=config.mse)
    codes = quantize(W, scale, zero, bits=config.bits)  # uint8 [rows, cols]
    return dequantize(codes, scale, zero).to(W.dtype), scale, zero, codes


@torch.no_grad()
def rtn_quantize(model: nn.Module, config: QuantConfig) -> RTNPass:
    """Round-to-nearest every targeted linear in place; returns each linear's grid and codes."""
    out = RTNPass({}, {})

    def rtn(name: str, W: torch.Tensor) -> torch.Tensor:
        W_hat, scale, zero, out.codes[name] = rtn_weight(W, config)
        out.grids[name] = (scale, zero)
        return W_hat

    walk.apply_to_linears(model, rtn)
    return out


@torch.no_grad()
def rtn_errors(model: nn.Module, config: QuantConfig, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{linear: Q(W) − W in `dtype`} with Q round-to-nearest, one linear at a time; the model is not changed."""
    errors = {}
    for name, lin in walk.named_linears(model).items():
        W_hat = rtn_weight(lin.weight.data, config)[0]
        errors[name] = (W_hat.float() - lin.weight.detach().float()).to(dtype)  # [rows, cols]
    return errors


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    restore: bool = False,
    error_dtype: torch.dtype = torch.float32,
    errors: MutableMapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> GPTQPass:
    """True-sequential GPTQ in place; returns each linear's loss, grid and Hessian diagonals.

    masks: {linear: bool [rows, cols]} of weights to keep in 16-bit (TaCQ's second pass; what they
    store: config.keep_value). device: the compute device; the decoder layers are onloaded to it
    one at a time (walk.sequential_pass); what the pass returns is on the host. restore=True
    (TaCQ's first pass): each layer gets its full-precision weights back once its quantized
    outputs have been passed on, and `errors` holds Q(W) − W (in the mapping given as `errors`, e.g.
    io.SpilledTensors to keep them on disk; a dict by default); only one layer's weights are copied
    at a time, never the model.
    """
    from ..algo.gptq import GPTQ

    out = GPTQPass({}, {}, {}, {}, {}, {} if errors is None else errors)
    masks = masks or {}
    originals: dict[str, torch.Tensor] = {}  # this layer's full-precision weights (restore=True)

    def finish(name: str, linear: nn.Linear, gptq) -> None:
        H_diag = torch.diag(gptq.H).clone()  # [cols]
        mask = masks.get(name)
        res = gptq.quantize(
            bits=config.bits, groupsize=config.groupsize, sym=config.sym, mse=config.mse,
            blocksize=config.blocksize, percdamp=config.percdamp, actorder=config.actorder,
            mask=None if mask is None else mask.to(linear.weight.device), keep_value=config.keep_value,
        )
        W_hat = res.W_hat.to(linear.weight.dtype)  # [rows, cols]
        if restore:
            # The quantized weight takes the original's place as a new tensor and the original is set
            # aside untouched (no copy; nor is any page written that a forked gradient worker still
            # shares with this process, which would copy it there).
            originals[name] = linear.weight.data
            out.errors[name] = (W_hat.float() - originals[name].float()).to(error_dtype).cpu()  # kept on the host
            linear.weight.data = W_hat
        else:
            linear.weight.data.copy_(W_hat)
        # What the pass returns goes to the host: the layers do, and so must what packs them.
        out.loss[name], out.grids[name] = res.loss, (res.scale.cpu(), res.zero.cpu())
        if not restore:  # the first pass's codes are never packed: 1 byte per weight not kept
            out.codes[name] = res.codes.cpu()
        out.H_diag[name], out.Hinv_diag[name] = H_diag.cpu(), res.Hinv_diag.cpu()

    def put_back(i: int, layer: nn.Module) -> None:
        for short, linear in walk.layer_linears(layer).items():
            linear.weight.data = originals.pop(f"model.layers.{i}.{short}")
        trim_heap()  # this layer's quantized weights and working sets, freed just now

    try:
        walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=progress,
                             device=device, after_layer=put_back if restore else None)
    except BaseException:  # interrupted or failed inside a layer: its full-precision weights go back too
        linears = walk.named_linears(model)
        for name, original in originals.items():
            linears[name].weight.data = original.to(linears[name].weight.device)
        raise
    return out
