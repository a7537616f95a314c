"""Tokenizer helpers shared by calibration and evaluation: ids of text, of a prompt + answer pair,
of a free-form prompt (through the chat template where the tokenizer has one).

Token lists are plain `list[int]`; `tokenize` gives a LongTensor [T] for long text.
"""
from __future__ import annotations

import torch


def encode(tok, text: str, *, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special).input_ids)


def use_chat_template(tok, chat_template: bool | None = None) -> bool:
    """Whether a free-form prompt goes through tok's chat template: chat_template as given, or (None)
    whenever the tokenizer has one. Asking for it (True) of a tokenizer without one is a ValueError."""
    has = bool(getattr(tok, "chat_template", None))
    if chat_template and not has:
        raise ValueError("--chat-template: this tokenizer has no chat template; pass --no-chat-template to "
                         "give the prompts as plain text.")
    return has if chat_template is None else bool(chat_template)


def prompt_ids(tok, prompt: str, *, chat_template: bool | None = None) -> list[int]:
    """Model input ids of a free-form prompt (generation, chat-style evaluation).

    With the chat template (see use_chat_template) the prompt is one user turn followed by the
    assistant's header, which is how an instruct model was trained to be asked; otherwise it is the
    plain text with the tokenizer's special tokens. The paper-protocol benchmarks (few-shot MMLU and
    GSM8K, the synthetic suite, perplexity) never use the template: their prompts stay plain text, as
    in the paper (greedy_generate's default is chat_template=False).
    """
    if use_chat_template(tok, chat_template):
        turn = [{"role": "user", "content": prompt}]
        return list(tok.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"])
    return encode(tok, prompt, special=True)


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
