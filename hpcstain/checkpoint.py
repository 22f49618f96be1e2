"""Checkpoints: written atomically, read with ``weights_only=True`` (never unpickled).

A checkpoint is a plain dict of tensors, numbers and strings:
``format``, ``architecture`` (rebuilds the networks alone), ``config`` (the resolved run
config), ``model`` (generators and discriminators), ``opt_g``/``opt_d``/``sched_g``/
``sched_d``/``scaler``, ``rng`` (torch, CUDA, numpy and Python states), ``pools_by_rank``
(every rank's image pools), ``epoch``, ``step``, ``batch_in_epoch``, ``minima`` (per-loss
best values) and ``reason`` (why it was written). ``min-*.pt`` files hold only
``architecture``, ``config``, ``model`` (the generators), ``epoch``, ``step``, ``minima``
and ``reason``.

Loading verifies the CRC-32 of every member of the zip archive torch writes, so a
truncated or bit-rotten file is one :class:`InputError`, never a traceback or silently
damaged weights.

Inference reads a checkpoint as a :class:`CheckpointFile` (:func:`read_checkpoint`): its
bytes are read once, hashed and loaded from memory, and the record is kept per file
version, so planning a run (conventions, hash) and pinning its generator cost one read.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcstain.atomic import write_bytes_atomic
from hpcstain.errors import InputError

FORMAT = "hpcstain-checkpoint/1"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Serialise to memory, then write via temp file + fsync + rename."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


@dataclass(frozen=True)
class CheckpointFile:
    """One version of a checkpoint file: where it is, its sha256 and its contents.

    The contents are shared by every caller of :func:`read_checkpoint` for that version:
    read them, never modify them.
    """

    path: Path
    sha256: str
    data: dict[str, Any]


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointFile:
    """The checkpoint at ``path`` (CPU tensors), read, hashed and verified once per file
    version (path, size, modification time)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    st = path.stat()
    return _read_version(str(path.resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _read_version(path: str, mtime_ns: int, size: int) -> CheckpointFile:
    raw = Path(path).read_bytes()
    data = _load(Path(path), raw, "cpu")
    return CheckpointFile(Path(path), hashlib.sha256(raw).hexdigest(), data)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Load a checkpoint safely (a fresh copy, e.g. to resume training); anything but
    tensors and plain containers is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    return _load(path, path.read_bytes(), map_location)


def _load(path: Path, raw: bytes, map_location: str | torch.device) -> dict[str, Any]:
    verify_archive(path, raw)
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused global: the file is simply corrupt
            raise InputError(f"{path}: not a readable checkpoint (corrupt or not a torch file)"
                             ) from None
        raise InputError(f"{path}: refused to load: it holds pickled Python objects, not only "
                         "tensors (hpcstain never unpickles code from checkpoints)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable checkpoint ({_first_sentence(exc)}; "
                         "truncated or corrupt?)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(f"{path}: not an hpcstain checkpoint (expected format {FORMAT})")
    return ckpt


def verify_archive(path: str | os.PathLike[str], raw: bytes | None = None) -> None:
    """Check the CRC-32 of every member of a torch zip checkpoint (the file at ``path``, or
    its bytes ``raw`` already read); damage → InputError.

    Files that are not zip archives at all are left to ``torch.load`` (which names them).
    Members written without a CRC (``torch.serialization.set_crc32_options(False)``) are
    skipped.
    """
    path = Path(path)
    source: Any = io.BytesIO(raw) if raw is not None else path
    if not zipfile.is_zipfile(source):
        return
    member = "?"
    try:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                member = info.filename
                if info.CRC == 0 and info.file_size:
                    continue
                with zf.open(info) as fh:
                    while fh.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputError(f"{path}: damaged checkpoint (member {member}: "
                         f"{_first_sentence(exc)}); restore it or use another checkpoint"
                         ) from None


def _first_sentence(exc: BaseException) -> str:
    """The first line and sentence of an exception message (torch's run on for lines)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    head, sep, _ = text.partition(". ")
    return head if sep else text


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors/ints, so they survive ``weights_only`` loading."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    random.setstate((3, tuple(int(v) for v in state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
