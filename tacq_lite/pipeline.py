"""The end-to-end quantization pipeline: RTN, GPTQ and TaCQ over a whole model.

TaCQ (Xiao et al., 2025, Sec. 3) runs, in the authors' order:
  1. GPTQ over the model -> Q(W), the "corrupt" weights;
  2. batch-size-1 backward passes on the calibration data -> G = sum |dL/dW|;
  3. score every weight (default |W| * |G| * |Q(W) - W|);
  4. global top-k over all targeted linears -> keep-mask;
  5. GPTQ again, with the mask: kept weights stay in 16-bit (at the value GPTQ's compensation
     moved them to, or their original value: config.keep_value), the rest are quantized.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import walk
from .bits import BitsReport, average_bits
from .config import QuantConfig
from .quant import dequantize, find_params, quantize


@dataclass
class QuantizeResult:
    config: QuantConfig
    bits: BitsReport  # average bits per targeted weight
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    layer_loss: dict[str, float] = field(default_factory=dict)  # linear -> GPTQ objective (GPTQ, TaCQ)
    kept: dict[str, int] = field(default_factory=dict)  # linear -> kept weights (TaCQ)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> bool [rows, cols] (TaCQ)
    info: dict = field(default_factory=dict)  # TaCQ: cache hits, backward passes, seconds per sample
    # linear -> (scale, zero), each fp32 [rows, n_groups]: the grid the weights were rounded to,
    # which `qlinear.QuantLinear.from_linear` needs to pack the codes.
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in walk.named_linears(model).items()}


def bits_report(model: nn.Module, config: QuantConfig, kept: dict[str, int] | None = None) -> BitsReport:
    """The bits accounting of `model` quantized with `config` (16 for full precision)."""
    shapes = linear_shapes(model)
    targeted = sum(r * c for r, c in shapes.values())
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - targeted
    if config.method == "fp":
        return average_bits(shapes, bits=16, scale_bits=0, zero_bits=0, other_params=other)
    return average_bits(shapes, bits=config.bits, groupsize=config.groupsize, kept=kept, other_params=other)


@torch.no_grad()
def rtn_quantize(model: nn.Module, config: QuantConfig, *, grids_out: dict | None = None) -> None:
    """Round-to-nearest every targeted linear in place; grids_out (if given) gets {linear: (scale, zero)}."""

    def rtn(name: str, W: torch.Tensor) -> torch.Tensor:
        scale, zero = find_params(W, bits=config.bits, sym=config.sym, groupsize=config.groupsize, mse=config.mse)
        if grids_out is not None:
            grids_out[name] = (scale, zero)
        return dequantize(quantize(W, scale, zero, bits=config.bits), scale, zero).to(W.dtype)

    walk.apply_to_linears(model, rtn)


@torch.no_grad()
def gptq_quantize(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    stats_out: dict[str, dict[str, torch.Tensor]] | None = None,
    grids_out: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """True-sequential GPTQ in place; returns {linear: GPTQ loss}.

    masks: {linear: bool [rows, cols]} of weights to keep in 16-bit (TaCQ's second pass; what they
    store: config.keep_value).
    stats_out: if given, filled with {linear: {"H_diag": [cols], "Hinv_diag": [cols]}} for the
    Hessian- and activation-based selectors.
    grids_out: if given, filled with {linear: (scale, zero)}, the grid of each quantized linear.
    """
    from .gptq import GPTQ

    losses: dict[str, float] = {}
    masks = masks or {}

    def finish(name: str, linear: nn.Linear, gptq) -> None:
        H_diag = torch.diag(gptq.H).clone()  # [cols]
        res = gptq.quantize(
            bits=config.bits, groupsize=config.groupsize, sym=config.sym, mse=config.mse,
            blocksize=config.blocksize, percdamp=config.percdamp, actorder=config.actorder,
            mask=masks.get(name), keep_value=config.keep_value,
        )
        linear.weight.data.copy_(res.W_hat.to(linear.weight.dtype))
        losses[name] = res.loss
        if grids_out is not None:
            grids_out[name] = (res.scale, res.zero)
        if stats_out is not None:
            stats_out[name] = {"H_diag": H_diag, "Hinv_diag": res.Hinv_diag}

    walk.sequential_pass(model, windows, make_stats=lambda _n, lin: GPTQ(lin), finish=finish, progress=progress)
    return losses


def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    samples=None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize `model` in place with config.method; windows: LongTensor [n, seq_len] (GPTQ's data).

    samples: TaCQ's gradient samples, (input_ids [T], loss_mask [T]) pairs for task data
    (`data.task_calibration`); None = the windows, loss on every token.
    """
    result = QuantizeResult(config=config, bits=bits_report(model, config))
    start = time.perf_counter()
    if config.method == "rtn":
        rtn_quantize(model, config, grids_out=result.grids)
        result.seconds["quantize"] = time.perf_counter() - start
    elif config.method == "gptq":
        result.layer_loss = gptq_quantize(model, windows, config, grids_out=result.grids, progress=progress)
        result.seconds["gptq"] = time.perf_counter() - start
    elif config.method == "tacq":
        from .tacq import tacq_quantize

        result.info = tacq_quantize(model, windows, config, result, samples=samples, progress=progress)
        result.bits = bits_report(model, config, kept=result.kept)
    return result


def float_copy(model: nn.Module) -> nn.Module:
    """An independent copy of `model` (the full-precision reference for KL)."""
    return copy.deepcopy(model).eval()
