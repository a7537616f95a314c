"""Task data for TaCQ: loaders, prompt formats and calibration pairs.

TaCQ (Task-Circuit Quantization, arXiv 2504.07389) scores weights by how much they matter
for a *target task*, so calibration data is (prompt, answer) pairs from that task and the
saliency is the gradient of the answer's loss. This module reads MMLU (Hendrycks et al.,
2021) and GSM8K (Cobbe et al., 2021), writes their standard few-shot prompts (MMLU 5-shot
from `dev`, GSM8K 8-shot chain-of-thought from `train`) and turns them into calibration
pairs. Calibration never touches an evaluation split: MMLU calibrates on dev/val, GSM8K on
train.
"""
from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import NamedTuple

from .corpus import read_utf8, shared_data_dir

LETTERS = ("A", "B", "C", "D")
MMLU_SPLITS = ("dev", "val", "test")
GSM8K_SPLITS = ("train", "test")
GSM8K_SHOTS = 8  # Wei et al. (2022) chain-of-thought evaluation uses 8 exemplars
MMLU_SHOTS = 5  # Hendrycks et al. (2021): the 5 dev questions of each subject
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, "<<48/2=24>>"

# The four MMLU categories of Hendrycks et al.'s `categories.py` (subject -> subcategory ->
# category, flattened here). "other" is their "other (business, health, misc.)".
CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
}
SUBJECT_CATEGORY: dict[str, str] = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects}
SUBJECTS: tuple[str, ...] = tuple(sorted(SUBJECT_CATEGORY))  # all 57


class TaskSample(NamedTuple):
    prompt: str  # text the model reads
    answer: str  # text it should continue with (scored / teacher-forced)


class MMLUItem(NamedTuple):
    question: str
    choices: tuple[str, str, str, str]  # texts of options A, B, C, D
    answer: str  # "A" | "B" | "C" | "D"


class GSM8KItem(NamedTuple):
    question: str
    answer: str  # worked solution ending in "#### <number>"


# --------------------------------------------------------------------------- data folder

def _hub_fallback(dataset: str, config: str, split: str):
    """Rows from the Hugging Face hub when the local folder is missing."""
    try:
        from datasets import load_dataset

        return load_dataset(dataset, config, split=split)
    except Exception as err:  # offline, not installed, unknown config ...
        raise FileNotFoundError(
            f"No local copy of {dataset!r} ({config}, {split}) and the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Either point $TACQ_LITE_DATA at a folder holding "
            "mmlu/ and gsm8k/ (see shared/data/README.md), or run with internet so "
            f"`datasets.load_dataset({dataset!r}, {config!r})` can download it."
        ) from err


# --------------------------------------------------------------------------- MMLU

def _check_subject(subject: str) -> str:
    if subject not in SUBJECTS:
        raise ValueError(f"Unknown MMLU subject {subject!r}; choose one of: {', '.join(SUBJECTS)}.")
    return subject


def read_mmlu_csv(path: str | Path) -> list[MMLUItem]:
    """Rows `question, A, B, C, D, answer letter` (no header), validated."""
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}, row {row_no}: expected 6 columns (question, A, B, C, D, answer), "
                                 f"got {len(row)}.")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise ValueError(f"{path}, row {row_no}: answer must be one of A/B/C/D, got {row[5]!r}.")
            items.append(MMLUItem(row[0], tuple(row[1:5]), answer))
    return items


def load_mmlu(subject: str, split: str = "test") -> list[MMLUItem]:
    """One subject's split ("dev": 5 few-shot examples, "val", "test")."""
    _check_subject(subject)
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split must be one of {MMLU_SPLITS}, got {split!r}.")
    root = shared_data_dir()
    if root is not None and (root / "mmlu").is_dir():
        return read_mmlu_csv(root / "mmlu" / split / f"{subject}_{split}.csv")
    rows = _hub_fallback("cais/mmlu", subject, {"val": "validation"}.get(split, split))
    return [MMLUItem(r["question"], tuple(r["choices"]), LETTERS[r["answer"]]) for r in rows]


def format_mmlu_question(item: MMLUItem, *, with_answer: bool) -> str:
    """"Question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" (+ " X\\n\\n" for a worked example).

    The question is stripped of surrounding whitespace, as lm-eval's `mmlu` task writes it
    (`{{question.strip()}}`), so the two prompts are the same text (tests/test_harness.py)."""
    text = item.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, item.choices)) + "\nAnswer:"
    return text + f" {item.answer}\n\n" if with_answer else text


