"""Volume inputs: zarr, HDF5 and TIFF stacks behind one lazy, validated reader.

An input spec names the file and, where the format has them, the array inside it:

* ``sample.zarr`` (a single array, or a group holding a ``ct`` array, or a group holding
  exactly one array) or ``sample.zarr:path/in/group``
* ``image.ome.zarr`` (an OME-Zarr image group, NGFF 0.4/0.5: its level 0; axes z, y, x
  plus optional channel/time axes of length 1)
* ``scan.h5`` (dataset ``/entry/data/data``, the NeXus convention) or ``scan.h5:/some/ds``
* ``stack.tif`` (a multipage TIFF: one page per z slice, or one 3D page) or a folder of
  2D slices (``*.tif``/``*.tiff``, in natural order: ``s2`` before ``s10``; names of
  several patterns or equal numbers are refused)

:class:`VolumeSource` validates the array before any work (3D, numeric, non-empty) and
reads only what a chunk asks for with :meth:`VolumeSource.read`. Non-finite values are an
:class:`~hpcstain.errors.InputError` naming the file (``nan_policy="error"``) or are
replaced by ``nan_value`` (``nan_policy="replace"``).

The physical voxel size (µm, z/y/x) is searched in the format's metadata when the volume
is opened (:mod:`hpcstain.volume.voxelsize`): :attr:`VolumeSource.voxel_size_um`, with
where it was found in :attr:`VolumeSource.voxel_size_from`.

Raw intensity levels (bone, background) put the CT on the checkpoint's §2.5 convention
(:func:`hpcstain.ct.signed.ct_to_signed`: mean bone and background onto the levels the model
was trained with, then [-1, 1]). :func:`estimate_levels` estimates both from a strided
subsample of the volume (:mod:`hpcstain.ct.levels`, the one CT-only estimator).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise, product
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcstain.atomic import atomic_output, check_output
from hpcstain.ct import cupping as cupping_mod
from hpcstain.ct import levels
from hpcstain.ct.cupping import Cupping
from hpcstain.data.readers import read_image
from hpcstain.errors import HpcstainError, InputError, UsageError
from hpcstain.volume import voxelsize
from hpcstain.volume.voxelsize import VoxelSize

Region = tuple[slice, slice, slice]
NanPolicy = Literal["error", "replace"]

DEFAULT_H5_DATASET = "/entry/data/data"
TIFF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class VolumeSpec:
    """A parsed input spec: the file or folder, its format and the array path inside."""

    path: Path
    kind: Literal["zarr", "hdf5", "tiff", "tiff-folder"]
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.key}" if self.key else str(self.path)


def parse_spec(spec: str | os.PathLike[str]) -> VolumeSpec:
    """``file[:inner/path]`` → :class:`VolumeSpec`; the format comes from the suffix."""
    text = os.fspath(spec)
    m = re.match(r"^(.*?\.(?:zarr|h5|hdf5|hdf|nxs))(?::(.*))?/?$", text, re.IGNORECASE)
    if m:
        path, key = Path(m.group(1)), (m.group(2) or None)
        kind = "zarr" if path.suffix.lower() == ".zarr" else "hdf5"
        return VolumeSpec(path, kind, key)  # type: ignore[arg-type]
    path = Path(text)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return VolumeSpec(path, "tiff")
    if path.is_dir():
        return VolumeSpec(path, "tiff-folder")
    raise InputError(f"{text}: unknown volume format (expected .zarr[:array], .h5[:/dataset], "
                     "a .tif stack or a folder of .tif slices)")


# --------------------------------------------------------------------------- damage

# Errors that are never a codec's complaint about the bytes: passed through unchanged.
_PASS_THROUGH = (HpcstainError, MemoryError)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its message (whitespace folded) or its type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def region_text(region: Region) -> str:
    """``z 0:16, y 16:32, x 0:48`` (voxel ranges, stop exclusive)."""
    return ", ".join(f"{n} {s.start}:{s.stop}" for n, s in zip("zyx", region, strict=False))


def chunk_regions(region: Region, shape: tuple[int, ...], grid: tuple[int, ...]
                  ) -> Iterator[tuple[tuple[int, ...], Region]]:
    """Storage chunks (grid index, voxel region) that ``region`` touches, in C order."""
    spans = [s.indices(n)[:2] for s, n in zip(region, shape, strict=False)]
    ranges = [range(a // c, max(a, b - 1) // c + 1) for (a, b), c in zip(spans, grid,
                                                                        strict=False)]
    for idx in product(*ranges):
        yield idx, tuple(slice(i * c, min(n, (i + 1) * c))  # type: ignore[misc]
                         for i, c, n in zip(idx, grid, shape, strict=False))


def locate_damage(read: Callable[[Region], Any], region: Region, shape: tuple[int, ...],
                  grid: tuple[int, ...] | None) -> tuple[tuple[int, ...], Region,
                                                         BaseException] | None:
    """After a failed read of ``region``: the first storage chunk that fails on its own.

    Reads chunk by chunk (only on this error path); None when every chunk reads.
    """
    if not grid:
        return None
    for idx, sub in chunk_regions(region, shape, grid):
        try:
            read(sub)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            return idx, sub, exc
    return None


def damaged_input(what: str, region: Region, exc: BaseException, chunk: str = "",
                  file: str | os.PathLike[str] | None = None) -> InputError:
    """The one-line error for undecodable input: file, chunk/region, the codec's complaint.

    ``chunk`` names the storage unit (``storage chunk 1,0,2``, ``page 7``, ``slice 7``).
    """
    voxels = f"voxels {region_text(region)}" + (f"; file {file}" if file is not None else "")
    where = f"{chunk} ({voxels})" if chunk else voxels
    return InputError(f"{what}: damaged data in {where}: {one_line(exc)}; restore or re-export "
                      "the input")


# --------------------------------------------------------------------------- readers


class _Reader:
    """Format-specific access: ``shape``, ``dtype``, ``attrs`` and ``read(region)``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict[str, Any]
    voxel: VoxelSize | None = None
    voxel_notes: list[str]

    def read(self, region: Region) -> np.ndarray:
        raise NotImplementedError


