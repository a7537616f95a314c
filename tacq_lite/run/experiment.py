"""The experiment layer: what one run does, in order. Load, calibrate, quantize, (save), evaluate,
and return the JSON record; or load a saved model and evaluate it.

    from tacq_lite.run.experiment import run_quantize
    record = run_quantize(QuantConfig(method="tacq", evals=("wikitext2",)))

The CLI (`tacq-lite quantize` / `eval`), the notebooks and `bench/bench_quality.py` all call these
functions; every check that can fail runs before the expensive part (the model load, the
quantization). The record holds the whole config, every metric, the bits accounting, seconds
per stage and the peak resident memory.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..core.bits import BitsReport
from ..eval.lm import ReferenceLogprobs
from ..io import check_output_dir
from ..model import placement
from ..model.checkpoint import DEFAULT_SHARD_SIZE
from .parallel import trim_heap

RECORD_VERSION = 1
TASK_EVALS = ("mmlu", "gsm8k", "synthetic")
EVALS = ("wikitext2",) + TASK_EVALS
HARNESS_PREFIX = "lm-eval:"  # "lm-eval:<task>": an lm-evaluation-harness task or group (eval/harness.py)

logger = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    config: QuantConfig
    bits: BitsReport  # average bits per targeted weight
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    layer_loss: dict[str, float] = field(default_factory=dict)  # linear -> GPTQ objective (GPTQ, TaCQ)
    n_kept: dict[str, int] = field(default_factory=dict)  # linear -> number of kept weights (TaCQ)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> bool [rows, cols] (TaCQ)
    info: dict = field(default_factory=dict)  # TaCQ: cache hits, backward passes, seconds per sample
    # linear -> (scale, zero), each fp32 [rows, n_groups]: the grid the weights were rounded to,
    # which `qlinear.QuantLinear.from_linear` needs to pack the codes.
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # linear -> uint8 codes [rows, cols] as the quantizer chose them, packed as they are (1 byte per
    # weight held until the model is saved or the result dropped).
    codes: dict[str, torch.Tensor] = field(default_factory=dict)


def quantize_model(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    samples=None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize `model` in place with config.method; windows: LongTensor [n, seq_len] (GPTQ's data).

    samples: TaCQ's gradient samples, (input_ids [T], loss_mask [T]) pairs for task data
    (`calibration.task_calibration`); None = the windows, loss on every token.
    """
    from .passes import bits_report, gptq_quantize, rtn_quantize
    from .tacq import tacq_quantize

    start = time.perf_counter()
    if config.method == "rtn":
        out = rtn_quantize(model, config)
        return QuantizeResult(config, bits_report(model, config), {"quantize": time.perf_counter() - start},
                              grids=out.grids, codes=out.codes)
    if config.method == "gptq":
        out = gptq_quantize(model, windows, config, progress=progress,
                            device=placement.compute_device(model, config.device, config.device_map))
        return QuantizeResult(config, bits_report(model, config), {"gptq": time.perf_counter() - start},
                              layer_loss=out.loss, grids=out.grids, codes=out.codes)
    if config.method == "tacq":
        out = tacq_quantize(model, windows, config, samples=samples, progress=progress)
        return QuantizeResult(config, bits_report(model, config, n_kept=out.n_kept), out.seconds,
                              layer_loss=out.layer_loss, n_kept=out.n_kept, masks=out.masks, info=out.info,
                              grids=out.grids, codes=out.codes)
    raise ValueError(f"quantize_model quantizes; method={config.method!r} is not one of rtn, gptq, tacq.")


def compute_placement(config: QuantConfig) -> tuple[torch.device | None, torch.dtype]:
    """(compute device, model dtype) for config, checked on this machine: a missing GPU, a GPU index
    beyond the machine's (also in a device_map) or float16 on the CPU is a ValueError before anything
    is loaded. With config.device_map the compute device is None: each layer computes where the map
    puts it, and nothing is onloaded or moved (model/placement.py)."""
    dtype = placement.resolve_dtype(config.dtype)
    if config.device_map is not None:
        for device in placement.map_devices(placement.resolve_device_map(config.device_map)):
            placement.check_dtype_on(dtype, device)
        return None, dtype
    device = placement.resolve_device(config.device)
    placement.check_dtype_on(dtype, device)
    return device, dtype


