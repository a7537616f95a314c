"""Files on disk, written once: atomic writes, checksums, JSON records, output checks.

Run records, score caches, saved models, the model cache, sweep tables, synthetic-task files and
student notebooks are written through `atomic_file` or `atomic_dir` (a sweep's per-run notebook
and results are papermill's, committed by course/sweep.py in the same way): the content is written
under a temporary name beside its destination and renamed into place only when complete, so a
reader never sees a half-written file and an interrupted run leaves nothing under the real name.
`check_output_file` / `check_output_dir` run before any model is loaded, so a wrong path fails
in a second, not after the quantization.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout: notebooks/, data/, tacq_lite/


def _clean(value):
    """JSON has no NaN/Inf: store them as strings a reader can spot."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; once the block ends without error, rename it
    to `path` (replacing any file there). On an error the temporary file is removed.

    The temporary file already exists (empty, with the umask's usual permissions, unlike
    mkstemp's 0600); the block writes it by name. fsync=True flushes it to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    open(tmp, "x").close()
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; once the block ends without error, rename it
    to `path`. On an error the temporary folder (written by this block only) is removed.

    Without `replace`, an existing empty folder at `path` is replaced and a non-empty one makes the
    rename fail (OSError). replace=True swaps out an existing `path` whatever it holds: the caller
    must have checked that everything in it was written by tacq_lite (nothing else is ever
    deleted). Files get the umask's usual modes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        yield tmp
        umask = _umask()
        for f in tmp.rglob("*"):  # mkdtemp made a private folder; give the files the user's usual modes
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        tmp.chmod(0o777 & ~umask)
        if replace and path.exists():
            old = path.with_name(path.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (`atomic_file`); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, record: dict) -> Path:
    return write_text_atomic(path, json.dumps(_clean(record), indent=2))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a temporary file in `folder` (root ignores permission bits, so ask the disk)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".tacq_lite-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {target}: cannot write in {folder} ({err.strerror or err}); "
                         "choose a writable place.") from None


def check_output_file(path: str | os.PathLike, what: str = "--json") -> Path:
    """Raise ValueError unless a file can be written at `path` (missing parents are made later)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name such as {path / 'record.json'}.")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder; choose another path.")
    _probe_writable(base, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Raise ValueError unless `path` is, or can become, a folder that can be written."""
    path = Path(path).expanduser()
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: {base} is a file, not a folder; choose another path.")
    _probe_writable(base, what, path)
    return path


class SpilledTensors(MutableMapping):
    """{name: tensor} kept on disk: each tensor set is written at once to a private temporary folder
    (one safetensors file each) and read back, as a fresh CPU tensor, whenever it is looked up.

    For results that are made piece by piece during a long pass and needed only later (TaCQ's
    Q(W) − W during the first GPTQ pass): memory then holds one piece at a time. A tensor that
    cannot be written (full or read-only disk) stays in memory instead, with one warning: the run
    goes on. `close()`, or garbage collection, deletes the folder.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="tacq_lite-spill-", dir=folder)
        self._files: dict[str, str | object] = {}  # name -> file path, or the tensor itself if it could not be written
        self._count = 0  # file numbers only go up: a deleted file's number is never reused
        self._warned = False

    def __setitem__(self, name: str, tensor) -> None:
        import warnings

        from safetensors import SafetensorError
        from safetensors.torch import save_file

        if name in self._files:
            del self[name]
        path = os.path.join(self._dir.name, f"{self._count:06d}.safetensors")
        self._count += 1
        tensor = tensor.detach().cpu().contiguous()
        try:
            save_file({"t": tensor}, path)
            self._files[name] = path
        except (OSError, SafetensorError) as err:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if not self._warned:
                warnings.warn(f"could not write {path} ({err}); keeping these tensors in memory instead.",
                              stacklevel=2)
                self._warned = True
            self._files[name] = tensor

    def __getitem__(self, name: str):
        from safetensors.torch import load_file

        where = self._files[name]
        return load_file(where)["t"] if isinstance(where, str) else where

    def __delitem__(self, name: str) -> None:
        where = self._files.pop(name)
        if isinstance(where, str):
            os.unlink(where)

    def __iter__(self):
        return iter(list(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._files.clear()
        self._dir.cleanup()


SAFETENSORS_DTYPES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                      "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
                      "torch.uint8": "U8", "torch.bool": "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` ({name: tensor}, any Mapping) to `path` in the safetensors format, one tensor at a time.

    safetensors' own save_file first turns every tensor into bytes, so writing N bytes of tensors
    holds 2N in memory; here each tensor is read (tensors[name], which may load it from disk or a
    GPU) once for its shape and once for its bytes, and only one is held at a time. The layout is
    the format's: an 8-byte little-endian header length, a JSON header (dtype, shape and data
    offsets of each tensor, and `__metadata__`) padded with spaces to a multiple of 8, then the
    tensors' bytes in header order. Writes `path` directly: wrap it in atomic_file.
    """
    import struct

    import torch

    names = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
        del t
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