class _ZarrReader(_Reader):
    """A zarr array, a group's ``ct``/only array, or an OME-Zarr image's level 0.

    Axes of length 1 that an OME-Zarr image puts before z, y, x (channel, time) are
    indexed away, so the volume is always 3D.
    """

    def __init__(self, spec: VolumeSpec) -> None:
        import zarr

        if not spec.path.exists():
            raise InputError(f"{spec.path}: no such zarr store")
        try:
            root = zarr.open(store=str(spec.path), mode="r")
        except Exception as exc:  # zarr raises several types for unreadable stores
            raise InputError(f"{spec.path}: not a readable zarr store ({exc})") from None
        node = root
        if spec.key:
            if not isinstance(node, zarr.Group):
                raise InputError(f"{spec.path}: is an array, not a group; drop ':{spec.key}'")
            try:
                node = node[spec.key]
            except KeyError:
                raise InputError(f"{spec.path}: no array {spec.key!r} in the group "
                                 f"(arrays: {sorted(node.array_keys())})") from None
        if isinstance(node, zarr.Group):
            node = _pick_group_array(spec, node)
        if not isinstance(node, zarr.Array):
            raise InputError(f"{spec}: not an array")
        self.spec = spec
        self.array = node
        parents = _zarr_parents(root, node)
        image = _ngff_parent(node, parents)
        self.keep = _ngff_spatial(spec, node, image[1]) if image else list(range(node.ndim))
        self.shape = tuple(int(node.shape[d]) for d in self.keep)
        self.dtype = np.dtype(node.dtype)
        self.attrs = dict(node.attrs)
        self.voxel, self.voxel_notes = voxelsize.search(
            lambda notes: _zarr_voxel(spec, node, parents, notes))

    def _index(self, region: Region) -> tuple[Any, ...]:
        """A 3D region → an index of the stored array (0 on the dropped length-1 axes)."""
        out: list[Any] = [0] * self.array.ndim
        for d, s in zip(self.keep, region, strict=True):
            out[d] = s
        return tuple(out)

    def read(self, region: Region) -> np.ndarray:
        try:
            return np.asarray(self.array[self._index(region)])
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # codecs raise RuntimeError/ValueError/... on bad bytes
            raise self._damage(region, exc) from None

    def _damage(self, region: Region, exc: BaseException) -> InputError:
        """Name the storage chunk (file) whose bytes do not decode."""
        full = tuple(getattr(self.array, "shards", None) or self.array.chunks)
        grid = tuple(full[d] for d in self.keep)
        found = locate_damage(lambda r: self.array[self._index(r)], region, self.shape, grid)
        if found is None:
            return damaged_input(str(self.spec), region, exc)
        idx, sub, chunk_exc = found
        full_idx = [0] * self.array.ndim
        for d, i in zip(self.keep, idx, strict=True):
            full_idx[d] = i
        file: Path | None = None
        try:
            key = self.array.metadata.encode_chunk_key(tuple(full_idx))
            file = self.spec.path / self.array.path / key if self.array.path else \
                self.spec.path / key
        except Exception:  # an unusual store layout: name the chunk by its index only
            file = None
        return damaged_input(str(self.spec), sub, chunk_exc,
                             chunk="storage chunk " + ",".join(str(i) for i in idx), file=file)


