"""The score cache: TaCQ's expensive inputs (gradients, Q(W), Hessian diagonals) kept on disk.

Steps 1-2 of TaCQ (run/tacq.py) do not depend on the ratio or the selector, so a rerun with a new
ratio or selector should run no backward pass and no first GPTQ pass. Each part is one safetensors
file whose metadata holds the JSON key it was computed for (model weights' fingerprint, the
calibration samples' fingerprint, the settings that change the result) and a sha256 over the key
and every tensor's name, dtype, shape and bytes. Files are written atomically (io.atomic_file),
so a killed run never leaves a half-written file under the real name. On reading, a key mismatch,
an unreadable file, a checksum that does not match, a NaN/Inf or a tensor of the wrong shape is a
miss announced with a CacheWarning naming the file, never a silent reuse; the caller recomputes
and the rewrite replaces the damaged file.

Cached G, Σg² and Q(W) − W are stored in bfloat16 (CACHE_DTYPE: 8 significant bits, half the disk
of fp32). They only rank weights, and a fresh run rounds them the same way before scoring, so a
cached run and a fresh run produce identical masks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config import QuantConfig
from ..io import atomic_file, write_safetensors
from ..model import walk
from ..model.loading import cache_dir

CACHE_FORMAT = 2  # bump when the meaning of cached tensors changes (2: sha256 in the metadata)
KEY_FIELD = "tacq_lite_key"
CHECKSUM_FIELD = "tacq_lite_sha256"

logger = logging.getLogger(__name__)


class CacheWarning(UserWarning):
    """A score cache file exists but is not used (other key, or unreadable)."""


def _key_text(key: Mapping) -> str:
    return json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True, default=str)


def cache_checksum(tensors: Mapping[str, torch.Tensor], key_text: str) -> str:
    """sha256 over the key and each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(key_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_cache(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], key: Mapping) -> Path:
    """Write tensors + JSON key + checksum to `path` (safetensors) atomically; returns the path.

    `tensors` may be any Mapping whose lookups load a tensor (from a GPU, or from disk: io.SpilledTensors);
    the checksum pass and the writing pass each take one tensor at a time (io.write_safetensors), so
    writing the cache of an 8B model does not hold it in memory twice. Any failure to write (full
    disk, read-only place) is an OSError naming the file; nothing is left under the real name or the
    temporary one.
    """
    path = Path(path)
    key_text = _key_text(key)
    metadata = {KEY_FIELD: key_text, CHECKSUM_FIELD: cache_checksum(tensors, key_text)}
    try:
        with atomic_file(path, fsync=True) as tmp:  # the data is on disk before the name points at it
            write_safetensors(tmp, tensors, metadata)
    except OSError as err:
        raise OSError(f"could not write score cache {path}: {err}") from None
    return path


def _cache_problem(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple] | None) -> str | None:
    """Why these tensors cannot be used (non-finite values, wrong or missing shapes), or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds NaN/Inf values"
    if shapes is None:
        return None
    for name, t in tensors.items():
        if name not in shapes:
            return f"it holds {name}, which this model does not have"
        if tuple(t.shape) != tuple(shapes[name]):
            return f"{name} has shape {tuple(t.shape)}, the model needs {tuple(shapes[name])}"
    for part in {n.split("/", 1)[0] for n in tensors}:  # a part that is there must be complete
        missing = [n for n in shapes if n.split("/", 1)[0] == part and n not in tensors]
        if missing:
            return f"it lacks {missing[0]}"
    return None


def load_cache(path: str | os.PathLike, key: Mapping, *, shapes: Mapping[str, tuple] | None = None
               ) -> dict[str, torch.Tensor] | None:
    """The tensors saved under exactly this key, verified, or None (no file, other key, damaged).

    shapes: {tensor name: shape} the caller can use; a cached tensor outside it, of another
    shape, or a part ("G/...") with some of its names missing makes the file a miss.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = meta.get(KEY_FIELD)
            if stored != _key_text(key):
                old = json.loads(stored) if stored else {}
                new = json.loads(_key_text(key))
                diff = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
                warnings.warn(f"score cache {path} was computed for another setting (differs in: "
                              f"{', '.join(diff) or 'unknown'}); not reusing it.", CacheWarning, stacklevel=2)
                return None
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as err:  # truncated or corrupted file: recompute rather than crash
        warnings.warn(f"score cache {path} is unreadable ({type(err).__name__}: {err}); recomputing.",
                      CacheWarning, stacklevel=2)
        return None
    if meta.get(CHECKSUM_FIELD) != cache_checksum(tensors, stored):
        problem = "its data does not match the checksum written with it"
    else:
        problem = _cache_problem(tensors, shapes)
    if problem:
        warnings.warn(f"score cache {path} is damaged ({problem}); discarding it and recomputing.", CacheWarning,
                      stacklevel=2)
        return None
    return tensors


