"""lm-evaluation-harness as an evaluator: a tacq_lite model scored by lm-eval's own task code.

EleutherAI's lm-evaluation-harness (Gao et al., 2024, `lm_eval` 0.4) is the common yardstick for
LLM benchmarks. `evaluate` hands an in-memory model and its tokenizer to lm-eval's `HFLM` wrapper
and runs one lm-eval task or group on it, so the number is lm-eval's number, and keeps each
document's prediction. The folder `harness_tasks/` beside this file holds lm-eval task configs
that read the shared reference data (`../shared/data`, see `data.corpus.shared_data_dir`) offline:

    tacq_mmlu_<subject>, tacq_mmlu   lm-eval's `mmlu` prompt and scoring on the MMLU CSVs
    tacq_gsm8k_cot                   lm-eval's `gsm8k_cot` on gsm8k/test.jsonl

Any task lm-eval ships runs too where the Hugging Face datasets it reads are already cached.
lm_eval is imported inside the functions: importing it takes seconds.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..data import tasks
from ..data.corpus import shared_data_dir

TASKS_DIR = Path(__file__).with_name("harness_tasks")  # project task YAMLs (shipped as package data)
MMLU_TASK = "tacq_mmlu"  # the group; one task per subject is f"{MMLU_TASK}_{subject}"
GSM8K_TASK = "tacq_gsm8k_cot"
DEFAULT_BATCH_SIZE = 1  # HFLM pads a batch to its longest sequence; on a CPU one at a time is as fast


class HarnessSample(NamedTuple):
    doc_id: int  # index of the document in the task's evaluation split
    target: int | str  # right choice index (multiple choice) or reference text
    prediction: int | str  # argmax choice index (multiple choice) or the filtered generation
    score: float  # the headline metric on this document (e.g. acc: 0.0 / 1.0)


@dataclass
class HarnessResult:
    task: str  # the task or group asked for
    metric: str  # headline metric as lm-eval keys it, "acc,none" or "exact_match,strict-match"
    score: float  # its value for `task` (a group: lm-eval's aggregate over its tasks)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task or group -> lm-eval's metrics
    samples: dict[str, list[HarnessSample]] = field(default_factory=dict)  # task -> [n docs], doc_id order
    versions: dict[str, float | str | None] = field(default_factory=dict)  # task -> its config's version
    n_shot: dict[str, int | None] = field(default_factory=dict)  # task -> few-shot examples in each prompt


# --------------------------------------------------------------------------- offline data (YAML `!function`s)

def _offline_problem(task: str, files: str) -> str:
    where = shared_data_dir() or "../shared/data (beside the project)"
    return (f"lm-eval task {task!r} reads {files} offline and they are not in {where}; provide them there "
            "(layout of shared/data/README.md) or set TACQ_LITE_DATA to a folder holding them.")


def _mmlu_split(subject: str, split: str) -> list[tasks.MMLUItem]:
    root = shared_data_dir()
    needed = f"mmlu/{split}/{subject}_{split}.csv"
    if root is None or not (root / "mmlu").is_dir():  # tasks.load_mmlu would go to the hub instead
        raise ValueError(_offline_problem(f"{MMLU_TASK}_{subject}", needed))
    try:
        return tasks.load_mmlu(subject, split)
    except FileNotFoundError:
        raise ValueError(_offline_problem(f"{MMLU_TASK}_{subject}", needed)) from None


def mmlu_dataset(*, subject: str, **metadata):
    """One subject's dev and test splits in the schema of the hub's `cais/mmlu` (answer: index 0-3).

    lm-eval calls this with the task's `dataset_kwargs` and its metadata, which is not needed here."""
    import datasets

    def rows(split: str) -> dict[str, list]:
        items = _mmlu_split(subject, split)
        return {"question": [it.question for it in items], "subject": [subject] * len(items),
                "choices": [list(it.choices) for it in items],
                "answer": [tasks.LETTERS.index(it.answer) for it in items]}

    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows(split)) for split in ("dev", "test")})


def gsm8k_dataset(**metadata):
    """GSM8K's test split, {"question", "answer"} as on the hub's `openai/gsm8k` (lm-eval's metadata unused)."""
    import datasets

    root = shared_data_dir()
    if root is None or not (root / "gsm8k").is_dir():
        raise ValueError(_offline_problem(GSM8K_TASK, "gsm8k/test.jsonl"))
    try:
        items = tasks.load_gsm8k("test")
    except FileNotFoundError:
        raise ValueError(_offline_problem(GSM8K_TASK, "gsm8k/test.jsonl")) from None
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"question": [it.question for it in items], "answer": [it.answer for it in items]})})


