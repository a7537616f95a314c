"""Tokenizer helpers shared by calibration and evaluation: ids of text, of a prompt + answer pair.

Token lists are plain `list[int]`; `tokenize` gives a LongTensor [T] for long text.
"""
from __future__ import annotations

import torch


def encode(tok, text: str, *, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special).input_ids)


def split_ids(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer, tokenized together, and the index where the answer starts.

    Tokenizing jointly keeps the tokens the model would really see; the boundary is the end
    of the longest common prefix with the prompt alone (a merge across it moves it left).
    """
    ids = encode(tok, prompt + answer, special=True)
    start = common_prefix(encode(tok, prompt, special=True), ids)
    if start == len(ids):
        raise ValueError(f"The answer {answer!r} adds no tokens after the prompt.")
    return ids, max(start, 1)  # position 0 has no prediction; a BOS-less empty prompt scores from token 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """LongTensor [T] of token ids, no special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