def check_memory(config: QuantConfig, device: torch.device | None) -> None:
    """Before loading: a ValueError naming the stage and what to change when the byte budget
    (run/budget.py) says the run cannot fit this machine's free memory. A model whose config
    cannot be read without loading it is not checked here, nor a run with a device_map (device
    None), whose per-device peaks the budget does not price."""
    from . import budget
    from .tacq import uses_gradient_worker

    if config.method not in ("gptq", "tacq") or device is None:
        return
    try:
        shape = budget.model_shape("smollm2-135m" if config.model == "embedded" else config.model)
    except ValueError:
        return
    n_eval = sum(config.eval_tokens // config.seq_len for e in config.evals if is_perplexity(e)) if config.kl else 0
    worker = config.method == "tacq" and uses_gradient_worker(config, device)
    bud = budget.budget(shape, dtype=config.dtype, device=device.type, grad_dtype=config.grad_dtype,
                        accum_device=config.accum_device, checkpointing=config.checkpointing, n_calib=config.n_calib,
                        seq_len=config.seq_len, n_eval=n_eval, method=config.method, worker=worker)
    free = torch.cuda.mem_get_info(device)[0] + budget.CUDA_CONTEXT_BYTES if device.type == "cuda" else None
    budget.check_fits(bud, device_bytes=free)  # the GPU the run will use, not the current one


def environment(device: torch.device | None, model: nn.Module | None = None) -> dict:
    """What a record needs to be reproduced: library versions, git commit, device, threads, command.

    device None (a device_map run): the devices holding `model`'s weights, the first as "device" and
    each under "devices" (with its peak memory on a GPU)."""
    import platform
    import shlex
    import subprocess
    import sys
    from importlib import metadata

    from ..io import PACKAGE_ROOT

    versions = {"python": platform.python_version()}
    for lib in ("torch", "transformers", "triton", "accelerate", "datasets", "lm_eval", "tacq_lite"):
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    commit = None
    if (PACKAGE_ROOT / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
            commit = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    devices = [device] if device is not None else placement.model_devices(model)
    extra = {"devices": [placement.device_info(d) for d in devices]} if device is None else {}
    return {"versions": versions, "git_commit": commit, **placement.device_info(devices[0]), **extra,
            "command": shlex.join(sys.argv)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_model(model, config: QuantConfig) -> None:
    """Fail right after loading, before any long work: damaged weights, windows beyond the context."""
    from ..model.loading import check_finite_weights, context_length

    check_finite_weights(model)
    limit = context_length(model)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"--seq-len {config.seq_len} is longer than the model's context ({limit} tokens); "
                         f"pass --seq-len {min(limit, 512)} or less.")


def is_perplexity(name: str) -> bool:
    """An eval name that is a perplexity set (WikiText-2 or a text file), not a task benchmark."""
    return name not in TASK_EVALS and not name.startswith(HARNESS_PREFIX)


def check_evals(evals) -> None:
    """Fail before any long work on an eval name that is neither known nor an existing file, and on an
    lm-eval task that does not exist or cannot read its data offline."""
    for name in evals:
        if name.startswith(HARNESS_PREFIX):
            from ..eval.harness import check_task

            check_task(name[len(HARNESS_PREFIX):])
        elif name not in EVALS and not Path(name).expanduser().is_file():
            raise ValueError(f"--eval {name!r} is neither one of {', '.join(EVALS)}, {HARNESS_PREFIX}<task> nor an "
                             "existing text file.")


def perplexity_streams(tok, config: QuantConfig) -> dict:
    """{name: token stream} for the perplexity sets in config.evals (read before any long work)."""
    from ..data import corpus

    return {name: corpus.eval_tokens(tok, name, max_tokens=config.eval_tokens, seq_len=config.seq_len)
            for name in config.evals if is_perplexity(name)}


def run_evals(model, tok, config: QuantConfig, *, reference=None, streams=None, progress: bool = True,
              log=None) -> tuple[dict, dict]:
    """Every evaluation in config.evals; returns (metrics {eval: {...}}, seconds {eval_<name>: s}).

    reference (for KL): the full-precision model, or {perplexity set: its ReferenceLogprobs}.
    log: where status lines go; None = this module's logger at INFO (route or silence it with `logging`)."""
    from ..data import corpus
    from ..eval.lm import evaluate_lm

    log = log or logger.info
    check_evals(config.evals)
    metrics, seconds = {}, {}
    for name in config.evals:
        t = time.perf_counter()
        if name == "mmlu":
            from ..eval.mmlu_gsm8k import mmlu_eval

            r = mmlu_eval(model, tok, subjects=list(config.mmlu_subjects) or None, max_per_subject=config.mmlu_limit,
                          progress=progress)
            metrics[name] = {"accuracy": r.overall, "letter_nll": r.letter_nll, "categories": r.categories,
                             "subjects": r.subjects, "n": sum(r.counts.values()),
                             "item_right": r.item_right, "item_nll": r.item_nll}
        elif name == "gsm8k":
            from ..eval.mmlu_gsm8k import gsm8k_eval

            r = gsm8k_eval(model, tok, limit=config.gsm8k_limit, max_new_tokens=config.gsm8k_max_new_tokens,
                           generate=config.gsm8k_generate, progress=progress)
            metrics[name] = {"accuracy": r.accuracy, "nll": r.nll, "n": r.n, "protocol": r.protocol,
                             "item_nll": [g.nll for g in r.records],
                             "generations": [g.generation for g in r.records[:3]] if config.gsm8k_generate else []}
        elif name == "synthetic":
            from ..eval.synthetic import synthetic_eval

            r = synthetic_eval(model, tok, limit=config.synthetic_limit, progress=progress)
            metrics[name] = {"accuracy": sum(r.accuracy.values()) / len(r.accuracy),
                             "nll": sum(r.nll.values()) / len(r.nll), "tasks": r.accuracy, "task_nll": r.nll,
                             "chance": r.chance, "n": r.n,
                             "item_nll": [v for t in r.item_nll.values() for v in t],  # every item, task by task
                             "item_right": [v for t in r.item_right.values() for v in t]}
        elif name.startswith(HARNESS_PREFIX):
            from ..eval.harness import evaluate

            r = evaluate(model, tok, name[len(HARNESS_PREFIX):], limit=config.lm_eval_limit,
                         batch_size=config.lm_eval_batch_size)
            item_score = [s.score for docs in r.samples.values() for s in docs]  # task by task, doc_id order
            metrics[name] = {"metric": r.metric, "score": r.score, "scores": r.scores, "n": len(item_score),
                             "task_versions": r.versions, "n_shot": r.n_shot, "item_score": item_score}
        else:  # perplexity (+ KL) on WikiText-2's second half or a text file
            tokens = (streams if streams is not None else perplexity_streams(tok, config))[name]
            log(f"eval {name}: {tokens.numel()} tokens from "
                f"{corpus.describe_source(name) if name == corpus.WIKITEXT2 else name}")
            ref = reference.get(name) if isinstance(reference, dict) else reference
            m = evaluate_lm(model, tokens, seq_len=config.seq_len, reference=ref, progress=progress,
                            desc=f"eval {name}")
            metrics[name] = m._asdict()
        seconds[f"eval_{name}"] = time.perf_counter() - t
    return metrics, seconds


def run_quantize(config: QuantConfig, *, save: str | None = None, overwrite: bool = False,
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = True,
                 log=None) -> dict:
    """Load, calibrate, quantize, (save) and evaluate as `config` says; return the JSON record.

    log: where status lines go; None = this module's logger at INFO."""
    import torch

    from ..model.loading import load_model

    log = log or logger.info
    check_evals(config.evals)
    device, dtype = compute_placement(config)  # a GPU that is not there fails before anything is loaded
    check_memory(config, device)  # so does a run the byte budget says cannot fit
    if save is not None:
        from ..model.checkpoint import check_save_target, parse_size

        parse_size(max_shard_size)  # a bad size fails before the run, not after it
        if config.method == "fp":
            raise ValueError("--save stores a quantized model; --method fp has nothing to pack.")
        check_save_target(save, overwrite=overwrite)
        check_output_dir(Path(save).expanduser().parent, "--save")
    if config.cache_dir is not None and config.method == "tacq":
        check_output_dir(config.cache_dir, "--cache-dir")
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(config.model, dtype=dtype, device_map=config.device_map)
    check_model(model, config)
    seconds["load"] = time.perf_counter() - t
    # Check every perplexity source before any long work starts.
    streams = perplexity_streams(tok, config)
    references = {}
    try:
        if config.kl and streams and config.method != "fp":
            t = time.perf_counter()
            reference_logprobs(model, streams, config, device, into=references, progress=progress)
            seconds["reference"] = time.perf_counter() - t
            trim_heap()  # the reference passes' freed activations, before the quantization starts
        record = quantize_and_evaluate(model, tok, config, device, streams, references, seconds, save=save,
                                        overwrite=overwrite, max_shard_size=max_shard_size, progress=progress, log=log)
    finally:
        for r in references.values():
            r.close()
    return record


def reference_logprobs(model, streams: dict, config: QuantConfig, device: torch.device, *, into: dict,
                       progress: bool = True) -> None:
    """The full-precision model's log-probabilities on each perplexity stream, on disk, for KL.

    Put into `into` one stream at a time, so a caller's `finally` closes every one made before an error."""
    with placement.placed(model, device):
        for name, tokens in streams.items():
            into[name] = ReferenceLogprobs(model, tokens, seq_len=config.seq_len, progress=progress,
                                           desc=f"reference {name}")


def quantize_and_evaluate(model, tok, config, device, streams, references, seconds, *, save, overwrite,
                          max_shard_size, progress, log) -> dict:
    """Calibrate, quantize `model` in place, (save) and evaluate it: the record of one run_quantize
    (also one quantized row of `tacq-lite demo`). references: {perplexity set: ReferenceLogprobs} for KL."""
    from ..data import calibration, corpus
    from ..model.checkpoint import tensor_files
    from .passes import bits_report

    windows = samples = None
    if config.method in ("gptq", "tacq"):
        t = time.perf_counter()
        if calibration.is_task_calibration(config.calib):
            windows, samples = calibration.task_calibration(tok, config.calib, n=config.n_calib, seq_len=config.seq_len,
                                                            seed=config.seed)
            log(f"calibration: {len(samples)} {config.calib} prompt/answer samples (loss on answers) for gradients; "
                f"{windows.shape[0]} x {windows.shape[1]} tokens of the same data for GPTQ")
        else:
            windows = corpus.calibration_windows(tok, config.calib, n=config.n_calib, seq_len=config.seq_len,
                                                 seed=config.seed)
            log(f"calibration: {config.n_calib} x {config.seq_len} tokens from {corpus.describe_source(config.calib)}")
        seconds["calib_data"] = time.perf_counter() - t
    result = quantize_model(model, windows, config, samples=samples, progress=progress) \
        if config.method != "fp" else None
    if result is not None:
        seconds.update(result.seconds)
    report = result.bits if result is not None else bits_report(model, config)
    saved = None
    if save is not None:
        t = time.perf_counter()
        saved = save_packed(model, tok, result, save, overwrite=overwrite, max_shard_size=max_shard_size)
        seconds["save"] = time.perf_counter() - t
        on_disk = sum(saved["files"][name]["bytes"] for name in tensor_files(saved))  # every shard
        log(f"saved {save}: {on_disk / 2**20:.1f} MiB in {len(tensor_files(saved))} file(s), quantized linears "
            f"{saved['bytes']['bits_per_quantized_weight']:.3f} bits per weight on disk "
            f"(accounting: {report.avg_bits:.3f})")
    with placement.placed(model, device):
        metrics, eval_seconds = run_evals(model, tok, config, reference=references or None, streams=streams,
                                          progress=progress, log=log)
    seconds.update(eval_seconds)
    record = {
        "record_version": RECORD_VERSION,
        "config": config.to_dict(),
        "method": config.method,
        "bits": config.bits if config.method != "fp" else 16,
        "avg_bits": report.avg_bits,
        "n_weights": report.n_weights,
        "n_kept": report.n_kept,
        "other_params_16bit": report.other_params,
        "metrics": metrics,
        "seconds": seconds,
        "seconds_total": sum(seconds.values()),
        "peak_rss_mb": peak_rss_mb(),
        "environment": environment(device, model),
    }
    if config.device_map is not None:  # where the map put each module (transformers' hf_device_map)
        record["hf_device_map"] = placement.device_map_record(model)
    if references:
        record["reference_bytes_on_disk"] = sum(r.nbytes for r in references.values())
    if saved is not None:
        record["saved"] = {"path": str(save), "bytes": saved["bytes"], "files": saved["files"]}
    if result is not None and result.layer_loss:
        record["layer_loss"] = result.layer_loss
    if result is not None and result.n_kept:
        record["kept_per_layer"] = result.n_kept
    if result is not None and result.info:
        record["tacq"] = {k: v for k, v in result.info.items() if k != "files"}
    return record


def save_packed(model, tok, result, folder: str, *, overwrite: bool = False,
                max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict:
    """Pack the fake-quantized `model` into QuantLinears and save it; `model` comes back as it was.

    The linears are swapped for packed QuantLinears in place (each a few bits per weight) and
    swapped back after saving, so saving needs no second copy of the model."""
    from ..model import walk
    from ..model.checkpoint import save_quantized
    from ..model.qlinear import convert_model
    from .tacq import PerLinear

    cfg = result.config
    originals = walk.named_linears(model)  # swapped back after saving: no copy of the model is made

    def beside(parts: dict):  # a linear's grid and codes where its weight is, one linear at a time (device_map)
        return PerLinear([n for n in parts if n in originals],
                         lambda n: placement.to_device(parts[n], originals[n].weight.device))

    try:
        convert_model(model, beside(result.grids), bits=cfg.bits, groupsize=cfg.groupsize, masks=result.masks,
                      codes=beside(result.codes) if result.codes else None)
        info = {"config": cfg.to_dict(), "avg_bits": result.bits.avg_bits, "n_kept": result.bits.n_kept}
        return save_quantized(model, folder, tokenizer=tok, info=info, overwrite=overwrite,
                              max_shard_size=max_shard_size)
    finally:
        for name, linear in originals.items():
            walk.set_module(model, name, linear)


def run_eval(config: QuantConfig, *, load: str | None = None, prompts: tuple[str, ...] = (),
             max_new_tokens: int = 40, progress: bool = True, log=None) -> dict:
    """Evaluate (and generate from) a saved quantized model, or any model by name; the JSON record.

    prompts are generated from greedily, through the tokenizer's chat template as config.chat_template
    says (data.tokens.prompt_ids); each generation in the record says whether it was used.
    log: where status lines go; None = this module's logger at INFO."""
    from ..data.tokens import use_chat_template
    from ..model.loading import load_model

    check_evals(config.evals)
    device, dtype = compute_placement(config)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    meta = None
    if load is not None:
        from ..model.checkpoint import load_quantized

        if config.device_map is not None:
            raise ValueError("--device-map places a float model (--model) over devices; a saved quantized model "
                             "(--load) loads on the CPU: leave --device-map out, or use --device.")
        model, tok, meta = load_quantized(load)
        if tok is None:
            raise ValueError(f"{load} holds no tokenizer files; re-save it with a tokenizer.")
        source = meta.get("info", {}).get("config", {}).get("model", config.model)
    else:
        model, tok = load_model(config.model, dtype=dtype, device_map=config.device_map)
        source = None
    check_model(model, config)
    chat = use_chat_template(tok, config.chat_template) if prompts else False  # fails before any long work
    seconds["load"] = time.perf_counter() - t
    streams = perplexity_streams(tok, config)
    references = {}
    try:
        if config.kl and streams and source is not None:
            try:
                reference = load_model(source, dtype=dtype)[0]
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(f"KL needs the full-precision model the saved one came from ({source}), which "
                                 f"cannot be loaded: {err} Pass --no-kl to evaluate without it.") from None
            reference_logprobs(reference, streams, config, device, into=references, progress=progress)
            del reference  # only its log-probabilities, on disk, are needed
        with placement.placed(model, device):
            metrics, eval_seconds = run_evals(model, tok, config, reference=references or None, streams=streams,
                                              progress=progress, log=log)
            generations = generate_replies(model, tok, prompts, max_new_tokens, seconds, chat_template=chat)
    finally:
        for r in references.values():
            r.close()
    seconds.update(eval_seconds)
    info = (meta or {}).get("info", {})
    cfg = info.get("config", {})
    record = {
        "record_version": RECORD_VERSION,
        "config": {**config.to_dict(), **({"loaded": str(load), "quantized_with": cfg} if load else {})},
        "method": cfg.get("method", "fp") if load else "fp",
        "bits": cfg.get("bits", 16) if load else 16,
        "avg_bits": info.get("avg_bits", 16.0) if load else 16.0,
        "metrics": metrics,
        "generations": generations,
        "seconds": seconds,
        "seconds_total": sum(seconds.values()),
        "peak_rss_mb": peak_rss_mb(),
        "environment": environment(device, model),
    }
    if config.device_map is not None:
        record["hf_device_map"] = placement.device_map_record(model)
    if meta is not None:
        record["saved"] = {"path": str(load), "bytes": meta["bytes"], "files": meta["files"]}
    return record


def generate_replies(model, tok, prompts, max_new_tokens: int, seconds: dict, *, chat_template: bool) -> list[dict]:
    """One greedy completion per prompt, each as {"prompt", "chat_template", "generation"}; adds to
    seconds["generate"]."""
    from ..eval.continuation import greedy_generate

    generations = []
    for prompt in prompts:
        t = time.perf_counter()
        with torch.no_grad():
            text = greedy_generate(model, tok, prompt, max_new_tokens=max_new_tokens, chat_template=chat_template)
        seconds.setdefault("generate", 0.0)
        seconds["generate"] += time.perf_counter() - t
        generations.append({"prompt": prompt, "chat_template": chat_template, "generation": text})
    return generations


def format_table(records: list[dict]) -> str:
    """A plain-text table: method, bits, avg bits, one column per metric, KL, seconds."""
    cols: list[tuple[str, str, str]] = []  # (header, eval, key)
    for e in sorted({name for r in records for name in r["metrics"]}):
        if e in ("mmlu", "synthetic"):
            cols += [(f"{e} acc", e, "accuracy"), (f"{e} nll", e, "letter_nll" if e == "mmlu" else "nll")]
        elif e == "gsm8k":
            cols += [("gsm8k acc", e, "accuracy"), ("gsm8k nll", e, "nll")]
        elif e.startswith(HARNESS_PREFIX):  # lm-eval's headline metric, "acc" or "exact_match,strict-match"
            metric = next(r["metrics"][e]["metric"] for r in records if e in r["metrics"])
            cols.append((f"{e} {metric.removesuffix(',none')}", e, "score"))
        else:
            cols.append((f"ppl {e}", e, "ppl"))
    head = ["method", "bits", "avg bits"] + [c[0] for c in cols] + ["KL", "seconds"]

    def cell(r, e, k):
        m = r["metrics"].get(e, {})
        v = m.get(k)
        if v is None:
            return "-"
        if k != "ppl":
            return f"{v:.3f}"
        return f"{v:.2f}" if m.get("ppl_low") is None else f"{v:.2f} [{m['ppl_low']:.2f}, {m['ppl_high']:.2f}]"

    rows = []
    for r in records:
        kls = [m["kl"] for m in r["metrics"].values() if m.get("kl") is not None]
        rows.append(
            [r["method"], str(r["bits"]), f"{r['avg_bits']:.3f}"]
            + [cell(r, e, k) for _, e, k in cols]
            + [f"{sum(kls) / len(kls):.4f}" if kls else "-", f"{r['seconds_total']:.1f}"]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    notes = sorted({f"ppl {e}: [95 % bootstrap interval over windows], {m['n_windows']} windows × "
                    f"{m['n_tokens'] // m['n_windows']} predicted tokens = {m['n_tokens']} tokens"
                    for r in records for e, m in r["metrics"].items() if m.get("n_windows")})
    notes += sorted({f"{e}: {m['protocol']}" for r in records for e, m in r["metrics"].items() if m.get("protocol")})
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), *notes])
