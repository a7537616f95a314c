"""Language-modelling metrics: perplexity and KL divergence to the full-precision model.

Perplexity is exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens (the
GPTQ protocol; no sliding context). KL(P_fp || P_q) is averaged over the same predicted
positions, so it measures how far quantization moved the whole next-token distribution,
not only the probability of the reference token.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LMMetrics(NamedTuple):
    ppl: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood, nats
    n_tokens: int  # predicted positions averaged over
    kl: float | None  # mean KL(reference || model), nats; None without a reference
    ref_ppl: float | None  # the reference model's perplexity on the same windows


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}.")
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens hold no window of seq_len={seq_len}.")
    return tokens[: n * seq_len].view(n, seq_len)  # [n, seq_len]


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    reference: nn.Module | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> LMMetrics:
    """Perplexity of `model` on a token stream [T]; with `reference`, also KL and its perplexity."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll_sum, kl_sum, ref_sum, count = 0.0, 0.0, 0.0, 0
    for window in tqdm(_windows(tokens, seq_len), desc=desc, disable=not progress, leave=False):
        ids = window[None].to(device)  # [1, seq_len]
        logp = F.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)  # [seq_len-1, vocab]
        target = ids[0, 1:]  # [seq_len-1]
        nll_sum += -logp.gather(1, target[:, None]).sum().item()
        if reference is not None:
            ref_logp = F.log_softmax(reference(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            ref_sum += -ref_logp.gather(1, target[:, None]).sum().item()
        count += target.numel()
    nll = nll_sum / count
    return LMMetrics(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=count,
        kl=kl_sum / count if reference is not None else None,
        ref_ppl=math.exp(ref_sum / count) if reference is not None else None,
    )


def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int, progress: bool = True) -> float:
    """exp(mean NLL) over non-overlapping windows."""
    return evaluate_lm(model, tokens, seq_len=seq_len, progress=progress).ppl
