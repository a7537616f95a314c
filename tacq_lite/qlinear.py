"""QuantLinear: a linear layer stored as packed low-bit codes plus CSR kept weights, and
saving / loading whole quantized models in safetensors + JSON.

A TaCQ layer (arXiv 2504.07389) is W_final = where(mask, W_kept, W_hat): most weights are
integer codes on a per-row (or per-group) grid, W_hat = scale * (code - zero), and a few
"kept" weights are stored in fp16 with whatever value the fake-quantized model holds
there (by default the value GPTQ's compensation moved them to: gptq.py). `QuantLinear` holds
exactly the tensors that go to disk:

    qweight       int32 [out, ceil(in / per_word)]   codes, `pack.pack` layout
    scale, zero   fp16  [out, n_groups]              the grid (zero is an integer in fp16)
    kept_row_ptr  int32 [out + 1]                    CSR of the kept weights
    kept_col_idx  int16 [nnz] (int32 when in > 32767)
    kept_values   fp16  [nnz]
    bias          the original bias, if any

`forward` calls `kernels.dequant_matmul`, the one dispatch point: the Triton kernels on CUDA,
the pure-torch reference elsewhere. Scales are stored in fp16, so a packed layer differs from
the float32 fake-quantized weights it came from by at most one fp16 rounding of the scale
(relative 2**-11); `dequantized_weight()` gives the exact float weights the layer computes with.

On disk (`save_quantized` / `load_quantized`), a folder holds:

    tacq_lite.json      format name and version, quantization settings, per-layer shapes,
                        size accounting, sha256 of the tensor file
    model.safetensors   every tensor of the model (packed linears, embeddings, norms, ...)
    config.json, tokenizer files, generation_config.json   the Hugging Face side

Loading builds the model on the meta device (no memory, no random init), swaps in meta
QuantLinears and assigns the stored tensors; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import walk
from .pack import SparseKept, check_kept, check_packed, index_dtype, pack, pack_sparse, packed_cols
from .quant import check_bits, check_groupsize, dequantize, quantize
from .records import sha256_file

FORMAT_NAME = "tacq_lite.quantized"
FORMAT_VERSION = 1
META_FILE = "tacq_lite.json"
TENSOR_FILE = "model.safetensors"


class QuantLinear(nn.Module):
    """y = x @ W_finalᵀ (+ bias) from packed codes and CSR kept weights. See the module docstring."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, groupsize: int = -1, nnz: int = 0,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        check_bits(bits)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: a QuantLinear needs at "
                             "least one input and one output feature.")
        gs = check_groupsize(groupsize, in_features)
        if nnz < 0 or nnz > in_features * out_features:
            raise ValueError(f"nnz={nnz} outside [0, {in_features * out_features}].")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groupsize, self.backend = bits, groupsize, backend
        n_groups = in_features // gs
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits=bits),
                                                    dtype=torch.int32, **kw))
        self.register_buffer("scale", torch.zeros(out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.float16, **kw))
        self.register_buffer("kept_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, **kw))
        self.register_buffer("kept_col_idx", torch.zeros(nnz, dtype=index_dtype(in_features), **kw))
        self.register_buffer("kept_values", torch.zeros(nnz, dtype=torch.float16, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None

    @property
    def nnz(self) -> int:
        return self.kept_values.numel()

    @property
    def kept(self) -> SparseKept | None:
        if self.nnz == 0:
            return None
        return SparseKept(self.kept_row_ptr, self.kept_col_idx, self.kept_values)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    groupsize: int = -1, mask: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                    backend: str = "auto") -> "QuantLinear":
        """Pack a fake-quantized linear: its weight must lie on the grid (scale, zero) except
        where `mask` is True (those weights are stored as W holds them, in fp16).

        codes: uint8 [out, in], the codes the quantizer chose (GPTQ's, RTN's); packed as given after
        a check that they reproduce W off the mask. None: derived from W and the grid."""
        W = linear.weight.detach().float()  # [out, in]
        out_f, in_f = W.shape
        if W.numel() == 0:
            raise ValueError(f"linear.weight is empty (shape {tuple(W.shape)}); only a linear with at least one "
                             "input and one output can be packed.")
        gs = check_groupsize(groupsize, in_f)
        if scale.shape != (out_f, in_f // gs) or zero.shape != scale.shape:
            raise ValueError(f"scale/zero shapes {tuple(scale.shape)}/{tuple(zero.shape)} do not fit a "
                             f"[{out_f}, {in_f}] weight with groupsize={groupsize}; expected [{out_f}, {in_f // gs}].")
        if codes is None:
            codes = quantize(W, scale.float(), zero.float(), bits=bits)  # [out, in], recovers the codes of W_hat
        elif codes.dtype != torch.uint8 or codes.shape != W.shape:
            raise ValueError(f"codes must be uint8 {tuple(W.shape)}, got {codes.dtype} {tuple(codes.shape)}.")
        off_grid = (dequantize(codes, scale.float(), zero.float()) - W).abs() \
            > 1e-4 * W.abs().max().clamp_min(1e-12)  # [out, in]
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != W.shape:
                raise ValueError(f"mask must be bool {tuple(W.shape)}, got {mask.dtype} {tuple(mask.shape)}.")
            off_grid &= ~mask
        if off_grid.any():
            raise ValueError(f"{int(off_grid.sum())} weights are off the given grid and not masked: pass the "
                             "(scale, zero) the layer was quantized with, and the keep-mask of a TaCQ model.")
        kept = pack_sparse(W, mask) if mask is not None and mask.any() else None
        q = cls(in_f, out_f, bits=bits, groupsize=groupsize, nnz=0 if kept is None else kept.values.numel(),
                bias=linear.bias is not None, device=W.device, dtype=linear.weight.dtype, backend=backend)
        q.qweight.copy_(pack(codes, bits=bits))
        q.scale.copy_(scale.half())
        q.zero.copy_(zero.half())
        if kept is not None:
            q.kept_row_ptr.copy_(kept.row_ptr)
            q.kept_col_idx.copy_(kept.col_idx)
            q.kept_values.copy_(kept.values)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

    def check(self) -> None:
        """Raise if the buffers do not fit the declared shape (e.g. after loading)."""
        check_packed(self.qweight, self.scale, self.zero, bits=self.bits, cols=self.in_features,
                     groupsize=self.groupsize)
        if self.qweight.shape[0] != self.out_features:
            raise ValueError(f"qweight has {self.qweight.shape[0]} rows, expected {self.out_features}.")
        check_kept(SparseKept(self.kept_row_ptr, self.kept_col_idx, self.kept_values), self.out_features,
                   self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_final [out, in] as this layer computes it."""
        from .kernels import dequant_weight

        return dequant_weight(self.qweight, self.scale, self.zero, self.kept, bits=self.bits,
                              cols=self.in_features, groupsize=self.groupsize, dtype=dtype, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import dequant_matmul

        if x.shape[-1] != self.in_features:  # shapes only, no sync
            raise ValueError(f"input has {x.shape[-1]} features (last dim) but this layer has "
                             f"in_features={self.in_features}; pass x of shape [..., {self.in_features}].")
        y = dequant_matmul(x, self.qweight, self.scale, self.zero, self.kept, bits=self.bits,
                           groupsize=self.groupsize, backend=self.backend)  # [..., out]
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        gs = "per channel" if self.groupsize == -1 else f"group {self.groupsize}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {gs}, "
                f"kept={self.nnz}, bias={self.bias is not None}")


def convert_model(model: nn.Module, grids: dict[str, tuple[torch.Tensor, torch.Tensor]], *, bits: int,
                  groupsize: int = -1, masks: dict[str, torch.Tensor] | None = None,
                  codes: dict[str, torch.Tensor] | None = None, backend: str = "auto") -> nn.Module:
    """Swap every targeted linear of a fake-quantized model for a QuantLinear, in place.

    grids: {linear: (scale, zero)} as `QuantizeResult.grids`; masks: {linear: bool mask} (TaCQ);
    codes: {linear: uint8 codes} as `QuantizeResult.codes` (None: derived from the weights).
    """
    linears = walk.named_linears(model)
    missing = sorted(set(linears) - set(grids))
    if missing:
        raise KeyError(f"no grid for {len(missing)} linears (first: {missing[0]}); pass QuantizeResult.grids "
                       "of the run that quantized this model.")
    masks, codes = masks or {}, codes or {}
    for name, linear in linears.items():
        scale, zero = grids[name]
        q = QuantLinear.from_linear(linear, scale=scale, zero=zero, bits=bits, groupsize=groupsize,
                                    mask=masks.get(name), codes=codes.get(name), backend=backend)
        walk.set_module(model, name, q)
    return model


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---------------------------------------------------------------- saving and loading


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
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
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # mkdtemp made a private folder; give the files the user's usual modes
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if folder.exists():
            old = folder.with_name(folder.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


__all__ = ["FORMAT_VERSION", "QuantLinear", "convert_model", "load_quantized", "quant_linears", "read_meta",
           "save_quantized"]
