"""``hpcstain morph``: 3D histomorphometry of a fused stain, without any truth.

Reads ``RUN_DIR/fused.ome.zarr`` level 0 (RGB of the RGBA image), gives every voxel the
tissue class of the nearest palette colour (:mod:`hpcstain.metrics.tissue`), writes the
class volume as an NGFF labels image inside the fused image (``labels/tissue``, with
``image-label`` colours and class names, the parent's levels and scales, so napari and
ome-zarr readers show it over the stain) and a table (``RUN_DIR/morph.csv``, also
printed) of BV/TV, BIC and degradation-layer thickness for the whole sample and, with
``regions``, for shells at distance bands (µm) from the implant surface.

Palette: a YAML file (``--palette``), else the one stored in the checkpoint the run was
stained with (``palette``, written at training time).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output, check_output
from hpcstain.checkpoint import load_checkpoint
from hpcstain.errors import InputError, UsageError
from hpcstain.metrics.tissue import (
    CLASS_RGBA,
    CLASSES,
    Palette,
    checkpoint_palette,
    distance_bands,
    morphometry,
    morphometry_counts,
    read_classes,
    read_palette_file,
)
from hpcstain.volume.omezarr import n_levels_of, ngff_attrs, open_image

FUSED = "fused.ome.zarr"
LABEL_NAME = "tissue"
TABLE = "morph.csv"
COLUMNS = ("region", "bv_tv", "bic", "thickness_mean", "thickness_median", "unit",
           "tv_voxels", "surface_voxels", *(f"voxels_{c}" for c in CLASSES))


@dataclass
class MorphReport:
    labels_path: Path
    table_path: Path
    rows: list[dict[str, Any]]
    table: str
    palette: Palette


# --------------------------------------------------------------------------- inputs


def run_palette(run: Path, palette_file: str | os.PathLike[str] | None) -> Palette:
    """The palette file, else the palette of the checkpoint named in the run's plan."""
    if palette_file is not None:
        return read_palette_file(palette_file)
    try:
        ckpt = str(json.loads((run / "plan.json").read_text()).get("checkpoint") or "")
    except (OSError, ValueError):
        ckpt = ""
    if not ckpt:
        raise UsageError(f"{run}: the run names no checkpoint; pass --palette FILE")
    if not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: the run's checkpoint is gone; pass --palette FILE")

    palette = checkpoint_palette(load_checkpoint(ckpt), ckpt)
    if palette is None:
        raise UsageError(f"{ckpt}: no tissue palette in this checkpoint (trained before "
                         "palettes were stored); pass --palette FILE")
    return palette


def fused_image(run: Path) -> Any:
    path = run / FUSED
    if not path.is_dir():
        raise InputError(f"{run}: no {FUSED} (run `hpcstain fuse {run}` first)")
    try:
        return open_image(path, mode="r+")
    except Exception as exc:  # zarr raises several types for unreadable stores
        raise InputError(f"{path}: not a readable OME-Zarr image ({exc})") from None


def voxel_size(root: Any) -> tuple[float, float, float] | None:
    """µm per voxel (z, y, x) from level 0's scale when the axes carry a unit."""
    ms = ngff_attrs(root)["multiscales"][0]
    if not all(a.get("unit") for a in ms["axes"][1:]):
        return None
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    return tuple(float(v) for v in scale[1:4])  # type: ignore[return-value]


def classify_fused(root: Any, palette: Palette, slab: int = 16) -> np.ndarray:
    """Class ids (uint8 (Z, Y, X)) of level 0, read slab by slab along z."""
    level = root["0"]
    if level.ndim != 4 or level.shape[0] < 3:
        raise InputError(f"fused image level 0 has shape {level.shape}; expected (4, Z, Y, X)")
    out = np.empty(level.shape[1:], np.uint8)
    for z0 in range(0, level.shape[1], slab):
        rgb = np.moveaxis(np.asarray(level[:3, z0:z0 + slab]), 0, -1)
        out[z0:z0 + slab] = read_classes(rgb, palette)
    return out


# --------------------------------------------------------------------------- labels image


def label_metadata(parent: dict[str, Any], n_levels: int, version: str,
                   palette: Palette) -> dict[str, Any]:
    """NGFF multiscales (z, y, x; the parent's scales) and ``image-label`` attributes."""
    ms = parent["multiscales"][0]
    datasets = [{"path": d["path"], "coordinateTransformations": [
        {**t, t["type"]: t[t["type"]][1:]} for t in d["coordinateTransformations"]]}
        for d in ms["datasets"][:n_levels]]
    multiscale: dict[str, Any] = {"name": LABEL_NAME, "axes": ms["axes"][1:],
                                  "datasets": datasets, "type": "nearest"}
    label: dict[str, Any] = {
        "colors": [{"label-value": i, "rgba": list(CLASS_RGBA[c])}
                   for i, c in enumerate(CLASSES)],
        "properties": [{"label-value": i, "class": c} for i, c in enumerate(CLASSES)],
        "source": {"image": "../../"}}
    extra = {"hpcstain": {"palette": palette.to_dict(), "classes": list(CLASSES)}}
    if version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}],
                "image-label": {"version": "0.4", **label}, **extra}
    return {"ome": {"version": version, "multiscales": [multiscale], "image-label": label},
            **extra}


