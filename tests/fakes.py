"""Test helpers: a hand-made tokenizer, language models with known outputs, a tiny data folder, a
word-level Hugging Face tokenizer with or without a chat template."""
from __future__ import annotations

import csv
import json
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

PIECES = re.compile(r" ?\w+|\n|\s|[^\w\s]")  # GPT-2-like: a leading space sticks to its word


class FakeTok:
    """Word-level tokenizer; ids are handed out in order of first appearance (0 is EOS)."""

    eos_token_id = 0

    def __init__(self, vocab: int = 64):
        self.size, self.pieces, self.ids = vocab, ["<eos>"], {"<eos>": 0}

    def id(self, piece: str) -> int:
        if piece not in self.ids:
            if len(self.pieces) == self.size:
                raise ValueError("FakeTok vocabulary is full")
            self.ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.ids[piece]

    def __call__(self, text: str, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=[self.id(p) for p in PIECES.findall(text)])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [i for i in ids if not (skip_special_tokens and i == 0)]
        return "".join(self.pieces[i] if i < len(self.pieces) else f"<{i}>" for i in ids)


class BigramLM(nn.Module):
    """logits[t] = table[input_ids[t]]: the next-token distribution depends on the last token only."""

    def __init__(self, table: torch.Tensor, max_positions: int | None = None):
        super().__init__()
        self.table = table  # [vocab, vocab]
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.seen_lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor, **kwargs):
        self.seen_lengths.append(input_ids.shape[1])
        return SimpleNamespace(logits=self.table[input_ids])  # [1, seq, vocab]; no cache


class ScriptLM(nn.Module):
    """Writes `script` token by token after a prompt of `prompt_len` tokens, whatever the input."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int = 64):
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.config = SimpleNamespace(max_position_embeddings=None)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        seq = input_ids.shape[1]
        logits = torch.zeros(1, seq, self.vocab)
        for p in range(seq):
            k = p + 1 - self.prompt_len  # index in the script of the token position p predicts
            logits[0, p, self.script[k] if 0 <= k < len(self.script) else 0] = 10.0
        return SimpleNamespace(logits=logits)


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """A data folder with one MMLU subject and a few GSM8K lines, found through $TACQ_LITE_DATA."""
    for split, n in (("dev", 5), ("val", 3), ("test", 4)):
        write_csv(tmp_path / "mmlu" / split / f"astronomy_{split}.csv",
                  [[f"{split} q{i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(n)])
    for split in ("train", "test"):
        write_jsonl(tmp_path / "gsm8k" / f"{split}.jsonl",
                    [{"question": f"{split} {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
                     for i in range(10)])
    monkeypatch.setenv("TACQ_LITE_DATA", str(tmp_path))
    return tmp_path


# A small chat template in the usual Jinja form: each turn "role : text ;", then the assistant's header.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def word_tokenizer(chat_template: str | None = None):
    """A real Hugging Face tokenizer (word level, whitespace split) with or without a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "user", "assistant", ":", ";", "the", "capital", "of", "France", "is", "Paris", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    hf.chat_template = chat_template
    return hf


class ChatSpyTok(FakeTok):
    """FakeTok that has a chat template and fails the test if anything applies it."""

    chat_template = CHAT_TEMPLATE

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs):
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": super().__call__(text, add_special_tokens).input_ids})

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("a paper-protocol evaluation went through the chat template")


def cli_error_before_loading(argv, capsys, monkeypatch) -> str:
    """Run the CLI with argv, with loading a model made an error: it must exit 2 with one line; returns it."""
    from tacq_lite import cli

    def no_load(*_a, **_k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("tacq_lite.model.loading.load_model", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err
