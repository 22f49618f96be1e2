"""Physical voxel size of an input volume: found in its metadata, kept in µm as (z, y, x).

Where each format keeps it (searched in this order; the first usable value wins):

* **Attributes** (zarr arrays and groups, HDF5 datasets and groups): ``voxel_size``,
  ``element_size``, ``pixel_size``, ``resolution``, each bare or with a unit suffix
  (``_um``, ``_nm``, ``_mm``, ``_m``), one value (isotropic) or three (z, y, x, unless an
  ``axes`` attribute names another order). A bare name takes its unit from
  ``NAME_unit(s)``, ``unit(s)``, ``spatial_unit(s)`` or ``length_unit`` when that is a
  length; with no unit it is read as µm, unless the values are too small to be µm
  (< 0.001: metres without their unit), which are refused with a note.
* **HDF5 / NeXus**: the dataset's attributes, then each parent group (attributes and
  small fields such as ``voxel_size`` or ``x_pixel_size``/``y_pixel_size``/``z_pixel_size``
  with their ``units`` attribute), then the entry's ``NXsample`` groups, then its
  ``NXdetector`` groups (and ``/entry/instrument/detector``). A detector gives only the
  pixel size on its face: the reconstruction's slices are detector rows, so z comes from
  ``y_pixel_size`` and the in-plane y, x from ``x_pixel_size`` (equal on square pixels).
* **OME-Zarr**: the ``scale`` of the dataset read (times the multiscale's own scale) and
  the ``unit`` of the z, y, x axes (a scale without a unit is no physical size).
* **TIFF**: OME-XML ``PhysicalSize{X,Y,Z}``; ImageJ ``unit`` with ``XResolution``/
  ``YResolution`` (pixels per unit) and ``spacing`` for z; tifffile's JSON description
  (attributes as above, e.g. the phantom's ``voxel_size_um``); else ``XResolution``/
  ``YResolution`` in ``ResolutionUnit`` inch or cm (72 and 96 dpi are a writer's default,
  not a size, and are ignored). A TIFF without a z spacing is taken as isotropic (z = y).

Everything found is converted to micrometres; the OME-Zarr output writes it with the NGFF
unit ``micrometer``. What was refused on the way is kept as notes for the one-line note
printed when no size is found.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpcstain.errors import UsageError

ZYX = tuple[float, float, float]

NGFF_UNIT = "micrometer"  # the unit every output is written in

# Length units → micrometres (lower-case; NGFF names, SI symbols, common spellings).
UM_PER_UNIT: dict[str, float] = {
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "um": 1.0, "µm": 1.0, "micron": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "pm": 1e-6, "picometer": 1e-6, "picometre": 1e-6,
    "å": 1e-4, "angstrom": 1e-4,
    "in": 25400.0, "inch": 25400.0,
}
NOT_LENGTH = ("pixel", "pixels", "px", "voxel", "voxels", "")

SIZE_NAMES = ("voxel_size", "element_size", "pixel_size", "resolution")
UNIT_SUFFIXES = (("_um", "um"), ("_nm", "nm"), ("_mm", "mm"), ("_m", "m"), ("", None))
MIN_BARE_UM = 1e-3        # a unit-less value below this is not µm (metres, most likely)
DEFAULT_DPI = (72.0, 96.0)  # TIFF writers' default resolution: no physical meaning


@dataclass(frozen=True)
class VoxelSize:
    """A voxel size in µm (z, y, x) and where it was read."""

    zyx_um: ZYX
    source: str

    def describe(self) -> str:
        return f"{format_zyx(self.zyx_um)} µm (z, y, x) from {self.source}"


def format_zyx(zyx: Sequence[float]) -> str:
    return " × ".join(f"{v:g}" for v in zyx)


# --------------------------------------------------------------------------- values


def unit_factor(unit: Any) -> float | None:
    """µm per ``unit`` (``"m"``, ``"µm"``, ``"micrometer"``, ``"\\u00B5m"`` …), or None."""
    if not isinstance(unit, str):
        return None
    text = unit.strip().lower().replace("\\u00b5", "µ").replace("μ", "µ")
    text = text.replace("micro-", "micro").replace("micro ", "micro")
    if text in UM_PER_UNIT:
        return UM_PER_UNIT[text]
    if text.endswith("s") and text[:-1] in UM_PER_UNIT:  # meters, microns, nanometres
        return UM_PER_UNIT[text[:-1]]
    return None


def _is_length(unit: Any) -> bool:
    return unit_factor(unit) is not None


def _numbers(value: Any) -> tuple[list[float], str | None] | None:
    """Numbers (and a unit written after them, for strings like ``"5e-6 m"``) or None."""
    if isinstance(value, bool):
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, int | float):
        return [float(value)], None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([-+0-9.eE,\s]+?)\s*([^\d\s,][^\d,]*)?\s*", value)
        if not m:
            return None
        try:
            nums = [float(t) for t in re.split(r"[,\s]+", m.group(1).strip()) if t]
        except ValueError:
            return None
        return (nums, m.group(2).strip() if m.group(2) else None) if nums else None
    if isinstance(value, Sequence) and value and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value], None
    return None


def axis_order(attrs: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The order of three-value lists when an ``axes``/``axis_order`` attribute names one."""
    for key in ("axes", "axis_order"):
        value = attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            names = [c for c in value.lower() if c in "zyx"]
        elif isinstance(value, Sequence):
            names = [str(v.get("name", "") if isinstance(v, Mapping) else v).lower()
                     for v in value]
            names = [n for n in names if n in ("z", "y", "x")]
        else:
            continue
        if sorted(names) == ["x", "y", "z"]:
            return tuple(names)  # type: ignore[return-value]
    return None


