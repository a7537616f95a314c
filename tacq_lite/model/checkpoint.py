"""Saving and loading whole quantized models: safetensors shards + a JSON manifest.

A saved folder (format version 2) holds

    tacq_lite.json      format name and version, per-layer shapes, size accounting, and the size
                        and sha256 of every file written
    model.safetensors   every tensor: packed linears as QuantLinear stores them, and the tensors
                        that are not quantized (embeddings, norms, head) in 16-bit (bfloat16 by
                        default). A model larger than `max_shard_size` is split into
                        model-00001-of-0000N.safetensors ... with model.safetensors.index.json
                        (the layout `save_pretrained` writes)
    config.json         the model's config plus `quantization_config` (quant_method "tacq_lite",
                        bits, group size, format version, the kept-weight layout of each layer):
                        with `import tacq_lite`, `AutoModelForCausalLM.from_pretrained(folder)`
                        loads the packed model (model/hf_quantizer.py)
    tokenizer files, generation_config.json

Each packed linear also stores a zero-element `<linear>.weight`. tacq_lite never reads it; it is
there for transformers without tacq_lite imported, which would otherwise only warn that the
weights are missing and fill every decoder linear with random numbers. With the marker, its
shape check stops the load with an error instead.

`save_quantized` writes the folder under a temporary name and renames it into place when complete
(io.atomic_dir). `load_quantized` verifies the manifest and checksums, builds the model on the meta
device (no memory, no random init), swaps in meta QuantLinears and assigns the stored tensors;
nothing is unpickled. Folders of format version 1 (one file, fp32 unquantized tensors, no
quantization_config) still load with `load_quantized`; `upgrade_checkpoint` re-saves one as version 2.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, sha256_file, write_safetensors
from . import walk
from .qlinear import QuantLinear, quant_linears

FORMAT_NAME = "tacq_lite.quantized"


FORMAT_VERSION = 2


READABLE_VERSIONS = (1, 2)  # version 1: one fp32 file, no quantization_config (before transformers loading)


QUANT_METHOD = "tacq_lite"  # config.json's quantization_config.quant_method


META_FILE = "tacq_lite.json"


TENSOR_FILE = "model.safetensors"


INDEX_FILE = "model.safetensors.index.json"


MARKER = "weight"  # zero-element int8 <linear>.weight: makes transformers without tacq_lite fail loudly


DEFAULT_SHARD_SIZE = "5GB"


UNQUANTIZED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10**9) or "500MiB" (2**20), as save_pretrained reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = int(float(text[: -len(unit)]) * _SIZE_UNITS[unit]) if unit else int(text)
        except (ValueError, OverflowError):  # "lots", "1e400GB"
            value = -1
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} is not a positive size; write e.g. 5GB, 500MB or 2GiB.")
    return value


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every parameter and buffer once (tied tensors stored under their first name); returns
    (tensors, names of the tied aliases)."""
    tensors, seen, aliases = {}, {}, []
    items = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in items:
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases.append(name)
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach()
    return tensors, aliases


QUANT_BUFFERS = ("qweight", "scale", "zero", "kept_row_ptr", "kept_col_idx", "kept_values")  # a packed layer's


def stored_as_is(name: str, layers, computed) -> bool:
    """Whether tensor `name` is stored and loaded in its own dtype: a packed layer's buffers and the
    buffers a model computes itself are; every other floating tensor (embeddings, norms, the head,
    biases) is stored in the unquantized dtype and loaded in the compute dtype."""
    owner, _, leaf = name.rpartition(".")
    return (owner in layers and leaf in QUANT_BUFFERS) or name in computed


def meta_quant_linear(spec: dict, *, dtype: torch.dtype, backend: str = "auto") -> QuantLinear:
    """An empty (meta-device) QuantLinear of a layer table entry, to be filled with stored tensors."""
    with torch.device("meta"):
        return QuantLinear(spec["in_features"], spec["out_features"], bits=spec["bits"], groupsize=spec["groupsize"],
                           nnz=spec["nnz"], bias=spec["bias"], dtype=dtype, backend=backend)


def non_persistent_buffers(model: nn.Module) -> set[str]:
    """Names of the buffers a model computes itself (e.g. rotary inv_freq): not in its state_dict."""
    return {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}