def _pick_group_array(spec: VolumeSpec, group: Any) -> Any:
    """The array a group stands for: OME-Zarr level 0, its ``ct`` array, or its only one."""
    path = spec.path
    meta = voxelsize.ngff_metadata(dict(group.attrs))
    if meta is None and "bioformats2raw.layout" in dict(group.attrs) and "0" in group:
        group = group["0"]  # bioformats2raw: the first image sits in group 0
        meta = voxelsize.ngff_metadata(dict(group.attrs))
    if meta is not None:
        datasets = meta.get("datasets") or []
        level0 = str(datasets[0].get("path", "")) if datasets else ""
        try:
            return group[level0]
        except KeyError:
            raise InputError(f"{spec}: OME-Zarr image without its level-0 array "
                             f"{level0!r}") from None
    names = sorted(group.array_keys())
    if "ct" in names:
        return group["ct"]
    if len(names) == 1:
        return group[names[0]]
    raise InputError(f"{path}: group holds {len(names)} arrays {names} and no 'ct'; "
                     f"name one as {path}:ARRAY")


def _zarr_parents(root: Any, node: Any) -> list[Any]:
    """The groups above ``node`` in its store, nearest first."""
    if node is root or not node.path:
        return []
    parts = node.path.strip("/").split("/")[:-1]
    out = [root]
    for k in range(len(parts)):
        try:
            out.append(root["/".join(parts[:k + 1])])
        except Exception:  # a path that does not open as a group: stop climbing
            break
    return out[::-1]


def _ngff_parent(node: Any, parents: list[Any]) -> tuple[Any, dict[str, Any]] | None:
    """(group, multiscale) when ``node`` is a dataset of its parent's OME-Zarr multiscale."""
    if not parents:
        return None
    meta = voxelsize.ngff_metadata(dict(parents[0].attrs))
    name = node.path.strip("/").split("/")[-1]
    if meta and any(str(d.get("path")) == name for d in meta.get("datasets") or []):
        return parents[0], meta
    return None


