"""The course's one full-precision baseline: notebook 00 computes it, later notebooks reprint it.

Perplexity depends on the protocol (which text, how many windows, how long each window is: notebook
00, section 4), so a notebook that evaluates on its own, shorter windows prints a different
full-precision number. Each such notebook calls `print_baseline` to show notebook 00's number next to
its own, with both protocols, so a learner never compares numbers measured two ways.
"""
from __future__ import annotations

from ..data import corpus
from ..eval.lm import LMMetrics, evaluate_lm, format_ppl

BASELINE_TEXT = "wikitext2"
BASELINE_EVAL_TOKENS = 2048  # notebook 00's defaults: 4 windows of 512 tokens from the evaluation half
BASELINE_SEQ_LEN = 512


def protocol(m: LMMetrics, seq_len: int, text: str = "WikiText-2 evaluation half") -> str:
    """One line saying how `m` was measured: windows × tokens, and how many predictions it averages."""
    return (f"{text}, {m.n_windows} windows × {seq_len} tokens = {m.n_windows * seq_len} tokens, "
            f"{m.n_tokens} predicted")


def full_precision_baseline(model, tokenizer, *, eval_tokens: int = BASELINE_EVAL_TOKENS,
                            seq_len: int = BASELINE_SEQ_LEN) -> LMMetrics:
    """Perplexity (with its interval) of `model` under notebook 00's protocol."""
    tokens = corpus.eval_tokens(tokenizer, BASELINE_TEXT, max_tokens=eval_tokens, seq_len=seq_len)
    return evaluate_lm(model, tokens, seq_len=seq_len, progress=False)


def print_baseline(model, tokenizer, *, here: LMMetrics | None = None, here_seq_len: int | None = None) -> LMMetrics:
    """Print notebook 00's baseline for the float `model`; with `here` (the same float model measured by
    this notebook's own protocol) print that too and say why the two differ. Returns the baseline."""
    base = full_precision_baseline(model, tokenizer)
    print(f"full-precision baseline (notebook 00): perplexity {format_ppl(base)}")
    print(f"  protocol: {protocol(base, BASELINE_SEQ_LEN)}")
    if here is not None:
        if here_seq_len is None:
            raise ValueError("give here_seq_len, the window length `here` was measured with.")
        print(f"full precision in this notebook:      perplexity {format_ppl(here)}")
        print(f"  protocol: {protocol(here, here_seq_len)}")
        if here_seq_len != BASELINE_SEQ_LEN or here.n_windows != base.n_windows:
            shorter = " shorter windows give each prediction less context (notebook 00, section 4), and" \
                if here_seq_len < BASELINE_SEQ_LEN else ""
            print(f"  the two differ because{shorter} they average over different tokens; compare a quantized "
                  "model with the full-precision number measured the same way.")
    return base
