"""The pair manifest: which CT slice goes with which histology slide, and how to read them.

CSV columns (header required): ``id, material, ct, histology`` and optionally ``mask``
(the correspondence mask; computed when empty), ``truth`` (exact stain, phantoms only),
``extra_masks`` (``;``-separated, AND-ed into the mask), ``ct_slab`` (K odd CT planes
about the slice, one voxel apart, centre = the slice: multi-page TIFF, ``.npy``, zarr or
HDF5 (K, H, W); 2.5D models, ``model.context_slices``), ``bone_roi`` and
``background_roi`` (boxes ``y0:y1,x0:x1``, several separated by ``;``). Unknown columns are
kept in :attr:`Pair.extra`. The YAML form is a list of mappings with the same keys (under
``pairs:`` or at the top level); ``extra_masks`` and ROIs may be lists there. Paths are
relative to the manifest's folder; images are TIFF/PNG or ``file.h5:/ds``, ``dir.zarr:arr``.

:func:`read_manifest` validates every pair before anything runs (files exist, shapes agree,
histology is RGB, no NaN/Inf, not empty/constant, known material, ROIs inside the image)
and raises one :class:`InputError` listing every bad row.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hpcstain.data.readers import read_image, resolve_spec, spec_file
from hpcstain.errors import InputError

MATERIALS = ("mg", "ti", "peek")
REQUIRED = ("id", "material", "ct", "histology")
OPTIONAL = ("mask", "truth", "extra_masks", "bone_roi", "background_roi", "ct_slab")

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


@dataclass(frozen=True)
class Pair:
    """One co-registered CT slice / histology slide pair, paths resolved to absolute specs."""

    id: str
    material: str
    ct: str
    histology: str
    mask: str | None = None
    extra_masks: tuple[str, ...] = ()
    truth: str | None = None
    bone_roi: tuple[Box, ...] = ()
    background_roi: tuple[Box, ...] = ()
    source: str = ""  # "manifest.csv row 3", for messages
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    ct_slab: str | None = None  # (K, H, W) CT planes about the slice (2.5D input)

    @property
    def files(self) -> tuple[str, ...]:
        """Every image spec this pair reads (cache keys, existence checks)."""
        out = [self.ct, self.histology, *self.extra_masks]
        out += [s for s in (self.mask, self.truth, self.ct_slab) if s]
        return tuple(out)


@dataclass
class PairImages:
    """The arrays of one pair as read from disk: CT (H, W) float32, histology (H, W, 3)."""

    ct: np.ndarray
    histology: np.ndarray
    mask: np.ndarray | None
    extra_masks: list[np.ndarray]
    truth: np.ndarray | None = None


# --------------------------------------------------------------------------- parsing


def parse_boxes(text: Any, where: str) -> tuple[Box, ...]:
    """``"10:50,20:80; 0:5,0:5"`` (or a list of such / of 4 ints) → boxes; '' → ()."""
    if text is None or text == "":
        return ()
    if isinstance(text, list | tuple) and len(text) == 4 and all(
            isinstance(v, int) for v in text):
        items: list[Any] = [list(text)]
    elif isinstance(text, list | tuple):
        items = list(text)
    else:
        items = [s for s in str(text).split(";") if s.strip()]
    boxes = []
    for item in items:
        try:
            if isinstance(item, list | tuple):
                y0, y1, x0, x1 = (int(v) for v in item)
            else:
                ys, xs = str(item).split(",")
                y0, y1 = (int(v) for v in ys.split(":"))
                x0, x1 = (int(v) for v in xs.split(":"))
        except ValueError:
            raise InputError(f"{where}: ROI {item!r} is not 'y0:y1,x0:x1'") from None
        if y1 <= y0 or x1 <= x0 or min(y0, x0) < 0:
            raise InputError(f"{where}: ROI {item!r} is empty or negative")
        boxes.append((y0, y1, x0, x1))
    return tuple(boxes)


def _split_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(";") if s.strip()]


def _rows_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing} (header: {header})")
        rows = []
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k}
            if any(clean.values()):
                rows.append((f"row {reader.line_num}", clean))
    return rows


def _rows_yaml(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = data.get("pairs")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of pairs (or 'pairs:' holding one)")
    return [(f"entry {i}", {str(k): v for k, v in r.items()}) for i, r in enumerate(data)]


def _pair_from_row(row: dict[str, Any], base: Path, source: str) -> Pair:
    """Build a Pair from one row; raises InputError with the row's problem."""
    missing = [c for c in REQUIRED if not str(row.get(c) or "").strip()]
    if missing:
        raise InputError(f"empty required field(s) {missing}")
    material = str(row["material"]).strip().lower()
    if material not in MATERIALS:
        raise InputError(f"unknown material {row['material']!r} (known: {list(MATERIALS)})")

    def spec(key: str) -> str | None:
        value = str(row.get(key) or "").strip()
        return resolve_spec(value, base) if value else None

    return Pair(
        id=str(row["id"]).strip(), material=material,
        ct=spec("ct") or "", histology=spec("histology") or "", mask=spec("mask"),
        extra_masks=tuple(resolve_spec(s, base) for s in _split_list(row.get("extra_masks"))),
        truth=spec("truth"),
        bone_roi=parse_boxes(row.get("bone_roi"), "bone_roi"),
        background_roi=parse_boxes(row.get("background_roi"), "background_roi"),
        source=source,
        extra={k: str(v) for k, v in row.items() if k not in REQUIRED + OPTIONAL},
        ct_slab=spec("ct_slab"),
    )


