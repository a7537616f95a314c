"""Scoring a model on the synthetic tasks of data/synthetic.py.

Open tasks count an item right when greedy decoding writes exactly the answer and then a newline
(checked in one teacher-forced pass); choice tasks compare the options' log-likelihoods. Both
also report the answer's mean token NLL, which moves continuously.

    python -m tacq_lite.eval.synthetic --out data/synthetic          # write the JSONL files
    python -m tacq_lite.eval.synthetic --eval [--limit 20]           # score the embedded model
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.synthetic import TASKS, check_task, synthetic_prefix, synthetic_samples, write_jsonl
from ..data.tokens import encode
from ..model.loading import load_model
from .continuation import PrefixCache, score_continuation


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
        check_task(name)
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
        model, tok = load_model(args.model)
        print(synthetic_eval(model, tok, limit=args.limit).table())


if __name__ == "__main__":
    main()
