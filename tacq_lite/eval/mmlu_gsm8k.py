"""Task benchmarks for TaCQ: MMLU letter scoring and GSM8K generation + answer NLL.

The TaCQ paper (arXiv 2504.07389) reports MMLU 5-shot accuracy and GSM8K 8-shot
chain-of-thought exact match. MMLU is scored the way Hendrycks et al. (2021) do it: after
"Answer:" compare the next-token logits of the four letters " A", " B", " C", " D".
GSM8K greedily generates a solution and compares its final number with the reference.
Because accuracy on a small model moves in coarse steps, both also report a continuous
teacher-forced NLL (of the right letter, or of the reference solution).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import torch
from tqdm.auto import tqdm

from ..data import tasks
from ..data.tokens import encode
from .continuation import PrefixCache, greedy_generate, max_length, score_continuation, truncate_left

GSM8K_STOP = ("\n\nQuestion:", "Question:")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive integer (or None for all), got {value}.")


# --------------------------------------------------------------------------- MMLU

@dataclass
class MMLUResult:
    subjects: dict[str, float]  # subject -> accuracy
    categories: dict[str, float]  # STEM / humanities / social sciences / other -> accuracy (over questions)
    overall: float  # accuracy over all questions scored
    counts: dict[str, int]  # subject -> questions scored
    letter_nll: float  # mean -log p(correct letter | 4 letters): moves before accuracy does
    item_right: list[bool] = field(default_factory=list)  # [n] each question, subject by subject: for intervals
    item_nll: list[float] = field(default_factory=list)  # [n] each question's letter NLL
    item_choice: list[int] = field(default_factory=list)  # [n] each question's predicted letter, 0-3 (argmax)


def letter_token_ids(tok) -> list[int]:
    """Token ids of " A", " B", " C", " D" as they follow "Answer:" in the prompt."""
    base = encode(tok, "Answer:")
    ids = []
    for letter in tasks.LETTERS:
        full = encode(tok, f"Answer: {letter}")
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"The tokenizer does not write ' {letter}' after 'Answer:' as one token: {full}.")
        ids.append(full[-1])
    return ids


@torch.no_grad()
def mmlu_eval(model, tok, *, subjects=None, max_per_subject: int | None = None, shots: int = tasks.MMLU_SHOTS,
              split: str = "test", progress: bool = True) -> MMLUResult:
    """k-shot MMLU accuracy from the letter logits after "Answer:" (shots from each subject's dev)."""
    subjects = list(tasks.SUBJECTS if subjects is None else [subjects] if isinstance(subjects, str) else subjects)
    _check_positive("max_per_subject", max_per_subject)
    if not 0 <= shots <= tasks.MMLU_SHOTS:
        raise ValueError(f"shots must be in [0, {tasks.MMLU_SHOTS}] (the dev split holds 5), got {shots}.")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test' (dev holds the few-shot examples), got {split!r}.")
    letters = torch.tensor(letter_token_ids(tok))  # [4]
    work = [(s, tasks.load_mmlu(s, split)[:max_per_subject]) for s in subjects]
    correct: dict[str, list[bool]] = {}
    nll, choice = [], []
    bar = tqdm(total=sum(len(items) for _, items in work), desc="MMLU", disable=not progress)
    for subject, items in work:
        dev = tasks.load_mmlu(subject, "dev")[:shots]
        cache = PrefixCache(model, encode(tok, tasks.mmlu_prefix(subject, dev), special=True))
        correct[subject] = []
        for item in items:
            ids = encode(tok, tasks.mmlu_prompt(subject, item, dev), special=True)
            ids, _ = truncate_left(ids, len(ids), max_length(model))
            logits, _ = cache.run(ids, len(ids) - 1)  # [1, vocab]
            cache.release()
            logp = torch.log_softmax(logits[0, letters.to(logits.device)], dim=-1)  # [4]
            truth = tasks.LETTERS.index(item.answer)
            choice.append(int(logp.argmax()))
            correct[subject].append(choice[-1] == truth)
            nll.append(-float(logp[truth]))
            bar.update()
    bar.close()
    return _mmlu_summary(correct, nll, choice)


def _mmlu_summary(correct: dict[str, list[bool]], nll: list[float], choice: list[int]) -> MMLUResult:
    def acc(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else float("nan")

    by_cat: dict[str, list[bool]] = {}
    for subject, flags in correct.items():
        by_cat.setdefault(tasks.SUBJECT_CATEGORY[subject], []).extend(flags)
    every = [f for flags in correct.values() for f in flags]
    return MMLUResult(
        subjects={s: acc(f) for s, f in correct.items()},
        categories={c: acc(by_cat[c]) for c in tasks.CATEGORIES if c in by_cat},
        overall=acc(every),
        counts={s: len(f) for s, f in correct.items()},
        letter_nll=sum(nll) / len(nll) if nll else float("nan"),
        item_right=every,
        item_nll=list(nll),
        item_choice=list(choice),
    )


# --------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"(?<![\w.])(-?)\$?\s?(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The final numeric answer in `text` as a canonical string ("1,234.50" -> "1234.5"), or None.

    Priority: the number after the last "####", else after the last "the answer is", else
    the last number anywhere. "$", thousands commas and a leading minus are understood.
    """
    for marker in (re.compile("####"), _ANSWER_IS):
        hits = list(marker.finditer(text))
        if hits:
            found = _NUMBER.search(text, hits[-1].end())
            if found:
                return _canonical(found)
    found = list(_NUMBER.finditer(text))
    return _canonical(found[-1]) if found else None


def _canonical(match: re.Match) -> str | None:
    sign = "-" if (match.group(1) or match.group(2)) else ""
    try:
        value = Decimal(sign + match.group(3).replace(",", ""))
    except InvalidOperation:
        return None
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def gsm8k_correct(prediction: str, reference: str) -> bool:
    """Exact match of final numbers; a prediction without a number is simply wrong."""
    pred, ref = extract_number(prediction), extract_number(reference)
    return pred is not None and pred == ref


@dataclass
class GSM8KRecord:
    question: str
    reference: str  # worked solution ending in "#### N"
    generation: str | None  # greedy output, cut at a stop string (None when generate=False)
    correct: bool | None
    nll: float  # mean token NLL of the reference solution


@dataclass
class GSM8KResult:
    accuracy: float | None  # exact match of final numbers; None when generate=False
    nll: float  # token-weighted mean NLL of the reference solutions (nats/token)
    n: int
    records: list[GSM8KRecord] = field(default_factory=list)
    protocol: str = ""  # how the accuracy was measured (gsm8k_protocol): not lm-eval's gsm8k_cot


def gsm8k_protocol(shots: int, max_new_tokens: int) -> str:
    """One line naming this evaluator's GSM8K protocol, for tables: lm-eval's `gsm8k_cot` prompts,
    stops and extracts differently (its Wei et al. exemplars, "Q:/A:", "The answer is N.")."""
    return (f"tacq_lite {shots}-shot: first {shots} train solutions (calculator notes removed), 'Question:/Answer:' "
            f"prompt, greedy <= {max_new_tokens} tokens stopped at 'Question:', final number after '####' or "
            "'the answer is' (else the last number); not lm-eval's gsm8k_cot")


def gsm8k_eval(model, tok, *, limit: int, shots: int = tasks.GSM8K_SHOTS, max_new_tokens: int = 256,
               generate: bool = True, split: str = "test", progress: bool = True) -> GSM8KResult:
    """k-shot chain-of-thought GSM8K on the first `limit` questions of `split`."""
    _check_positive("limit", limit)
    _check_positive("max_new_tokens", max_new_tokens)
    if split == "train":
        raise ValueError("The few-shot examples come from train; evaluate on 'test'.")
    examples = tasks.gsm8k_shots(shots)
    cache = PrefixCache(model, encode(tok, tasks.gsm8k_prefix(examples), special=True))
    records, nll_sum, n_tokens = [], 0.0, 0
    for item in tqdm(tasks.load_gsm8k(split)[:limit], desc="GSM8K", disable=not progress):
        prompt, reference = tasks.gsm8k_prompt(item.question, examples), " " + tasks.clean_solution(item.answer)
        score = score_continuation(model, tok, prompt, reference, cache=cache)
        nll_sum, n_tokens = nll_sum + float(score.token_nll.sum()), n_tokens + len(score.token_nll)
        generation = correct = None
        if generate:
            generation = greedy_generate(model, tok, prompt, max_new_tokens=max_new_tokens,
                                         stop_strings=GSM8K_STOP, cache=cache)
            correct = gsm8k_correct(generation, item.answer)
        records.append(GSM8KRecord(item.question, item.answer, generation, correct, float(score.token_nll.mean())))
    accuracy = sum(r.correct for r in records) / len(records) if generate else None
    return GSM8KResult(accuracy, nll_sum / n_tokens, len(records), records, gsm8k_protocol(shots, max_new_tokens))
