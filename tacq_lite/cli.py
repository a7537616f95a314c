"""`tacq-lite` command line: quantize a model, evaluate it, print a table, write a JSON record.

    tacq-lite quantize --method rtn --bits 4 --groupsize 64 --eval wikitext2 --json out.json

Flags map one to one onto `QuantConfig` fields; the JSON record holds the whole config, every
metric, the bits accounting, seconds per stage and the peak resident memory.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

from .config import METHODS, QuantConfig
from .records import write_json_atomic

RECORD_VERSION = 1


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--model", default=d.model, help="'embedded' (default), a Hugging Face id, or a local folder")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--bits", type=int, default=d.bits, help="2, 3, 4 or 8")
    p.add_argument("--groupsize", type=int, default=d.groupsize, help="-1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--no-mse", dest="mse", action="store_false", help="plain min/max range, no MSE grid search")
    p.add_argument("--calib", default=d.calib, help="'wikitext2' or a text file")
    p.add_argument("--n-calib", type=int, default=d.n_calib, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--blocksize", type=int, default=d.blocksize, help="GPTQ lazy-batch block size")
    p.add_argument("--percdamp", type=float, default=d.percdamp, help="GPTQ damping, fraction of mean diag(H)")
    p.add_argument("--actorder", action="store_true", help="GPTQ: quantize columns by decreasing diag(H)")
    p.add_argument("--selector", default=d.selector, help="TaCQ: score that picks the kept weights")
    p.add_argument("--ratio", type=float, default=d.ratio, help="TaCQ: fraction of weights kept in 16-bit")
    p.add_argument("--qw-method", default=d.qw_method, choices=("gptq", "rtn"), help="TaCQ: how Q(W) is made")
    p.add_argument("--eval", dest="evals", action="append", default=[], help="'wikitext2' or a text file; repeatable")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="token cap per eval set")
    p.add_argument("--no-kl", dest="kl", action="store_false", help="skip KL to full precision (saves memory)")
    p.add_argument("--cache-dir", default=None, help="score cache folder (default: the user cache)")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON record here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    fields = QuantConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["evals"] = tuple(values.get("evals") or ())
    return QuantConfig(**values)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_quantize(config: QuantConfig, *, progress: bool = True, log=print) -> dict:
    """Load, calibrate, quantize and evaluate as `config` says; return the JSON record."""
    import torch

    from . import data
    from .eval import evaluate_lm
    from .models import load_model
    from .pipeline import float_copy, quantize_model

    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(config.model)
    seconds["load"] = time.perf_counter() - t
    # Check every eval source before any long work starts.
    streams = {name: data.eval_tokens(tok, name, max_tokens=config.eval_tokens, seq_len=config.seq_len)
               for name in config.evals}
    reference = float_copy(model) if config.kl and config.evals and config.method != "fp" else None
    windows = None
    if config.method in ("gptq", "tacq"):
        t = time.perf_counter()
        windows = data.calibration_windows(tok, config.calib, n=config.n_calib, seq_len=config.seq_len, seed=config.seed)
        seconds["calib_data"] = time.perf_counter() - t
        log(f"calibration: {config.n_calib} x {config.seq_len} tokens from {data.describe_source(config.calib)}")
    result = quantize_model(model, windows, config, progress=progress) if config.method != "fp" else None
    if result is not None:
        seconds.update(result.seconds)
    from .pipeline import bits_report

    report = result.bits if result is not None else bits_report(model, config)
    metrics = {}
    for name, tokens in streams.items():
        log(f"eval {name}: {tokens.numel()} tokens from {data.describe_source(name) if name == data.WIKITEXT2 else name}")
        t = time.perf_counter()
        m = evaluate_lm(model, tokens, seq_len=config.seq_len, reference=reference, progress=progress, desc=f"eval {name}")
        seconds[f"eval_{name}"] = time.perf_counter() - t
        metrics[name] = m._asdict()
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
    if result is not None and result.layer_loss:
        record["layer_loss"] = result.layer_loss
    if result is not None and result.kept:
        record["kept_per_layer"] = result.kept
    if result is not None and result.info:
        record["tacq"] = {k: v for k, v in result.info.items() if k != "files"}
    return record


def format_table(records: list[dict]) -> str:
    """A plain-text table: method, bits, avg bits, ppl per eval set, KL, seconds."""
    evals = sorted({name for r in records for name in r["metrics"]})
    head = ["method", "bits", "avg bits"] + [f"ppl {e}" for e in evals] + ["KL", "seconds"]
    rows = []
    for r in records:
        kls = [m["kl"] for m in r["metrics"].values() if m.get("kl") is not None]
        rows.append(
            [r["method"], str(r["bits"]), f"{r['avg_bits']:.3f}"]
            + [f"{r['metrics'][e]['ppl']:.2f}" if e in r["metrics"] else "-" for e in evals]
            + [f"{sum(kls) / len(kls):.4f}" if kls else "-", f"{r['seconds_total']:.1f}"]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tacq-lite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and evaluate it")
    _add_quantize_args(q)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        record = run_quantize(config, progress=not args.quiet)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, TypeError) as err:
        print(f"tacq-lite: error: {err}", file=sys.stderr)
        return 2
    print(format_table([record]))
    if args.json_path:
        write_json_atomic(args.json_path, record)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
