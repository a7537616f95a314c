"""Calibration and evaluation text: token windows, drawn reproducibly.

Calibration follows GPTQ (Frantar et al., 2022): `n` windows of `seq_len` tokens starting at
seeded random offsets. WikiText-2 comes from the shared reference copy of its test split
(`../shared/data/wikitext2/wiki.test.raw`), which must serve both purposes, so the file is cut
in two at a line break near its middle: calibration windows come only from the first half,
evaluation only from the second half. Online users without that copy get the Hugging Face
`wikitext-2-raw-v1` train split for calibration and its test split for evaluation.
Any plain text file can be named instead; a file is used whole for whichever role it plays.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from ..io import PACKAGE_ROOT
from .tokens import tokenize

WIKITEXT2 = "wikitext2"


def shared_data_dir() -> Path | None:
    """The read-only reference data folder, or None when it is absent.

    Looked up in $TACQ_LITE_DATA, then `../shared/data` beside the project checkout, then
    `shared/data` in the current folder or any of its parents (notebooks run from `notebooks/`).
    """
    if os.environ.get("TACQ_LITE_DATA"):
        path = Path(os.environ["TACQ_LITE_DATA"]).expanduser()
        return path if path.is_dir() else None
    cwd = Path.cwd().resolve()
    candidates = [PACKAGE_ROOT.parent / "shared" / "data"] + [d / "shared" / "data" for d in (cwd, *cwd.parents)]
    return next((path for path in candidates if path.is_dir()), None)


@lru_cache(maxsize=4)
def _wikitext2_halves() -> tuple[str, str, str]:
    """(calibration text, evaluation text, where they came from)."""
    root = shared_data_dir()
    raw = root / "wikitext2" / "wiki.test.raw" if root else None
    if raw is not None and raw.is_file():
        text = raw.read_text(encoding="utf-8")
        cut = text.index("\n", len(text) // 2) + 1
        where = f"{raw}: calibration from the first half, evaluation on the second half (disjoint)"
        return text[:cut], text[cut:], where
    try:
        from datasets import load_dataset

        train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as err:  # offline, or datasets cannot reach the hub
        raise FileNotFoundError(
            "No WikiText-2 source: put the reference data at ../shared/data/wikitext2/wiki.test.raw "
            "(or set TACQ_LITE_DATA to its folder), or go online so datasets.load_dataset("
            f"'wikitext', 'wikitext-2-raw-v1') can download it. ({type(err).__name__}: {err})"
        ) from None
    where = "Hugging Face wikitext-2-raw-v1: calibration from train, evaluation on test"
    return "".join(train["text"]), "".join(test["text"]), where


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a user's file; one that is not UTF-8 is a ValueError naming the file and the bad byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # read_text decodes the whole file at once: err.start is its byte offset
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "convert it with iconv -t utf-8 or pass a UTF-8 file.") from None


def _read_file(name: str) -> str:
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Text file {str(path)!r} does not exist; pass '{WIKITEXT2}' or an existing file.")
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"Text file {str(path)!r} is empty; pass a file with text in it.")
    return text


def describe_source(name: str) -> str:
    """One line saying where the text for `name` comes from (printed by the CLI)."""
    if name == WIKITEXT2:
        return _wikitext2_halves()[2]
    return f"{name} (whole file)"


def source_text(name: str, *, role: str) -> str:
    """Text for role 'calib' or 'eval': WikiText-2's disjoint halves, or a whole file."""
    if role not in ("calib", "eval"):
        raise ValueError(f"role must be 'calib' or 'eval', got {role!r}.")
    if name == WIKITEXT2:
        calib, evaluation, _ = _wikitext2_halves()
        return calib if role == "calib" else evaluation
    return _read_file(name)


@lru_cache(maxsize=8)
def _cached_tokens(tokenizer, name: str, role: str) -> torch.Tensor:
    return tokenize(tokenizer, source_text(name, role=role))


def calibration_windows(tokenizer, name: str = WIKITEXT2, *, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """LongTensor [n, seq_len]: windows at seeded random offsets of the calibration text."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"need n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}.")
    tokens = _cached_tokens(tokenizer, name, "calib")  # [T]
    if tokens.numel() <= seq_len:
        raise ValueError(
            f"The calibration text of {name!r} has {tokens.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}; lower --seq-len or use a longer text."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=gen)  # [n]
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_tokens(tokenizer, name: str = WIKITEXT2, *, max_tokens: int | None = None, seq_len: int) -> torch.Tensor:
    """LongTensor [T]: the evaluation stream, cut to a whole number of windows (<= max_tokens)."""
    tokens = _cached_tokens(tokenizer, name, "eval")
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise ValueError(f"max_tokens={max_tokens} is below one window of seq_len={seq_len}.")
        tokens = tokens[:max_tokens]
    if tokens.numel() < seq_len:
        raise ValueError(
            f"The evaluation text of {name!r} has {tokens.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}; lower --seq-len or use a longer text."
        )
    return tokens[: tokens.numel() // seq_len * seq_len]
