"""Read one 2D image (CT slice, histology slide, mask) from TIFF, PNG, zarr or HDF5.

An image *spec* is a path, optionally followed by ``:inner`` for container formats:
``slide.tif``, ``slide.png``, ``scan.h5:/entry/data/data``, ``scan.zarr:slices/ct``.
A container given without an inner path must hold exactly one array (or the NeXus-like
``/entry/data/data``). Errors are :class:`InputError` naming the file and the problem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from hpcstain.errors import HpcstainError, InputError

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NEXUS_DATASET = "entry/data/data"

_CONTAINER = re.compile(r"^(?P<file>.*?\.(?:h5|hdf5|hdf|nxs|zarr))(?::(?P<inner>.*))?$",
                        re.IGNORECASE)


# Never a decoder's complaint about the bytes: passed through unchanged.
_PASS_THROUGH = (HpcstainError, MemoryError)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def split_spec(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``"a.h5:/ds"`` → ``(Path("a.h5"), "/ds")``; plain files → ``(path, None)``."""
    text = os.fspath(spec)
    m = _CONTAINER.match(text)
    if m:
        inner = m.group("inner")
        return Path(m.group("file")), (inner.strip("/") or None) if inner else None
    return Path(text), None


def join_spec(file: Path, inner: str | None) -> str:
    return f"{file}:{inner}" if inner else str(file)


def resolve_spec(spec: str, base: Path) -> str:
    """Make the file part of ``spec`` absolute relative to ``base`` (the manifest folder)."""
    file, inner = split_spec(spec)
    file = file.expanduser()
    if not file.is_absolute():
        file = base / file
    return join_spec(file, inner)


def spec_file(spec: str) -> Path:
    """The file (or zarr directory) on disk behind a spec."""
    return split_spec(spec)[0]


def _read_hdf5(file: Path, inner: str | None) -> np.ndarray:
    import h5py

    try:
        with h5py.File(file, "r") as fh:
            if inner is None:
                names: list[str] = []
                fh.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset)
                              else None)
                if NEXUS_DATASET in names:
                    inner = NEXUS_DATASET
                elif len(names) == 1:
                    inner = names[0]
                else:
                    raise InputError(f"{file}: holds {len(names)} datasets; name one as "
                                     f"{file}:/path/to/dataset")
            if inner not in fh or not isinstance(fh[inner], h5py.Dataset):
                raise InputError(f"{file}: no dataset '/{inner}'")
            try:
                return np.asarray(fh[inner][()])
            except _PASS_THROUGH:
                raise
            except Exception as exc:  # a chunk whose filter (gzip, lz4...) fails
                raise InputError(f"{file}: damaged data in dataset '/{inner}' "
                                 f"({_one_line(exc)})") from None
    except OSError as exc:
        raise InputError(f"{file}: not a readable HDF5 file ({_one_line(exc)})") from None


def _read_zarr(file: Path, inner: str | None) -> np.ndarray:
    import zarr

    try:
        node = zarr.open(str(file), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(f"{file}: not a readable zarr store ({exc})") from None
    if inner is not None:
        try:
            node = node[inner]
        except (KeyError, TypeError):
            raise InputError(f"{file}: no array '{inner}'") from None
    if isinstance(node, zarr.Group):
        arrays = [name for name, _ in node.arrays()]
        if len(arrays) != 1:
            raise InputError(f"{file}{':' + inner if inner else ''}: is a group with "
                             f"{len(arrays)} arrays; name one as {file}:array")
        node = node[arrays[0]]
    try:
        return np.asarray(node[...])
    except _PASS_THROUGH:
        raise
    except Exception as exc:  # a storage chunk whose codec fails (zstd, blosc...)
        raise InputError(f"{file}{':' + inner if inner else ''}: damaged data "
                         f"({_one_line(exc)})") from None


def _read_tiff(file: Path) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(file))
    except _PASS_THROUGH:
        raise
    except Exception as exc:  # tifffile raises ValueError/TiffFileError/zlib errors...
        raise InputError(f"{file}: not a readable TIFF, truncated or damaged? "
                         f"({_one_line(exc)})") from None


def _read_pil(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            if img.mode in ("P", "PA", "LA", "CMYK", "YCbCr"):
                img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
            return np.asarray(img)
    except _PASS_THROUGH:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL: OSError "image file is truncated", SyntaxError "broken PNG file", ...
        raise InputError(f"{file}: not a readable image, truncated or damaged? "
                         f"({_one_line(exc)})") from None


def read_image(spec: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole 2D image (or small stack) named by ``spec`` into memory, unchanged."""
    file, inner = split_spec(spec)
    if not file.exists():
        raise InputError(f"{file}: file not found")
    suffix = file.suffix.lower()
    if suffix in (".h5", ".hdf5", ".hdf", ".nxs"):
        return _read_hdf5(file, inner)
    if suffix == ".zarr":
        return _read_zarr(file, inner)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(file)
    if suffix == ".npy":
        try:
            return np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{file}: not a readable .npy array ({_one_line(exc)})") from None
    if suffix in PIL_SUFFIXES:
        return _read_pil(file)
    raise InputError(f"{file}: unknown image format '{suffix}' (TIFF, PNG, .h5:/dataset, "
                     ".zarr:array or .npy)")


def file_signature(spec: str) -> tuple[str, int, int]:
    """(path, size, mtime_ns) of the file behind ``spec``: the cache key of derived data."""
    file = spec_file(spec)
    st = file.stat()
    if file.is_dir():  # a zarr store: newest member counts
        mtimes = [p.stat().st_mtime_ns for p in file.rglob("*") if p.is_file()]
        return (f"{file.resolve()}:{split_spec(spec)[1] or ''}", len(mtimes),
                max(mtimes, default=st.st_mtime_ns))
    return (f"{file.resolve()}:{split_spec(spec)[1] or ''}", st.st_size, st.st_mtime_ns)
