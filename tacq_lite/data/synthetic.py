"""Small checkable tasks on which a 135M model is well above chance: a fast target for TaCQ.

TaCQ (arXiv 2504.07389) keeps the weights a *task* depends on in 16 bits, so its effect
shows on task accuracy. MMLU and GSM8K sit near chance (or zero) for SmolLM2-135M, where
quantization damage is hard to see; these tasks start high, so a drop is visible in
seconds on a CPU. Each task is a deterministic pool of unique (query, answer) items split
into few-shot examples, evaluation items and disjoint calibration items.

The scoring is in eval/synthetic.py, which also writes the JSONL files of data/synthetic/:

    python -m tacq_lite.eval.synthetic --out data/synthetic          # write the JSONL files
    python -m tacq_lite.eval.synthetic --eval [--limit 20]           # score the embedded model
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, NamedTuple

from ..io import write_text_atomic
from .tasks import TaskSample

SHOTS = 5  # worked examples at the top of every prompt (one shared prefix per task)
N_EVAL = 50  # evaluation items per task
N_CALIB = 50  # calibration items per task (fewer when a pool is small), disjoint from eval


class SyntheticTask(NamedTuple):
    description: str  # what the task measures
    chance: float  # accuracy of a blind guess among plausible answers
    items: Callable[[random.Random], list[tuple[str, str]]]  # seeded pool of unique (query, answer)
    choices: tuple[str, ...] | None = None  # answer options for choice scoring; None = greedy match
    seed: int = 0


# --------------------------------------------------------------------------- item pools

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WORDS = ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "cup", "hat", "ball", "door",
         "key", "map", "pen", "star")
NOUNS = (("dog", "dogs"), ("key", "keys"), ("teacher", "teachers"), ("car", "cars"), ("girl", "girls"),
         ("boy", "boys"), ("house", "houses"), ("bird", "birds"), ("doctor", "doctors"), ("box", "boxes"))
PLACES = ("near", "behind", "next to", "under", "beside")


def _copy(rng: random.Random) -> list[tuple[str, str]]:
    codes = rng.sample(range(10_000), SHOTS + N_EVAL + N_CALIB)
    return [(f"Copy: {s} ->", f" {s}") for s in (" ".join(f"{c:04d}") for c in codes)]


def _count(rng: random.Random) -> list[tuple[str, str]]:
    pool = [(start, length) for start in range(1, 96) for length in (3, 4)]
    return [(", ".join(str(start + i) for i in range(length)) + " ->", f" {start + length}")
            for start, length in rng.sample(pool, len(pool))]


def _calendar(rng: random.Random) -> list[tuple[str, str]]:
    pool = [(names, start, length) for names in (DAYS, MONTHS) for start in range(len(names)) for length in range(1, 6)]
    rng.shuffle(pool)
    items = []
    for names, start, length in pool:
        given = [names[(start + i) % len(names)] for i in range(length)]
        items.append((", ".join(given) + " ->", " " + names[(start + length) % len(names)]))
    return items


def _add(rng: random.Random) -> list[tuple[str, str]]:
    pool = [(a, b) for a in range(10) for b in range(10)]
    return [(f"{a} + {b} =", f" {a + b}") for a, b in rng.sample(pool, len(pool))]


def _agreement(rng: random.Random) -> list[tuple[str, str]]:
    # The noun next to the verb (the "attractor") has the other number, so copying the
    # nearest noun's number gives the wrong verb (Linzen et al., 2016).
    pool = [(s, p, place, attractor) for s, p in NOUNS for place in PLACES for attractor in NOUNS if attractor[0] != s]
    picked = rng.sample(pool, SHOTS + N_EVAL + N_CALIB)
    return [(f"The {p if i % 2 else s} {place} the {a_s if i % 2 else a_p}", " are" if i % 2 else " is")
            for i, (s, p, place, (a_s, a_p)) in enumerate(picked)]  # alternate is/are: balanced shots


def _last_word(rng: random.Random) -> list[tuple[str, str]]:
    lists: dict[tuple[str, ...], None] = {}  # insertion-ordered set: the same order on every run
    while len(lists) < SHOTS + N_EVAL + N_CALIB:
        lists[tuple(rng.sample(WORDS, 4))] = None
    return [("List: " + " ".join(w) + ". Last word:", " " + w[-1]) for w in lists]


TASKS: dict[str, SyntheticTask] = {
    "copy": SyntheticTask("copy four digits (induction / copying)", 1e-4, _copy, seed=1),
    "count": SyntheticTask("next integer of a counting sequence", 0.01, _count, seed=2),
    "calendar": SyntheticTask("next day of the week or month of the year", 0.1, _calendar, seed=3),
    "add": SyntheticTask("single-digit addition", 1 / 19, _add, seed=4),
    "agreement": SyntheticTask("subject-verb agreement across an attractor noun (is/are)", 0.5, _agreement,
                               choices=(" is", " are"), seed=5),
    "last_word": SyntheticTask("last word of a four-word list", 0.25, _last_word, seed=6),
}


# --------------------------------------------------------------------------- samples

def check_task(name: str) -> SyntheticTask:
    if name not in TASKS:
        raise ValueError(f"Unknown synthetic task {name!r}; choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def _split(name: str) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """(shared few-shot prefix, eval items, calibration items) of one task."""
    task = check_task(name)
    pool = task.items(random.Random(task.seed))
    assert len(set(q for q, _ in pool)) == len(pool), f"{name}: duplicate queries"
    prefix = "".join(q + a + "\n" for q, a in pool[:SHOTS])
    return prefix, pool[SHOTS:SHOTS + N_EVAL], pool[SHOTS + N_EVAL:SHOTS + N_EVAL + N_CALIB]


def synthetic_prefix(name: str) -> str:
    return _split(name)[0]


def synthetic_samples(name: str, *, split: str = "eval") -> list[TaskSample]:
    """A task's prompts ("shots + query") and answers; split "eval" or "calib" (disjoint)."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}.")
    prefix, eval_items, calib_items = _split(name)
    return [TaskSample(prefix + q, a) for q, a in (eval_items if split == "eval" else calib_items)]


def write_jsonl(out: str | Path) -> list[Path]:
    """Write `<task>.jsonl` (eval) and `<task>.calib.jsonl` with prompt/answer(/choices) fields."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, task in TASKS.items():
        for split, suffix in (("eval", ".jsonl"), ("calib", ".calib.jsonl")):
            records = [{"task": name, "prompt": s.prompt, "answer": s.answer,
                        **({"choices": list(task.choices)} if task.choices else {})}
                       for s in synthetic_samples(name, split=split)]
            path = write_text_atomic(out / f"{name}{suffix}", "".join(json.dumps(r) + "\n" for r in records))
            written.append(path)
    return written
