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
     or another selector, algo/selectors.py);
  4. global top-k over every targeted linear -> keep-mask (utils/quantization_utils.py:49 over all
     `.mlp.` and `.self_attn.` weights, utils/measurement_utils.py:87; algo/select.py);
  5. GPTQ on the full-precision model again with the mask: kept weights are left out of the grid fit,
     send no error and are stored at the value GPTQ's compensation moved them to (gptq/gptq.py:207,
     269-290; `config.keep_value="original"` stores the original value instead, see algo/gptq.py).

Where tacq_lite differs: with task data (`--calib gsm8k`/`mmlu`) the loss of step 2 is on the answer
tokens only, while the authors' loss covers every token of the few-shot prompt
(gradient_attributors.py:99, no masking function passed at measure_importances.py:47); dead input
columns are rounded, not zeroed (their gptq/gptq.py:135).

Steps 1 and 2 do not depend on each other. On a multi-core Linux CPU the backward passes start in
a forked one-thread worker (parallel.GradientWorker) and step 1 runs on the other thread
meanwhile; then this process takes the samples left. `QuantConfig.parallel=False` runs them one
after the other. On a GPU (`config.device`) the layers are onloaded one at a time for step 1 and
the masked pass, and the whole model goes to the GPU for step 2 (model/placement.py). A model loaded
with a device_map (`config.device_map`) moves nowhere: each step computes every layer on the device
its weights are on, and G, Q(W) − W and the masks of a linear sit beside its weight.

Steps 1-2 are the expensive ones and do not depend on the ratio or the selector, so their
results are cached (run/score_cache.py): gradients (keyed by the model's weights and the
calibration samples) and Q(W) with the Hessian diagonals (keyed by the weights, the windows and the
GPTQ settings). A rerun with a new ratio or selector then runs no backward pass and no first GPTQ
pass; a new bit width reuses the gradients.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Mapping, NamedTuple

import torch
from torch import nn

from ..algo import gradients, select, selectors
from ..config import QuantConfig
from ..io import SpilledTensors
from ..model import placement, walk
from . import parallel, passes
from .score_cache import CACHE_DTYPE, ScoreCache

logger = logging.getLogger(__name__)


class PerLinear(Mapping):
    """{linear: tensor} made on access, one linear at a time, and not kept: W and Q(W) for scoring
    without a copy of every weight (TaCQ's own run; `compute_importance(materialize=True)` gives
    plain dicts). Read it before the model changes: it reads the model's current weights."""

    def __init__(self, names, make):
        self._names, self._make = list(names), make

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class ImportanceInputs(NamedTuple):
    W: Mapping[str, torch.Tensor]  # linear -> [rows, cols] float32 full-precision weights
    G: dict[str, torch.Tensor] | None  # [rows, cols] Σ|dL/dW| in CACHE_DTYPE, or None if not needed
    G2: dict[str, torch.Tensor] | None  # [rows, cols] Σ(dL/dW)² in CACHE_DTYPE
    QW: Mapping[str, torch.Tensor] | None  # [rows, cols] float32, W + (Q(W) − W) rounded to CACHE_DTYPE
    H_diag: dict[str, torch.Tensor] | None  # [cols] float32 diag(H) seen by the first GPTQ pass
    Hinv_diag: dict[str, torch.Tensor] | None  # [cols] float32 diag((H + damp·I)⁻¹)
    meta: dict  # provenance: "cache" / "computed" per part, seconds, backward passes, cache files


