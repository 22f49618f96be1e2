"""`hpcstain view RUN_DIR`: labelled orthoview PNGs of a user's own stained or fused run.

For each of the three centre planes (or the planes ``at``), one PNG with the run's input
CT and its stain side by side: the plane named (XY at z = k, XZ at y = k, YZ at x = k),
each panel titled, a scale bar from the plan's voxel size (µm; in voxels when the size is
unknown), and anisotropic voxels shown at their physical aspect. The stain is the fused
image when there is one (``fused.ome.zarr``, or ``--image``), else the per-axis store of
the first stained axis — so a run can be looked at while it is still being stained.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output
from hpcstain.errors import InputError, UsageError
from hpcstain.volume import load_plan, open_volume
from hpcstain.volume.plan import input_at
from hpcstain.volume.rundir import axis_store

PLANES = (("xy", 0), ("xz", 1), ("yz", 2))  # (name, the axis held fixed: z, y, x)
AXIS_NAMES = "zyx"
MIN_SIDE, MAX_SIDE = 384, 1600  # display size of a panel's longer side (px)
HEADER, PAD = 26, 6
BACKGROUND = (255, 255, 255)


@dataclass
class ViewReport:
    out_dir: Path
    files: list[Path]
    stain: str
    planes: dict[str, int]

    def summary(self) -> str:
        at = ", ".join(f"{AXIS_NAMES[i]} = {k}" for i, k in
                       sorted((("zyx".index(n), v) for n, v in self.planes.items())))
        return (f"orthoviews of {self.stain} at {at}: "
                + ", ".join(str(f) for f in self.files))


def resolve_run(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(run directory, the image given) for ``RUN_DIR`` or ``RUN_DIR/<image>.ome.zarr``."""
    p = Path(path)
    if (p / "plan.json").is_file():
        return p, None
    if p.suffix == ".zarr" and (p.parent / "plan.json").is_file():
        return p.parent, p
    if (p / "config.yaml").is_file():
        raise UsageError(f"{p}: a training run; view shows staining runs (stain it first: "
                         "hpcstain stain VOL --checkpoint "
                         f"{p}/checkpoints/latest.pt --out ST)")
    if not p.exists():
        raise InputError(f"{p}: no such run directory")
    raise InputError(f"{p}: not a staining run directory (no plan.json)")


def _stain_source(run: Path, image: Path | None, plan: Any) -> tuple[str, Any, str]:
    """(label, reader of a (Z, Y, X) region → (…, 3) uint8, kind) of the run's stain."""
    import zarr

    if image is None and (run / "fused.ome.zarr").is_dir():
        image = run / "fused.ome.zarr"
    if image is not None:
        if not image.is_dir():
            raise InputError(f"{image}: no such fused image in {run}")
        level0 = zarr.open_group(str(image), mode="r")["0"]  # (4, Z, Y, X) RGBA

        def read_fused(region: tuple[slice, slice, slice]) -> np.ndarray:
            return np.moveaxis(np.asarray(level0[(slice(0, 3), *region)]), 0, -1)

        return f"{image.name} (fused)", read_fused, "fused"
    for axis in plan.axes:
        store = axis_store(run, axis)
        if store.is_dir():
            arr = zarr.open_array(str(store), mode="r")

            def read_axis(region: tuple[slice, slice, slice], arr: Any = arr) -> np.ndarray:
                return np.asarray(arr[region])

            return f"{store.name} (stained along {axis}, not fused)", read_axis, "axis"
    raise InputError(f"{run}: nothing stained yet (no fused image, no axis-*.zarr); run "
                     "hpcstain stain first")


def _ct_grey(plane: np.ndarray) -> np.ndarray:
    """A CT plane → uint8 grey, windowed to its 0.5–99.5 percentiles."""
    v = np.asarray(plane, np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.zeros(v.shape, np.uint8)
    lo, hi = np.percentile(finite, (0.5, 99.5))
    scaled = (np.nan_to_num(v, nan=lo) - lo) / max(hi - lo, 1e-9)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def _nice_length(target: float) -> float:
    """1, 2 or 5 × 10^k, the largest not above ``target``."""
    if target <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(target))
    return max(m * k for m in (1, 2, 5) if m * k <= target)


def _font(size: int) -> tuple[Any, bool]:
    """(font, whether it draws µ): DejaVu Sans when installed, else Pillow's own font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default(), False


def _panel(rgb: np.ndarray, spacing: tuple[float, float], unit: str, title: str) -> Any:
    """One titled panel at physical aspect with a scale bar (PIL image)."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    phys_h, phys_w = h * spacing[0], w * spacing[1]
    px = max(phys_h, phys_w) / min(max(MIN_SIDE, max(h, w)), MAX_SIDE)  # µm (or vox) / px
    size = (max(1, round(phys_w / px)), max(1, round(phys_h / px)))
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize(
        size, Image.NEAREST if px <= min(spacing) else Image.BILINEAR)
    canvas = Image.new("RGB", (size[0], size[1] + HEADER), BACKGROUND)
    canvas.paste(img, (0, HEADER))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=_font(14)[0])
    length = _nice_length(phys_w / 5)
    bar = max(1, round(length / px))
    x0, y0 = 10, HEADER + size[1] - 14
    small, has_mu = _font(12)
    label = f"{length:g} {unit if has_mu or unit != 'µm' else 'um'}"
    draw.rectangle((x0 - 3, y0 - 16, x0 + max(bar, 8 * len(label)) + 3, y0 + 7),
                   fill=(0, 0, 0))
    draw.rectangle((x0, y0, x0 + bar, y0 + 4), fill=(255, 255, 255))
    draw.text((x0, y0 - 15), label, fill=(255, 255, 255), font=small)
    return canvas