def _ngff_spatial(spec: VolumeSpec, node: Any, meta: dict[str, Any]) -> list[int]:
    """The array dimensions of z, y, x; every other axis must have length 1."""
    axes = voxelsize.ngff_axes(meta)
    names = [str(a.get("name")) for a in axes]
    if len(names) != node.ndim:
        raise InputError(f"{spec}: OME-Zarr metadata names {len(names)} axes {names} for a "
                         f"{node.ndim}D array")
    if [n for n in names if n in ("z", "y", "x")] != ["z", "y", "x"]:
        raise InputError(f"{spec}: OME-Zarr image has axes {names}; a CT volume needs z, y, x "
                         "(in this order)")
    extra = [(n, node.shape[d]) for d, n in enumerate(names)
             if n not in ("z", "y", "x") and node.shape[d] != 1]
    if extra:
        shown = ", ".join(f"{n}={k}" for n, k in extra)
        raise InputError(f"{spec}: OME-Zarr image has {shown}; hpcstain stains one "
                         "single-channel CT volume (other axes must have length 1)")
    return [names.index(a) for a in ("z", "y", "x")]


def _zarr_voxel(spec: VolumeSpec, node: Any, parents: list[Any], notes: list[str]
                ) -> VoxelSize | None:
    """The array's attributes, its OME-Zarr scale, then each parent group's attributes."""
    found = voxelsize.from_attrs(dict(node.attrs), str(spec), notes)
    image = _ngff_parent(node, parents)
    if found is None and image is not None:
        name = node.path.strip("/").split("/")[-1]
        found = voxelsize.from_multiscales(image[1], name, str(spec.path), notes)
    for group in parents:
        if found is not None:
            break
        where = f"{spec.path}:{group.path}" if group.path else f"{spec.path} (group)"
        found = voxelsize.from_attrs(dict(group.attrs), where, notes)
    return found


def _h5_spec_example(path: Path, fh: object) -> str:
    """``file.h5:/path/to/dataset`` with the file's first 3D dataset (or a placeholder)."""
    import h5py

    found: list[str] = []

    def visit(name: str, obj: object) -> None:
        if not found and isinstance(obj, h5py.Dataset) and len(obj.shape) == 3:
            found.append("/" + name)

    fh.visititems(visit)  # type: ignore[attr-defined]
    return f"{path}:{found[0] if found else '/path/to/dataset'}"


class _H5Reader(_Reader):
    def __init__(self, spec: VolumeSpec) -> None:
        import h5py

        self.path = spec.path
        self.key = spec.key or DEFAULT_H5_DATASET
        if not spec.path.is_file():
            raise InputError(f"{spec.path}: no such HDF5 file")
        try:
            with h5py.File(spec.path, "r") as fh:
                if self.key not in fh:
                    raise InputError(f"{spec.path}: no dataset {self.key!r} "
                                     f"(datasets: {_h5_datasets(fh)}); name one as "
                                     f"{_h5_spec_example(spec.path, fh)}")
                ds = fh[self.key]
                if not isinstance(ds, h5py.Dataset):
                    raise InputError(f"{spec.path}: {self.key!r} is a group, not a dataset "
                                     f"(datasets: {_h5_datasets(fh)}); name one as "
                                     f"{_h5_spec_example(spec.path, fh)}")
                self.shape = tuple(ds.shape)
                self.dtype = np.dtype(ds.dtype)
                self.attrs = {k: _plain(v) for k, v in ds.attrs.items()}
                self.voxel, self.voxel_notes = voxelsize.search(
                    lambda notes: voxelsize.from_hdf5(fh, self.key, notes))
        except OSError as exc:
            raise InputError(f"{spec.path}: not a readable HDF5 file ({exc})") from None
        self._file: Any = None
        self._pid = -1

    def _dataset(self) -> Any:
        import h5py

        if self._file is None or self._pid != os.getpid():  # handles do not survive fork
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.key]

    def read(self, region: Region) -> np.ndarray:
        try:
            return np.asarray(self._dataset()[region])
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # h5py: OSError "Can't read data (filter returned failure)"
            raise self._damage(region, exc) from None

    def _damage(self, region: Region, exc: BaseException) -> InputError:
        """Name the HDF5 chunk that does not decode (or the region, if not chunked)."""
        what = f"{self.path}:{self.key}"
        try:
            ds = self._dataset()
            grid = ds.chunks
            found = locate_damage(lambda r: ds[r], region, self.shape, grid)
        except _PASS_THROUGH:
            raise
        except Exception:  # the file itself no longer opens
            found = None
        if found is None:
            return damaged_input(what, region, exc)
        idx, sub, chunk_exc = found
        return damaged_input(what, sub, chunk_exc,
                             chunk="storage chunk " + ",".join(str(i) for i in idx))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}