def uses_gradient_worker(config: QuantConfig, device: torch.device | None, model: nn.Module | None = None) -> bool:
    """Whether step 2's backward passes run in a forked CPU worker while step 1 runs on one thread.

    Decided by the config and the machine only, never by the selector or by what the cache holds:
    the same command always rounds the same way, and every selector shares one cached Q(W). The
    worker takes the model's weights as they are, so it runs only when they already have
    config.grad_dtype. model=None asks before loading (the byte budget, run/budget.py), reading the
    weights' dtype from config.dtype. device None (a model loaded with a device_map): never."""
    grad_dtype = placement.DTYPES[config.grad_dtype]
    if model is None:
        weights_match = placement.DTYPES[config.dtype] == grad_dtype
    else:
        weights_match = all(lin.weight.dtype == grad_dtype for lin in walk.named_linears(model).values())
    return bool(config.parallel and device is not None and device.type == "cpu" and not config.checkpointing
                and weights_match and parallel.GradientWorker.usable(model))


def compute_importance(
    model: nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    *,
    selector: str | None = None,  # None: config.selector
    samples=None,  # gradient samples: None = the windows; or (input_ids, loss_mask) pairs
    cache: bool = True,
    progress: bool = True,
    materialize: bool = True,  # False: W and QW are PerLinear views, made one linear at a time
) -> ImportanceInputs:
    """Steps 1-2: everything `selector` needs (Q(W), G, Σg², Hessian diagonals), cached where possible.

    Everything returned lives on the compute device (config.device), or with a device_map beside
    each linear's weight; the model stays where it is.
    """
    needs = selectors.get_selector(selector or config.selector).needs
    samples = windows if samples is None else samples
    device = placement.compute_device(model, config.device, config.device_map)  # None: where each weight is
    store = ScoreCache(model, config, enabled=cache,
                       device=placement.module_device(model) if device is None else device)
    meta = {"qw": "not needed", "gradients": "not needed", "seconds": {"qw": 0.0, "gradients": 0.0},
            "n_backward": 0, "seconds_per_sample": None, "files": {}}
    with_worker = uses_gradient_worker(config, device, model)

    # Step 2's cache is read first: when gradients must be computed and a worker can run, it starts
    # now and works through the samples while step 1 runs here on one thread.
    grads, gkey, job = {}, None, None
    if needs & {"G", "G2"}:
        gkey = store.gradients_key(samples)  # hashes every sample: computed once, used for lookup and write
        grads = store.load(gkey)
        if needs & {"G", "G2"} - grads.keys() and with_worker:
            job = parallel.GradientWorker(model, samples, squares="G2" in needs or "G2" in grads)
    qw: dict = {}
    try:
        qw = _step1_qw(model, windows, config, needs, store, meta, one_thread=with_worker, device=device,
                       progress=progress)
        if needs & {"G", "G2"}:
            grads = _step2_gradients(model, samples, needs, grads, store, gkey, meta, job=job, config=config,
                                     device=device, progress=progress)
        if "qw_key" in meta:  # after the backward passes, when writing it (a copy in memory) costs no peak
            key = meta.pop("qw_key")
            if store.enabled:
                meta["files"]["qw"] = store.save(key, qw)
        linears = walk.named_linears(model)
        where = {n: lin.weight.device if device is None else device for n, lin in linears.items()}  # its compute device

        def on_device(d: dict | None) -> dict | None:  # moved one linear at a time, each host copy dropped at once
            return None if d is None else {n: d.pop(n).to(where[n]) for n in linears}

        E = on_device(qw.get("E")) if "QW" in needs else None
    finally:
        if job is not None:  # finished, failed or interrupted: the worker is gone and its buffer freed
            job.cancel()
        if isinstance(qw.get("E"), SpilledTensors):  # Q(W) − W's files on disk, whatever happened
            qw["E"].close()
    W = PerLinear(linears, lambda n: linears[n].weight.detach().to(where[n], torch.float32))  # [rows, cols]
    QW = None if E is None else PerLinear(linears, lambda n: W[n] + E[n].float())
    if materialize:
        W = {n: w.clone() if w.data_ptr() == linears[n].weight.data_ptr() else w for n, w in W.items()}
        QW = None if QW is None else {n: W[n] + E[n].float() for n in linears}
    return ImportanceInputs(W, on_device(grads.get("G")), on_device(grads.get("G2")), QW,
                            on_device(qw.get("H_diag")), on_device(qw.get("Hinv_diag")), meta)


