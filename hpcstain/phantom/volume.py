"""Phantom volumes: generated slab by slab, in memory or streamed to zarr / HDF5 / TIFF."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcstain import __version__
from hpcstain.atomic import atomic_output, check_output
from hpcstain.errors import UsageError
from hpcstain.phantom.render import CT_GAIN, CT_OFFSET, PALETTE, cupping_truth, render_slab
from hpcstain.phantom.sample import (
    LABELS,
    Sample,
    check_cupping,
    check_material,
    check_screw_scale,
    make_sample,
)
from hpcstain.phantom.tomo import TomoParams, check_tomo, nominal_levels, tomo_slab

PHANTOM_VERSION = "1"
VOXEL_SIZE_UM = 5.0          # nominal; the anatomy is a scale model filling the field of view
SLAB_VOXELS = 1 << 21        # voxels evaluated at once (bounds the float32 temporaries)
ZARR_SUFFIXES = (".zarr",)
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs")
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class PhantomVolume:
    """A generated volume with its exact truth (all arrays indexed z, y, x)."""

    ct: np.ndarray           # uint16 (Z, Y, X)
    stain: np.ndarray        # uint8 (Z, Y, X, 3) toluidine-blue RGB
    labels: np.ndarray       # uint8 (Z, Y, X), LABELS codes
    material: str
    seed: int
    voxel_size_um: float = VOXEL_SIZE_UM
    screw_scale: float = 1.0
    cupping: dict[str, object] | None = None   # the CT's true cupping (render.cupping_truth)


def check_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """Three positive ints or a UsageError naming the bad value."""
    try:
        dims = tuple(int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"shape {shape!r}: expected three integers Z Y X") from exc
    if len(dims) != 3 or any(v <= 0 for v in dims) or any(
            int(v) != v for v in shape):
        raise UsageError(f"shape {tuple(shape)!r}: expected three positive integers Z Y X")
    return dims  # type: ignore[return-value]


def metadata(shape: tuple[int, int, int], material: str, seed: int,
             screw_scale: float = 1.0, cupping: float | None = None,
             tomo: TomoParams | None = None) -> dict[str, object]:
    """Attributes stored with every volume (provenance, the label/colour key and the CT's
    true cupping: ``cupping`` = render.cupping_truth). A ``tomo`` scan adds ``physics``
    (its knobs), nominal ``ct_air``/``ct_dense_bone`` and no cupping (it has beam
    hardening instead)."""
    if tomo is not None:
        return {**metadata(shape, material, seed, screw_scale), **nominal_levels(tomo),
                "cupping": None, "physics": tomo.attrs()}
    return {
        "generator": "hpcstain.phantom", "generator_version": PHANTOM_VERSION,
        "hpcstain_version": __version__, "material": material, "seed": int(seed),
        "screw_scale": float(screw_scale),
        "shape_zyx": list(shape), "axes": "zyx", "voxel_size_um": VOXEL_SIZE_UM,
        "labels": dict(LABELS), "palette": {k: list(v) for k, v in PALETTE.items()},
        "ct_air": CT_OFFSET, "ct_dense_bone": CT_OFFSET + CT_GAIN,
        "cupping": cupping_truth(make_sample(shape, material, seed, screw_scale, cupping)),
    }


def _render_into(s: Sample, z0: int, z1: int, ny: int, nx: int,
                 ct: np.ndarray, rgb: np.ndarray, labels: np.ndarray,
                 tomo: TomoParams | None = None) -> None:
    """Fill output slices ``z0..z1`` (buffers indexed from 0) in memory-bounded sub-slabs
    (rendered, or scanned by the physical chain when ``tomo`` is given)."""
    step = max(1, SLAB_VOXELS // (ny * nx) // (4 if tomo is not None else 1))
    for a in range(z0, z1, step):
        b = min(z1, a + step)
        c, r, lab = (render_slab(s, a, b, ny, nx) if tomo is None
                     else tomo_slab(s, a, b, ny, nx, tomo))
        ct[a - z0:b - z0], rgb[a - z0:b - z0], labels[a - z0:b - z0] = c, r, lab


def iter_slabs(shape: tuple[int, int, int], material: str, seed: int,
               slab: int = 64, screw_scale: float = 1.0, cupping: float | None = None,
               tomo: TomoParams | None = None
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(z0, ct, stain, labels)`` for consecutive slabs of ``slab`` slices."""
    nz, ny, nx = check_shape(shape)
    tomo = None if tomo is None else check_tomo(tomo)
    s = make_sample((nz, ny, nx), check_material(material), seed, screw_scale, cupping)
    for z0 in range(0, nz, max(1, int(slab))):
        z1 = min(nz, z0 + max(1, int(slab)))
        ct = np.empty((z1 - z0, ny, nx), np.uint16)
        rgb = np.empty((z1 - z0, ny, nx, 3), np.uint8)
        lab = np.empty((z1 - z0, ny, nx), np.uint8)
        _render_into(s, z0, z1, ny, nx, ct, rgb, lab, tomo)
        yield z0, ct, rgb, lab