def _side_by_side(panels: list[Any], vertical: bool = False) -> Any:
    """PIL images in a row (or a column), ``PAD`` apart on the background colour."""
    from PIL import Image

    if vertical:
        size = (max(p.width for p in panels),
                sum(p.height for p in panels) + PAD * (len(panels) - 1))
    else:
        size = (sum(p.width for p in panels) + PAD * (len(panels) - 1),
                max(p.height for p in panels))
    canvas = Image.new("RGB", size, BACKGROUND)
    at = 0
    for p in panels:
        canvas.paste(p, (0, at) if vertical else (at, 0))
        at += (p.height if vertical else p.width) + PAD
    return canvas


def orthoviews(rgb: np.ndarray) -> np.ndarray:
    """XY, XZ and YZ centre planes of a (Z, Y, X, 3) volume side by side (uint8), unlabelled
    (the benchmarks' quick look; :func:`compare_planes` is the labelled comparison)."""
    z, y, x = (s // 2 for s in rgb.shape[:3])
    planes = [rgb[z], rgb[:, y], rgb[:, :, x]]
    height = max(p.shape[0] for p in planes)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255)
              for p in planes]
    return np.concatenate(padded, axis=1)


def compare_planes(ct: np.ndarray, columns: list[tuple[str, np.ndarray]],
                   path: str | os.PathLike[str],
                   voxel_size: tuple[float, float, float] | None = None) -> Path:
    """One PNG: a row per centre plane (XY, XZ, YZ), the CT then each (Z, Y, X, 3) uint8
    volume of ``columns`` (title, volume) side by side — e.g. CT | stain | truth — so a
    person sees at once what is right. Returns the path written."""
    shape = ct.shape
    centre = tuple(s // 2 for s in shape)
    unit = "µm" if voxel_size is not None else "voxels"
    size = voxel_size if voxel_size is not None else (1.0, 1.0, 1.0)
    rows = []
    for plane, fixed in PLANES:
        index = [slice(None)] * 3
        index[fixed] = centre[fixed]
        r, c = [i for i in range(3) if i != fixed]
        spacing = (size[r], size[c])
        where = f"{AXIS_NAMES[fixed]} = {centre[fixed]}"
        grey = np.repeat(_ct_grey(ct[tuple(index)])[..., None], 3, axis=-1)
        panels = [_panel(grey, spacing, unit, f"CT, {plane.upper()} at {where}")]
        panels += [_panel(np.ascontiguousarray(vol[tuple(index)][..., :3], dtype=np.uint8),
                          spacing, unit, title) for title, vol in columns]
        rows.append(_side_by_side(panels))
    out = Path(path)
    _side_by_side(rows, vertical=True).save(out)
    return out


def view_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
             *, at: tuple[int, int, int] | None = None, image: str | None = None,
             overwrite: bool = False) -> ViewReport:
    """Write ``OUT/view-xy.png``, ``view-xz.png``, ``view-yz.png`` (default OUT:
    ``RUN_DIR/view``) for the stained or fused run in ``run_dir``."""
    run, given = resolve_run(run_dir)
    plan = load_plan(run)
    if image is not None:
        if Path(image).name != image:
            raise UsageError(f"--image {image!r}: the name of an image inside {run}")
        given = run / image
    label, read_stain, _ = _stain_source(run, given, plan)
    shape = tuple(int(s) for s in plan.shape)
    centre = tuple(s // 2 for s in shape) if at is None else tuple(int(a) for a in at)
    for name, k, n in zip(AXIS_NAMES, centre, shape, strict=True):
        if not 0 <= k < n:
            raise UsageError(f"--at: {name} = {k} is outside the volume (0..{n - 1})")
    try:
        source = open_volume(input_at(plan, run), plan.nan_policy, plan.nan_value, scan=False)
    except InputError as exc:
        raise InputError(f"{exc} (the run's input CT, from {run / 'plan.json'})") from None
    vox = plan.voxel_size_um
    unit = "µm" if vox is not None else "voxels"
    size = tuple(float(v) for v in vox) if vox is not None else (1.0, 1.0, 1.0)
    out_dir = Path(out) if out is not None else run / "view"
    files = []
    # RUN_DIR/view is derived from the run alone: replaced on every call; an --out that
    # exists needs --overwrite like any other output
    with atomic_output(out_dir, overwrite or out is None) as tmp:
        tmp.mkdir(parents=True)
        for plane, fixed in PLANES:
            region = [slice(None)] * 3
            region[fixed] = slice(centre[fixed], centre[fixed] + 1)
            box = tuple(slice(0, n) if r == slice(None) else r
                        for r, n in zip(region, shape, strict=True))
            ct = np.squeeze(np.asarray(source.read(box)), axis=fixed)
            stain = np.squeeze(read_stain(box), axis=fixed)
            rows, cols = [i for i in range(3) if i != fixed]
            spacing = (size[rows], size[cols])
            where = f"{AXIS_NAMES[fixed]} = {centre[fixed]} of {shape[fixed]}"
            grey = np.repeat(_ct_grey(ct)[..., None], 3, axis=-1)
            _side_by_side([
                _panel(grey, spacing, unit, f"CT, {plane.upper()} plane at {where}"),
                _panel(stain.astype(np.uint8), spacing, unit, f"stain: {label}"),
            ]).save(tmp / f"view-{plane}.png")
            files.append(out_dir / f"view-{plane}.png")
    return ViewReport(out_dir, files, label, dict(zip(AXIS_NAMES, centre, strict=True)))
