"""`AutoModelForCausalLM.from_pretrained(folder)` for folders written by `save_quantized`.

transformers picks a loader from config.json's `quantization_config.quant_method`. tacq_lite
registers "tacq_lite" through transformers' public hooks (`register_quantization_config`,
`register_quantizer`) when `tacq_lite` is imported, so after `import tacq_lite`

    model = AutoModelForCausalLM.from_pretrained(folder)          # or device_map="cuda"

returns the packed QuantLinear model, with the same logits as `load_quantized(folder)`. The
quantizer below does three things around transformers' own weight loading:

1. before: verify the folder's tacq_lite.json (format version, every file's size and sha256),
   then swap each listed linear for an empty (meta) QuantLinear of the stored layout;
2. transformers assigns the stored tensors by name (safetensors only: nothing is unpickled) and
   casts the unquantized ones to the requested dtype; the packed buffers keep their dtypes;
3. after: check every QuantLinear's buffers against its declared shape and bits.

Without `import tacq_lite`, transformers does not know "tacq_lite": it logs "Unknown quantization
type" and then stops on the zero-element `<linear>.weight` markers (model/checkpoint.py) with a
size-mismatch error, rather than returning a model with random linears.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import walk
from .checkpoint import (
    MARKER,
    META_FILE,
    QUANT_METHOD,
    check_stored_layout,
    meta_quant_linear,
    non_persistent_buffers,
    read_meta,
    verify_files,
)
from .qlinear import quant_linears


class TacqLiteConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a saved tacq_lite model (written by `save_quantized`).

    layers: {linear name: {in_features, out_features, bits, groupsize, nnz, bias}}; bits and
    group_size summarize them (a list when layers differ)."""

    def __init__(self, format_version: int | None = None, bits=None, group_size=None, layers: dict | None = None,
                 kept_dtype: str = "float16", kept_layout: str = "csr", unquantized_dtype: str = "bfloat16",
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version, self.bits, self.group_size = format_version, bits, group_size
        self.layers = layers or {}
        self.kept_dtype, self.kept_layout, self.unquantized_dtype = kept_dtype, kept_layout, unquantized_dtype


class TacqLiteHfQuantizer(HfQuantizer):
    """Loads a saved tacq_lite model inside `from_pretrained` (see the module docstring)."""

    requires_calibration = True  # a tacq_lite model is quantized by tacq_lite, never on load

    def _folder(self, checkpoint_files) -> Path:
        if not checkpoint_files:
            raise ValueError("from_pretrained found no safetensors file for this tacq_lite model; load the folder "
                             "save_quantized wrote (it holds model.safetensors or model-0000N-of-... shards).")
        return Path(checkpoint_files[0]).parent

    def preprocess_model(self, model, dtype=None, checkpoint_files=None, **kwargs):
        folder = self._folder(checkpoint_files)
        if not (folder / META_FILE).is_file():
            raise ValueError(f"{folder} has a tacq_lite quantization_config but no {META_FILE}, so its checksums "
                             f"cannot be verified; load the whole folder save_quantized wrote, {META_FILE} included "
                             "(from the Hub: download the repository to a folder first, then load that folder).")
        meta = read_meta(folder)
        verify_files(folder, meta)
        layers = self.quantization_config.layers
        if layers != meta["layers"]:
            differ = sorted(n for n in set(layers) | set(meta["layers"]) if layers.get(n) != meta["layers"].get(n))
            raise ValueError(f"config.json's quantization_config and {META_FILE} describe different layers (first: "
                             f"{differ[0]}); the folder was edited by hand. Re-save the model.")
        check_stored_layout(folder, meta)  # every packed buffer is there: none is left uninitialised
        super().preprocess_model(model, dtype=dtype, **kwargs)
        bias_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        for name, spec in layers.items():
            walk.set_module(model, name, meta_quant_linear(spec, dtype=bias_dtype))
        # The markers are for transformers without tacq_lite, and the buffers a model computes itself
        # (rotary inv_freq, stored for load_quantized) are computed here too: both expected and unused.
        expected = {f"{n}.{MARKER}" for n in layers} | non_persistent_buffers(model)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {"^" + re.escape(n) + "$" for n in expected}

    def _process_model_after_weight_loading(self, model, **kwargs):
        for q in quant_linears(model).values():
            q.check()
        return model

    def is_serializable(self, **kwargs) -> bool:
        return False  # save with tacq_lite's save_quantized, which writes the manifest and checksums

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers' loaders know quant_method "tacq_lite" (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TacqLiteConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TacqLiteHfQuantizer)