def make_volume(shape: tuple[int, int, int], material: str, seed: int,
                screw_scale: float = 1.0, cupping: float | None = None,
                tomo: TomoParams | None = None) -> PhantomVolume:
    """The whole volume in memory (tests, small demos); equals what the writers store.

    ``screw_scale`` multiplies the screw's radii (1: the default M2-like screw);
    ``cupping`` is the CT's cupping depth (attenuation units at the axis; None: 0.05).
    ``tomo``: scan the sample with the physical CT chain (``phantom.tomo``) instead of
    rendering it (None: the renderer; labels and stain are the same either way).
    """
    nz, ny, nx = check_shape(shape)
    material = check_material(material)
    tomo = None if tomo is None else check_tomo(tomo)
    s = make_sample((nz, ny, nx), material, seed, screw_scale, cupping)
    ct = np.empty((nz, ny, nx), np.uint16)
    rgb = np.empty((nz, ny, nx, 3), np.uint8)
    lab = np.empty((nz, ny, nx), np.uint8)
    _render_into(s, 0, nz, ny, nx, ct, rgb, lab, tomo)
    return PhantomVolume(ct=ct, stain=rgb, labels=lab, material=material, seed=int(seed),
                         screw_scale=s.screw_scale,
                         cupping=cupping_truth(s) if tomo is None else None)


def volume_format(out: Path) -> str:
    """``zarr``, ``hdf5`` or ``tiff`` from the output suffix."""
    suffix = out.suffix.lower()
    for fmt, suffixes in (("zarr", ZARR_SUFFIXES), ("hdf5", HDF5_SUFFIXES),
                          ("tiff", TIFF_SUFFIXES)):
        if suffix in suffixes:
            return fmt
    raise UsageError(f"{out}: unknown volume format {suffix!r} "
                     "(use .zarr, .h5/.hdf5/.nxs or .tif/.tiff)")


def tiff_truth_paths(out: Path) -> tuple[Path, Path]:
    """Where the truth of a TIFF volume goes: ``<stem>_stain<sfx>`` and ``<stem>_labels<sfx>``."""
    return (out.with_name(f"{out.stem}_stain{out.suffix}"),
            out.with_name(f"{out.stem}_labels{out.suffix}"))


def write_volume_file(out: str | Path, shape: tuple[int, int, int], material: str, seed: int,
                      overwrite: bool = False, chunk: int = 64,
                      screw_scale: float = 1.0, cupping: float | None = None,
                      tomo: TomoParams | None = None) -> Path:
    """Stream a phantom volume to ``out`` (.zarr group, NeXus-like .h5, or TIFF stacks).

    All arguments are checked before anything is written; the output appears only once
    complete (``atomic_output``). Memory stays at one ``chunk``-thick slab of outputs
    plus the bounded float32 work of ``render_slab``. ``tomo``: the physical CT chain
    instead of the renderer (``--physics tomo``; its knobs go to the attrs as ``physics``).
    """
    out = Path(out)
    dims = check_shape(shape)
    material = check_material(material)
    screw_scale = check_screw_scale(screw_scale)
    cupping = check_cupping(cupping)
    tomo = None if tomo is None else check_tomo(tomo)
    if int(chunk) <= 0:
        raise UsageError(f"chunk {chunk!r}: expected a positive integer")
    chunk = int(chunk)
    fmt = volume_format(out)
    targets = [out, *tiff_truth_paths(out)] if fmt == "tiff" else [out]
    for path in targets:
        check_output(path, overwrite)
    attrs = metadata(dims, material, seed, screw_scale, cupping, tomo)
    slabs = iter_slabs(dims, material, seed, slab=chunk, screw_scale=screw_scale,
                       cupping=cupping, tomo=tomo)
    if fmt == "zarr":
        with atomic_output(out, overwrite) as tmp:
            _write_zarr(tmp, dims, chunk, attrs, slabs)
    elif fmt == "hdf5":
        with atomic_output(out, overwrite) as tmp:
            _write_hdf5(tmp, dims, chunk, attrs, slabs)
    else:
        with contextlib.ExitStack() as stack:
            tmps = [stack.enter_context(atomic_output(p, overwrite)) for p in targets]
            _write_tiff(tmps, attrs, slabs)
    return out