def mmlu_prefix(subject: str, shots: list[MMLUItem]) -> str:
    """Header and worked examples: the part of the prompt all of a subject's questions share."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_mmlu_question(s, with_answer=True) for s in shots)


def mmlu_prompt(subject: str, item: MMLUItem, shots: list[MMLUItem]) -> str:
    """The standard k-shot MMLU prompt (Hendrycks et al., 2021, `evaluate.py`), ending in "Answer:"."""
    return mmlu_prefix(subject, shots) + format_mmlu_question(item, with_answer=False)


# --------------------------------------------------------------------------- GSM8K

def read_gsm8k_jsonl(path: str | Path) -> list[GSM8KItem]:
    """Lines `{"question", "answer"}`, validated (the answer must hold "#### <number>")."""
    items = []
    for line_no, record in _read_jsonl(path, ("question", "answer")):
        if "####" not in record["answer"]:
            raise ValueError(f"{path}, line {line_no}: the answer has no final '#### <number>' line.")
        items.append(GSM8KItem(record["question"], record["answer"]))
    return items


def load_gsm8k(split: str = "test") -> list[GSM8KItem]:
    if split not in GSM8K_SPLITS:
        raise ValueError(f"GSM8K split must be one of {GSM8K_SPLITS}, got {split!r}.")
    root = shared_data_dir()
    if root is not None and (root / "gsm8k").is_dir():
        return read_gsm8k_jsonl(root / "gsm8k" / f"{split}.jsonl")
    return [GSM8KItem(r["question"], r["answer"]) for r in _hub_fallback("openai/gsm8k", "main", split)]


def gsm8k_shots(k: int = GSM8K_SHOTS, *, seed: int | None = None) -> list[GSM8KItem]:
    """k worked train examples: the first k (seed=None, the fixed default) or a seeded draw."""
    train = load_gsm8k("train")
    if not 0 <= k <= len(train):
        raise ValueError(f"shots must be in [0, {len(train)}], got {k}.")
    return train[:k] if seed is None else random.Random(seed).sample(train, k)


def clean_solution(answer: str) -> str:
    """Drop GSM8K's calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return _CALCULATOR.sub("", answer)


def gsm8k_prefix(shots: list[GSM8KItem]) -> str:
    """"Question: ..\\nAnswer: <solution ending in #### N>\\n\\n" for each worked example."""
    return "".join(f"Question: {s.question}\nAnswer: {clean_solution(s.answer)}\n\n" for s in shots)


def gsm8k_prompt(question: str, shots: list[GSM8KItem]) -> str:
    """The k-shot chain-of-thought prompt, ending in "Answer:" (shots' calculator notes removed)."""
    return gsm8k_prefix(shots) + f"Question: {question}\nAnswer:"


# --------------------------------------------------------------------------- calibration

def _read_jsonl(path: str | Path, fields: tuple[str, ...]):
    """Yield (line number, record) for non-blank lines, checking the required string fields."""
    for line_no, line in enumerate(read_utf8(path).split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_no}: not valid JSON ({err.msg}).") from err
        missing = [k for k in fields if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}, line {line_no}: missing string field(s) {missing}; "
                             f"each line needs {list(fields)}.")
        yield line_no, record


def read_pairs_jsonl(path: str | Path) -> list[TaskSample]:
    """A user's own task: JSONL lines with "prompt" and "answer" strings."""
    pairs = [TaskSample(r["prompt"], r["answer"]) for _, r in _read_jsonl(path, ("prompt", "answer"))]
    if not pairs:
        raise ValueError(f"{path} holds no prompt/answer lines.")
    return pairs


def mmlu_pairs(n: int, rng: random.Random) -> list[TaskSample]:
    # Questions come from dev + val of every subject, never from test. MMLU repeats 42
    # dev/val question texts in test, so test is read only to drop those (no leak).
    # Prompts are zero-shot to keep calibration sequences short (one backward each).
    in_test = {item.question for s in SUBJECTS for item in load_mmlu(s, "test")}
    pool = [(s, item) for s in SUBJECTS for split in ("dev", "val") for item in load_mmlu(s, split)
            if item.question not in in_test]
    picked = rng.sample(pool, min(n, len(pool)))
    return [TaskSample(mmlu_prompt(s, item, []), f" {item.answer}") for s, item in picked]


def gsm8k_pairs(n: int, rng: random.Random) -> list[TaskSample]:
    train = load_gsm8k("train")
    picked = rng.sample(train, min(n, len(train)))
    return [TaskSample(gsm8k_prompt(item.question, []), " " + clean_solution(item.answer)) for item in picked]
