"""`tacq-lite` command line: quantize a model, evaluate it, print a table, write a JSON record.

    tacq-lite quantize --method rtn --bits 4 --groupsize 64 --eval wikitext2 --json out.json
    tacq-lite quantize --method tacq --calib gsm8k --eval gsm8k --no-gsm8k-generate --save q3/
    tacq-lite eval --load q3/ --eval wikitext2 --prompt "The capital of France is"

Flags map one to one onto `QuantConfig` fields; the JSON record holds the whole config, every
metric, the bits accounting, seconds per stage and the peak resident memory.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .config import METHODS, QuantConfig
from .gptq import KEEP_VALUES
from .records import check_output_dir, check_output_file, write_json_atomic

RECORD_VERSION = 1
TASK_EVALS = ("mmlu", "gsm8k", "synthetic")
EVALS = ("wikitext2",) + TASK_EVALS


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--eval", dest="evals", action="append", default=[],
                   help=f"one of {', '.join(EVALS)} or a text file (perplexity); repeatable")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="token cap per perplexity set")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration / perplexity window")
    p.add_argument("--mmlu-subjects", type=_names, default=d.mmlu_subjects,
                   help="comma-separated MMLU subjects (default: all 57)")
    p.add_argument("--mmlu-limit", type=int, default=d.mmlu_limit, help="MMLU test questions per subject")
    p.add_argument("--gsm8k-limit", type=int, default=d.gsm8k_limit, help="GSM8K test questions")
    p.add_argument("--gsm8k-max-new-tokens", type=int, default=d.gsm8k_max_new_tokens)
    p.add_argument("--no-gsm8k-generate", dest="gsm8k_generate", action="store_false",
                   help="GSM8K answer NLL only, no generation (much faster on CPU)")
    p.add_argument("--synthetic-limit", type=int, default=d.synthetic_limit, help="items per synthetic task")
    p.add_argument("--no-kl", dest="kl", action="store_false", help="skip KL to full precision (saves memory)")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON record here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--model", default=d.model, help="'embedded' (default), a Hugging Face id, or a local folder")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--bits", type=int, default=d.bits, help="2, 3, 4 or 8")
    p.add_argument("--groupsize", type=int, default=d.groupsize, help="-1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--no-mse", dest="mse", action="store_false", help="plain min/max range, no MSE grid search")
    p.add_argument("--calib", default=d.calib,
                   help="'wikitext2' or a text file (all tokens scored); 'mmlu', 'gsm8k', 'synthetic:<task>' or a "
                        "JSONL with prompt/answer fields (TaCQ's gradients on answer tokens only)")
    p.add_argument("--n-calib", type=int, default=d.n_calib, help="calibration windows (task data: samples)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--blocksize", type=int, default=d.blocksize, help="GPTQ lazy-batch block size")
    p.add_argument("--percdamp", type=float, default=d.percdamp, help="GPTQ damping, fraction of mean diag(H)")
    p.add_argument("--actorder", action="store_true", help="GPTQ: quantize columns by decreasing diag(H)")
    p.add_argument("--selector", default=d.selector, help="TaCQ: score that picks the kept weights")
    p.add_argument("--ratio", type=float, default=d.ratio, help="TaCQ: fraction of weights kept in 16-bit")
    p.add_argument("--qw-method", default=d.qw_method, choices=("gptq", "rtn"), help="TaCQ: how Q(W) is made")
    p.add_argument("--keep-value", default=d.keep_value, choices=KEEP_VALUES,
                   help="TaCQ: what a kept weight stores: the value GPTQ's error compensation moved it to (as the "
                        "authors' code) or its original value")
    p.add_argument("--no-parallel", dest="parallel", action="store_false",
                   help="TaCQ: no forked worker; the backward passes run after the first GPTQ pass")
    p.add_argument("--cache-dir", default=None, help="score cache folder (default: the user cache)")
    p.add_argument("--save", default=None, help="save the quantized model here, packed (load it with `eval --load`)")
    p.add_argument("--overwrite", action="store_true", help="--save may replace a tacq_lite model saved there")
    _add_eval_args(p)


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    fields = QuantConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["evals"] = tuple(values.get("evals") or ())
    return QuantConfig(**values)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_model(model, config: QuantConfig) -> None:
    """Fail right after loading, before any long work: damaged weights, windows beyond the context."""
    from .models import check_finite_weights, context_length

    check_finite_weights(model)
    limit = context_length(model)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"--seq-len {config.seq_len} is longer than the model's context ({limit} tokens); "
                         f"pass --seq-len {min(limit, 512)} or less.")


def check_evals(evals) -> None:
    """Fail before any long work on an eval name that is neither known nor an existing file."""
    from pathlib import Path

    for name in evals:
        if name not in EVALS and not Path(name).expanduser().is_file():
            raise ValueError(f"--eval {name!r} is neither one of {', '.join(EVALS)} nor an existing text file.")


def perplexity_streams(tok, config: QuantConfig) -> dict:
    """{name: token stream} for the perplexity sets in config.evals (read before any long work)."""
    from . import data

    return {name: data.eval_tokens(tok, name, max_tokens=config.eval_tokens, seq_len=config.seq_len)
            for name in config.evals if name not in TASK_EVALS}


def run_evals(model, tok, config: QuantConfig, *, reference=None, streams=None, progress: bool = True,
              log=print) -> tuple[dict, dict]:
    """Every evaluation in config.evals; returns (metrics {eval: {...}}, seconds {eval_<name>: s})."""
    from . import data
    from .eval import evaluate_lm

    check_evals(config.evals)
    metrics, seconds = {}, {}
    for name in config.evals:
        t = time.perf_counter()
        if name == "mmlu":
            from .benchmarks import mmlu_eval

            r = mmlu_eval(model, tok, subjects=list(config.mmlu_subjects) or None, max_per_subject=config.mmlu_limit,
                          progress=progress)
            metrics[name] = {"accuracy": r.overall, "letter_nll": r.letter_nll, "categories": r.categories,
                             "subjects": r.subjects, "n": sum(r.counts.values()),
                             "item_right": r.item_right, "item_nll": r.item_nll}
        elif name == "gsm8k":
            from .benchmarks import gsm8k_eval

            r = gsm8k_eval(model, tok, limit=config.gsm8k_limit, max_new_tokens=config.gsm8k_max_new_tokens,
                           generate=config.gsm8k_generate, progress=progress)
            metrics[name] = {"accuracy": r.accuracy, "nll": r.nll, "n": r.n,
                             "item_nll": [g.nll for g in r.records],
                             "generations": [g.generation for g in r.records[:3]] if config.gsm8k_generate else []}
        elif name == "synthetic":
            from .synthetic import synthetic_eval

            r = synthetic_eval(model, tok, limit=config.synthetic_limit, progress=progress)
            metrics[name] = {"accuracy": sum(r.accuracy.values()) / len(r.accuracy),
                             "nll": sum(r.nll.values()) / len(r.nll), "tasks": r.accuracy, "task_nll": r.nll,
                             "chance": r.chance, "n": r.n,
                             "item_nll": [v for t in r.item_nll.values() for v in t],  # every item, task by task
                             "item_right": [v for t in r.item_right.values() for v in t]}
        else:  # perplexity (+ KL) on WikiText-2's second half or a text file
            tokens = (streams if streams is not None else perplexity_streams(tok, config))[name]
            log(f"eval {name}: {tokens.numel()} tokens from "
                f"{data.describe_source(name) if name == data.WIKITEXT2 else name}")
            m = evaluate_lm(model, tokens, seq_len=config.seq_len, reference=reference, progress=progress,
                            desc=f"eval {name}")
            metrics[name] = m._asdict()
        seconds[f"eval_{name}"] = time.perf_counter() - t
    return metrics, seconds


def run_quantize(config: QuantConfig, *, save: str | None = None, overwrite: bool = False, progress: bool = True,
                 log=print) -> dict:
    """Load, calibrate, quantize, (save) and evaluate as `config` says; return the JSON record."""
    import torch

    from . import data
    from .models import load_model
    from .pipeline import bits_report, float_copy, quantize_model

    check_evals(config.evals)
    if save is not None:
        from .qlinear import check_save_target

        if config.method == "fp":
            raise ValueError("--save stores a quantized model; --method fp has nothing to pack.")
        check_save_target(save, overwrite=overwrite)
        check_output_dir(Path(save).expanduser().parent, "--save")
    if config.cache_dir is not None and config.method == "tacq":
        check_output_dir(config.cache_dir, "--cache-dir")
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(config.model)
    check_model(model, config)
    seconds["load"] = time.perf_counter() - t
    # Check every perplexity source before any long work starts.
    streams = perplexity_streams(tok, config)
    reference = float_copy(model) if config.kl and streams and config.method != "fp" else None
    windows = samples = None
    if config.method in ("gptq", "tacq"):
        t = time.perf_counter()
        if data.is_task_calibration(config.calib):
            windows, samples = data.task_calibration(tok, config.calib, n=config.n_calib, seq_len=config.seq_len,
                                                     seed=config.seed)
            log(f"calibration: {len(samples)} {config.calib} prompt/answer samples (loss on answers) for gradients; "
                f"{windows.shape[0]} x {windows.shape[1]} tokens of the same data for GPTQ")
        else:
            windows = data.calibration_windows(tok, config.calib, n=config.n_calib, seq_len=config.seq_len,
                                               seed=config.seed)
            log(f"calibration: {config.n_calib} x {config.seq_len} tokens from {data.describe_source(config.calib)}")
        seconds["calib_data"] = time.perf_counter() - t
    result = quantize_model(model, windows, config, samples=samples, progress=progress) \
        if config.method != "fp" else None
    if result is not None:
        seconds.update(result.seconds)
    report = result.bits if result is not None else bits_report(model, config)
    saved = None
    if save is not None:
        t = time.perf_counter()
        saved = save_packed(model, tok, result, save, overwrite=overwrite)
        seconds["save"] = time.perf_counter() - t
        log(f"saved {save}: {saved['files']['model.safetensors']['bytes'] / 2**20:.1f} MiB, quantized linears "
            f"{saved['bytes']['bits_per_quantized_weight']:.3f} bits per weight on disk "
            f"(accounting: {report.avg_bits:.3f})")
    metrics, eval_seconds = run_evals(model, tok, config, reference=reference, streams=streams, progress=progress,
                                      log=log)
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
    }
    if saved is not None:
        record["saved"] = {"path": str(save), "bytes": saved["bytes"], "files": saved["files"]}
    if result is not None and result.layer_loss:
        record["layer_loss"] = result.layer_loss
    if result is not None and result.kept:
        record["kept_per_layer"] = result.kept
    if result is not None and result.info:
        record["tacq"] = {k: v for k, v in result.info.items() if k != "files"}
    return record


def save_packed(model, tok, result, folder: str, *, overwrite: bool = False) -> dict:
    """Pack a copy of the fake-quantized `model` into QuantLinears and save it; `model` is untouched."""
    import copy

    from .qlinear import convert_model, save_quantized

    cfg = result.config
    packed = convert_model(copy.deepcopy(model), result.grids, bits=cfg.bits, groupsize=cfg.groupsize,
                           masks=result.masks)
    info = {"config": cfg.to_dict(), "avg_bits": result.bits.avg_bits, "n_kept": result.bits.n_kept}
    meta = save_quantized(packed, folder, tokenizer=tok, info=info, overwrite=overwrite)
    del packed
    return meta


def run_eval(config: QuantConfig, *, load: str | None = None, prompts: tuple[str, ...] = (),
             max_new_tokens: int = 40, progress: bool = True, log=print) -> dict:
    """Evaluate (and generate from) a saved quantized model, or any model by name; the JSON record."""
    import torch

    from .models import load_model

    check_evals(config.evals)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    meta = None
    if load is not None:
        from .qlinear import load_quantized

        model, tok, meta = load_quantized(load)
        if tok is None:
            raise ValueError(f"{load} holds no tokenizer files; re-save it with a tokenizer.")
        source = meta.get("info", {}).get("config", {}).get("model", config.model)
    else:
        model, tok = load_model(config.model)
        source = None
    check_model(model, config)
    seconds["load"] = time.perf_counter() - t
    streams = perplexity_streams(tok, config)
    reference = None
    if config.kl and streams and source is not None:
        try:
            reference = load_model(source)[0]
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"KL needs the full-precision model the saved one came from ({source}), which cannot "
                             f"be loaded: {err} Pass --no-kl to evaluate without it.") from None
    metrics, eval_seconds = run_evals(model, tok, config, reference=reference, streams=streams, progress=progress,
                                      log=log)
    seconds.update(eval_seconds)
    generations = []
    for prompt in prompts:
        from .scoring import greedy_generate

        t = time.perf_counter()
        with torch.no_grad():
            text = greedy_generate(model, tok, prompt, max_new_tokens=max_new_tokens)
        seconds.setdefault("generate", 0.0)
        seconds["generate"] += time.perf_counter() - t
        generations.append({"prompt": prompt, "generation": text})
        log(f"{prompt}{text}")
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
    }
    if meta is not None:
        record["saved"] = {"path": str(load), "bytes": meta["bytes"], "files": meta["files"]}
    return record


def format_table(records: list[dict]) -> str:
    """A plain-text table: method, bits, avg bits, one column per metric, KL, seconds."""
    cols: list[tuple[str, str, str]] = []  # (header, eval, key)
    for e in sorted({name for r in records for name in r["metrics"]}):
        if e in ("mmlu", "synthetic"):
            cols += [(f"{e} acc", e, "accuracy"), (f"{e} nll", e, "letter_nll" if e == "mmlu" else "nll")]
        elif e == "gsm8k":
            cols += [("gsm8k acc", e, "accuracy"), ("gsm8k nll", e, "nll")]
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
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    notes = sorted({f"ppl {e}: [95 % bootstrap interval over windows], {m['n_windows']} windows × "
                    f"{m['n_tokens'] // m['n_windows']} predicted tokens = {m['n_tokens']} tokens"
                    for r in records for e, m in r["metrics"].items() if m.get("n_windows")})
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tacq-lite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model, evaluate it, optionally save it packed")
    _add_quantize_args(q)
    e = sub.add_parser("eval", help="evaluate / generate from a saved quantized model (--load) or any model")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--load", default=None, help="a folder written by `tacq-lite quantize ... --save`")
    src.add_argument("--model", default=QuantConfig().model, help="or a float model: 'embedded', an HF id or folder")
    e.add_argument("--prompt", action="append", default=[], help="generate greedily from this prompt; repeatable")
    e.add_argument("--max-new-tokens", type=int, default=40)
    _add_eval_args(e)
    w = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill, collect one table")
    w.add_argument("-p", "--param", action="append", default=[], metavar="NAME=V1,V2",
                   help="a grid axis, e.g. -p bits=2,3 -p ratio=0,0.0035; repeatable")
    w.add_argument("--grid", default=None, help="a YAML file mapping parameter names to lists of values")
    w.add_argument("--notebook", default=None, help="notebook to run (default: notebooks/07_end_to_end.ipynb)")
    w.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    w.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    st = sub.add_parser("student", help="write student copies of the notebooks, solutions removed")
    st.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook in notebooks/ with exercises)")
    st.add_argument("--out", required=True, help="folder for the student copies")
    st.add_argument("--overwrite", action="store_true", help="replace student copies already in --out")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "student":
        return _student(args)
    try:
        config = config_from_args(args)
        if args.json_path:  # checked before any work: a wrong path must not cost the run
            check_output_file(args.json_path, "--json")
        if args.command == "quantize":
            record = run_quantize(config, save=args.save, overwrite=args.overwrite, progress=not args.quiet)
        else:
            if args.max_new_tokens < 1:
                raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}.")
            if not config.evals and not args.prompt:
                raise ValueError("nothing to do: give --eval NAME and/or --prompt TEXT.")
            record = run_eval(config, load=args.load, prompts=tuple(args.prompt), max_new_tokens=args.max_new_tokens,
                              progress=not args.quiet)
        if record["metrics"]:
            print(format_table([record]))
        if args.json_path:
            write_json_atomic(args.json_path, record)
            print(f"wrote {args.json_path}")
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"tacq-lite: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("tacq-lite: interrupted; nothing half-written is left (outputs are written whole or not at all).",
              file=sys.stderr)
        return 130
    return 0


# What bad input or a bad environment raises: one line on stderr, exit 2 (--debug: the traceback).
# OSError covers a full disk or a read-only place met after the up-front checks.
USER_ERRORS = (ValueError, OSError, NotImplementedError, KeyError, TypeError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if not isinstance(err, OSError) or err.filename is None or str(err.filename) in text \
        else f"{err.filename}: {text}"


def _student(args) -> int:
    from pathlib import Path

    from .exercises import make_student_copies
    from .sweep import PACKAGE_ROOT

    notebooks = args.notebooks or sorted((PACKAGE_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    try:
        missing = [str(n) for n in notebooks if not Path(n).is_file()]
        if missing:
            raise FileNotFoundError(f"no such notebook: {', '.join(missing)}")
        counts = make_student_copies(notebooks, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"tacq-lite: error: {err}", file=sys.stderr)
        return 2
    if not counts:
        print("tacq-lite: error: none of these notebooks holds an exercise cell.", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{args.out}/{name}: {n} exercise{'s' if n != 1 else ''}, solutions removed")
    return 0


def _sweep(args) -> int:
    from . import sweep

    try:
        if args.grid and args.param:
            raise sweep.SweepError("give the grid either with -p or with --grid, not both.")
        grid = sweep.read_grid_file(args.grid) if args.grid else sweep.parse_grid(args.param) if args.param else None
        rows = sweep.run_sweep(grid, out_dir=args.out, notebook=args.notebook or sweep.DEFAULT_NOTEBOOK,
                               kernel=args.kernel)
    except sweep.SweepError as err:
        print(f"tacq-lite: error: {err}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
