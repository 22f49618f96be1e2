"""``hpcstain score``: read a stained volume and its reference, score, write a report.

The metrics live in :mod:`hpcstain.metrics.volume` (pure functions over arrays); this
module only finds and reads the inputs and writes ``table.md``, ``summary.json`` and
``profiles.png`` into one folder (whole or not at all). Volumes are read whole into memory.

Prediction: a run folder (its ``fused.ome.zarr``, else its only ``axis-*.zarr`` or
``slicewise-*.ome.zarr``), an OME-Zarr image (level 0, ``(4, Z, Y, X)``), a zarr array or
``group:array``, ``x.h5:/dataset``, a TIFF stack or a ``.npy`` file, RGB(A) channel-first
or channel-last. Reference: a phantom volume (``.zarr`` group with ``stain``/``labels``/
``ct``; NeXus-like ``.h5`` with ``/entry/truth/stain``; ``OUT_stain.tif`` beside
``OUT_labels.tif`` and ``OUT.tif``) whose labels and CT are used too, or any RGB volume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output, check_output
from hpcstain.ct.cupping import apply_cupping
from hpcstain.ct.outside import OUTSIDE_TEST, outside_of_sample
from hpcstain.errors import HpcstainError, InputError, UsageError
from hpcstain.metrics.tissue import TissueTally, format_tissue_table, score_readings
from hpcstain.metrics.volume import (
    AXES,
    Reference,
    VolumeScore,
    as_rgb_volume,
    format_table,
    prepare_reference,
    score_volume,
)
from hpcstain.volume.io import open_volume, parse_spec
from hpcstain.volume.plan import input_at, load_plan

RUN_OUTPUTS = ("fused.ome.zarr",)


@dataclass
class ScoreReport:
    out_dir: Path
    score: VolumeScore
    table: str
    files: list[Path]


# --------------------------------------------------------------------------- reading


def _zarr_node(path: Path, key: str | None) -> Any:
    import zarr

    if not path.exists():
        raise InputError(f"{path}: no such zarr store")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for unreadable stores
        raise InputError(f"{path}: not a readable zarr store ({exc})") from None
    if key:
        if not isinstance(node, zarr.Group) or key not in node:
            raise InputError(f"{path}: no array {key!r}")
        node = node[key]
    return node


def _group_rgb(path: Path, group: Any) -> Any:
    """The RGB array of a zarr group: OME-Zarr level 0, a phantom's ``stain``, or the one."""
    attrs = dict(group.attrs)
    if "multiscales" in attrs.get("ome", attrs):
        meta = attrs.get("ome", attrs)["multiscales"][0]
        return group[meta["datasets"][0]["path"]]
    names = sorted(group.array_keys())
    if "stain" in names:
        return group["stain"]
    if len(names) == 1:
        return group[names[0]]
    raise InputError(f"{path}: group holds arrays {names}; name one as {path}:ARRAY")


