"""The demo: full precision, GPTQ and TaCQ side by side on the same windows and the same prompt.

    from tacq_lite.run.demo import run_demo, format_demo
    print(format_demo(run_demo()))

One model is loaded once. Each quantized method works on its own deep copy of it, so the
full-precision model that the other rows and the KL reference come from is never quantized, and no
method is applied on top of another (GPTQ then TaCQ on the GPTQ weights would be a different
recipe). The full-precision log-probabilities for KL are computed once and read by every quantized
row, as `experiment.run_quantize` does for one. Each row is the record `run_quantize` would write for
that method, plus one greedy completion of the demo prompt.
"""
from __future__ import annotations

import copy
import logging
import textwrap
import time

import torch

from ..config import METHODS, QuantConfig
from ..model.checkpoint import DEFAULT_SHARD_SIZE
from . import experiment
from .parallel import trim_heap

# What `make demo` runs: 3 bits per channel, TaCQ keeping the paper's 0.35 %, and a CPU-sized
# calibration set (8 windows, no MSE range search): the three rows took 3 min 17 s on 2 idle cores with an
# empty score cache (2026-12-06), 18-28 min while other jobs held a load average of 3-7.
DEMO_CONFIG = QuantConfig(bits=3, ratio=0.0035, n_calib=8, mse=False, evals=("wikitext2",))
DEMO_METHODS = ("fp", "gptq", "tacq")
DEMO_PROMPT = "What is the capital of France?"
DEMO_MAX_NEW_TOKENS = 20

# One entry per column of the table: what it measures, and the notebook that teaches it.
HOW_TO_READ = (
    "ppl: perplexity on held-out WikiText-2 windows, lower is better, with its 95 % bootstrap interval over "
    "windows: intervals apart mean a clear difference; overlapping ones decide nothing by themselves, since every "
    "row reads the same windows and a paired comparison (eval.lm.paired_ppl_ratio) is sharper "
    "[00_setup, 06_evaluation]",
    "KL: mean KL(full precision || quantized) per predicted token, in nats: how far quantization moved the whole "
    "next-token distribution (0 = not at all; fp is the reference, so '-') [00_setup, 06_evaluation]",
    "avg bits: stored bits per decoder-linear weight, scales and zeros included; TaCQ adds a 16-bit value and a "
    "16-bit column index per kept weight [04_outlier_masking]",
    "gptq rounds column by column and moves each column's rounding error onto the columns not yet rounded "
    "[02_gptq]; tacq runs the same pass but keeps the weights with the highest |W|·|G|·|Q(W)−W| in 16-bit "
    "[03_contrastive_importance, 04_outlier_masking]",
    "seconds: wall time of each row's own stages; loading the model and the full-precision reference for KL are "
    "counted on the fp row",
)

logger = logging.getLogger(__name__)


