"""The byte budget of a TaCQ / GPTQ run: peak host and device memory, predicted from shapes only.

Nothing is allocated: every number is arithmetic on the model config (hidden, intermediate,
layers, heads, kv heads, vocab, tied embeddings), the run's settings and the constants below.
The memory design priced here, stage by stage (TaCQ, Xiao et al., 2025, arXiv 2504.07389, Alg. 1):

  load       the model lives on the host in its dtype (4/2/2 bytes per parameter), loaded once;
  gptq_1     GPTQ for Q(W), sequential onloading (model/walk.py's pass): one decoder layer, its
             largest linear's fp32 working set and one layer's activations of all calibration
             windows on the compute device; Q(W) − W goes to disk in bfloat16, layer by layer;
  gradients  the whole model moved to the device in grad_dtype (placement.placed: nothing stays
             on the host), float32 G = Σ|dL/dW| (and Σg² with squares) on the device or the
             host, one sample's activations (algo/gradients.py); Q(W) − W waits on disk;
  scoring    |W|·|G|·|Q(W) − W| one linear at a time (run/tacq.py); G, Q(W) − W (bf16) and the
             keep-masks (bool) of every targeted weight on the compute device;
  gptq_2     the masked GPTQ pass, priced like gptq_1, with the keep-masks on the host.
method="gptq" has the load and gptq stages only. With device="cpu" the device parts are host parts.
The KL reference (log-probs of the full-precision model) and Q(W) − W between the first pass and
scoring (io.SpilledTensors) are stored on disk, priced as `disk`.
Not priced: the allocator's caching slack (~0.5 GiB on an H100), packing the quantized model for
saving, and the embedding table's moment on the device while layer 0's inputs are captured.

    python -m tacq_lite.run.budget --shape llama-3-8b --dtype bfloat16 --device cuda [--accum-device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..algo.gradients import HEAD_CHUNK

GIB = 2**30
PROCESS_BYTES = int(0.6 * GIB)  # host RSS of python + torch + transformers before any tensor
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context and cuBLAS workspace, outside torch's allocator
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACCUM_BYTES = 4  # G and Σg² are summed in float32
CACHE_BYTES = 2  # G and Q(W) − W are cached on the host in bfloat16 (run/score_cache.py)
MASK_BYTES = 1  # a keep-mask is bool
GPTQ_WEIGHT_COPIES = 3  # [rows, cols] fp32: W0, the working transposed copy, W_hat (algo/gptq.py)
GPTQ_HESSIAN_COPIES = 4  # [cols, cols] fp32: H and its clone, the Cholesky factor of H⁻¹ and its workspace
CALIB_HIDDEN_COPIES = 3  # [n, T, hidden] per layer: inputs, normed / attention context, residual (walk.py)
SCORE_TEMPS = 4  # [rows, cols] fp32 while scoring one linear: |W|, |G|, |Q(W) − W|, the score
LOGIT_COPIES = 3  # [positions, vocab] fp32: logits, cross_entropy's saved log-softmax, their gradient
# Activations kept for backward, per decoder layer and token, in elements: ACT_HIDDEN·hidden +
# ACT_INTER·intermediate. Counting a Llama layer's saved tensors gives ~10-12·hidden (two RMSNorms'
# input and normalized output, q, k, v, RoPE'd q and k, k/v repeated for SDPA, attention output,
# o_proj's input) and 4·intermediate (gate, silu(gate), up, their product). 12 and 4 fit the H100
# measurement of bench/results/importance_memory (Llama-3-8B, fp32, T=512: 7.29 GiB over weights +
# accumulators measured, 7.23 predicted); see tests/test_budget.py.
ACT_HIDDEN = 12
ACT_INTER = 4
ACT_NORM_FP32 = 4  # of ACT_HIDDEN: RMSNorm upcasts to float32, so these stay 4 bytes in bf16

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # model/walk.py's, in its order
STAGES = ("load", "gptq_1", "gradients", "scoring", "gptq_2")  # TaCQ's, in order; GPTQ: load, gptq

# Public architecture numbers (each model's config.json).
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size", "tie_word_embeddings")
SHAPES = {name: dict(zip(_FIELDS, numbers)) for name, numbers in {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256, False),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
}.items()}


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama-style decoder that memory depends on."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # lm_head shares the embedding table
    head_dim: int
    qkv_bias: bool = False  # Qwen2: q/k/v carry a bias; Llama: attention_bias
    o_bias: bool = False
    mlp_bias: bool = False
    name: str = field(default="", compare=False)  # where the numbers came from

    def linears(self) -> dict[str, tuple[int, int]]:
        """{walk's name: (rows, cols)} of one layer's targeted linears, as nn.Linear.weight is shaped."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return dict(zip(LINEAR_NAMES, ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))))

    @property
    def targeted_per_layer(self) -> int:
        return sum(r * c for r, c in self.linears().values())

    @property
    def targeted(self) -> int:
        """Weights TaCQ scores and GPTQ quantizes (walk.named_linears)."""
        return self.layers * self.targeted_per_layer

    @property
    def largest(self) -> int:
        """Elements of the largest targeted weight."""
        return max(r * c for r, c in self.linears().values())

    @property
    def layer_params(self) -> int:
        """One decoder layer: its linears, their biases and two RMSNorm weights."""
        r = {n: rows for n, (rows, _) in self.linears().items()}
        bias = (self.qkv_bias * (r["self_attn.q_proj"] + 2 * r["self_attn.k_proj"]) + self.o_bias * self.hidden
                + self.mlp_bias * (2 * self.intermediate + self.hidden))
        return self.targeted_per_layer + bias + 2 * self.hidden

    @property
    def n_params(self) -> int:
        """Every parameter: layers, embedding table, lm_head unless tied, the final norm."""
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def model_shape(config_or_name) -> Shape:
    """A Shape from a name in SHAPES, a config.json or model folder, a Hugging Face id (needs the
    hub), a dict of config fields or a transformers config; raises ValueError naming what is wrong."""
    if isinstance(config_or_name, Shape):
        return config_or_name
    name = ""
    if isinstance(config_or_name, (str, os.PathLike)):
        name = str(config_or_name)
        path = Path(name).expanduser()
        if name in SHAPES:
            cfg = SHAPES[name]
        elif path.is_file() or (path / "config.json").is_file():
            cfg = json.loads((path if path.is_file() else path / "config.json").read_text())
        elif "/" in name and not path.exists():
            try:
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(name).to_dict()
            except Exception as err:  # noqa: BLE001 - any failure is "this id gave no config"
                raise ValueError(f"shape {name!r}: no config could be loaded ({type(err).__name__}); give one of "
                                 f"{', '.join(SHAPES)}, a config.json or a model folder.") from None
        else:
            raise ValueError(f"unknown shape {name!r}; give one of {', '.join(SHAPES)}, a config.json, "
                             "a model folder or a Hugging Face id.")
    elif isinstance(config_or_name, Mapping):
        cfg = dict(config_or_name)
    else:
        cfg = config_or_name.to_dict()
        name = getattr(config_or_name, "_name_or_path", "") or cfg.get("model_type", "")
    cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the decoder's numbers there
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if missing:
        raise ValueError(f"shape {name or 'config'}: {', '.join(missing)} missing or not a positive integer.")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if heads % kv or (not cfg.get("head_dim") and cfg["hidden_size"] % heads):
        raise ValueError(f"shape {name or 'config'}: {heads} heads, {kv} kv heads, hidden {cfg['hidden_size']} "
                         "do not divide; give head_dim and a kv head count that divides the heads.")
    attn_bias = bool(cfg.get("attention_bias", False))
    qwen2 = cfg.get("model_type") == "qwen2"  # Qwen2Attention: bias on q/k/v, none on o (transformers 5)
    return Shape(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                 heads=heads, kv_heads=kv, vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
                 head_dim=head_dim, qkv_bias=attn_bias or qwen2, o_bias=attn_bias and not qwen2,
                 mlp_bias=bool(cfg.get("mlp_bias", False)), name=name)


@dataclass(frozen=True)
class Budget:
    """Predicted bytes of one run, stage by stage."""
    shape: Shape
    settings: dict  # budget()'s keyword arguments, so that a change can be re-priced
    host_parts: dict  # stage -> {what: bytes} in host memory
    device_parts: dict  # stage -> {what: bytes} on the compute device; {} for every stage on cpu
    disk: int  # temporary files: KL reference log-probs n_eval × (seq_len − 1) × vocab × 4, Q(W) − W (TaCQ)

    @property
    def host(self) -> dict[str, int]:
        return {s: sum(p.values()) for s, p in self.host_parts.items()}

    @property
    def device(self) -> dict[str, int]:
        return {s: sum(p.values()) for s, p in self.device_parts.items()}

    @property
    def peak_host(self) -> int:
        return max(self.host.values())

    @property
    def peak_device(self) -> int:
        return max(self.device.values())

    def fits(self, host_bytes: int | None = None, device_bytes: int | None = None) -> tuple[bool, str]:
        """(True, summary) or (False, one line naming the first stage that does not fit and a change
        that makes the whole run fit). None skips that check."""
        over = _overflow(self, host_bytes, device_bytes)
        if over is None:
            return True, (f"fits: peak host {self.peak_host / GIB:.2f} GiB, peak {self.settings['device']} "
                          f"{self.peak_device / GIB:.2f} GiB")
        stage, where, need, have = over
        parts = (self.device_parts if where == "device" else self.host_parts)[stage]
        top = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
        mem = self.settings["device"] if where == "device" else "host"
        return False, (f"stage {stage!r} needs {need / GIB:.1f} GiB of {mem} memory ({top} GiB), "
                       f"{have / GIB:.1f} GiB available: {_advice(self, host_bytes, device_bytes)}")


def budget(shape, *, dtype: str = "float32", device: str = "cpu", grad_dtype: str = "float32",
           accum_device: str | None = None, checkpointing: bool = False, n_calib: int = 128,
           seq_len: int = 2048, n_eval: int = 8, squares: bool = False, method: str = "tacq",
           worker: bool = False, head_chunk: int | None = HEAD_CHUNK, cache: bool = True) -> Budget:
    """Price one run; accum_device=None keeps G beside the weights (on `device`).

    worker=True: the CPU's forked gradient worker (run/parallel.py), whose backward passes run beside
    the first GPTQ pass. head_chunk: positions whose logits exist at once in backward
    (algo/gradients.py's HEAD_CHUNK); None prices the whole [T − 1, vocab] logits, as before it.
    cache=True (tacq_quantize's default): the score cache is written after the backward passes, one
    tensor at a time through host memory."""
    s = model_shape(shape)
    accum_device = None if accum_device == device else accum_device  # beside the weights either way
    settings = {"dtype": _dtype(dtype), "device": device, "grad_dtype": _dtype(grad_dtype),
                "accum_device": accum_device, "checkpointing": checkpointing, "n_calib": n_calib,
                "seq_len": seq_len, "n_eval": n_eval, "squares": squares, "method": method, "worker": worker,
                "head_chunk": head_chunk, "cache": cache}
    if worker and device != "cpu":
        raise ValueError("worker=True is the CPU's forked gradient worker; it needs device='cpu'.")
    if device not in ("cpu", "cuda") or accum_device not in (None, "cpu", device):
        raise ValueError(f"device {device!r} / accum_device {accum_device!r}: device is cpu or cuda, "
                         "accum_device None, cpu or the device.")
    if method not in ("tacq", "gptq") or n_calib < 1 or seq_len < 2 or n_eval < 0:
        raise ValueError(f"method {method!r}, n_calib {n_calib}, seq_len {seq_len}, n_eval {n_eval}: method is "
                         "tacq or gptq, n_calib >= 1, seq_len >= 2, n_eval >= 0.")
    b, gb, T = DTYPE_BYTES[settings["dtype"]], DTYPE_BYTES[settings["grad_dtype"]], seq_len
    h, i, n = s.hidden, s.intermediate, s.targeted
    gpu = device == "cuda"
    host = {st: {"process": PROCESS_BYTES, "weights": s.n_params * b} for st in STAGES}
    dev = {st: {"cuda context": CUDA_CONTEXT_BYTES} if gpu else {} for st in STAGES}
    on = {st: dev[st] if gpu else host[st] for st in STAGES}  # the compute device's parts
    for st in ("gptq_1", "gptq_2"):  # sequential onloading: one layer at a time
        if gpu:  # on the cpu the layer is the host copy itself
            on[st]["layer weights"] = s.layer_params * b
        on[st]["gptq working set"] = 4 * max(GPTQ_WEIGHT_COPIES * r * c + GPTQ_HESSIAN_COPIES * c * c
                                             for r, c in s.linears().values())
        on[st]["calibration activations"] = n_calib * T * (CALIB_HIDDEN_COPIES * h + i) * b
    # Gradient pass: the whole model in grad_dtype (on the cpu, shared when the dtypes agree).
    if gpu or gb != b:
        on["gradients"]["model (grad dtype)"] = s.n_params * gb
    (host if (accum_device or device) == "cpu" else dev)["gradients"]["accumulators"] = \
        n * ACCUM_BYTES * (2 if squares else 1)
    if gpu and accum_device == "cpu":  # |g| of one linear copied to the host before add_
        host["gradients"]["accumulator staging"] = s.largest * ACCUM_BYTES
    layer_act = T * ((ACT_HIDDEN - ACT_NORM_FP32) * h * gb + ACT_NORM_FP32 * h * 4 + ACT_INTER * i * gb)
    on["gradients"]["activations"] = s.layers * T * h * gb if checkpointing else s.layers * layer_act
    if worker:  # the worker's backward passes start beside the first GPTQ pass, whose working set
        # is then held at the same time (one backward pass at a time: run/parallel.py)
        host["gradients"]["first GPTQ pass beside it"] = \
            host["gptq_1"]["gptq working set"] + host["gptq_1"]["calibration activations"]
    # After the forward the logits peak; later one linear's grad and |grad| (plus, with
    # checkpointing, one layer's recomputed activations): whichever is larger.
    on["gradients"]["logits or one layer's backward"] = max(
        min(T - 1, head_chunk or T - 1) * s.vocab * 4 * LOGIT_COPIES,
        2 * s.largest * gb + (layer_act if checkpointing else 0))
    if gpu:  # placement.placed moves the parameters to the device: nothing of the model stays on the host
        del host["gradients"]["weights"]
    # Scoring and the masked pass run where the compute is: G and Q(W) − W (bf16) and the masks live there.
    on["scoring"].update({"G": n * CACHE_BYTES, "Q(W)-W": n * CACHE_BYTES, "keep masks": n * MASK_BYTES})
    on["scoring"]["score working set"] = SCORE_TEMPS * s.largest * 4
    if cache and method == "tacq":  # written just before scoring, one tensor at a time (io.write_safetensors)
        host["scoring"]["score cache write"] = s.largest * CACHE_BYTES
    host["gptq_2"]["keep masks"] = n * MASK_BYTES  # moved to the host with the layers (run/tacq.py)
    keep = STAGES if method == "tacq" else ("load", "gptq_1")
    rename = {"gptq_1": "gptq"} if method == "gptq" else {}
    host_parts = {rename.get(st, st): host[st] for st in keep}
    return Budget(s, settings, host_parts, {rename.get(st, st): dev[st] for st in keep},
                  disk=n_eval * (T - 1) * s.vocab * 4 + (n * CACHE_BYTES if method == "tacq" else 0))


def _dtype(d) -> str:
    d = str(d).removeprefix("torch.")
    if d not in DTYPE_BYTES:
        raise ValueError(f"dtype {d!r}: use one of {', '.join(DTYPE_BYTES)}.")
    return d


def _overflow(bud: Budget, host_bytes, device_bytes):
    """(stage, 'host' | 'device', need, have) of the first stage that does not fit, else None."""
    for st in bud.host:
        if host_bytes is not None and bud.host[st] > host_bytes:
            return st, "host", bud.host[st], host_bytes
        if device_bytes is not None and bud.device_parts[st] and bud.device[st] > device_bytes:
            return st, "device", bud.device[st], device_bytes
    return None


def _remedies(s: dict, stage: str, where: str) -> list[tuple[str, dict]]:
    """Changes of settings `s` worth trying for this stage, least costly to the result first."""
    def halve(key: str, flag: str, why: str) -> list[tuple[str, dict]]:
        return [(f"{flag} {v} ({why})", {key: v}) for v in (s[key] // 2**k for k in range(1, 8)) if v >= 2]

    out = []
    if stage == "gradients" and where == "device":
        out += [("--accum-device cpu (accumulators on the host)", {"accum_device": "cpu"}),
                ("--checkpointing", {"checkpointing": True}),
                ("--grad-dtype bfloat16", {"grad_dtype": "bfloat16"})]
    if stage == "gradients" and where == "host":
        if s["device"] == "cuda":
            out.append(("--accum-device cuda (accumulators on the device)", {"accum_device": None}))
        out += [("--checkpointing", {"checkpointing": True}), ("--grad-dtype bfloat16", {"grad_dtype": "bfloat16"})]
    out.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    if stage.startswith("gptq"):
        out += halve("n_calib", "--n-calib", "fewer calibration windows")
    if stage == "gradients":
        out += halve("seq_len", "--seq-len", "shorter windows")
    return [(flag, ch) for flag, ch in out if any(s[k] != v for k, v in ch.items())]


def _advice(bud: Budget, host_bytes, device_bytes) -> str:
    """Greedy, stage by stage: the first change that makes the whole run fit, else the first that makes
    the failing stage fit, else that stage's changes combined; 'a bigger machine' when none does."""
    settings, flags = dict(bud.settings), {}
    for _ in range(len(STAGES) + 1):
        over = _overflow(budget(bud.shape, **settings), host_bytes, device_bytes)
        if over is None:
            return "use " + " and ".join(flags.values())
        stage, where = over[:2]
        remedies = [(f, c) for f, c in _remedies(settings, stage, where)  # never undo an earlier change
                    if tuple(c) not in flags or tuple(c) in (("n_calib",), ("seq_len",))]

        def stage_fits(trial: dict, stage=stage, where=where) -> bool:
            b = budget(bud.shape, **trial)
            return (b.host if where == "host" else b.device)[stage] <= (host_bytes if where == "host" else device_bytes)

        pick = next(([(f, c)] for f, c in remedies
                     if _overflow(budget(bud.shape, **{**settings, **c}), host_bytes, device_bytes) is None), None)
        pick = pick or next(([(f, c)] for f, c in remedies if stage_fits({**settings, **c})), None)
        if pick is None:  # this stage's changes, one after another, until it fits
            trial, pick = dict(settings), []
            for f, c in remedies:
                trial.update(c)
                pick.append((f, c))
                if stage_fits(trial):
                    break
            else:
                mem = "host" if where == "host" else bud.settings["device"]
                return f"no setting here fits stage {stage!r}; use a machine with more {mem} memory"
        for f, c in pick:  # a later --n-calib replaces an earlier one
            settings.update(c)
            flags[tuple(c)] = f
    return "no setting here fits; use a machine with more memory"


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else free pages × page size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(bud: Budget, host_bytes: int | None = None, device_bytes: int | None = None) -> None:
    """Raise ValueError (one line: stage, need, available, what to change) if the run would not fit.

    A None is measured now: MemAvailable, and torch.cuda.mem_get_info's free bytes when the run uses
    cuda and one is visible. This process's baseline and CUDA context are already outside those, so
    they are added back to what is available.
    """
    if host_bytes is None:
        host_bytes = available_host_bytes() + PROCESS_BYTES
    if device_bytes is None and bud.settings["device"] == "cuda":
        import torch

        if torch.cuda.is_available():
            device_bytes = torch.cuda.mem_get_info()[0] + CUDA_CONTEXT_BYTES
    ok, why = bud.fits(host_bytes, device_bytes)
    if not ok:
        raise ValueError(why)


def _gib(x: int) -> str:
    return f"{x / GIB:.2f}"


def format_table(rows: Iterable) -> str:
    """A markdown table, one row per Budget (or (label, Budget)): settings, peaks and their stages, disk."""
    lines = [("| model | dtype | device | grad dtype | accumulators | checkpointing | n_calib × seq_len "
              "| peak device GiB (stage) | peak host GiB (stage) | KL reference disk GiB |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label, bud = row if isinstance(row, tuple) else (row.shape.name, row)
        s = bud.settings
        dev = (f"{_gib(bud.peak_device)} ({max(bud.device, key=bud.device.get)})" if s["device"] == "cuda" else "-")
        lines.append(f"| {label} | {s['dtype']} | {s['device']} | {s['grad_dtype']} "
                     f"| fp32 on {s['accum_device'] or s['device']}{' (+Σg²)' if s['squares'] else ''} "
                     f"| {'yes' if s['checkpointing'] else 'no'} | {s['n_calib']} × {s['seq_len']} | {dev} "
                     f"| {_gib(bud.peak_host)} ({max(bud.host, key=bud.host.get)}) | {_gib(bud.disk)} |")
    return "\n".join(lines)


def format_stages(bud: Budget) -> str:
    """A markdown table of one Budget: host and device GiB per stage, with their parts."""
    lines = [f"| stage | host GiB | {bud.settings['device']} GiB | parts (GiB) |", "|---|---|---|---|"]
    for st in bud.host:
        parts = {**bud.host_parts[st], **{f"{k} [dev]": v for k, v in bud.device_parts[st].items()}}
        what = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
        lines.append(f"| {st} | {_gib(bud.host[st])} | {_gib(bud.device[st])} | {what} |")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, no usage block
        print(f"tacq_lite.run.budget: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Print the stage table of one run; with --host-gib/--device-gib or --check, whether it fits."""
    p = _Parser(prog="python -m tacq_lite.run.budget", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b", help=f"{', '.join(SHAPES)}, a config.json, a folder or an HF id")
    p.add_argument("--method", default="tacq", choices=("tacq", "gptq"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPE_BYTES), help="the model's dtype on the host")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--grad-dtype", default="float32", choices=tuple(DTYPE_BYTES))
    p.add_argument("--accum-device", default=None, choices=("cpu", "cuda"), help="default: the device")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--squares", action="store_true", help="also Σg² accumulators")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--n-eval", type=int, default=8, help="KL reference windows stored on disk")
    p.add_argument("--host-gib", type=float, default=None)
    p.add_argument("--device-gib", type=float, default=None)
    p.add_argument("--check", action="store_true", help="check against this machine's free memory")
    a = p.parse_args(argv)
    try:
        bud = budget(a.shape, dtype=a.dtype, device=a.device, grad_dtype=a.grad_dtype, accum_device=a.accum_device,
                     checkpointing=a.checkpointing, n_calib=a.n_calib, seq_len=a.seq_len, n_eval=a.n_eval,
                     squares=a.squares, method=a.method)
        print(format_stages(bud))
        print(f"\npeak host {_gib(bud.peak_host)} GiB, peak {a.device} {_gib(bud.peak_device)} GiB, "
              f"KL reference on disk {_gib(bud.disk)} GiB ({bud.shape.n_params:,} parameters, "
              f"{bud.shape.targeted:,} targeted)")
        host, dev = (None if x is None else int(x * GIB) for x in (a.host_gib, a.device_gib))
        if a.check or host is not None or dev is not None:
            if a.check:
                check_fits(bud, host, dev)
            else:
                ok, why = bud.fits(host, dev)
                if not ok:
                    raise ValueError(why)
            print("fits")
    except ValueError as err:
        print(f"tacq_lite.run.budget: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