def _ct_units(attrs: dict[str, object]) -> str:
    if "physics" in attrs:
        return "a.u. (uint16 = grey_offset + grey_scale * mu[1/cm], see attrs physics)"
    return "a.u. (uint16; air 10000, dense bone 30000)"


def _write_zarr(path: Path, shape: tuple[int, int, int], chunk: int, attrs: dict[str, object],
                slabs: Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    import zarr

    c = tuple(min(chunk, n) for n in shape)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(attrs)
    ct = group.create_array("ct", shape=shape, chunks=c, dtype="uint16", fill_value=0,
                            dimension_names=("z", "y", "x"))
    rgb = group.create_array("stain", shape=(*shape, 3), chunks=(*c, 3), dtype="uint8",
                             fill_value=0, dimension_names=("z", "y", "x", "c"))
    lab = group.create_array("labels", shape=shape, chunks=c, dtype="uint8", fill_value=0,
                             dimension_names=("z", "y", "x"))
    ct.attrs.update({"units": _ct_units(attrs), "voxel_size_um": VOXEL_SIZE_UM})
    lab.attrs.update({"labels": dict(LABELS)})
    for z0, c_ct, c_rgb, c_lab in slabs:
        z1 = z0 + c_ct.shape[0]
        ct[z0:z1], rgb[z0:z1], lab[z0:z1] = c_ct, c_rgb, c_lab


def _write_hdf5(path: Path, shape: tuple[int, int, int], chunk: int, attrs: dict[str, object],
                slabs: Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    import json

    import h5py

    c = tuple(min(chunk, n) for n in shape)
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "hpcstain.phantom"
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "default": "data"})
        data = entry.create_group("data")
        data.attrs.update({"NX_class": "NXdata", "signal": "data",
                           "voxel_size_um": VOXEL_SIZE_UM})
        ct = data.create_dataset("data", shape=shape, chunks=c, dtype="uint16")
        ct.attrs.update({"voxel_size_um": VOXEL_SIZE_UM, "axes": "z,y,x",
                         "units": _ct_units(attrs)})
        sample = entry.create_group("sample")
        sample.attrs.update({"NX_class": "NXsample", "material": str(attrs["material"]),
                             "seed": int(attrs["seed"])})  # type: ignore[call-overload]
        truth = entry.create_group("truth")
        truth.attrs.update({"NX_class": "NXcollection"})
        rgb = truth.create_dataset("stain", shape=(*shape, 3), chunks=(*c, 3), dtype="uint8")
        lab = truth.create_dataset("labels", shape=shape, chunks=c, dtype="uint8")
        lab.attrs["labels"] = json.dumps(LABELS)
        entry.attrs["phantom"] = json.dumps(attrs)
        for z0, c_ct, c_rgb, c_lab in slabs:
            z1 = z0 + c_ct.shape[0]
            ct[z0:z1], rgb[z0:z1], lab[z0:z1] = c_ct, c_rgb, c_lab


def _write_tiff(paths: list[Path], attrs: dict[str, object],
                slabs: Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    import json

    import tifffile

    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(tifffile.TiffWriter(p, bigtiff=True)) for p in paths]
        first = True
        for _z0, *arrays in slabs:
            for w, arr in zip(writers, arrays, strict=True):
                kw = {"metadata": {"phantom": json.dumps(attrs)}} if first else {}
                rgb = arr.ndim == 4
                for page in arr:
                    w.write(page, contiguous=True, photometric="rgb" if rgb else "minisblack",
                            **kw)
                    kw = {}
            first = False