def _h5_datasets(fh: Any, limit: int = 10) -> list[str]:
    import h5py

    names: list[str] = []
    fh.visititems(lambda n, o: names.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    return names[:limit]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class _TiffReader(_Reader):
    """A multipage TIFF (pages = z slices) or a single 3D page; reads only needed pages."""

    def __init__(self, spec: VolumeSpec) -> None:
        import tifffile

        self.path = spec.path
        if not spec.path.is_file():
            raise InputError(f"{spec.path}: no such TIFF file")
        try:
            with tifffile.TiffFile(spec.path) as tf:
                series = tf.series[0]
                self.shape = tuple(series.shape)
                self.dtype = np.dtype(series.dtype)
                self.n_pages = len(series.pages)
                self.attrs = _tiff_attrs(tf)
                self.voxel, self.voxel_notes = voxelsize.search(
                    lambda notes: voxelsize.from_tiff(tf, str(spec.path), notes))
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # TiffFileError, OSError, IndexError, struct.error...
            raise InputError(f"{spec.path}: not a readable TIFF ({one_line(exc)})") from None

    def read(self, region: Region) -> np.ndarray:
        import tifffile

        zs, ys, xs = region
        if self.n_pages == 1:  # one 3D page (or a 2D page, refused by validation)
            try:
                return np.asarray(tifffile.imread(self.path))[region]
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise damaged_input(str(self.path), region, exc) from None
        planes = []
        page = zs.indices(self.shape[0])[0]
        try:
            with tifffile.TiffFile(self.path) as tf:
                pages = tf.series[0].pages
                for page in range(*zs.indices(self.shape[0])):
                    planes.append(pages[page].asarray()[ys, xs])
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # a page whose strips/tiles do not decode
            raise damaged_input(str(self.path), (slice(page, page + 1), ys, xs), exc,
                                chunk=f"page {page}") from None
        return _stack(planes, self.dtype, ys, xs, self.shape)


def _tiff_attrs(tf: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    ij = tf.imagej_metadata or {}
    if "spacing" in ij:
        attrs["z_spacing"] = float(ij["spacing"])
    return attrs


def natural_key(name: str) -> tuple[object, ...]:
    """``slice_10.tif`` after ``slice_9.tif``: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part.lower()
                 for part in re.split(r"(\d+)", name) if part)


def natural_slices(folder: Path, files: list[Path]) -> list[Path]:
    """[slice order] The slices of a folder in the order a person means: numeric parts as
    numbers (``s2`` before ``s10``). Refused when that order is ambiguous: names of more
    than one pattern (``slice_#.tif`` beside ``preview.tif``), or two names with the same
    numbers (``s01.tif`` and ``s1.tif``)."""
    if not files:
        return []
    patterns: dict[str, list[str]] = {}
    for f in files:
        patterns.setdefault(re.sub(r"\d+", "#", f.name.lower()), []).append(f.name)
    if len(patterns) > 1:
        shown = "; ".join(f"{pat} ({len(names)}: {names[0]}…)" if len(names) > 1
                          else f"{names[0]}"
                          for pat, names in sorted(patterns.items(), key=lambda kv:
                                                   -len(kv[1]))[:4])
        raise InputError(f"{folder}: slice names follow {len(patterns)} patterns ({shown}); "
                         "the slice order would be a guess — keep only one stack's slices "
                         "in the folder")
    ordered = sorted(files, key=lambda f: natural_key(f.name))
    for a, b in pairwise(ordered):
        if natural_key(a.name) == natural_key(b.name):
            raise InputError(f"{folder}: {a.name} and {b.name} have the same slice number; "
                             "the slice order would be a guess — rename or remove one")
    return ordered


class _TiffFolderReader(_Reader):
    """A folder of 2D slices, one file per z, in natural name order."""

    def __init__(self, spec: VolumeSpec) -> None:
        import tifffile

        self.path = spec.path
        self.files = natural_slices(spec.path, [
            p for p in spec.path.iterdir()
            if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")])
        if not self.files:
            raise InputError(f"{spec.path}: folder holds no .tif/.tiff slices")
        try:
            with tifffile.TiffFile(self.files[0]) as tf:
                first = tf.series[0]
                plane_shape, self.dtype = tuple(first.shape), np.dtype(first.dtype)
                self.voxel, self.voxel_notes = voxelsize.search(
                    lambda notes: voxelsize.from_tiff(tf, str(self.files[0]), notes))
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # TiffFileError, OSError, IndexError, struct.error...
            raise InputError(f"{self.files[0]}: not a readable TIFF ({one_line(exc)})"
                             ) from None
        self.shape = (len(self.files), *plane_shape)
        self.attrs = {}

    def read(self, region: Region) -> np.ndarray:
        import tifffile

        zs, ys, xs = region
        planes = []
        for z in range(*zs.indices(self.shape[0])):
            try:
                plane = tifffile.imread(self.files[z])
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise damaged_input(str(self.path), (slice(z, z + 1), ys, xs), exc,
                                    chunk=f"slice {z}", file=self.files[z]) from None
            if plane.shape != self.shape[1:]:
                raise InputError(f"{self.files[z]}: slice shape {plane.shape} differs from "
                                 f"{self.files[0].name}'s {self.shape[1:]}")
            planes.append(plane[ys, xs])
        return _stack(planes, self.dtype, ys, xs, self.shape)


def _stack(planes: list[np.ndarray], dtype: np.dtype, ys: slice, xs: slice,
           shape: tuple[int, ...]) -> np.ndarray:
    if planes:
        return np.stack(planes)
    ny = len(range(*ys.indices(shape[1])))
    nx = len(range(*xs.indices(shape[2])))
    return np.zeros((0, ny, nx), dtype)


_READERS: dict[str, type[_Reader]] = {
    "zarr": _ZarrReader, "hdf5": _H5Reader, "tiff": _TiffReader,
    "tiff-folder": _TiffFolderReader,
}


# --------------------------------------------------------------------------- source


@dataclass
class VolumeSource:
    """A validated 3D (Z, Y, X) input volume read lazily, region by region."""

    spec: VolumeSpec
    shape: tuple[int, int, int]
    dtype: np.dtype
    nan_policy: NanPolicy = "error"
    nan_value: float = 0.0
    attrs: dict[str, Any] = field(default_factory=dict)
    _reader: _Reader | None = field(default=None, repr=False)
    voxel: VoxelSize | None = None
    voxel_notes: tuple[str, ...] = ()

    @property
    def voxel_size_um(self) -> tuple[float, float, float] | None:
        """The voxel size recorded in the input's metadata, if any (µm, z/y/x)."""
        if self.voxel is not None:
            return self.voxel.zyx_um
        return voxel_size_from_attrs(self.attrs)

    @property
    def voxel_size_from(self) -> str:
        """Where the voxel size was found (field, value and unit as stored), or ''."""
        if self.voxel is not None:
            return self.voxel.source
        return "attributes" if voxel_size_from_attrs(self.attrs) else ""

    def voxel_size_note(self) -> str | None:
        """The one-line note for a volume whose metadata holds no usable voxel size."""
        if self.voxel_size_um is not None:
            return None
        return voxelsize.absent_note(str(self.spec), self.voxel_notes)

    def read(self, region: Region) -> np.ndarray:
        """The voxels in ``region`` (slices with explicit, in-bounds start/stop)."""
        if self._reader is None:
            self._reader = _READERS[self.spec.kind](self.spec)
        data = self._reader.read(region)
        if data.dtype.kind in "fc":
            data = apply_nan_policy(data, self.nan_policy, self.nan_value, self.spec, region)
        return data

    def iter_slabs(self, depth: int = 16) -> Iterator[tuple[Region, np.ndarray]]:
        """The whole volume as z slabs of ``depth`` slices (for scans)."""
        z, y, x = self.shape
        for z0 in range(0, z, depth):
            region = (slice(z0, min(z, z0 + depth)), slice(0, y), slice(0, x))
            yield region, self.read(region)


def open_volume(spec: str | os.PathLike[str], nan_policy: NanPolicy = "error",
                nan_value: float = 0.0, scan: bool = True) -> VolumeSource:
    """Open and validate an input volume; nothing but metadata is read unless ``scan``.

    With ``scan`` (default) a floating-point volume is read once, slab by slab, to refuse
    NaN/Inf up front (``nan_policy="error"``) rather than hours into a run.
    """
    if nan_policy not in ("error", "replace"):
        raise UsageError(f"nan_policy must be 'error' or 'replace', got {nan_policy!r}")
    parsed = parse_spec(spec)
    reader = _READERS[parsed.kind](parsed)
    shape, dtype = tuple(int(n) for n in reader.shape), np.dtype(reader.dtype)
    if len(shape) != 3:
        raise InputError(f"{parsed}: expected a 3D volume (Z, Y, X), got shape {shape}")
    if min(shape) == 0:
        raise InputError(f"{parsed}: volume is empty (shape {shape})")
    if dtype.kind not in "uif":
        raise InputError(f"{parsed}: expected a numeric (integer or float) volume, got {dtype}")
    if nan_policy == "replace" and not np.isfinite(nan_value):
        raise UsageError(f"nan_value must be finite, got {nan_value}")
    source = VolumeSource(parsed, shape, dtype, nan_policy, float(nan_value),  # type: ignore[arg-type]
                          dict(reader.attrs), reader, voxel=reader.voxel,
                          voxel_notes=tuple(reader.voxel_notes))
    if scan and dtype.kind == "f" and nan_policy == "error":
        for _ in source.iter_slabs():
            pass
    return source


def apply_nan_policy(data: np.ndarray, policy: NanPolicy, value: float, spec: Any,
                     region: Region) -> np.ndarray:
    """Refuse or replace non-finite voxels; the error names the file and the first voxel."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return data
    if policy == "error":
        idx = tuple(int(i) + (s.start or 0) for i, s in zip(np.argwhere(bad)[0], region,
                                                            strict=True))
        raise InputError(f"{spec}: {int(bad.sum())} non-finite (NaN/Inf) voxels, first at "
                         f"z,y,x={idx}; pass nan_policy='replace' (--nan-value V) to replace "
                         "them")
    data = data.copy()
    data[bad] = value
    return data


def voxel_size_from_attrs(attrs: dict[str, Any]) -> tuple[float, float, float] | None:
    """A (z, y, x) voxel size in µm from a dict of attributes (units honoured), or None."""
    found = voxelsize.from_attrs(attrs, "attributes", [])
    return found.zyx_um if found is not None else None


# --------------------------------------------------------------------------- levels


def estimate_levels(source: VolumeSource, max_voxels: int = 2_000_000) -> levels.RawLevels:
    """Estimate the raw (bone, background) levels from a strided subsample of the volume.

    Delegates to :func:`hpcstain.ct.levels.volume_levels` (every k-th plane, k chosen so at
    most ``max_voxels`` are read; classes from the histogram with metal, implants, tube
    wall and cupping handled; see docs/volume.md "CT levels"). An ambiguous estimate, a
    constant volume or one without bone is an InputError naming what was found and the
    ``--bone-level``/``--background-level`` to pass.
    """
    return levels.require_confident(levels.volume_levels(source, max_voxels)).levels


def level_sample(spec: str | os.PathLike[str], max_voxels: int = 2_000_000,
                  nan_value: float | None = None
                  ) -> tuple[np.ndarray, dict[float, np.ndarray], int, str]:
    """(raw, σ → smoothed, stride, name) of a volume spec, or of a 2D slide (.png/.tif...).

    Volumes go through :func:`hpcstain.volume.io.open_volume`; a file it cannot open as a
    volume but that reads as one 2D image is taken as a slide.
    """
    try:
        src = open_volume(spec, nan_policy="error" if nan_value is None else "replace",
                          nan_value=nan_value or 0.0)
    except InputError as exc:
        try:
            image = np.asarray(read_image(spec), dtype=np.float64)
        except Exception:
            raise exc from None
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., :3].mean(axis=-1)
        if image.ndim != 2:
            raise exc from None
        if nan_value is not None:
            image = np.where(np.isfinite(image), image, nan_value)
        start, top = levels.smoothing_for(image), levels.max_smoothing(image.shape)
        smoothed = {sg: levels.smooth_planes(image, sg) for sg in levels.SIGMAS
                    if start <= sg <= max(top, start)}
        return image, smoothed, 1, str(spec)
    raw, smoothed, k = levels.sample_source(src, max_voxels)
    if raw.shape[0] == 1:   # a single plane: a slide
        raw, smoothed = raw[0], {sg: v[0] for sg, v in smoothed.items()}
    return raw, smoothed, k, str(src.spec)



# --------------------------------------------------------------------------- cupping


class CorrectedSource:
    """A volume source whose reads are cupping-corrected (float32); everything else is
    the wrapped source's."""

    def __init__(self, source: Any, cupping: Cupping) -> None:
        self._source = source
        self.cupping = cupping

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def iter_slabs(self, depth: int = 16) -> Any:
        """Corrected z slabs (the wrapped source's own would read uncorrected)."""
        return VolumeSource.iter_slabs(self, depth)  # type: ignore[arg-type]

    def read(self, region: Any) -> np.ndarray:
        region = tuple(region)
        block = self._source.read(region)
        origin = (region[1].start or 0, region[2].start or 0)
        return cupping_mod.apply_cupping(block, self.cupping, origin)


def write_corrected(source: Any, out: str | Any, cupping: Cupping, *, chunk: int = 64,
                    overwrite: bool = False) -> Any:
    """Write the corrected CT as a zarr v3 group ``out`` (array ``ct``, the input's dtype,
    rounded and clipped; attrs: the correction and the input), slab by slab, atomically."""
    import zarr

    out = Path(out)
    if out.suffix.lower() != ".zarr":
        raise UsageError(f"{out}: the corrected volume is written as zarr (name it *.zarr)")
    if int(chunk) < 1:
        raise UsageError(f"chunk {chunk!r}: expected a positive integer")
    check_output(out, overwrite)
    nz, ny, nx = (int(n) for n in source.shape)
    dtype = np.dtype(getattr(source, "dtype", np.float32))
    c = tuple(min(int(chunk), n) for n in (nz, ny, nx))
    attrs: dict[str, Any] = {"hpcstain": "cupping-corrected", "source": str(source.spec),
                             "cupping": cupping.to_dict()}
    vox = getattr(source, "voxel_size_um", None)
    if vox is not None:
        attrs["voxel_size_um"] = [float(v) for v in vox]
    with atomic_output(out, overwrite) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs.update(attrs)
        arr = group.create_array("ct", shape=(nz, ny, nx), chunks=c, dtype=dtype,
                                 fill_value=0, dimension_names=("z", "y", "x"))
        for z0 in range(0, nz, c[0]):
            z1 = min(nz, z0 + c[0])
            block = source.read((slice(z0, z1), slice(0, ny), slice(0, nx)))
            arr[z0:z1] = cupping_mod.to_dtype(cupping_mod.apply_cupping(block, cupping), dtype)
    return out