def gsm8k_cot_exemplars() -> list[dict]:
    """The 8 worked examples of lm-eval's `gsm8k_cot` (Wei et al., 2022), read from the installed lm-eval."""
    import yaml
    from lm_eval import tasks as lm_tasks

    config = yaml.safe_load((Path(lm_tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml").read_text())
    return config["fewshot_config"]["samples"]


# --------------------------------------------------------------------------- task names

def project_tasks() -> tuple[str, ...]:
    """The task and group names defined in harness_tasks/ (one YAML file each, named after it)."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def _task_manager(task: str):
    """lm-eval's TaskManager over the project's tasks, plus lm-eval's own when `task` is not one of them."""
    return _indexed_tasks(task not in project_tasks())


@lru_cache(maxsize=2)
def _indexed_tasks(with_lm_eval_tasks: bool):
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's ~15,000 task YAMLs takes about 12 s on 2 CPU cores: once per process.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_lm_eval_tasks)


def check_task(task: str) -> None:
    """Fail fast, before a model is loaded: an unknown task name, or data it cannot read offline."""
    if not task.strip():
        raise ValueError(f"name an lm-eval task, e.g. {MMLU_TASK}_astronomy, {GSM8K_TASK} or any task lm-eval lists.")
    if task == MMLU_TASK or task.startswith(f"{MMLU_TASK}_"):
        subjects = tasks.SUBJECTS if task == MMLU_TASK else [task[len(MMLU_TASK) + 1:]]
        if subjects[0] not in tasks.SUBJECTS:
            raise ValueError(f"lm-eval task {task!r} is unknown: tacq_mmlu_<subject> takes one of the 57 MMLU "
                             f"subjects, e.g. {MMLU_TASK}_abstract_algebra.")
        for subject in subjects:
            for split in ("dev", "test"):
                _mmlu_split(subject, split)
        return
    if task == GSM8K_TASK:
        gsm8k_dataset()
        return
    manager = _task_manager(task)
    if task not in manager.all_tasks:
        close = difflib.get_close_matches(task, manager.all_tasks, n=3, cutoff=0.8)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"lm-eval has no task {task!r}; {hint}list them with `lm-eval ls tasks`, or use "
                         f"{MMLU_TASK}_<subject>, {MMLU_TASK} or {GSM8K_TASK} (shared data, offline).")
    entry = manager.task_index[task]
    if entry.kind.name == "TAG" or (entry.kind.name == "GROUP" and not (entry.cfg or {}).get("aggregate_metric_list")):
        members = sorted(n for n, e in manager.task_index.items() if task in (e.tags or []))
        listed = f" ({', '.join(members[:5])}{', ...' if len(members) > 5 else ''})" if members else ""
        raise ValueError(f"lm-eval's {task!r} is a {entry.kind.name.lower()} without one overall score; evaluate "
                         f"its tasks one by one{listed}: --eval lm-eval:<task> for each.")
    try:
        manager.load([task])  # builds the task, which reads its data
    except Exception as err:  # datasets' ConnectionError / FileNotFoundError, or whatever the task raises
        cfg = manager.task_index[task].cfg or {}  # a group's config names no dataset
        source = "its data"
        if cfg.get("dataset_path"):
            source = f"the Hugging Face dataset {cfg['dataset_path']!r}"
            source += f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
        raise ValueError(f"lm-eval task {task!r} could not read {source} offline ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); run it once with internet so "
                         f"`datasets` caches it, or use {MMLU_TASK}_<subject> / {GSM8K_TASK}, which read "
                         "../shared/data.") from None


# --------------------------------------------------------------------------- evaluation

def evaluate(model, tok, task: str, *, limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             num_fewshot: int | None = None) -> HarnessResult:
    """Run lm-eval's `task` (a task or group name) on an in-memory causal LM and its tokenizer.

    limit: the first `limit` documents of each task (lm-eval's --limit); num_fewshot: None = the task's own.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=[task], task_manager=_task_manager(task), limit=limit,
                          num_fewshot=num_fewshot, log_samples=True, random_seed=None, numpy_random_seed=None,
                          torch_random_seed=None)  # leave the caller's random state alone
    results = out["results"]
    scores = {name: {k: v if isinstance(v, int) else float(v) for k, v in m.items() if isinstance(v, (int, float))}
              for name, m in results.items()}  # numpy floats -> float, for JSON
    # "metric,filter" keys in the order of the task's metric_list and filter_list: the headline comes first
    metric = next(k for k in scores[task] if "," in k and "_stderr," not in k)
    samples = {name: _samples(docs, out["configs"][name], metric) for name, docs in out["samples"].items()}
    return HarnessResult(task=task, metric=metric, score=float(scores[task][metric]), scores=scores, samples=samples,
                         versions=dict(out.get("versions", {})), n_shot=dict(out.get("n-shot", {})))


def _samples(docs: list[dict], config: dict, metric: str) -> list[HarnessSample]:
    """One HarnessSample per document, under the filter the headline metric names ("acc,none")."""
    name, _, filter_name = metric.partition(",")
    picked = []
    for d in sorted((d for d in docs if d.get("filter", "none") == filter_name), key=lambda d: d["doc_id"]):
        resps = d["filtered_resps"]
        if config.get("output_type") == "multiple_choice":  # [(loglikelihood, is_greedy)] per choice
            lls = [float(r[0]) for r in resps]
            prediction = max(range(len(lls)), key=lls.__getitem__)
        else:
            prediction = resps[0] if isinstance(resps, list) else resps
        value = d.get(name)  # a number, or a tuple for corpus-level metrics (perplexity, BLEU): no per-document score
        score = float(value) if isinstance(value, (int, float)) else float("nan")
        picked.append(HarnessSample(int(d["doc_id"]), d["target"], prediction, score))
    return picked
