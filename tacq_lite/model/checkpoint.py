"""Saving and loading whole quantized models: safetensors tensors + a JSON manifest.

A saved folder holds

    tacq_lite.json      format name and version, quantization settings, per-layer shapes,
                        size accounting, and the size and sha256 of every file written
    model.safetensors   every tensor of the model (packed linears as QuantLinear stores them,
                        embeddings, norms, ...)
    config.json, tokenizer files, generation_config.json   the Hugging Face side

`save_quantized` writes the folder under a temporary name and renames it into place when complete
(io.atomic_dir). `load_quantized` verifies the manifest, builds the model on the meta device (no
memory, no random init), swaps in meta QuantLinears and assigns the stored tensors; nothing is
unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_dir, sha256_file
from . import walk
from .qlinear import QuantLinear, quant_linears

FORMAT_NAME = "tacq_lite.quantized"


FORMAT_VERSION = 1


META_FILE = "tacq_lite.json"


TENSOR_FILE = "model.safetensors"


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
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


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
                   overwrite: bool = False) -> dict:
    """Write a model holding QuantLinears to `folder`; returns the JSON metadata written.

    The folder is written under a temporary name and renamed into place when complete, so an
    interrupted save leaves no half-written model. An existing folder is replaced only with
    overwrite=True and only if it holds a tacq_lite model (or nothing).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    layers = quant_linears(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; quantize it and call convert_model(...) first.")
    check_save_target(folder, overwrite=overwrite)
    tensors, aliases = _model_tensors(model)
    linear_bytes = sum(q.nbytes() for q in layers.values())
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": {n: {"in_features": q.in_features, "out_features": q.out_features, "bits": q.bits,
                       "groupsize": q.groupsize, "nnz": q.nnz, "bias": q.bias is not None}
                   for n, q in layers.items()},
        "tied": aliases,
        "bytes": {
            "quantized_linears": linear_bytes,
            "quantized_linear_weights": sum(q.in_features * q.out_features for q in layers.values()),
            "other_tensors": sum(t.numel() * t.element_size() for n, t in tensors.items()
                                 if n.rsplit(".", 1)[0] not in layers),
        },
        "info": info or {},
    }
    meta["bytes"]["bits_per_quantized_weight"] = 8 * linear_bytes / meta["bytes"]["quantized_linear_weights"]
    with atomic_dir(folder, replace=True) as tmp:  # check_save_target allowed replacing what is there
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT_NAME})
        model.config.save_pretrained(tmp)
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not supported by this "
                         f"tacq_lite (reads version {FORMAT_VERSION}); upgrade tacq_lite or re-save the model.")
    files, layers = meta.get("files"), meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path} has no layer table; the saved model is damaged. Re-save it.")
    if not isinstance(files, dict) or not isinstance(files.get(TENSOR_FILE), dict):
        raise ValueError(f"{path} lists no checksummed {TENSOR_FILE}, so nothing can be verified; re-save the model.")
    for name, spec in files.items():
        if (not isinstance(spec, dict) or not isinstance(spec.get("bytes"), int) or not isinstance(spec.get("sha256"), str)
                or Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(f"{path}: the entry for {name!r} is not a file name with bytes and sha256; the saved "
                             "model is damaged. Re-save it.")
    return meta


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


def load_quantized(folder: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True,
                   backend: str = "auto"):
    """Load a folder written by `save_quantized`; returns (model, tokenizer or None, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / TENSOR_FILE
    verify_files(folder, meta, checksums=verify)
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from None

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, spec in meta["layers"].items():
        with torch.device("meta"):
            q = QuantLinear(spec["in_features"], spec["out_features"], bits=spec["bits"],
                            groupsize=spec["groupsize"], nnz=spec["nnz"], bias=spec["bias"], backend=backend)
        walk.set_module(model, name, q)
    wanted = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(wanted))
    if unknown:
        raise ValueError(f"{path} holds tensors the model does not have (first: {unknown[0]}); config and "
                         "tensors disagree.")
    for name, t in tensors.items():
        want = wanted[name]
        if tuple(t.shape) != tuple(want.shape) or (t.dtype != want.dtype and name.rsplit(".", 1)[0] in meta["layers"]):
            raise ValueError(f"{name}: stored {t.dtype} {tuple(t.shape)} but the config says "
                             f"{want.dtype} {tuple(want.shape)}; the saved files disagree.")
        _assign(model, name, t)
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