def run_demo(config: QuantConfig = DEMO_CONFIG, *, methods: tuple[str, ...] = DEMO_METHODS,
             prompt: str = DEMO_PROMPT, max_new_tokens: int = DEMO_MAX_NEW_TOKENS, progress: bool = True,
             log=None) -> list[dict]:
    """One record per method, in `methods` order, on the same evaluation windows and the same prompt.

    config: everything but the method (each row is config.replace(method=m)); its seed seeds every row
    alike, so a row does not depend on the rows before it. The prompt is asked through the tokenizer's
    chat template as config.chat_template says (data.tokens.prompt_ids); each record's "generations"
    says whether it was. log: where status lines go; None = this module's logger at INFO."""
    from ..data.tokens import use_chat_template
    from ..model.loading import load_model

    log = log or logger.info
    if not methods or len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise ValueError(f"methods must be distinct names from {METHODS}, got {methods}.")
    configs = [config.replace(method=m) for m in methods]
    if not prompt.strip():
        raise ValueError("--prompt is empty; give the demo a question to answer.")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}.")
    experiment.check_evals(config.evals)  # every check that can fail runs before the model is loaded
    device, dtype = experiment.compute_placement(config)
    for c in configs:
        experiment.check_memory(c, device)
    if config.cache_dir is not None and "tacq" in methods:
        from ..io import check_output_dir

        check_output_dir(config.cache_dir, "--cache-dir")
    t = time.perf_counter()
    model, tok = load_model(config.model, dtype=dtype)
    experiment.check_model(model, config)
    chat = use_chat_template(tok, config.chat_template)
    streams = experiment.perplexity_streams(tok, config)  # the same windows for every row
    shared = {"load": time.perf_counter() - t}
    references = {}
    try:
        if config.kl and streams and set(methods) - {"fp"}:
            t = time.perf_counter()
            experiment.reference_logprobs(model, streams, config, device, into=references, progress=progress)
            shared["reference"] = time.perf_counter() - t
        records = []
        for i, c in enumerate(configs):
            log(f"demo: {c.method}" + (f", {c.bits} bits" if c.method != "fp" else ", full precision"))
            records.append(_demo_row(model, tok, c, device, streams, references, shared if i == 0 else {},
                                     prompt=prompt, max_new_tokens=max_new_tokens, chat_template=chat,
                                     progress=progress, log=log))
    finally:
        for r in references.values():
            r.close()
    return records


def _demo_row(model, tok, config: QuantConfig, device, streams, references, shared, *, prompt, max_new_tokens,
              chat_template, progress, log) -> dict:
    """The record of one method: full precision evaluates `model` itself, a quantized method a deep copy.
    shared: {stage: seconds} of the stages all rows used (load, KL reference), counted on this row."""
    from ..model import placement

    seconds = dict(shared)
    torch.manual_seed(config.seed)  # as run_quantize seeds before each run: rows do not depend on their order
    if config.method == "fp":
        subject, refs = model, {}  # KL of the reference against itself would be 0 by construction
    else:
        t = time.perf_counter()
        subject, refs = copy.deepcopy(model), references  # quantize_model works in place
        seconds["copy"] = time.perf_counter() - t
    record = experiment.quantize_and_evaluate(subject, tok, config, device, streams, refs, seconds, save=None,
                                              overwrite=False, max_shard_size=DEFAULT_SHARD_SIZE, progress=progress,
                                              log=log)
    with placement.placed(subject, device):
        record["generations"] = experiment.generate_replies(subject, tok, (prompt,), max_new_tokens, seconds,
                                                     chat_template=chat_template)
    for g in record["generations"]:
        g["max_new_tokens"] = max_new_tokens
    record["seconds"] = seconds
    record["seconds_total"] = sum(seconds.values())
    del subject
    trim_heap()  # the copy and the quantization's freed memory, before the next row
    return record


def format_completions(records: list[dict]) -> str:
    """The demo prompt once, then each method's greedy completion on one line labelled by method."""
    first = records[0]["generations"][0]
    how = "through the chat template" if first["chat_template"] else "as plain text"
    lines = [f"Greedy completion of {first['prompt']!r} ({how}, at most {first['max_new_tokens']} new tokens):"]
    width = max(len(r["method"]) for r in records)
    for r in records:
        text = " ".join(r["generations"][0]["generation"].split())  # one line, whatever the model wrote
        lines.append(f"  {r['method'].ljust(width)}  {text}")
    return "\n".join(lines)


def format_demo(records: list[dict], *, width: int = 100) -> str:
    """What `tacq-lite demo` prints: the side-by-side table, the completions and how to read them."""
    guide = ["How to read this (in brackets: the notebook in notebooks/ that explains it):"]
    guide += [textwrap.fill(entry, width, initial_indent="  ", subsequent_indent="    ") for entry in HOW_TO_READ]
    return "\n\n".join([experiment.format_table(records), format_completions(records), "\n".join(guide)])
