"""`tacq-lite` command line: quantize a model, evaluate it, print a table, write a JSON record.

    tacq-lite quantize --method rtn --bits 4 --groupsize 64 --eval wikitext2 --json out.json
    tacq-lite quantize --method tacq --calib gsm8k --eval gsm8k --no-gsm8k-generate --save q3/
    tacq-lite eval --load q3/ --eval wikitext2 --prompt "The capital of France is"
    tacq-lite demo --json demo.json   # full precision, GPTQ and TaCQ side by side (`make demo`)

Flags map one to one onto `QuantConfig` fields; the JSON record holds the whole config, every
metric, the bits accounting, seconds per stage and the peak resident memory.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .algo.gptq import KEEP_VALUES
from .config import METHODS, QuantConfig
from .io import check_output_file, write_json_atomic
from .model.checkpoint import DEFAULT_SHARD_SIZE
from .run.demo import DEMO_CONFIG, DEMO_MAX_NEW_TOKENS, DEMO_PROMPT, format_demo, run_demo
from .run.experiment import EVALS, HARNESS_PREFIX, format_table, run_eval, run_quantize


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    d = QuantConfig()
    p.add_argument("--eval", dest="evals", action="append", default=[],
                   help=f"one of {', '.join(EVALS)}, a text file (perplexity), or {HARNESS_PREFIX}<task>: an "
                        "lm-evaluation-harness task, e.g. lm-eval:tacq_mmlu_astronomy (shared data, offline); "
                        "repeatable")
    p.add_argument("--device", default=d.device,
                   help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"),
                   help="the model's weights (GPTQ's Hessian and solve are float32 whatever this says)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="a model larger than one GPU, split over several: auto, balanced, balanced_low_0, "
                        "sequential, or a JSON object {module: device} (or a .json file holding one), e.g. "
                        '\'{"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.norm": 1, "lm_head": 0}\'; '
                        "each layer computes on its own device (instead of --device's one layer at a time)")
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
    p.add_argument("--lm-eval-limit", type=int, default=d.lm_eval_limit,
                   help="first documents of each lm-eval task (lm-eval's --limit; default: all)")
    p.add_argument("--lm-eval-batch-size", type=int, default=d.lm_eval_batch_size, help="lm-eval's HFLM batch size")
    p.add_argument("--no-kl", dest="kl", action="store_false", help="skip KL to full precision (saves memory)")
    p.add_argument("--json", dest="json_path", default=None, help="write the JSON record here")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no status lines: warnings, errors and the result only")
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
    p.add_argument("--grad-dtype", default=d.grad_dtype, choices=("float32", "bfloat16"),
                   help="TaCQ: precision of the backward passes (float32 as the authors' code)")
    p.add_argument("--accum-device", default=None, choices=("cpu",),
                   help="TaCQ: sum the gradients in host memory instead of beside each weight (GPU memory)")
    p.add_argument("--checkpointing", action="store_true",
                   help="TaCQ: recompute each decoder layer in backward instead of keeping its activations")
    p.add_argument("--cache-dir", default=None, help="score cache folder (default: the user cache)")
    p.add_argument("--save", default=None, help="save the quantized model here, packed (load it with `eval --load`)")
    p.add_argument("--overwrite", action="store_true", help="--save may replace a tacq_lite model saved there")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help="--save splits the tensors into files of at most this size (e.g. 5GB, 500MB) with an index")
    _add_eval_args(p)


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    d = DEMO_CONFIG
    p.add_argument("--model", default=d.model, help="'embedded' (default), a Hugging Face id, or a local folder")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the question every model answers greedily")
    p.add_argument("--max-new-tokens", type=int, default=DEMO_MAX_NEW_TOKENS)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="WikiText-2 tokens evaluated, the same windows for every model")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration / perplexity window")
    p.add_argument("--n-calib", type=int, default=d.n_calib, help="calibration windows for GPTQ and TaCQ")
    p.add_argument("--cache-dir", default=None, help="TaCQ's score cache folder (default: the user cache)")
    p.add_argument("--device", default=d.device,
                   help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--json", dest="json_path", default=None, help='write the three records here, as {"records": [...]}')
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no status lines: warnings, errors and the result only")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def config_from_args(args: argparse.Namespace, base: QuantConfig | None = None) -> QuantConfig:
    """base (default QuantConfig()) with every flag that names a QuantConfig field applied."""
    fields = QuantConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    if "evals" in values:
        values["evals"] = tuple(values["evals"] or ())
    if values.get("device_map") is not None:
        values["device_map"] = parse_device_map(values["device_map"])
    return (base or QuantConfig()).replace(**values)


def parse_device_map(text: str) -> str | dict:
    """--device-map's value: a JSON object (inline, or the path of a .json file holding one), else the
    name as it is (a strategy such as auto, which QuantConfig checks)."""
    import json
    from pathlib import Path

    path = Path(text).expanduser()
    if not text.lstrip().startswith("{") and not path.is_file():
        if text.endswith(".json"):
            raise ValueError(f"--device-map {text}: no such file.")
        return text
    where = "" if text.lstrip().startswith("{") else f" in {text}"
    try:
        found = json.loads(text if not where else path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map: the JSON{where} does not parse ({err}); give an object such as "
                         '{"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ...}.') from None
    if not isinstance(found, dict):
        raise ValueError(f"--device-map: the JSON{where} is a {type(found).__name__}, not a {{module: device}} object.")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["budget"]:  # the byte budget has its own parser (python -m tacq_lite.run.budget)
        from .run.budget import main as budget_main

        return budget_main(argv[1:])
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
    e.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="ask each --prompt as a user turn of the tokenizer's chat template (default: when the "
                        "tokenizer has one); the MMLU/GSM8K/perplexity protocols never use it")
    _add_eval_args(e)
    dm = sub.add_parser("demo", help="full precision, GPTQ and TaCQ at 3 bits side by side: perplexity, KL, bits, "
                                     "seconds and one greedy completion each")
    _add_demo_args(dm)
    w = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill, collect one table")
    w.add_argument("-p", "--param", action="append", default=[], metavar="NAME=V1,V2",
                   help="a grid axis, e.g. -p bits=2,3 -p ratio=0,0.0035; repeatable")
    w.add_argument("--grid", default=None, help="a YAML file mapping parameter names to lists of values")
    w.add_argument("--notebook", default=None, help="notebook to run (default: notebooks/07_end_to_end.ipynb)")
    w.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    w.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    w.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N notebooks at once on this machine, each pinned to cpus/N threads (default 1)")
    w.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="send the runs to a running Dask cluster, e.g. tcp://10.0.0.5:8786 (needs a shared "
                        "filesystem for --out and the notebook)")
    sub.add_parser("budget", help="predict peak host / GPU memory of a run before starting it (see --help)",
                   add_help=False)
    st = sub.add_parser("student", help="write student copies of the notebooks, solutions removed")
    st.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook in notebooks/ with exercises)")
    st.add_argument("--out", required=True, help="folder for the student copies")
    st.add_argument("--overwrite", action="store_true", help="replace student copies already in --out")
    args = parser.parse_args(argv)
    _configure_logging(quiet=getattr(args, "quiet", False))
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "student":
        return _student(args)
    try:
        config = config_from_args(args, base=DEMO_CONFIG if args.command == "demo" else None)
        if args.json_path:  # checked before any work: a wrong path must not cost the run
            check_output_file(args.json_path, "--json")
        if args.command == "demo":
            records = run_demo(config, prompt=args.prompt, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
            print(format_demo(records))
            if args.json_path:
                write_json_atomic(args.json_path, {"records": records})
                print(f"wrote {args.json_path}")
            return 0
        if args.command == "quantize":
            record = run_quantize(config, save=args.save, overwrite=args.overwrite,
                                  max_shard_size=args.max_shard_size, progress=not args.quiet)
        else:
            if args.max_new_tokens < 1:
                raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}.")
            if not config.evals and not args.prompt:
                raise ValueError("nothing to do: give --eval NAME and/or --prompt TEXT.")
            record = run_eval(config, load=args.load, prompts=tuple(args.prompt), max_new_tokens=args.max_new_tokens,
                              progress=not args.quiet)
        for g in record.get("generations", ()):
            print(format_generation(g))
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


def _configure_logging(*, quiet: bool) -> None:
    """The library's status lines (tacq_lite.* loggers, INFO) on stderr, one plain line each; --quiet keeps
    warnings only. Other libraries stay at WARNING; a caller that configured logging keeps its handlers."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("tacq_lite").setLevel(logging.WARNING if quiet else logging.INFO)


