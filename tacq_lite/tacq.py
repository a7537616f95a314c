"""Task-Circuit Quantization end to end: Q(W), gradients, scores, keep-mask, masked GPTQ.

TaCQ (Xiao, Sung, Stengel-Eskin, Bansal, 2025, arXiv 2504.07389, Sec. 3), as the authors' code
runs it (The-Inscrutable-X/TACQ at cfc4ccc; file:line):
  1. GPTQ over a copy of the model -> Q(W) (per channel, asymmetric, MSE range search,
     true-sequential: gptq/llama.py:156-158, scripts/examples/evaluate_llama3_8b.sh:45-52); its
     Hessian diagonals feed the SpQR/OWQ-style selectors;
  2. batch-size-1 fp32 backward passes of the full-precision model -> G = Σ|dL/dW|
     (utils/gradient_attributors.py:90 batch_size=1, :23 `torch.abs(param.grad)` summed, :64/:74
     the backward model in float32);
  3. score = |W| · |G| · |Q(W) − W| (gradient_attributors.py:40, abs in make_quantization_configs.py:31-32;
     or another selector, scores.py);
  4. global top-k over every targeted linear -> keep-mask (utils/quantization_utils.py:49 over all
     `.mlp.` and `.self_attn.` weights, utils/measurement_utils.py:87; outliers.py);
  5. GPTQ on the full-precision model again with the mask: kept weights are left out of the grid fit,
     send no error and are stored at the value GPTQ's compensation moved them to (gptq/gptq.py:207,
     269-290; `config.keep_value="original"` stores the original value instead, see gptq.py).

Where tacq_lite differs: with task data (`--calib gsm8k`/`mmlu`) the loss of step 2 is on the answer
tokens only, while the authors' loss covers every token of the few-shot prompt
(gradient_attributors.py:99, no masking function passed at measure_importances.py:47); dead input
columns are rounded, not zeroed (their gptq/gptq.py:135).

Steps 1 and 2 do not depend on each other. On a multi-core Linux CPU the backward passes start in
a forked one-thread worker (importance.GradientWorker) and step 1 runs on the other thread
meanwhile; `QuantConfig.parallel=False` runs them one after the other.

Steps 1-2 are the expensive ones and do not depend on the ratio or the selector, so their
results are cached (outliers.save_cache) in two safetensors files: gradients (keyed by the
model's weights and the calibration samples) and Q(W) with the Hessian diagonals (keyed by the
weights, the windows and the GPTQ settings). A rerun with a new ratio or selector then runs no
backward pass and no first GPTQ pass; a new bit width reuses the gradients.
Cached G, Σg² and Q(W) − W are stored in bfloat16 (8 significant bits; half the disk of fp32).
They only rank weights, and a fresh run rounds them the same way before scoring, so a cached
run and a fresh run produce identical masks.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import importance, outliers, pipeline, scores, walk
from .config import QuantConfig

CACHE_DTYPE = torch.bfloat16  # storage of G, Σg² and Q(W) − W: ranking inputs, see module docstring


class ImportanceInputs(NamedTuple):
    W: dict[str, torch.Tensor]  # linear -> [rows, cols] float32 copy of the full-precision weights
    G: dict[str, torch.Tensor] | None  # [rows, cols] Σ|dL/dW| in CACHE_DTYPE, or None if not needed
    G2: dict[str, torch.Tensor] | None  # [rows, cols] Σ(dL/dW)² in CACHE_DTYPE
    QW: dict[str, torch.Tensor] | None  # [rows, cols] float32, W + (Q(W) − W) rounded to CACHE_DTYPE
    H_diag: dict[str, torch.Tensor] | None  # [cols] float32 diag(H) seen by the first GPTQ pass
    Hinv_diag: dict[str, torch.Tensor] | None  # [cols] float32 diag((H + damp·I)⁻¹)
    meta: dict  # provenance: "cache" / "computed" per part, seconds, backward passes, cache files


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def weights_fingerprint(model: nn.Module, *, stride: int = 61) -> str:
    """A cheap fingerprint of every parameter: names, shapes, dtypes and every stride-th value."""
    parts = []
    for name, p in model.named_parameters(remove_duplicate=True):
        sample = p.detach().reshape(-1)[::stride].float().cpu()  # [numel / stride]
        parts += [f"{name}{tuple(p.shape)}{p.dtype}".encode(), sample.numpy().tobytes()]
    return _sha(*parts)[:32]


def samples_fingerprint(samples) -> str:
    if isinstance(samples, torch.Tensor):
        return _sha(str(tuple(samples.shape)).encode(), samples.cpu().numpy().tobytes())[:32]
    return _sha(*(t.cpu().numpy().tobytes() + b"|" for pair in samples for t in pair))[:32]


def cache_folder(config: QuantConfig) -> Path:
    from .models import cache_dir

    return Path(config.cache_dir) if config.cache_dir else cache_dir() / "scores"


def _cache_path(config: QuantConfig, kind: str, key: dict) -> Path:
    return cache_folder(config) / f"{kind}-{_sha(outliers._key_text(key).encode())[:16]}.safetensors"


def _part(tensors: dict, prefix: str) -> dict[str, torch.Tensor] | None:
    found = {n[len(prefix) + 1 :]: t for n, t in tensors.items() if n.startswith(prefix + "/")}
    return found or None


def _present(**parts) -> set[str]:
    return {p for p, d in parts.items() if d is not None}


def _flat(**parts) -> dict[str, torch.Tensor]:
    return {f"{p}/{n}": t for p, d in parts.items() if d for n, t in d.items()}


def _first_pass(model, windows, config, *, want_qw: bool, want_stats: bool, progress: bool):
    """Step 1 on deep copies: ({linear: Q(W) − W}, {linear: H_diag}, {linear: Hinv_diag})."""
    E, H, Hinv = {}, None, None
    use_gptq_for_qw = want_qw and config.qw_method == "gptq"
    if use_gptq_for_qw or want_stats:
        twin = copy.deepcopy(model)
        first = pipeline.gptq_quantize(twin, windows, config, progress=progress)
        if use_gptq_for_qw:
            E = _errors(model, twin)
        # The Hessian diagonals come free with the pass: keep them, so the cache serves the
        # hessian / activation / owq_columns selectors later.
        H = {n: d.float().cpu() for n, d in first.H_diag.items()}
        Hinv = {n: d.float().cpu() for n, d in first.Hinv_diag.items()}
        del twin
    if want_qw and config.qw_method == "rtn":
        twin = copy.deepcopy(model)
        pipeline.rtn_quantize(twin, config)
        E = _errors(model, twin)
    elif want_qw and config.qw_method != "gptq":
        raise ValueError(f"qw_method={config.qw_method!r} is unknown; choose 'gptq' or 'rtn'.")
    return (E or None), H, Hinv


def _errors(model: nn.Module, twin: nn.Module) -> dict[str, torch.Tensor]:
    twin_linears = walk.named_linears(twin)
    return {n: (twin_linears[n].weight.detach().float() - lin.weight.detach().float()).to(CACHE_DTYPE).cpu()
            for n, lin in walk.named_linears(model).items()}  # [rows, cols] Q(W) − W


def compute_importance(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    selector: str | None = None,  # None: config.selector
    samples=None,  # gradient samples: None = the windows; or (input_ids, loss_mask) pairs
    cache: bool = True,
    progress: bool = True,
) -> ImportanceInputs:
    """Everything `selector` needs (steps 1-2), from the score cache where possible."""
    log = print if progress else (lambda *_a: None)
    needs = scores.get_selector(selector or config.selector).needs
    samples = windows if samples is None else samples
    fp = weights_fingerprint(model)
    common = {"model": config.model, "weights": fp, "dtype": str(CACHE_DTYPE)}
    meta = {"qw": "not needed", "gradients": "not needed", "seconds": {"qw": 0.0, "gradients": 0.0},
            "n_backward": 0, "seconds_per_sample": None, "files": {}}
    G = G2 = E = H = Hinv = None

    # The gradients are looked up first: when they must be computed and a forked worker can run
    # (importance.GradientWorker), it starts now and works through the samples while this process
    # runs the first GPTQ pass on one thread; result() below then shares out what is left.
    want_g, job = needs & {"G", "G2"}, None
    # Whether the first pass runs on one thread (beside a worker) depends on the config and the
    # thread count only, not on the selector or on what the cache holds: the same command always
    # rounds the same way, and every selector shares one cached Q(W). That thread count is in the
    # Q(W) key, since GPTQ's rounding depends on it.
    with_worker = config.parallel and importance.GradientWorker.usable(model)
    shapes = cache_shapes(model)
    if want_g:
        gkey = {"kind": "gradients", **common, "samples": samples_fingerprint(samples), "calib": config.calib,
                "n_samples": len(samples), "seed": config.seed,
                "loss": "all" if isinstance(samples, torch.Tensor) else "answer"}
        gpath = _cache_path(config, "gradients", gkey)
        got = (outliers.load_cache(gpath, gkey, shapes=shapes) if cache else None) or {}
        G, G2 = _part(got, "G"), _part(got, "G2")
        squares = "G2" in want_g or G2 is not None
        if want_g - _present(G=G, G2=G2) and with_worker:
            job = importance.GradientWorker(model, samples, squares=squares)
    try:
        t = time.perf_counter()
        want = needs & {"QW", "H_diag", "Hinv_diag"}
        if want:
            # config.keep_value is not in the key: this first pass runs without a mask, and keep_value
            # only decides what a kept weight stores (tests/test_gptq.py checks both give one result).
            key = {"kind": "qw", **common, "windows": samples_fingerprint(windows), "calib": config.calib,
                   "n_calib": len(windows), "seq_len": windows.shape[1], "seed": config.seed,
                   "qw_method": config.qw_method, "threads": 1 if with_worker else torch.get_num_threads(),
                   **{f: getattr(config, f) for f in
                      ("bits", "groupsize", "sym", "mse", "blocksize", "percdamp", "actorder")}}
            path = _cache_path(config, "qw", key)
            got = (outliers.load_cache(path, key, shapes=shapes) if cache else None) or {}
            E, H, Hinv = _part(got, "E"), _part(got, "H_diag"), _part(got, "Hinv_diag")
            have = _present(QW=E, H_diag=H, Hinv_diag=Hinv)
            meta["qw"] = "cache"
            if want - have:
                meta["qw"] = "computed"
                want_stats = bool(want & {"H_diag", "Hinv_diag"}) or H is not None
                with importance.single_thread() if with_worker else contextlib.nullcontext():
                    E2, H2, Hinv2 = _first_pass(model, windows, config, want_qw="QW" in want or E is not None,
                                                want_stats=want_stats, progress=progress)
                E, H, Hinv = E2 or E, H2 or H, Hinv2 or Hinv
                if cache:
                    meta["files"]["qw"] = _save(path, _flat(E=E, H_diag=H, Hinv_diag=Hinv), key, log)
            else:
                log(f"score cache: Q(W) from {path}")
        meta["seconds"]["qw"] = time.perf_counter() - t

        t = time.perf_counter()
        if want_g:
            meta["gradients"] = "cache"
            if want_g - _present(G=G, G2=G2):
                meta["gradients"] = "computed"
                if job is not None:
                    res, job = job.result(progress=progress), None
                    meta["gradient_processes"] = 2
                else:
                    res = importance.accumulate_gradients(model, samples, squares=squares, progress=progress)
                    meta["gradient_processes"] = 1
                G = {n: g.to(CACHE_DTYPE).cpu() for n, g in res.G.items()}
                G2 = {n: g.to(CACHE_DTYPE).cpu() for n, g in res.G2.items()} if res.G2 is not None else None
                meta["n_backward"], meta["seconds_per_sample"] = res.n_samples, res.seconds_per_sample
                if cache:
                    meta["files"]["gradients"] = _save(gpath, _flat(G=G, G2=G2), gkey, log)
            else:
                log(f"score cache: gradients from {gpath}")
        meta["seconds"]["gradients"] = time.perf_counter() - t  # with a worker: only what was left after Q(W)
    finally:
        if job is not None:  # the Q(W) pass failed or was interrupted
            job.cancel()

    W = {n: lin.weight.detach().float().clone() for n, lin in walk.named_linears(model).items()}  # [rows, cols]
    dev = lambda d: None if d is None else {n: d[n].to(W[n].device) for n in W}  # noqa: E731
    QW = None if E is None or "QW" not in needs else {n: W[n] + E[n].to(W[n].device).float() for n in W}
    return ImportanceInputs(W, dev(G), dev(G2), QW, dev(H), dev(Hinv), meta)


def _save(path: Path, tensors: dict, key: dict, log) -> str | None:
    try:
        outliers.save_cache(path, tensors, key)
        log(f"score cache: wrote {path}")
        return str(path)
    except OSError as err:  # a full or read-only disk must not stop the run: warn and go on
        warnings.warn(f"score cache: could not write {path} ({err}); the run goes on without caching.",
                      outliers.CacheWarning, stacklevel=2)
        return None


def cache_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{cache tensor name: shape} for this model: what a score cache file for it may hold."""
    shapes = {}
    for n, lin in walk.named_linears(model).items():
        rows, cols = lin.weight.shape
        shapes.update({f"{p}/{n}": (rows, cols) for p in ("G", "G2", "E")})
        shapes.update({f"{p}/{n}": (cols,) for p in ("H_diag", "Hinv_diag")})
    return shapes


