"""Language-modelling metrics: perplexity and KL divergence to the full-precision model.

Perplexity is exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens (the
GPTQ protocol; no sliding context). KL(P_fp || P_q) is averaged over the same predicted
positions, so it measures how far quantization moved the whole next-token distribution,
not only the probability of the reference token.

Perplexity comes with a 95 % percentile-bootstrap interval over the evaluation windows
(Efron & Tibshirani, 1993, ch. 13): windows are resampled with replacement and exp(mean NLL)
is recomputed each time. Windows, not tokens, are the resampling unit because the tokens of one
window share their context and are far from independent. The interval says how much the number
would move on another text of the same kind and length; it says nothing about calibration
seeds, which benchmarks vary separately.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BOOTSTRAP_SAMPLES = 2000  # resamples for the interval: its ends then move by well under 1 % between seeds
BOOTSTRAP_LEVEL = 0.95


class LMMetrics(NamedTuple):
    ppl: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood, nats
    n_tokens: int  # predicted positions averaged over
    kl: float | None  # mean KL(reference || model), nats; None without a reference
    ref_ppl: float | None  # the reference model's perplexity on the same windows
    ppl_low: float | None  # 95 % bootstrap interval of ppl over windows; None with a single window
    ppl_high: float | None
    n_windows: int  # windows of seq_len tokens (each predicts seq_len − 1 of them)
    window_nll: tuple[float, ...]  # [n_windows] mean NLL of each window, nats: for paired comparisons


def bootstrap_interval(values: torch.Tensor, *, n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of mean(values) for values [n]; None when n < 2."""
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    n = values.numel()
    if n < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)  # [n_boot, n] resampled window indices
    means = values.double()[idx].mean(1)  # [n_boot]
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def ppl_interval(window_nll, **kwargs) -> tuple[float, float] | None:
    """The bootstrap interval of exp(mean NLL) from per-window mean NLLs (equal-length windows)."""
    bounds = bootstrap_interval(torch.as_tensor(window_nll, dtype=torch.float64), **kwargs)
    return None if bounds is None else (math.exp(bounds[0]), math.exp(bounds[1]))


def paired_ppl_ratio(window_nll_a, window_nll_b, **kwargs) -> tuple[float, float | None, float | None]:
    """ppl_a / ppl_b on the same windows, with the bootstrap interval of the per-window NLL differences.

    Both models saw the same text, so the windows' difficulty cancels and the interval is far
    narrower than the two perplexity intervals side by side. (ratio, low, high); low/high None
    for a single window.
    """
    a = torch.as_tensor(window_nll_a, dtype=torch.float64)  # [n_windows]
    b = torch.as_tensor(window_nll_b, dtype=torch.float64)  # [n_windows]
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"the two runs have {a.numel()} and {b.numel()} windows; compare runs on the same, "
                         "non-empty set of windows.")
    bounds = bootstrap_interval(a - b, **kwargs)
    ratio = math.exp((a - b).mean().item())
    return (ratio, None, None) if bounds is None else (ratio, math.exp(bounds[0]), math.exp(bounds[1]))


def format_ppl(m: dict | LMMetrics) -> str:
    """'42.08 [40.51, 43.77] (64 × 511 tok)': perplexity, its 95 % interval and what it rests on."""
    m = m._asdict() if isinstance(m, LMMetrics) else m
    ci = "" if m.get("ppl_low") is None else f" [{m['ppl_low']:.2f}, {m['ppl_high']:.2f}]"
    n_win = m.get("n_windows")
    size = f"{m['n_tokens']} tok" if not n_win else f"{n_win} × {m['n_tokens'] // n_win} tok"
    return f"{m['ppl']:.2f}{ci} ({size})"


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}.")
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens hold no window of seq_len={seq_len}.")
    return tokens[: n * seq_len].view(n, seq_len)  # [n, seq_len]


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[seq_len − 1, vocab] float32 next-token log-probabilities of one window ids [1, seq_len]."""
    return F.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)


class ReferenceLogprobs:
    """The full-precision model's log-probabilities on a stream's windows, kept on disk for KL.

    KL(P_fp || P_q) needs the reference's whole next-token distribution at every position. Instead
    of keeping a second model in memory while the first is quantized, they are computed once,
    before quantizing, and written to a private temporary folder, one safetensors file per window
    ([seq_len − 1, vocab] float32: (seq_len − 1) × vocab × 4 bytes each, 100 MB for a 512-token window
    of a 49,152-token vocabulary). evaluate_lm reads one window at a time. The values are the ones the
    model would give again, so KL and the reference perplexity are the same, bit for bit, as with
    the model itself. `close()` (or leaving a `with` block) deletes the folder.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, *, seq_len: int, folder: str | None = None,
                 progress: bool = True, desc: str = "reference"):
        import tempfile

        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        self.windows = _windows(tokens, seq_len).clone()  # [n, seq_len]
        self._dir = tempfile.TemporaryDirectory(prefix="tacq_lite-reference-", dir=folder)
        device = next(model.parameters()).device
        with torch.no_grad():
            for i, window in enumerate(tqdm(self.windows, desc=desc, disable=not progress, leave=False)):
                logp = _logprobs(model, window[None].to(device))  # [seq_len − 1, vocab]
                save_file({"logp": logp.cpu().contiguous()}, self._path(i))

    def _path(self, i: int) -> str:
        return f"{self._dir.name}/window-{i:05d}.safetensors"

    def logprobs(self, i: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[seq_len − 1, vocab] float32 log-probabilities of window i."""
        from safetensors.torch import load_file

        return load_file(self._path(i))["logp"].to(device)

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(f.stat().st_size for f in Path(self._dir.name).iterdir())

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    reference: nn.Module | ReferenceLogprobs | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> LMMetrics:
    """Perplexity of `model` on a token stream [T]; with `reference` (the full-precision model, or
    its ReferenceLogprobs on the same windows), also KL and its perplexity."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    windows = _windows(tokens, seq_len)  # [n, seq_len]
    if isinstance(reference, ReferenceLogprobs) and not torch.equal(reference.windows, windows):
        raise ValueError("the reference log-probabilities were computed on other windows; compute them on the same "
                         "tokens and seq_len as this evaluation.")
    kl_sum, ref_sum, count = 0.0, 0.0, 0
    window_nll = []
    for i, window in enumerate(tqdm(windows, desc=desc, disable=not progress, leave=False)):
        ids = window[None].to(device)  # [1, seq_len]
        logp = _logprobs(model, ids)  # [seq_len-1, vocab]
        target = ids[0, 1:]  # [seq_len-1]
        window_nll.append(-logp.gather(1, target[:, None]).mean().item())
        if reference is not None:
            ref_logp = reference.logprobs(i, device) if isinstance(reference, ReferenceLogprobs) \
                else _logprobs(reference, ids)
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            ref_sum += -ref_logp.gather(1, target[:, None]).sum().item()
        count += target.numel()
    nll = sum(window_nll) / len(window_nll)  # every window predicts seq_len − 1 tokens
    bounds = ppl_interval(window_nll)
    return LMMetrics(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=count,
        kl=kl_sum / count if reference is not None else None,
        ref_ppl=math.exp(ref_sum / count) if reference is not None else None,
        ppl_low=None if bounds is None else bounds[0],
        ppl_high=None if bounds is None else bounds[1],
        n_windows=len(window_nll),
        window_nll=tuple(window_nll),
    )


def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int, progress: bool = True) -> float:
    """exp(mean NLL) over non-overlapping windows."""
    return evaluate_lm(model, tokens, seq_len=seq_len, progress=progress).ppl