def _run_volume(run: Path) -> Path:
    for name in RUN_OUTPUTS:
        if (run / name).exists():
            return run / name
    found = sorted(run.glob("slicewise-*.ome.zarr")) + sorted(run.glob("axis-*.zarr"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{run}: run folder without fused.ome.zarr or axis-*.zarr")
    raise InputError(f"{run}: no fused.ome.zarr; name one of "
                     f"{[str(p) for p in found]} instead")


def read_rgb(spec: str | os.PathLike[str]) -> np.ndarray:
    """Any supported RGB(A) volume → its array as stored (shape checked by the scorer)."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir() and (path / "plan.json").is_file():
        path, text = _run_volume(path), str(_run_volume(path))
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return np.load(path)

    parsed = parse_spec(text)
    if parsed.kind == "zarr":
        import zarr

        node = _zarr_node(parsed.path, parsed.key)
        if isinstance(node, zarr.Group):
            node = _group_rgb(parsed.path, node)
        return np.asarray(node[...])
    if parsed.kind == "hdf5":
        import h5py

        with h5py.File(parsed.path, "r") as fh:
            key = parsed.key or ("/entry/truth/stain" if "/entry/truth/stain" in fh else None)
            if key is None or key not in fh:
                raise InputError(f"{parsed.path}: name the RGB dataset as {parsed.path}:/DS")
            return np.asarray(fh[key][...])
    if parsed.kind == "tiff":
        import tifffile

        return np.asarray(tifffile.imread(parsed.path))
    raise InputError(f"{text}: a folder of TIFF slices is not supported for RGB volumes")


def read_scalar(spec: str | os.PathLike[str]) -> np.ndarray:
    """A 3D scalar volume (CT, labels) read whole via :func:`open_volume`."""
    src = open_volume(spec, scan=False)
    return src.read(tuple(slice(0, n) for n in src.shape))  # type: ignore[arg-type]


def read_reference(spec: str | os.PathLike[str]
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(stain, labels, CT) of a reference: a phantom volume's three arrays, or RGB alone."""
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix.lower() != ".npy" and not (path.is_dir() and (path / "plan.json").exists()):
        parsed = parse_spec(text)
        if parsed.kind == "zarr" and not parsed.key:
            import zarr

            node = _zarr_node(parsed.path, None)
            if isinstance(node, zarr.Group) and "stain" in node:
                return (np.asarray(node["stain"][...]),
                        np.asarray(node["labels"][...]) if "labels" in node else None,
                        np.asarray(node["ct"][...]) if "ct" in node else None)
        if parsed.kind == "hdf5" and not parsed.key:
            import h5py

            with h5py.File(parsed.path, "r") as fh:
                if "/entry/truth/stain" in fh:
                    labels, ct = ("/entry/truth/labels", "/entry/data/data")
                    return (np.asarray(fh["/entry/truth/stain"][...]),
                            np.asarray(fh[labels][...]) if labels in fh else None,
                            np.asarray(fh[ct][...]) if ct in fh else None)
        if parsed.kind == "tiff" and parsed.path.stem.endswith("_stain"):
            stem = parsed.path.stem[:-len("_stain")]
            labels = parsed.path.with_name(f"{stem}_labels{parsed.path.suffix}")
            ct = parsed.path.with_name(f"{stem}{parsed.path.suffix}")
            return (read_rgb(parsed.path),
                    read_scalar(labels) if labels.is_file() else None,
                    read_scalar(ct) if ct.is_file() else None)
    return read_rgb(spec), None, None


def _run_of(spec: str | os.PathLike[str]) -> Path | None:
    """The run folder a prediction is (or lies in), if any."""
    path = Path(spec)
    return next((run for run in (path, path.parent) if (run / "plan.json").is_file()), None)


def _run_ct(spec: str | os.PathLike[str]) -> str | None:
    """The CT a run folder was stained from (its plan's input), if the prediction is one."""
    run = _run_of(spec)
    if run is None:
        return None
    try:
        return input_at(load_plan(run), run)  # [runs are places]
    except (OSError, ValueError, KeyError, TypeError, HpcstainError):
        return None


def run_sample_mask(spec: str | os.PathLike[str], ct: np.ndarray
                    ) -> tuple[np.ndarray, str] | None:
    """[issue 23] The sample of a run's CT ``ct`` (the plan's input, as read) by fuse's own
    outside test at the plan's levels, on the CT corrected as fuse corrects it (the plan's
    cupping, whole grey values; :func:`hpcstain.ct.outside.outside_of_sample`): the voxels
    fuse did not paint as background. None when the prediction is not in a run."""
    run = _run_of(spec)
    if run is None:
        return None
    plan = load_plan(run)
    cupping = plan.ct_recipe.cupping
    raw = ct if cupping is None else np.rint(apply_cupping(ct, cupping, (0, 0)))
    whole = tuple(slice(0, int(n)) for n in ct.shape)
    outside = outside_of_sample(raw, whole, whole, (plan.bone_level, plan.background_level))
    return ~outside, f"fuse's outside test ({OUTSIDE_TEST}) on the run's CT"


def voxel_size_of_inputs(prediction: str | os.PathLike[str],
                         reference: str | os.PathLike[str] | None) -> tuple[float, ...] | None:
    """Voxel size (µm, z/y/x) of the run the prediction belongs to, else the phantom
    reference's ``voxel_size_um`` attribute; None when neither says."""
    path = Path(prediction)
    for run in (path, path.parent):
        if (run / "plan.json").is_file():
            try:
                size = json.loads((run / "plan.json").read_text()).get("voxel_size_um")
            except (OSError, ValueError):
                size = None
            if size:
                return tuple(float(v) for v in size)
    if reference is not None and Path(reference).suffix.lower() == ".zarr":
        try:
            size = _zarr_node(Path(reference), None).attrs.get("voxel_size_um")
        except (InputError, AttributeError):
            size = None
        if size:
            return (float(size),) * 3 if np.isscalar(size) else tuple(map(float, size))
    return None


def tissue_section(pred: np.ndarray, ref: Reference, labels: np.ndarray | None,
                   spacing: tuple[float, ...] | None) -> tuple[dict[str, Any], str] | None:
    """Tissue classes (Dice of each reading, CT baseline) and histomorphometry against the
    phantom labels (``metrics.tissue``); None without labels."""
    if labels is None:
        return None
    tally = TissueTally()
    info = score_readings(tally, as_rgb_volume(pred, "prediction"), np.asarray(labels),
                          ref.mask, ref.rgb, ref.ct, spacing)
    summary = tally.summary()
    unit = "µm" if spacing else "voxels"
    note = (f"Tissue classes inside the sample mask ({int(ref.mask.sum())} voxels); "
            f"thickness in {unit}"
            + (f" (voxel {'×'.join(f'{v:g}' for v in spacing)} µm)" if spacing else "") + ".")
    record = {"spacing_um": list(spacing) if spacing else None, **info, "readings": summary}
    return _json_ready(record), format_tissue_table(summary, unit, note)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------- report


def plot_profiles(score: VolumeScore, path: Path) -> None:
    """Per axis: per-slice mean intensity and first-difference energy, prediction vs
    reference (or vs the CT on a second y axis, its energy rescaled to the prediction's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = score.profiles
    fig = Figure(figsize=(12.0, 6.0))
    FigureCanvasAgg(fig)
    styles = {"prediction": "C0", "reference": "C1", "ct": "C2"}
    for col, axis in enumerate(AXES):
        top = fig.add_subplot(2, 3, col + 1)
        bottom = fig.add_subplot(2, 3, col + 4)
        for name, prof in series.items():
            mean, energy = prof[axis]["mean"], prof[axis]["energy"]
            if name == "ct":
                twin = top.twinx()
                twin.plot(mean, color=styles[name], lw=1, label="CT (right axis)")
                twin.set_ylabel("CT mean", color=styles[name], fontsize=8)
                pred_e = series["prediction"][axis]["energy"]
                scale = np.nanmean(pred_e) / np.nanmean(energy) if np.nanmean(energy) else 1.0
                bottom.plot(energy * scale, color=styles[name], lw=1,
                            label=f"CT × {scale:.3g}")
                continue
            top.plot(mean, color=styles[name], lw=1, label=name)
            bottom.plot(energy, color=styles[name], lw=1, label=name)
        top.set_title(f"along {axis}: per-slice mean (mask)", fontsize=9)
        bottom.set_title(f"first-difference energy {axis}[i]→{axis}[i+1]", fontsize=9)
        bottom.set_xlabel(f"{axis} slice")
        top.legend(fontsize=7, loc="upper left")
        bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)


def score_files(prediction: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                reference: str | os.PathLike[str] | None = None,
                labels: str | os.PathLike[str] | None = None,
                ct: str | os.PathLike[str] | None = None,
                ct_threshold: float | str | None = "auto", normalise: bool = True,
                stretch_c: float = 0.0, stretch_c_prime: float = 0.0,
                overwrite: bool = False) -> ScoreReport:
    """Score ``prediction`` (against ``reference`` when given) and write ``out_dir``.

    Labels and CT come from the arguments, else from a phantom reference, else (CT only)
    from the plan of the run folder the prediction belongs to.
    """
    out_dir = check_output(out_dir, overwrite)
    if reference is None and not normalise:
        raise UsageError("--no-normalise needs --reference")
    pred = read_rgb(prediction)
    ref_rgb = ref_labels = ref_ct = None
    if reference is not None:
        ref_rgb, ref_labels, ref_ct = read_reference(reference)
    lab = read_scalar(labels) if labels is not None else ref_labels
    ct_spec = ct if ct is not None else (None if ref_ct is not None else _run_ct(prediction))
    ct_arr = read_scalar(ct_spec) if ct_spec is not None else ref_ct
    # without labels, a stained run's sample is what fuse kept (its outside test at the
    # plan's levels and cupping); a CT alone is read by metrics.volume.ct_sample_mask
    run_mask = run_sample_mask(prediction, ct_arr) if (
        lab is None and ct is None and ct_spec is not None and ct_arr is not None
        and ct_threshold == "auto") else None
    ref = prepare_reference(as_rgb_volume(pred, "prediction").shape[:3], ref_rgb, labels=lab,
                            ct=ct_arr, mask=None if run_mask is None else run_mask[0],
                            normalise=normalise, stretch_c=stretch_c,
                            stretch_c_prime=stretch_c_prime, ct_threshold=ct_threshold)
    if run_mask is not None:
        ref.info["mask"] = run_mask[1]
    score = score_volume(pred, ref)
    tissue = tissue_section(pred, ref, lab, voxel_size_of_inputs(prediction, reference))
    settings = {"prediction": os.fspath(prediction),
                "reference": None if reference is None else os.fspath(reference),
                "labels": os.fspath(labels) if labels is not None else
                ("from reference" if ref_labels is not None else None),
                "ct": os.fspath(ct_spec) if ct_spec is not None else
                ("from reference" if ref_ct is not None else None)}
    summary = {"inputs": settings, **score.summary,
               **({"tissue": tissue[0]} if tissue else {})}
    title = f"`{os.fspath(prediction)}` vs " + (f"`{os.fspath(reference)}`" if reference
                                               is not None else "no reference") + "\n"
    table = format_table(score.summary, title=title) + (f"\n{tissue[1]}" if tissue else "")
    with atomic_output(out_dir, overwrite) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (tmp / "table.md").write_text(table)
        plot_profiles(score, tmp / "profiles.png")
    score.summary = summary
    files = [out_dir / n for n in ("table.md", "summary.json", "profiles.png")]
    return ScoreReport(out_dir, score, table, files)