CACHE_DTYPE = torch.bfloat16  # storage of G, Σg² and Q(W) − W: ranking inputs, see module docstring


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
    return Path(config.cache_dir) if config.cache_dir else cache_dir() / "scores"


def _cache_path(config: QuantConfig, kind: str, key: dict) -> Path:
    return cache_folder(config) / f"{kind}-{_sha(_key_text(key).encode())[:16]}.safetensors"


def _part(tensors: dict, prefix: str) -> dict[str, torch.Tensor] | None:
    found = {n[len(prefix) + 1 :]: t for n, t in tensors.items() if n.startswith(prefix + "/")}
    return found or None


class _Flat(Mapping):
    """{"part/linear": tensor} over parts {part: {linear: tensor}}, looked up lazily (a part may be
    io.SpilledTensors, read from disk one tensor at a time)."""

    def __init__(self, parts: dict):
        self._parts = {p: d for p, d in parts.items() if d}

    def __getitem__(self, name: str) -> torch.Tensor:
        part, _, linear = name.partition("/")
        return self._parts[part][linear]

    def __iter__(self):
        return (f"{p}/{n}" for p, d in self._parts.items() for n in d)

    def __len__(self) -> int:
        return sum(len(d) for d in self._parts.values())


def _flat(**parts) -> Mapping[str, torch.Tensor]:
    return _Flat(parts)


def _save(path: Path, tensors: dict, key: dict) -> str | None:
    try:
        save_cache(path, tensors, key)
        logger.info("score cache: wrote %s", path)
        return str(path)
    except OSError as err:  # a full or read-only disk must not stop the run: warn and go on
        warnings.warn(f"score cache: could not write {path} ({err}); the run goes on without caching.",
                      CacheWarning, stacklevel=2)
        return None


def cache_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{cache tensor name: shape} for this model: what a score cache file for it may hold."""
    shapes = {}
    for n, lin in walk.named_linears(model).items():
        rows, cols = lin.weight.shape
        shapes.update({f"{p}/{n}": (rows, cols) for p in ("G", "G2", "E")})
        shapes.update({f"{p}/{n}": (cols,) for p in ("H_diag", "Hinv_diag")})
    return shapes


# The GPTQ settings that change Q(W) and the Hessian diagonals. config.keep_value is not among them:
# the first pass runs without a mask, and keep_value only decides what a kept weight stores
# (tests/test_gptq.py checks both give one result).
QW_SETTINGS = ("bits", "groupsize", "sym", "mse", "blocksize", "percdamp", "actorder")


class ScoreCache:
    """The score cache of one model and config: keys, lookups (misses when disabled) and writes.

    A cache file holds named parts, each {linear name: tensor}: "G" and "G2" (gradients file),
    "E" = Q(W) − W, "H_diag" and "Hinv_diag" (Q(W) file).
    """

    def __init__(self, model: nn.Module, config: QuantConfig, *, enabled: bool = True,
                 device: torch.device | None = None):
        self.config, self.enabled = config, enabled
        self.shapes = cache_shapes(model)
        self.common = {"model": config.model, "weights": weights_fingerprint(model), "dtype": str(CACHE_DTYPE)}
        # A GPU's kernels round differently from the CPU's; the model's own dtype is in the weights'
        # fingerprint. Keys of CPU runs stay as they were, so their cache files stay valid.
        if device is not None and device.type != "cpu":
            self.common["compute"] = device.type

    def gradients_key(self, samples) -> dict:
        c = self.config
        return {"kind": "gradients", **self.common, "samples": samples_fingerprint(samples), "calib": c.calib,
                "n_samples": len(samples), "seed": c.seed,
                "loss": "all" if isinstance(samples, torch.Tensor) else "answer", "head": "chunked",
                **({"grad_dtype": c.grad_dtype} if c.grad_dtype != "float32" else {})}

    def qw_key(self, windows: torch.Tensor, *, threads: int) -> dict:
        """`threads`: the first GPTQ pass's thread count, which changes its rounding."""
        c = self.config
        return {"kind": "qw", **self.common, "windows": samples_fingerprint(windows), "calib": c.calib,
                "n_calib": len(windows), "seq_len": windows.shape[1], "seed": c.seed, "qw_method": c.qw_method,
                "threads": threads, **{f: getattr(c, f) for f in QW_SETTINGS}}

    def path(self, key: dict) -> Path:
        return _cache_path(self.config, key["kind"], key)

    def load(self, key: dict) -> dict[str, dict[str, torch.Tensor]]:
        """{part: {linear: tensor}} for every part the file for `key` holds ({} on a miss or when disabled)."""
        got = (load_cache(self.path(key), key, shapes=self.shapes) if self.enabled else None) or {}
        parts = {n.split("/", 1)[0] for n in got}
        return {p: _part(got, p) for p in sorted(parts)}

    def save(self, key: dict, parts: dict[str, dict[str, torch.Tensor] | None]) -> str | None:
        """Write the parts that are not None; returns the file written, or None if it could not be written."""
        return _save(self.path(key), _flat(**parts), key)