def format_generation(g: dict) -> str:
    """One --prompt's result: a plain prompt runs on into its continuation; a chat prompt and its reply
    are a line each."""
    return f"> {g['prompt']}\n{g['generation']}" if g.get("chat_template") else g["prompt"] + g["generation"]


# What bad input or a bad environment raises: one line on stderr, exit 2 (--debug: the traceback).
# OSError covers a full disk or a read-only place met after the up-front checks.
USER_ERRORS = (ValueError, OSError, NotImplementedError, KeyError, TypeError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if not isinstance(err, OSError) or err.filename is None or str(err.filename) in text \
        else f"{err.filename}: {text}"


def _student(args) -> int:
    from pathlib import Path

    from .course.student import make_student_copies
    from .io import PACKAGE_ROOT

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
    from .course import sweep

    try:
        if args.grid and args.param:
            raise sweep.SweepError("give the grid either with -p or with --grid, not both.")
        grid = sweep.read_grid_file(args.grid) if args.grid else sweep.parse_grid(args.param) if args.param else None
        rows = sweep.run_sweep(grid, out_dir=args.out, notebook=args.notebook or sweep.DEFAULT_NOTEBOOK,
                               kernel=args.kernel, workers=args.workers, scheduler=args.scheduler)
    except sweep.SweepError as err:
        print(f"tacq-lite: error: {err}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
