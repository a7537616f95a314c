"""Task calibration: prompt/answer pairs from a task's calibration split, and how TaCQ and GPTQ
use them.

TaCQ's point is that the kept weights follow the task: its gradients come from the task's
data. `calibration_pairs` draws the pairs (MMLU dev + val questions, GSM8K train solutions, the
synthetic suite's calibration items, or a user's JSONL), and `task_calibration` turns them into
(windows for GPTQ's Hessians, (input_ids, loss_mask) samples with the loss on the answer tokens
only, for the gradients). Plain text (`--calib wikitext2` or a text file) goes through
`corpus.calibration_windows` instead; `is_task_calibration` tells the two apart.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from . import tasks
from .synthetic import TASKS, synthetic_samples
from .tokens import split_ids


def is_task_calibration(name: str) -> bool:
    """Task data (prompt/answer pairs) rather than plain text: mmlu, gsm8k, synthetic[:<task>], *.jsonl."""
    return name in ("mmlu", "gsm8k", "synthetic") or name.startswith("synthetic:") or Path(name).suffix == ".jsonl"


def task_calibration(tokenizer, name: str, *, n: int, seq_len: int, seed: int = 0):
    """Calibration from task data: (windows LongTensor [m, seq_len], samples).

    samples: n (input_ids [T], loss_mask [T]) pairs for the gradient pass; the mask marks the
    answer tokens, so the loss (and TaCQ's G) is taken on answers only. windows: GPTQ's
    calibration, the same pairs (then further ones, while the pool lasts) joined end to end
    with the EOS token between them and cut into up to n windows of seq_len tokens.
    """
    if n < 1 or seq_len < 2:
        raise ValueError(f"need n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}.")
    pool = calibration_pairs(name, n=n + n * seq_len // 32, seed=seed)  # >= 32 tokens a pair fills the windows
    samples, stream = [], []
    eos = tokenizer.eos_token_id
    for i, pair in enumerate(pool):
        ids, start = split_ids(tokenizer, pair.prompt, pair.answer)
        if i < n:
            ids_t = torch.tensor(ids, dtype=torch.long)
            mask = torch.zeros_like(ids_t, dtype=torch.bool)
            mask[start:] = True
            samples.append((ids_t, mask))
        stream.extend(ids + ([eos] if eos is not None else []))
        if i + 1 >= n and len(stream) >= n * seq_len:
            break
    m = min(n, len(stream) // seq_len)
    if m == 0:
        raise ValueError(
            f"The calibration set {name!r} holds {len(stream)} tokens in all, fewer than one window of "
            f"seq_len={seq_len}; lower --seq-len."
        )
    windows = torch.tensor(stream[: m * seq_len], dtype=torch.long).reshape(m, seq_len)
    return windows, samples


def calibration_pairs(name: str, *, n: int, seed: int = 0) -> list[tasks.TaskSample]:
    """n (prompt, answer) pairs from the task's calibration split, drawn with `seed`.

    name: "mmlu" (dev+val questions, answer " X"), "gsm8k" (train question -> solution),
    "synthetic:<task>" (the generator's calibration seed, disjoint from its eval items),
    "synthetic" (the calibration items of every synthetic task, mixed), or
    a path to a JSONL file with "prompt" and "answer" fields.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}.")
    rng = random.Random(seed)
    if name == "mmlu":
        return tasks.mmlu_pairs(n, rng)
    if name == "gsm8k":
        return tasks.gsm8k_pairs(n, rng)
    if name == "synthetic":  # every synthetic task's calibration items, mixed
        pairs = [p for t in TASKS for p in synthetic_samples(t, split="calib")]
        return rng.sample(pairs, min(n, len(pairs)))
    if name.startswith("synthetic:"):
        pairs = synthetic_samples(name.split(":", 1)[1], split="calib")
        return rng.sample(pairs, min(n, len(pairs)))
    if Path(name).suffix == ".jsonl" or Path(name).is_file():
        if not Path(name).is_file():
            raise FileNotFoundError(f"Calibration file {name} does not exist.")
        pairs = tasks.read_pairs_jsonl(name)
        return rng.sample(pairs, min(n, len(pairs)))
    choices = ["mmlu", "gsm8k", "synthetic"] + [f"synthetic:{t}" for t in TASKS] + ["<path to a .jsonl with prompt/answer>"]
    raise ValueError(f"Unknown calibration task {name!r}; choose one of: {', '.join(choices)}.")