def quantity(value: Any, unit: Any, label: str, notes: list[str],
             order: tuple[str, str, str] | None = None) -> VoxelSize | None:
    """One value (isotropic) or three (in ``order``, default z, y, x) with ``unit`` → µm.

    ``unit`` may be one unit or one per value; None reads µm (refused, with a note, when
    the values are too small to be µm). Anything unusable adds a note and gives None.
    """
    if isinstance(value, Mapping):  # {"value": .., "unit": ..} or {"z": .., "y": .., "x": ..}
        if "value" in value:
            return quantity(value["value"], value.get("unit", value.get("units", unit)),
                            label, notes, order)
        if all(a in value for a in "zyx"):
            return quantity([value[a] for a in "zyx"], unit, label, notes, None)
        return None
    parsed = _numbers(value)
    if parsed is None:
        notes.append(f"{label} = {value!r} is not a number")
        return None
    nums, written_unit = parsed
    unit = written_unit or unit
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    if len(nums) not in (1, 3):
        notes.append(f"{label} holds {len(nums)} values (need 1 or 3)")
        return None
    units = list(unit) if isinstance(unit, Sequence) and not isinstance(unit, str) else [unit]
    if len(units) == 1:
        units *= len(nums)
    if len(units) != len(nums):
        notes.append(f"{label}: {len(units)} units for {len(nums)} values")
        return None
    um = []
    for v, u in zip(nums, units, strict=True):
        if isinstance(u, bytes):
            u = u.decode("utf-8", "replace")
        if u is None:
            if 0 < abs(v) < MIN_BARE_UM:
                notes.append(f"{label} = {v:g} has no unit and is too small for µm "
                             "(metres?)")
                return None
            um.append(v)
            continue
        factor = unit_factor(u)
        if factor is None:
            reason = "is not a physical length" if str(u).strip().lower() in NOT_LENGTH \
                else "is not a known length unit"
            notes.append(f"{label}: unit {u!r} {reason}")
            return None
        um.append(v * factor)
    if not all(math.isfinite(v) and v > 0 for v in um):
        notes.append(f"{label} = {format_zyx(nums)} is not a positive size")
        return None
    if len(um) == 1:
        um *= 3
    elif order is not None and order != ("z", "y", "x"):
        um = [um[order.index(a)] for a in "zyx"]
    shown = " ".join(f"{v:g}" for v in nums)
    unit_text = " ".join(dict.fromkeys(str(u) for u in units)) if unit is not None \
        else "(no unit: µm)"
    return VoxelSize(tuple(um), f"{label} = {shown} {unit_text}")  # type: ignore[arg-type]


def from_attrs(attrs: Mapping[str, Any], where: str, notes: list[str]) -> VoxelSize | None:
    """The voxel size in a dict of attributes (zarr/HDF5 attributes, JSON metadata)."""
    order = axis_order(attrs)
    for name in SIZE_NAMES:
        for suffix, unit in UNIT_SUFFIXES:
            key = name + suffix
            if key not in attrs:
                continue
            if unit is None:
                unit = next((attrs[k] for k in (f"{name}_unit", f"{name}_units", "unit",
                                                "units", "spatial_unit", "spatial_units",
                                                "length_unit")
                             if k in attrs and _unit_ok(attrs[k])), None)
            found = quantity(attrs[key], unit, f"{where} attribute {key}", notes, order)
            if found is not None:
                return found
    return None