def write_labels(root: Any, fused: Path, classes: np.ndarray, palette: Palette,
                 overwrite: bool) -> Path:
    """``fused/labels/tissue``: the class volume with the parent's levels (2× nearest)."""
    import zarr

    fmt = root.metadata.zarr_format
    version = "0.4" if fmt == 2 else ngff_attrs(root).get("version", "0.5")
    labels = root.require_group("labels")
    names = sorted(set(ngff_attrs(labels).get("labels", [])) | {LABEL_NAME})
    target = fused / "labels" / LABEL_NAME
    n_levels = n_levels_of(root)
    chunk = tuple(root["0"].chunks[1:])
    with atomic_output(target, overwrite) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=fmt)
        for k in range(n_levels):
            f = 2 ** k
            data = classes[::f, ::f, ::f]
            kw = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2
                  else {"dimension_names": ["z", "y", "x"]})
            group.create_array(str(k), data=data,
                               chunks=tuple(min(c, n) for c, n in zip(chunk, data.shape,
                                                                      strict=True)), **kw)
        group.attrs.update(label_metadata(ngff_attrs(root), n_levels, version, palette))
    labels.attrs.update({"labels": names} if version == "0.4" else
                        {"ome": {"version": version, "labels": names}})
    return target


# --------------------------------------------------------------------------- table


def region_rows(classes: np.ndarray, spacing: Sequence[float] | None,
                edges: Sequence[float] | None) -> list[dict[str, Any]]:
    """One row for the whole sample, one per distance band (``edges`` in µm)."""
    regions: list[tuple[str, np.ndarray | None]] = [("sample", None)]
    if edges:
        regions += distance_bands(classes, edges, spacing)
    unit = "um" if spacing else "voxels"
    rows = []
    for name, region in regions:
        m = morphometry(morphometry_counts(classes, spacing, region))
        sel = classes if region is None else classes[region]
        counts = np.bincount(sel.ravel(), minlength=len(CLASSES))
        rows.append({"region": name, "bv_tv": m["bv_tv"], "bic": m["bic"],
                     "thickness_mean": m["thickness_mean"],
                     "thickness_median": m["thickness_median"], "unit": unit,
                     "tv_voxels": m["tv_voxels"], "surface_voxels": m["surface_voxels"],
                     **{f"voxels_{c}": int(counts[i]) for i, c in enumerate(CLASSES)}})
    return rows


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def format_rows(rows: Sequence[dict[str, Any]], note: str = "") -> str:
    unit = "µm" if rows and rows[0]["unit"] == "um" else "voxels"
    lines = [f"| region ({unit} from the implant) | BV/TV | BIC | degradation layer mean / "
             f"median ({unit}) | TV voxels |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['region']} | {_f(r['bv_tv'], '{:.3f}')} | {_f(r['bic'], '{:.3f}')}"
                     f" | {_f(r['thickness_mean'], '{:.1f}')} / "
                     f"{_f(r['thickness_median'], '{:.1f}')} | {r['tv_voxels']} |")
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def parse_regions(text: str | Sequence[float] | None) -> list[float] | None:
    """``"0,50,100"`` → ``[0, 50, 100]`` (µm edges of distance bands)."""
    if text is None or text == "":
        return None
    try:
        edges = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise UsageError(f"--regions {text!r}: expected comma-separated distances in µm, "
                         "e.g. 0,50,100,200") from None
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in pairwise(edges)):
        raise UsageError(f"--regions {text!r}: expected at least two ascending "
                         "distances >= 0 (µm), e.g. 0,50,100,200")
    return edges


# --------------------------------------------------------------------------- entry point


def morph_run(run_dir: str | os.PathLike[str], palette: str | os.PathLike[str] | None = None,
              regions: str | Sequence[float] | None = None, overwrite: bool = False,
              log: Callable[[str], None] = print) -> MorphReport:
    """Classify a run's fused stain, write ``labels/tissue`` and ``morph.csv``."""
    run = Path(run_dir)
    edges = parse_regions(regions)
    table_path = check_output(run / TABLE, overwrite)
    root = fused_image(run)
    if (run / FUSED / "labels" / LABEL_NAME).exists() and not overwrite:
        raise UsageError(f"{run / FUSED / 'labels' / LABEL_NAME}: output exists (pass "
                         "--overwrite to replace it)")
    pal = run_palette(run, palette)
    classes = classify_fused(root, pal)
    spacing = voxel_size(root)
    if edges and spacing is None:
        log("no voxel size in the fused image: --regions read as voxels")
    rows = region_rows(classes, spacing, edges)
    labels_path = write_labels(root, run / FUSED, classes, pal, overwrite)
    with atomic_output(table_path, overwrite) as tmp:
        tmp.write_text(rows_csv(rows))
    note = (f"palette: {pal.source} ({len(pal.names)} entries); classes in "
            f"{labels_path}; table in {table_path}")
    return MorphReport(labels_path, table_path, rows, format_rows(rows, note), pal)