class _Stored(Mapping):
    """The tensors as they go to disk, converted one at a time when read: packed linears and
    computed buffers as they are, other floating tensors (the weights that were not quantized) in
    `dtype`, plus a marker per packed linear."""

    def __init__(self, tensors: dict[str, torch.Tensor], layers: set[str], dtype: torch.dtype,
                 exact: set[str] = frozenset()):
        self._tensors, self._layers, self._dtype = tensors, layers, dtype
        self._names = list(tensors) + [f"{n}.{MARKER}" for n in sorted(layers)]
        self._exact = exact

    def _cast(self, name: str, t: torch.Tensor) -> bool:
        return t.is_floating_point() and not stored_as_is(name, self._layers, self._exact)

    def __getitem__(self, name: str) -> torch.Tensor:
        owner, _, leaf = name.rpartition(".")
        if owner in self._layers and leaf == MARKER and name not in self._tensors:
            return torch.zeros(0, dtype=torch.int8)
        t = self._tensors[name]
        return (t.to(self._dtype) if self._cast(name, t) else t).contiguous()

    def nbytes(self, name: str) -> int:
        if name not in self._tensors:
            return 0
        t = self._tensors[name]
        return t.numel() * (self._dtype.itemsize if self._cast(name, t) else t.element_size())

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _shards(stored: _Stored, max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into consecutive groups of at most max_bytes (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name in stored:
        n = stored.nbytes(name)
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    return shards + [current] if current else shards


def _compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating tensor outside the packed linears."""
    packed = set(quant_linears(model))
    for name, t in model.named_parameters():
        if name.rsplit(".", 1)[0] not in packed and t.is_floating_point():
            return t.dtype
    return torch.float32


def tensor_files(meta: dict) -> list[str]:
    """The safetensors files of a saved model, in order."""
    return list(meta.get("shards") or [TENSOR_FILE])


def quantization_config(meta: dict) -> dict:
    """The `quantization_config` that config.json carries for transformers (model/hf_quantizer.py)."""
    layers = meta["layers"]
    bits = sorted({spec["bits"] for spec in layers.values()})
    groups = sorted({spec["groupsize"] for spec in layers.values()})
    return {"quant_method": QUANT_METHOD, "format_version": meta["format_version"],
            "bits": bits[0] if len(bits) == 1 else bits, "group_size": groups[0] if len(groups) == 1 else groups,
            "kept_dtype": "float16", "kept_layout": "csr", "unquantized_dtype": meta["unquantized_dtype"],
            "layers": layers}


def check_save_target(folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise unless `folder` is new, empty, or (with overwrite) a tacq_lite model and nothing else.

    "A tacq_lite model" means: its tacq_lite.json is a valid manifest (`read_meta`) and every
    file and folder inside is one that manifest lists, so replacing it deletes only what
    `save_quantized` wrote. Anything else there (notes, code, a half-written model) is kept.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose a new or empty folder.")
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    if not present:
        return
    if not (folder / META_FILE).is_file():
        raise FileExistsError(f"{folder} holds files that are not a tacq_lite model; choose an empty or new folder.")
    if not overwrite:
        raise FileExistsError(f"{folder} already holds a tacq_lite model; pass overwrite=True (CLI: --overwrite).")
    try:
        listed = set(read_meta(folder)["files"]) | {META_FILE}
    except (ValueError, FileNotFoundError) as err:
        raise FileExistsError(f"not replacing {folder}: its {META_FILE} is not a valid tacq_lite manifest ({err}); "
                              "choose another folder.") from None
    extra = [name for name in present if name not in listed]
    if extra:
        raise FileExistsError(f"not replacing {folder}: it holds {len(extra)} file(s) its {META_FILE} does not "
                              f"list (first: {extra[0]}); move them out or choose another folder.")


def save_quantized(model: nn.Module, folder: str | os.PathLike, *, tokenizer=None, info: dict | None = None,
                   overwrite: bool = False, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                   unquantized_dtype: str = "bfloat16") -> dict:
    """Write a model holding QuantLinears to `folder`; returns the JSON metadata written.

    Tensors that are not quantized are stored in `unquantized_dtype` (bfloat16, float16 or
    float32); the tensors go to one file, or to shards of at most `max_shard_size` ("5GB",
    "500MiB" or bytes) with an index. The folder is written under a temporary name and renamed
    into place when complete, so an interrupted save leaves no half-written model. An existing
    folder is replaced only with overwrite=True and only if it holds a tacq_lite model (or nothing).
    """
    folder = Path(folder)
    if unquantized_dtype not in UNQUANTIZED_DTYPES:
        raise ValueError(f"unquantized_dtype={unquantized_dtype!r}; choose one of {', '.join(UNQUANTIZED_DTYPES)}.")
    max_bytes = parse_size(max_shard_size)
    layers = quant_linears(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; quantize it and call convert_model(...) first.")
    check_save_target(folder, overwrite=overwrite)
    tensors, aliases = _model_tensors(model)
    stored = _Stored(tensors, set(layers), UNQUANTIZED_DTYPES[unquantized_dtype], non_persistent_buffers(model))
    linear_bytes = sum(q.nbytes() for q in layers.values())
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": {n: {"in_features": q.in_features, "out_features": q.out_features, "bits": q.bits,
                       "groupsize": q.groupsize, "nnz": q.nnz, "bias": q.bias is not None}
                   for n, q in layers.items()},
        "tied": aliases,
        "unquantized_dtype": unquantized_dtype,
        "bytes": {
            "quantized_linears": linear_bytes,
            "quantized_linear_weights": sum(q.in_features * q.out_features for q in layers.values()),
            "other_tensors": sum(stored.nbytes(n) for n in tensors if n.rsplit(".", 1)[0] not in layers),
        },
        "info": info or {},
    }
    meta["bytes"]["bits_per_quantized_weight"] = 8 * linear_bytes / meta["bytes"]["quantized_linear_weights"]
    groups = _shards(stored, max_bytes)
    names = [TENSOR_FILE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                                    for i in range(len(groups))]
    meta["shards"] = names
    with atomic_dir(folder, replace=True) as tmp:  # check_save_target allowed replacing what is there
        for name, group in zip(names, groups):
            write_safetensors(tmp / name, {t: stored[t] for t in group} if len(groups) > 1 else stored,
                              metadata={"format": "pt", "producer": FORMAT_NAME})
        if len(groups) > 1:
            weight_map = {t: name for name, group in zip(names, groups) for t in group}
            total = sum(stored.nbytes(t) for t in stored)
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(meta)
        config["dtype"] = str(_compute_dtype_of(model)).removeprefix("torch.")  # what the unquantized tensors load as
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # Every file written, with its size and sha256: `load_quantized` verifies them and
        # `check_save_target` replaces the folder only if it holds nothing else.
        meta["files"] = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                         for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a complete folder
    return meta


def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {META_FILE}: not a tacq_lite quantized model "
                                "(save one with `tacq-lite quantize ... --save DIR`).")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the saved model is damaged.") from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}.")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported by this "
                         f"tacq_lite (reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade tacq_lite "
                         "or re-save the model.")
    files, layers = meta.get("files"), meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path} has no layer table; the saved model is damaged. Re-save it.")
    shards = meta.get("shards", [TENSOR_FILE])
    if not isinstance(shards, list) or not shards or not all(isinstance(s, str) for s in shards):
        raise ValueError(f"{path}: 'shards' is not a list of file names; the saved model is damaged. Re-save it.")
    if not isinstance(files, dict) or not all(isinstance(files.get(s), dict) for s in shards):
        raise ValueError(f"{path} lists no checksummed {shards[0]}, so nothing can be verified; re-save the model.")
    for name, spec in files.items():
        if (not isinstance(spec, dict) or not isinstance(spec.get("bytes"), int) or not isinstance(spec.get("sha256"), str)
                or Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(f"{path}: the entry for {name!r} is not a file name with bytes and sha256; the saved "
                             "model is damaged. Re-save it.")
    return meta


def check_stored_layout(folder: str | os.PathLike, meta: dict) -> None:
    """Raise unless the safetensors files hold every packed buffer of every listed layer (and its
    bias where the table says so), with each `<layer>.weight` a zero-element marker. Reads headers only."""
    from safetensors import safe_open

    folder, shapes = Path(folder), {}
    for name in tensor_files(meta):
        with safe_open(str(folder / name), "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    for layer, spec in meta["layers"].items():
        wanted = [f"{layer}.{b}" for b in QUANT_BUFFERS + (("bias",) if spec["bias"] else ())]
        missing = [w for w in wanted if w not in shapes]
        marker = shapes.get(f"{layer}.{MARKER}")
        if missing or (marker is not None and any(marker)):
            what = f"lacks {missing[0]}" if missing else f"stores a full {layer}.{MARKER} {marker}"
            raise ValueError(f"{folder}: the layer table lists {layer} as packed but the tensors disagree (it "
                             f"{what}); the folder was edited or mixed with another model. Re-save it.")


def verify_files(folder: str | os.PathLike, meta: dict, *, checksums: bool = True) -> None:
    """Raise ValueError unless every file the manifest lists is there with its size (and sha256)."""
    folder = Path(folder)
    for name, spec in meta["files"].items():
        f = folder / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; the saved model is incomplete. Re-save it.")
        if f.stat().st_size != spec["bytes"]:
            raise ValueError(f"{f} has {f.stat().st_size} bytes, {spec['bytes']} were written: the file is "
                             "truncated or was replaced. Re-save the model.")
        if checksums and sha256_file(f) != spec["sha256"]:
            raise ValueError(f"{f} does not match the sha256 recorded at save time: the file is corrupted. "
                             "Re-save the model.")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def plain_config(folder: str | os.PathLike):
    """The model's transformers config without its quantization_config (so building it quantizes nothing)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def compute_dtype(config, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` if given, else the config's float dtype (the one the model computed in when saved), else float32."""
    if dtype is not None:
        return dtype
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def load_quantized(folder: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True,
                   backend: str = "auto", dtype: torch.dtype | None = None):
    """Load a folder written by `save_quantized`; returns (model, tokenizer or None, meta).

    dtype: what the unquantized tensors (embeddings, norms, head, biases) are cast to and the
    model computes in; None: the dtype recorded in config.json (float32 when it names none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    verify_files(folder, meta, checksums=verify)
    tensors = {}
    for name in tensor_files(meta):
        try:
            tensors.update(load_file(str(folder / name), device=str(device)))
        except SafetensorError as err:
            raise ValueError(f"{folder / name} is not a readable safetensors file ({err}).") from None
    path = folder / tensor_files(meta)[0]

    config = plain_config(folder)
    dtype = compute_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in meta["layers"].items():
        walk.set_module(model, name, meta_quant_linear(spec, dtype=dtype, backend=backend))
    markers = {f"{n}.{MARKER}" for n in meta["layers"]}
    computed = non_persistent_buffers(model)  # e.g. rotary inv_freq: stored exactly, never cast
    wanted = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(wanted) - markers)
    if unknown:
        raise ValueError(f"{path} holds tensors the model does not have (first: {unknown[0]}); config and "
                         "tensors disagree.")
    for name, t in tensors.items():
        if name in markers:
            continue
        want = wanted[name]
        owner, _, leaf = name.rpartition(".")
        packed = owner in meta["layers"] and leaf in QUANT_BUFFERS
        if tuple(t.shape) != tuple(want.shape) or (packed and t.dtype != want.dtype):
            raise ValueError(f"{name}: stored {t.dtype} {tuple(t.shape)} but the config says "
                             f"{want.dtype} {tuple(want.shape)}; the saved files disagree.")
        as_is = stored_as_is(name, meta["layers"], computed) or not t.is_floating_point()
        _assign(model, name, t if as_is else t.to(dtype))
    if meta.get("tied"):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{path} lacks {len(still_meta)} tensors (first: {still_meta[0]}); the saved model is "
                         "incomplete.")
    for q in quant_linears(model).values():
        q.check()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, meta


def upgrade_checkpoint(old: str | os.PathLike, new: str | os.PathLike, **save_kwargs) -> dict:
    """Re-save a model of an older format version (1) as the current one; `old` is left as it is.

    The unquantized tensors are stored in 16-bit (`unquantized_dtype`, default bfloat16), as
    every current save does, so the upgraded model's logits move by that rounding."""
    model, tok, meta = load_quantized(old)
    return save_quantized(model, new, tokenizer=tok, info=meta.get("info"), **save_kwargs)
