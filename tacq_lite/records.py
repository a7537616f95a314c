"""Saving run records: JSON written atomically (temp file, then rename), and checking before a
run that the places its outputs go can be written.

Notebooks and the CLI record their results here so that papermill sweeps and CI can read
them back; a reader never sees a half-written file. `check_output_file` / `check_output_dir`
run before any model is loaded, so a wrong path fails in a second, not after the quantization.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import tempfile
from pathlib import Path


def _clean(value):
    """JSON has no NaN/Inf: store them as strings a reader can spot."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text under a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    f = open(tmp, "x", encoding="utf-8")  # unlike mkstemp's 0600, the umask's usual permissions
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