def _unit_ok(unit: Any) -> bool:
    """A length unit, or one length unit per axis (``units`` may describe the data)."""
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    if isinstance(unit, Sequence) and not isinstance(unit, str):
        return len(unit) in (1, 3) and all(_is_length(u) for u in unit)
    return _is_length(unit)


def parse_voxel_size(values: str | Sequence[Any]) -> ZYX:
    """``"5"``, ``"2,1,1"``, ``["2", "1", "1"]`` or ``(2.0, 1.0, 1.0)`` → (z, y, x) in µm."""
    text = values if isinstance(values, str) else " ".join(str(v) for v in values)
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 3) or not all(math.isfinite(v) and v > 0 for v in nums):
        raise UsageError(f"voxel size {text!r}: expected Z,Y,X (or one isotropic value) in "
                         "µm, all positive")
    return (nums[0],) * 3 if len(nums) == 1 else (nums[0], nums[1], nums[2])


# --------------------------------------------------------------------------- HDF5 / NeXus


def _h5_attrs(obj: Any) -> dict[str, Any]:
    out = {}
    for k, v in obj.attrs.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[k] = v
    return out


def _field(group: Any, name: str) -> tuple[Any, Any] | None:
    """A small numeric or text field of ``group`` and its ``units`` attribute, or None."""
    import h5py

    obj = group.get(name)
    if not isinstance(obj, h5py.Dataset) or obj.size > 3 or obj.dtype.kind not in "uifSO":
        return None
    value = obj[()]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    units = obj.attrs.get("units", obj.attrs.get("unit"))
    if isinstance(units, bytes):
        units = units.decode("utf-8", "replace")
    return value, units


def from_fields(group: Any, notes: list[str]) -> VoxelSize | None:
    """Voxel-size fields (datasets) of an HDF5 group: whole, or per axis (``x_pixel_size``)."""
    base = group.name.rstrip("/")
    for name in SIZE_NAMES:
        for suffix, unit in UNIT_SUFFIXES:
            got = _field(group, name + suffix)
            if got is not None:
                found = quantity(got[0], unit or got[1], f"{base}/{name + suffix}", notes)
                if found is not None:
                    return found
    for name in ("voxel_size", "pixel_size"):
        per_axis: dict[str, VoxelSize] = {}
        for a in "zyx":
            for key in (f"{a}_{name}", f"{name}_{a}"):
                got = _field(group, key)
                if got is not None:
                    size = quantity(got[0], got[1], f"{base}/{key}", notes)
                    if size is not None:
                        per_axis[a] = size
                    break
        if per_axis:
            return _combine(per_axis, pixels=name == "pixel_size")
    return None


def _combine(per_axis: dict[str, VoxelSize], pixels: bool) -> VoxelSize:
    """Per-axis fields → (z, y, x).

    Pixel sizes (``x_pixel_size``, ``y_pixel_size``: a detector's face, as NXdetector and
    NXsample give them) map onto a reconstruction: its slices are detector rows (z from
    y) and its in-plane grid uses the detector columns' size (y and x from x). Voxel sizes
    are the volume's own axes; a missing one takes its neighbour's value.
    """
    v = {a: s.zyx_um[0] for a, s in per_axis.items()}
    src = "; ".join(s.source for s in per_axis.values())
    if len(v) == 3:
        return VoxelSize((v["z"], v["y"], v["x"]), src)
    if len(v) == 1:
        one = next(iter(v.values()))
        return VoxelSize((one, one, one), f"{src} (isotropic)")
    if pixels and "z" not in v:
        return VoxelSize((v["y"], v["x"], v["x"]), f"{src} (z from y, in-plane from x)")
    y = v.get("y", v.get("x"))
    zyx = (v.get("z", y), y, v.get("x", y))
    return VoxelSize(zyx, f"{src} (missing axis from its neighbour)")  # type: ignore[arg-type]


def _nx_groups(entry: Any, nx_class: str) -> list[Any]:
    import h5py

    found: list[tuple[int, str]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group):
            cls = obj.attrs.get("NX_class")
            if isinstance(cls, bytes):
                cls = cls.decode("utf-8", "replace")
            if cls == nx_class:
                found.append((name.count("/"), name))

    entry.visititems(visit)
    return [entry[name] for _, name in sorted(found)]


