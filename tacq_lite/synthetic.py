"""Small checkable tasks on which a 135M model is well above chance: a fast target for TaCQ.

TaCQ (arXiv 2504.07389) keeps the weights a *task* depends on in 16 bits, so its effect
shows on task accuracy. MMLU and GSM8K sit near chance (or zero) for SmolLM2-135M, where
quantization damage is hard to see; these tasks start high, so a drop is visible in
seconds on a CPU. Each task is a deterministic pool of unique (query, answer) items split
into few-shot examples, evaluation items and disjoint calibration items.

Scoring: open tasks count an item right when greedy decoding writes exactly the answer and
then a newline (checked in one teacher-forced pass); choice tasks compare the options'
log-likelihoods. Both also report the answer's mean token NLL, which moves continuously.

    python -m tacq_lite.synthetic --out data/synthetic          # write the JSONL files
    python -m tacq_lite.synthetic --eval [--limit 20]           # score the embedded model
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from tacq_lite.scoring import PrefixCache, encode, score_continuation
from tacq_lite.tasks import TaskSample

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

def _check_task(name: str) -> SyntheticTask:
    if name not in TASKS:
        raise ValueError(f"Unknown synthetic task {name!r}; choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def _split(name: str) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """(shared few-shot prefix, eval items, calibration items) of one task."""
    task = _check_task(name)
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
            path = out / f"{name}{suffix}"
            with open(path, "w", encoding="utf-8") as f:
                for s in synthetic_samples(name, split=split):
                    record = {"task": name, "prompt": s.prompt, "answer": s.answer}
                    if task.choices:
                        record["choices"] = list(task.choices)
                    f.write(json.dumps(record) + "\n")
            written.append(path)
    return written


# --------------------------------------------------------------------------- evaluation

@dataclass
class SyntheticResult:
    accuracy: dict[str, float]  # task -> fraction right
    nll: dict[str, float]  # task -> mean over items of the answer's mean token NLL (nats)
    n: dict[str, int]  # task -> items scored
    chance: dict[str, float]  # task -> blind-guess accuracy, for reference
    item_nll: dict[str, list[float]] = field(default_factory=dict)  # task -> [n] each item's answer NLL
    item_right: dict[str, list[bool]] = field(default_factory=dict)  # task -> [n] each item scored right

    def table(self) -> str:
        rows = [f"{'task':<10} {'acc':>6} {'chance':>7} {'nll':>6} {'n':>4}"]
        for t in self.accuracy:
            rows.append(f"{t:<10} {self.accuracy[t]:6.2f} {self.chance[t]:7.3f} {self.nll[t]:6.3f} {self.n[t]:4d}")
        return "\n".join(rows)


def is_stop(tok, token: int) -> bool:
    """Does greedy decoding end the answer here (a newline, or end-of-sequence)?"""
    return token == tok.eos_token_id or tok.decode([token]).startswith("\n")


@torch.no_grad()
def synthetic_eval(model, tok, *, tasks=None, limit: int | None = None, progress: bool = True) -> SyntheticResult:
    """Per-task accuracy and answer NLL on the first `limit` eval items of each task."""
    names = list(TASKS if tasks is None else [tasks] if isinstance(tasks, str) else tasks)
    for name in names:
        _check_task(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer (or None for all), got {limit}.")
    result = SyntheticResult({}, {}, {}, {})
    for name in names:
        task, samples = TASKS[name], synthetic_samples(name)[:limit]
        cache = PrefixCache(model, encode(tok, synthetic_prefix(name), special=True))
        rights, nlls = [], []
        for s in tqdm(samples, desc=name, disable=not progress):
            options = task.choices if task.choices else (s.answer,)
            scores = {c: score_continuation(model, tok, s.prompt, c, cache=cache) for c in options}
            score = scores[s.answer]
            nlls.append(float(score.token_nll.mean()))
            if task.choices:  # the option with the highest total log-likelihood wins
                rights.append(min(scores, key=lambda c: float(scores[c].token_nll.sum())) == s.answer)
            else:  # greedy decoding reproduces the answer, then stops at a newline
                rights.append(bool(score.greedy.all()) and is_stop(tok, score.next_token))
        result.accuracy[name], result.nll[name] = sum(rights) / len(samples), sum(nlls) / len(samples)
        result.item_nll[name], result.item_right[name] = nlls, rights
        result.n[name], result.chance[name] = len(samples), task.chance
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the JSONL files (e.g. data/synthetic)")
    parser.add_argument("--eval", action="store_true", help="score a model on every task")
    parser.add_argument("--model", default=None, help="model for --eval (default: the embedded SmolLM2-135M)")
    parser.add_argument("--limit", type=int, default=None, help="eval items per task (default: all)")
    args = parser.parse_args(argv)
    if not args.out and not args.eval:
        parser.error("give --out FOLDER and/or --eval")
    if args.out:
        for path in write_jsonl(args.out):
            print(path)
    if args.eval:
        from tacq_lite.models import load_model

        model, tok = load_model(args.model)
        print(synthetic_eval(model, tok, limit=args.limit).table())


if __name__ == "__main__":
    main()