def build_masks(inputs: ImportanceInputs, *, selector: str, ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Steps 3-4: score every targeted weight and keep the global top ratio (bool [rows, cols])."""
    sel = scores.get_selector(selector)
    gen = torch.Generator().manual_seed(seed)
    found = {k: getattr(inputs, k) for k in sel.needs}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ValueError(f"selector {selector!r} needs {missing}; compute_importance with selector={selector!r}.")
    s = {n: scores.score(selector, W=W, generator=gen, **{k: v[n] for k, v in found.items()})
         for n, W in inputs.W.items()}  # linear -> [rows, cols]
    if sel.columns:  # every row of a column score is the same: rank columns, not weights
        shapes = {n: tuple(W.shape) for n, W in inputs.W.items()}
        masks = outliers.select_columns({n: v[0] for n, v in s.items()}, shapes=shapes, ratio=ratio)
    else:
        masks = outliers.select_topk(s, ratio=ratio)
    return {n: m.to(inputs.W[n].device) for n, m in masks.items()}


class TacqResult(NamedTuple):
    """What a TaCQ run leaves besides the quantized model, per targeted linear."""

    masks: dict[str, torch.Tensor]  # bool [rows, cols], True = kept in 16-bit ({} when ratio = 0)
    n_kept: dict[str, int]  # kept weights
    layer_loss: dict[str, float]  # GPTQ's objective in the masked pass
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (scale, zero) of the masked pass, fp32 [rows, n_groups]
    codes: dict[str, torch.Tensor]  # uint8 [rows, cols] of the masked pass
    seconds: dict[str, float]  # qw, gradients, score, gptq
    info: dict  # selector, ratio, k, cache hits, backward passes, seconds per sample


def tacq_quantize(model: nn.Module, windows: torch.Tensor, config: QuantConfig, *, samples=None,
                  progress: bool = True, cache: bool = True) -> TacqResult:
    """Steps 1-5 on `model`, in place; returns the masks and what each step measured."""
    scores.get_selector(config.selector)  # a typo fails before any long work
    names = list(walk.named_linears(model))
    seconds = {"score": 0.0}
    if config.ratio == 0:  # nothing to keep: plain GPTQ
        masks, inputs_meta = {}, {"seconds": {"qw": 0.0, "gradients": 0.0}}
    else:
        inputs = compute_importance(model, windows, config, samples=samples, progress=progress, cache=cache)
        t = time.perf_counter()
        masks = build_masks(inputs, selector=config.selector, ratio=config.ratio, seed=config.seed)
        seconds["score"] = time.perf_counter() - t
        inputs_meta = inputs.meta
        del inputs  # W, G and Q(W) copies are not needed by the final pass
    seconds.update(inputs_meta["seconds"])
    t = time.perf_counter()
    final = pipeline.gptq_quantize(model, windows, config, masks=masks, progress=progress)
    seconds["gptq"] = time.perf_counter() - t
    n_kept = {n: int(masks[n].sum()) if n in masks else 0 for n in names}
    info = {"selector": config.selector, "ratio": config.ratio, **inputs_meta, "k": sum(n_kept.values())}
    return TacqResult(masks, n_kept, final.loss, final.grids, final.codes, seconds, info)
