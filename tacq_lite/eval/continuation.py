"""Scoring text under a causal LM: teacher-forced answer NLL, greedy generation, prefix reuse.

The evaluators in `mmlu_gsm8k.py` and `synthetic.py` ask three questions of a model: how
likely is this answer after this prompt (teacher forcing), what would greedy decoding write,
and which next token wins. Few-shot prompts share a long prefix (the worked examples), so
`PrefixCache` runs it once and keeps its key/value cache; each question then costs only its
own tokens. Batch size is 1 throughout: memory stays small and no padding is needed.

Token lists are plain `list[int]`; logits are `[positions, vocab]` float tensors.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from ..data.tokens import common_prefix, prompt_ids, split_ids


class ContinuationScore(NamedTuple):
    token_nll: torch.Tensor  # [n_answer] -log p(answer token | everything before it)
    greedy: torch.Tensor  # [n_answer] bool, the argmax equals the answer token
    next_token: int  # argmax after the whole answer (did the model stop where the answer stops?)


def max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def truncate_left(ids: list[int], start: int, limit: int | None) -> tuple[list[int], int]:
    """Drop tokens from the left so that len(ids) <= limit; `start` moves with them."""
    if limit is None or len(ids) <= limit:
        return ids, start
    cut = len(ids) - limit
    if cut >= start:
        raise ValueError(f"The answer alone ({len(ids) - start} tokens) does not fit the model's {limit} positions.")
    return ids[cut:], start - cut


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _crop(past, length: int) -> None:
    extra = past.get_seq_length() - length
    if extra > 0:
        past.crop(-extra)  # a negative count removes tokens in every transformers version


def cache_keyword(model) -> str:
    """The forward keyword that takes a key/value cache: `cache` in newer transformers 5 releases,
    `past_key_values` before (still accepted there, with a deprecation warning per call)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    """The key/value cache a forward returned (its `cache` field, or `past_key_values` before), or None."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class PrefixCache:
    """Key/value cache of a prompt prefix shared by many sequences (the few-shot examples).

    `run(ids, start)` returns the logits of ids at positions start.. and reuses as much of
    the cached prefix as matches ids. Models whose output has no croppable cache (fake test
    models, custom modules) silently get a full forward pass instead.
    """

    def __init__(self, model, prefix_ids: list[int] = ()):
        self.model, self.ids, self.past, self.valid = model, list(prefix_ids), None, 0
        self.keyword = cache_keyword(model)
        if self.ids:
            out = self.forward(self.ids, None)
            past = _cache_of(out)
            if hasattr(past, "crop") and hasattr(past, "get_seq_length"):
                self.past, self.valid = past, len(self.ids)

    @torch.no_grad()
    def forward(self, ids: list[int], past):
        x = torch.tensor([ids], device=_device(self.model))  # [1, seq]
        return self.model(input_ids=x, use_cache=True, **{self.keyword: past})

    def run(self, ids: list[int], start: int):
        """(logits [len(ids) - start, vocab] for positions start.., cache holding ids or None)."""
        n = min(common_prefix(self.ids[: self.valid], ids), start) if self.past is not None else 0
        if n == 0:
            out = self.forward(ids, None)
            return out.logits[0, start:].float(), _cache_of(out)
        _crop(self.past, n)
        self.valid = n  # the cache now holds exactly ids[:n]; the next call may reuse them
        out = self.forward(ids[n:], self.past)
        return out.logits[0, start - n:].float(), self.past

    def release(self) -> None:
        """Forget whatever a run appended after the prefix."""
        if self.past is not None:
            _crop(self.past, self.valid)


def score_continuation(model, tok, prompt: str, answer: str, *, cache: PrefixCache | None = None) -> ContinuationScore:
    """Teacher-forced per-token NLL and greedy agreement of `answer` after `prompt`."""
    cache = cache or PrefixCache(model)
    ids, start = truncate_left(*split_ids(tok, prompt, answer), max_length(model))
    logits, _ = cache.run(ids, start - 1)  # [n_answer + 1, vocab]; row i predicts ids[start + i]
    cache.release()
    target = torch.tensor(ids[start:], device=logits.device)  # [n_answer]
    logp = torch.log_softmax(logits[:-1], dim=-1)  # [n_answer, vocab]
    token_nll = -logp.gather(1, target[:, None])[:, 0]  # [n_answer]
    return ContinuationScore(token_nll.cpu(), (logp.argmax(-1) == target).cpu(), int(logits[-1].argmax()))


def answer_nll(model, tok, prompt: str, answer: str, *, cache: PrefixCache | None = None) -> float:
    """Mean token negative log-likelihood (nats) of the reference `answer` given `prompt`."""
    return float(score_continuation(model, tok, prompt, answer, cache=cache).token_nll.mean())


@torch.no_grad()
def greedy_generate(model, tok, prompt: str, *, max_new_tokens: int, stop_strings: tuple[str, ...] = (),
                    cache: PrefixCache | None = None, chat_template: bool | None = False) -> str:
    """Greedy continuation of `prompt`, cut before the first stop string or end-of-sequence.

    chat_template: ask `prompt` as a user turn of tok's chat template (True; None = where tok has
    one, see data.tokens.prompt_ids); False (the default, the few-shot protocols) = plain text.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    cache = cache or PrefixCache(model)
    limit = max_length(model)
    ids = prompt_ids(tok, prompt, chat_template=chat_template)
    ids, _ = truncate_left(ids, len(ids), None if limit is None else limit - max_new_tokens)
    logits, past = cache.run(ids, len(ids) - 1)  # [1, vocab]
    new: list[int] = []
    text = ""
    try:
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            text = tok.decode(new, skip_special_tokens=True)
            if any(s in text for s in stop_strings):
                break
            if past is not None:
                out = cache.forward([token], past)
            else:  # no cache support: rerun the whole sequence
                out = cache.forward(ids + new, None)
            logits, past = out.logits[0, -1:].float(), _cache_of(out)
    finally:
        cache.release()
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