def from_hdf5(fh: Any, key: str, notes: list[str]) -> VoxelSize | None:
    """Search a dataset's attributes, its parent groups, then the entry's NeXus groups."""
    ds = fh[key]
    found = from_attrs(_h5_attrs(ds), ds.name, notes)
    if found is not None:
        return found
    seen = set()
    group = ds.parent
    while True:
        seen.add(group.name)
        found = from_attrs(_h5_attrs(group), group.name, notes) or from_fields(group, notes)
        if found is not None:
            return found
        if group.name == "/":
            break
        group = group.parent
    parts = ds.name.strip("/").split("/")
    entry = fh["/" + parts[0]] if len(parts) > 1 else fh
    searches = [*_nx_groups(entry, "NXsample"), *_nx_groups(entry, "NXdetector")]
    fallback = f"/{parts[0] if len(parts) > 1 else 'entry'}/instrument/detector"
    if fallback in fh:
        searches.append(fh[fallback])
    for group in searches:
        if group.name in seen:
            continue
        seen.add(group.name)
        found = from_fields(group, notes) or from_attrs(_h5_attrs(group), group.name, notes)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- OME-Zarr


def ngff_metadata(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first ``multiscales`` entry of a group's attributes (NGFF 0.4 or 0.5), or None."""
    meta = attrs.get("ome", attrs)
    ms = meta.get("multiscales") if isinstance(meta, Mapping) else None
    if isinstance(ms, list) and ms and isinstance(ms[0], Mapping):
        return dict(ms[0])
    return None


def ngff_axes(ms: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Axes as dicts (``name``, ``type``, ``unit``); NGFF ≤ 0.3 names are plain strings."""
    axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-5:]
    return [dict(a) if isinstance(a, Mapping) else {"name": str(a)} for a in axes]


def _scales(transforms: Any) -> list[list[float]]:
    return [list(t["scale"]) for t in transforms or []
            if isinstance(t, Mapping) and t.get("type") == "scale" and "scale" in t]


def from_multiscales(ms: Mapping[str, Any], dataset: str, where: str, notes: list[str]
                     ) -> VoxelSize | None:
    """The (z, y, x) size of ``dataset`` of an NGFF multiscale, from its scale and units."""
    axes = ngff_axes(ms)
    entry = next((d for d in ms.get("datasets", []) if str(d.get("path")) == dataset), None)
    if entry is None:
        return None
    scale = [1.0] * len(axes)
    for s in _scales(entry.get("coordinateTransformations")) + \
            _scales(ms.get("coordinateTransformations")):
        if len(s) != len(axes):
            notes.append(f"{where}: scale {s} does not match the {len(axes)} axes")
            return None
        scale = [a * b for a, b in zip(scale, s, strict=True)]
    names = [a.get("name") for a in axes]
    if not all(a in names for a in "zyx"):
        return None
    units = [axes[names.index(a)].get("unit") for a in "zyx"]
    if any(u is None for u in units):
        notes.append(f"{where}: OME-Zarr axes z, y, x have no unit (scale "
                     f"{format_zyx([scale[names.index(a)] for a in 'zyx'])} in unknown units)")
        return None
    return quantity([scale[names.index(a)] for a in "zyx"], units,
                    f"{where} OME-Zarr scale of dataset {dataset}", notes)


# --------------------------------------------------------------------------- TIFF


def _ratio(tag: Any) -> float | None:
    value = getattr(tag, "value", None)
    if isinstance(value, tuple) and len(value) == 2 and value[1]:
        return float(value[0]) / float(value[1])
    if isinstance(value, int | float) and value:
        return float(value)
    return None


def from_ome_xml(xml: str, where: str, notes: list[str]) -> VoxelSize | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    size, units = {}, {}
    for a in "XYZ":
        if f"PhysicalSize{a}" in pixels.attrib:
            size[a] = pixels.attrib[f"PhysicalSize{a}"]
            units[a] = pixels.attrib.get(f"PhysicalSize{a}Unit", "µm")  # the OME default
    x = quantity(size["X"], units["X"], f"{where} OME-XML PhysicalSizeX", notes)
    y = quantity(size.get("Y", size["X"]), units.get("Y", units["X"]),
                 f"{where} OME-XML PhysicalSizeY", notes)
    if x is None or y is None:
        return None
    if "Z" in size:
        z = quantity(size["Z"], units["Z"], f"{where} OME-XML PhysicalSizeZ", notes)
        if z is None:
            return None
        return VoxelSize((z.zyx_um[0], y.zyx_um[0], x.zyx_um[0]),
                         f"{where} OME-XML PhysicalSize X, Y, Z")
    return VoxelSize((y.zyx_um[0], y.zyx_um[0], x.zyx_um[0]),
                     f"{where} OME-XML PhysicalSize X, Y (no Z: z = y)")


def from_tiff(tf: Any, where: str, notes: list[str]) -> VoxelSize | None:
    """OME-XML, then ImageJ calibration, then resolution tags of a ``tifffile.TiffFile``."""
    if tf.is_ome and tf.ome_metadata:
        found = from_ome_xml(tf.ome_metadata, where, notes)
        if found is not None:
            return found
    page = tf.pages[0]
    xres, yres = _ratio(page.tags.get("XResolution")), _ratio(page.tags.get("YResolution"))
    yres = yres or xres
    res_unit = getattr(page.tags.get("ResolutionUnit"), "value", 1)
    ij = tf.imagej_metadata or {}
    z_text = "z = y (a TIFF without a z spacing is taken as isotropic)"
    if ij.get("unit") and unit_factor(ij["unit"]) is not None and xres and yres:
        factor = unit_factor(ij["unit"])
        assert factor is not None
        y_um, x_um = factor / yres, factor / xres
        z_um, z_text = y_um, z_text
        if "spacing" in ij:
            z_um, z_text = float(ij["spacing"]) * factor, f"z from ImageJ spacing {ij['spacing']:g}"
        return _checked((z_um, y_um, x_um), f"{where} ImageJ unit {ij['unit']!r} and "
                        f"XResolution {xres:g}/unit; {z_text}", notes)
    if ij.get("unit"):
        notes.append(f"{where}: ImageJ unit {ij['unit']!r} is not a physical length")
    for label, attrs in _json_descriptions(tf, where):
        found = from_attrs(attrs, label, notes)
        if found is not None:
            return found
    if xres and yres and int(res_unit) in (2, 3):
        name = "inch" if int(res_unit) == 2 else "cm"
        if int(res_unit) == 2 and xres == yres and xres in DEFAULT_DPI:
            notes.append(f"{where}: XResolution {xres:g} dpi is a writer's default, not a "
                         "voxel size")
            return None
        factor = UM_PER_UNIT["inch" if name == "inch" else "cm"]
        y_um, x_um = factor / yres, factor / xres
        return _checked((y_um, y_um, x_um), f"{where} XResolution {xres:g}, YResolution "
                        f"{yres:g} per {name}; {z_text}", notes)
    return None


def _json_descriptions(tf: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """tifffile's JSON ImageDescription (and JSON objects in its string values)."""
    import json

    out: list[tuple[str, dict[str, Any]]] = []
    for meta in tf.shaped_metadata or ():
        if not isinstance(meta, dict):
            continue
        out.append((f"{where} description", meta))
        for key, value in meta.items():
            if isinstance(value, str) and value.lstrip().startswith("{"):
                try:
                    nested = json.loads(value)
                except ValueError:
                    continue
                if isinstance(nested, dict):
                    out.append((f"{where} description {key}", nested))
    return out


def _checked(zyx: ZYX, source: str, notes: list[str]) -> VoxelSize | None:
    if all(math.isfinite(v) and v > 0 for v in zyx):
        return VoxelSize(zyx, source)
    notes.append(f"{source}: {format_zyx(zyx)} µm is not a positive size")
    return None


# --------------------------------------------------------------------------- search


def search(find: Callable[[list[str]], VoxelSize | None]) -> tuple[VoxelSize | None, list[str]]:
    """Run ``find(notes)``; metadata that cannot be parsed never stops a volume opening."""
    notes: list[str] = []
    try:
        return find(notes), notes
    except Exception as exc:  # odd metadata (types, encodings): the size stays unknown
        notes.append(f"voxel size metadata unreadable ({type(exc).__name__}: {exc})")
        return None, notes


def absent_note(what: str, notes: Sequence[str]) -> str:
    """The one line shown when no voxel size was found."""
    why = f" ({'; '.join(notes[:2])})" if notes else ""
    return (f"voxel size unknown: no usable size in the metadata of {what}{why}; the "
            "OME-Zarr output gets scale 1 per voxel and no unit; pass --voxel-size Z,Y,X "
            "(µm) to set it")