# --------------------------------------------------------------------------- checks


def _check_finite(a: np.ndarray, what: str) -> None:
    if a.size == 0:
        raise InputError(f"{what}: empty image (shape {a.shape})")
    if a.dtype.kind not in "uif":
        raise InputError(f"{what}: unsupported dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise InputError(f"{what}: {n} NaN/Inf value(s)")


def as_ct(a: np.ndarray, what: str) -> np.ndarray:
    """CT slice as float32 (H, W); rejects colour, empty, non-finite and constant images."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise InputError(f"{what}: CT must be a 2D greyscale slice, got shape {a.shape}")
    _check_finite(a, what)
    if a.min() == a.max():
        raise InputError(f"{what}: CT is constant (every pixel {a.flat[0]})")
    return a.astype(np.float32, copy=False)


def as_rgb(a: np.ndarray, what: str) -> np.ndarray:
    """Histology as float32 (H, W, 3) on the 0–255 scale; rejects grey and broken images."""
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 1):
        raise InputError(f"{what}: greyscale image (shape {a.shape}), expected RGB")
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise InputError(f"{what}: expected an RGB image (H, W, 3), got shape {a.shape}")
    _check_finite(a, what)
    rgb = a[..., :3]
    if a.dtype == np.uint16:
        rgb = rgb / 257.0
    elif a.dtype.kind == "f" and float(rgb.max()) <= 1.0:
        rgb = rgb * 255.0
    rgb = np.asarray(rgb, dtype=np.float32)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        raise InputError(f"{what}: greyscale image (R = G = B everywhere), expected RGB")
    if rgb.min() == rgb.max():
        raise InputError(f"{what}: histology is constant")
    return rgb


def as_mask(a: np.ndarray, what: str) -> np.ndarray:
    """Mask as bool (H, W): any non-zero pixel (or channel) is inside."""
    if a.ndim == 3:
        a = a.any(axis=-1) if a.shape[-1] in (1, 3, 4) else a
    if a.ndim != 2:
        raise InputError(f"{what}: mask must be 2D, got shape {a.shape}")
    _check_finite(a, what)
    m = a != 0
    if not m.any():
        raise InputError(f"{what}: mask is empty (no non-zero pixel)")
    return m


def _check_shape(a: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if a.shape[:2] != shape:
        raise InputError(f"{what}: shape {a.shape[0]}×{a.shape[1]} does not match the CT "
                         f"{shape[0]}×{shape[1]}")


def read_pair(pair: Pair, with_truth: bool = False) -> PairImages:
    """Read and check every image of ``pair``; the first problem raises InputError."""
    ct = as_ct(read_image(pair.ct), f"ct {pair.ct}")
    hist = as_rgb(read_image(pair.histology), f"histology {pair.histology}")
    _check_shape(hist, ct.shape, f"histology {pair.histology}")
    mask = None
    if pair.mask:
        mask = as_mask(read_image(pair.mask), f"mask {pair.mask}")
        _check_shape(mask, ct.shape, f"mask {pair.mask}")
    extras = []
    for spec in pair.extra_masks:
        m = as_mask(read_image(spec), f"extra mask {spec}")
        _check_shape(m, ct.shape, f"extra mask {spec}")
        extras.append(m)
    truth = None
    if pair.truth and with_truth:
        truth = as_rgb(read_image(pair.truth), f"truth {pair.truth}")
        _check_shape(truth, ct.shape, f"truth {pair.truth}")
    for name, boxes in (("bone_roi", pair.bone_roi), ("background_roi", pair.background_roi)):
        for y0, y1, x0, x1 in boxes:
            if y1 > ct.shape[0] or x1 > ct.shape[1]:
                raise InputError(f"{name} {y0}:{y1},{x0}:{x1} lies outside the "
                                 f"{ct.shape[0]}×{ct.shape[1]} image")
    return PairImages(ct, hist, mask, extras, truth)


def read_ct_slab(pair: Pair, planes: int | None = None,
                 shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The pair's CT slab as float32 (K, H, W), or its centre ``planes`` planes.

    Refused (one InputError naming the file) when the pair has none, it is not a 3D stack
    of an odd number of planes, holds fewer than ``planes``, its planes differ in shape
    from the CT (``shape``), or it is empty, non-finite or constant.
    """
    if not pair.ct_slab:
        raise InputError(f"{pair.ct}: a {planes or 'multi'}-slice (2.5D) model needs the CT "
                         f"planes about this slice: give the pair a ct_slab column")
    what = f"ct_slab {pair.ct_slab}"
    a = read_image(pair.ct_slab)
    if a.ndim != 3 or a.shape[0] % 2 == 0:
        raise InputError(f"{what}: expected an odd number of CT planes (K, H, W), got shape "
                         f"{a.shape}")
    _check_finite(a, what)
    if shape is not None and tuple(a.shape[1:]) != tuple(shape[:2]):
        raise InputError(f"{what}: planes {a.shape[1]}×{a.shape[2]} do not match the CT "
                         f"{shape[0]}×{shape[1]}")
    if planes is not None:
        if planes > a.shape[0]:
            raise InputError(f"{what}: {a.shape[0]} plane(s), the model needs {planes} "
                             "(model.context_slices)")
        c = a.shape[0] // 2
        a = a[c - planes // 2:c + planes // 2 + 1]
    if a.min() == a.max():
        raise InputError(f"{what}: CT slab is constant")
    return a.astype(np.float32, copy=False)


def check_pair(pair: Pair) -> None:
    """Raise InputError for the first problem of ``pair`` (missing files first)."""
    for spec in pair.files:
        if not spec_file(spec).exists():
            raise InputError(f"{spec}: file not found")
    images = read_pair(pair, with_truth=True)
    if pair.ct_slab:
        read_ct_slab(pair, shape=images.ct.shape)


# --------------------------------------------------------------------------- entry point


def read_manifest(path: str | os.PathLike[str], validate: bool = True) -> list[Pair]:
    """Read a CSV/YAML pair manifest; with ``validate`` read every image and check it.

    Every bad row is collected into one InputError naming the manifest, row and id.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    rows = _rows_yaml(path) if path.suffix.lower() in (".yaml", ".yml") else _rows_csv(path)
    if not rows:
        raise InputError(f"{path}: no pairs listed")
    base = path.resolve().parent
    pairs: list[Pair] = []
    problems: list[str] = []
    seen: set[str] = set()
    for where, row in rows:
        label = f"{where} (id {str(row.get('id') or '?').strip()})"
        try:
            pair = _pair_from_row(row, base, f"{path} {where}")
            if pair.id in seen:
                raise InputError(f"duplicate id {pair.id!r}")
            seen.add(pair.id)
            if validate:
                check_pair(pair)
        except InputError as exc:
            problems.append(f"{label}: {exc}")
            continue
        pairs.append(pair)
    if problems:
        raise InputError(f"{path}: {len(problems)} bad pair(s) of {len(rows)}:\n  "
                         + "\n  ".join(problems))
    return pairs


def labels_spec(pair: Pair) -> str | None:
    """A pair's label image: an absolute ``labels`` manifest column, else the phantom's
    ``labels/<id>.png`` beside ``truth/<id>.png``; None when there is none."""
    given = pair.extra.get("labels", "").strip()
    if given and Path(given).is_absolute():
        return given
    if pair.truth and ":" not in Path(pair.truth).name:
        path = Path(pair.truth).parent.parent / "labels" / Path(pair.truth).name
        return str(path) if path.is_file() else None
    return None