# ---------------------------------------------------------------- steps 1 and 2, cache included

STEP1_PARTS = {"QW": "E", "H_diag": "H_diag", "Hinv_diag": "Hinv_diag"}  # selector need -> cache part


def _step1_qw(model, windows, config, needs, store: ScoreCache, meta: dict, *, one_thread: bool,
              device: torch.device, progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{"E": Q(W) − W, "H_diag", "Hinv_diag"}, the parts `needs` asks for (and any the cache had)."""
    t = time.perf_counter()
    want = {STEP1_PARTS[k] for k in needs if k in STEP1_PARTS}
    found = {}
    if want:
        key = store.qw_key(windows, threads=1 if one_thread else torch.get_num_threads())
        found = store.load(key)
        meta["qw"] = "cache"
        if want - found.keys():
            meta["qw"] = "computed"
            with parallel.single_thread() if one_thread else contextlib.nullcontext():
                fresh = _first_pass(model, windows, config, want_qw="E" in want | found.keys(),
                                    want_stats=bool(want & {"H_diag", "Hinv_diag"}) or "H_diag" in found,
                                    device=device, progress=progress)
            found.update({p: d for p, d in fresh.items() if d})
            del fresh
            parallel.trim_heap()  # the pass's activations and working sets, before the backward passes
            meta["qw_key"] = key  # written to the cache after step 2 (compute_importance), not beside it
        else:
            logger.info("score cache: Q(W) from %s", store.path(key))
    meta["seconds"]["qw"] = time.perf_counter() - t
    return found


def _step2_gradients(model, samples, needs, found: dict, store: ScoreCache, key: dict, meta: dict, *,
                     job: parallel.GradientWorker | None, config: QuantConfig, device: torch.device,
                     progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{"G": Σ|g|, "G2": Σg²}: from the cache (`found`), else from `job` or from backward passes here.

    Without a worker the whole model goes to the compute device in config.grad_dtype for the
    backward passes and back afterwards (bfloat16/float16 -> float32 -> back is exact).
    """
    t = time.perf_counter()
    meta["gradients"] = "cache"
    if needs & {"G", "G2"} - found.keys():
        meta["gradients"] = "computed"
        squares = "G2" in needs or "G2" in found
        if job is not None:
            res = job.result(progress=progress, out_dtype=CACHE_DTYPE)
            meta["gradient_processes"] = 2
        else:
            with placement.placed(model, device, placement.DTYPES[config.grad_dtype]):
                res = gradients.accumulate_gradients(model, samples, squares=squares, accum_device=config.accum_device,
                                                     checkpointing=config.checkpointing, progress=progress)
            meta["gradient_processes"] = 1
        found = {"G": {n: g.to(CACHE_DTYPE) for n, g in res.G.items()}}
        if res.G2 is not None:
            found["G2"] = {n: g.to(CACHE_DTYPE) for n, g in res.G2.items()}
        meta["n_backward"], meta["seconds_per_sample"] = res.n_samples, res.seconds_per_sample
        del res
        parallel.trim_heap()
        if store.enabled:
            meta["files"]["gradients"] = store.save(key, found)
    else:
        logger.info("score cache: gradients from %s", store.path(key))
    meta["seconds"]["gradients"] = time.perf_counter() - t  # with a worker: only what was left after Q(W)
    return found


def _first_pass(model, windows, config, *, want_qw: bool, want_stats: bool, device: torch.device,
                progress: bool) -> dict:
    """Step 1: {"E": {linear: Q(W) − W}, "H_diag": ..., "Hinv_diag": ...} (None where not run).

    The GPTQ pass runs on the model itself, one layer at a time, and gives each layer its
    full-precision weights back once its outputs are passed on (`restore=True`): one layer's
    weights are copied at a time, never the model.
    """
    E, H, Hinv = {}, None, None
    use_gptq_for_qw = want_qw and config.qw_method == "gptq"
    if use_gptq_for_qw or want_stats:
        # Q(W) − W goes to disk layer by layer: it is needed only for scoring, after the backward
        # passes, and on the CPU those run beside this pass (2 bytes per weight not held meanwhile).
        first = passes.gptq_quantize(model, windows, config, device=device, restore=True, error_dtype=CACHE_DTYPE,
                                     errors=SpilledTensors() if use_gptq_for_qw else None, progress=progress)
        if use_gptq_for_qw:
            E = first.errors
        # The Hessian diagonals come free with the pass: keep them, so the cache serves the
        # hessian / activation / owq_columns selectors later.
        H = {n: d.float() for n, d in first.H_diag.items()}
        Hinv = {n: d.float() for n, d in first.Hinv_diag.items()}
        del first
    if want_qw and config.qw_method == "rtn":
        E = passes.rtn_errors(model, config, dtype=CACHE_DTYPE)
    elif want_qw and config.qw_method != "gptq":
        raise ValueError(f"qw_method={config.qw_method!r} is unknown; choose 'gptq' or 'rtn'.")
    return {"E": E or None, "H_diag": H, "Hinv_diag": Hinv}


def build_masks(inputs: ImportanceInputs, *, selector: str, ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Steps 3-4: score every targeted weight and keep the global top ratio (bool [rows, cols]).

    Scores are made one linear at a time and dropped (algo.select.select_topk_streaming), so
    their memory is one linear's, whatever the model.
    """
    sel = selectors.get_selector(selector)
    found = {k: getattr(inputs, k) for k in sel.needs}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise ValueError(f"selector {selector!r} needs {missing}; compute_importance with selector={selector!r}.")
    names = list(inputs.W)
    gen = None

    def score_of(name: str) -> torch.Tensor:  # [rows, cols]
        nonlocal gen
        if name == names[0]:  # every pass over the linears draws the same random numbers (random selector)
            gen = torch.Generator().manual_seed(seed)
        return selectors.score(selector, W=inputs.W[name], generator=gen, **{k: v[name] for k, v in found.items()})

    shapes = {n: tuple(inputs.W[n].shape) for n in names}
    if sel.columns:  # every row of a column score is the same: rank columns, not weights
        return select.select_columns({n: score_of(n)[0] for n in names}, shapes=shapes, ratio=ratio)
    return select.select_topk_streaming(score_of, shapes, ratio=ratio)


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
    selectors.get_selector(config.selector)  # a typo fails before any long work
    names = list(walk.named_linears(model))
    seconds = {"score": 0.0}
    if config.ratio == 0:  # nothing to keep: plain GPTQ
        masks, inputs_meta = {}, {"seconds": {"qw": 0.0, "gradients": 0.0}}
    else:
        inputs = compute_importance(model, windows, config, samples=samples, progress=progress, cache=cache,
                                    materialize=False)
        t = time.perf_counter()
        masks = build_masks(inputs, selector=config.selector, ratio=config.ratio, seed=config.seed)
        linears = walk.named_linears(model)  # beside the layers: on the host, or where a device_map put them
        masks = {n: m.to(linears[n].weight.device) for n, m in masks.items()}
        seconds["score"] = time.perf_counter() - t
        inputs_meta = inputs.meta
        del inputs  # G and Q(W) − W are not needed by the final pass
        parallel.trim_heap()
    seconds.update(inputs_meta["seconds"])
    t = time.perf_counter()
    final = passes.gptq_quantize(model, windows, config, masks=masks,
                                 device=placement.compute_device(model, config.device, config.device_map),
                                 progress=progress)
    seconds["gptq"] = time.perf_counter() - t
    n_kept = {n: int(masks[n].sum()) if n in masks else 0 for n in names}
    info = {"selector": config.selector, "ratio": config.ratio, **inputs_meta, "k": sum(n_kept.values())}
    return TacqResult(masks, n_kept, final.loss, final.grids, final.codes, seconds, info)
