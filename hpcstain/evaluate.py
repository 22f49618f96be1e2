"""The §2.10 evaluation: stain each pair's whole slide, compare 256×256 patches, report.

Per pair (§2.5 normalisation with the pair's ROIs, as in training):

* the CT is stained on the global tile grid (§2.9, ``PAPER_TILING`` by default);
* every image compared gets its own mean background colour (over the pair's background
  ROI) outside the correspondence mask (§2.8);
* non-overlapping ``patch``² patches with ≥ 50 % mask coverage are scored: SSIM, PSNR,
  LPIPS (when its weights load; otherwise the "LPIPS skipped: …" message is reported once)
  and the FRC resolution (supplement S3).

Comparisons (``method`` vs ``reference``): ``model`` vs ``histology`` (Table 1), the
``raw_ct`` baseline (the normalised CT as grey RGB) vs ``histology``, and on phantoms
(manifest ``truth`` column) ``model`` vs ``truth`` and ``histology`` vs ``truth`` (the
ceiling that registration and section artefacts leave). The truth is white-balanced and
stretched like the histology, with its own constants from the same ROIs, so both live in
the same colour space.

Outputs (one folder, written whole or not at all): ``metrics.csv`` (one row per patch and
comparison), ``summary.json`` (medians per split and comparison, counts, seam index per
pair, LPIPS status), ``table.md`` (Table-1-like), ``boxplots.png`` and ``slides/<id>.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output, check_output
from hpcstain.checkpoint import load_checkpoint
from hpcstain.ct.cupping import apply_cupping, check_fit_choice, slide_fits
from hpcstain.ct.signed import ct16_to_signed, normalise_ct
from hpcstain.data.manifest import Pair, as_ct, labels_spec, read_ct_slab, read_manifest, read_pair
from hpcstain.data.masks import load_or_compute_mask
from hpcstain.data.normalise import (
    Rois,
    apply_stretch,
    ct_levels,
    histology_stretch,
    normalise_histology,
    signed_to_rgb8,
)
from hpcstain.data.readers import read_image
from hpcstain.data.sampler import pair_rois
from hpcstain.errors import InputError, UsageError
from hpcstain.info import _training_pairs
from hpcstain.metrics.lpips import LPIPS, try_load_lpips
from hpcstain.metrics.patches import (
    MIN_COVERAGE,
    PATCH,
    PatchScore,
    apply_mask,
    evaluate_patches,
    medians,
)
from hpcstain.metrics.seams import seam_index
from hpcstain.metrics.tissue import TissueTally, format_tissue_table, score_readings
from hpcstain.predict import Stainer, load_stainer, mask_outside, mean_colour, predict_slide
from hpcstain.tiles import PAPER_TILING, Tiling, check_tiling, tile_boundaries

COMPARISONS = (("model", "histology"), ("raw_ct", "histology"),
               ("model", "truth"), ("histology", "truth"))
LABELS = {("model", "histology"): "Model",
          ("raw_ct", "histology"): "Raw CT (baseline)",
          ("model", "truth"): "Model vs truth",
          ("histology", "truth"): "Histology vs truth"}
SPLIT_ORDER = ("train", "val", "test", "unassigned", "all")
METRICS = ("ssim", "psnr", "lpips", "frc_px", "frc_um")
CSV_COLUMNS = ("pair", "material", "split", "method", "reference", "row", "col", "coverage",
               *METRICS)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PatchRow:
    """One scored patch of one comparison."""

    pair: str
    material: str
    split: str
    method: str
    reference: str
    score: PatchScore

    def as_dict(self) -> dict[str, Any]:
        return {"pair": self.pair, "material": self.material, "split": self.split,
                "method": self.method, "reference": self.reference, **self.score.as_dict()}


@dataclass
class PairImagesNormalised:
    """One pair in the evaluation's spaces: raw CT, uint8 RGB images, mask, ROIs."""

    id: str
    material: str
    ct: np.ndarray              # raw (radial checkpoint: cupping-corrected) CT (H, W) float32
    histology: np.ndarray       # normalised histology, uint8 (H, W, 3)
    truth: np.ndarray | None    # normalised exact stain, uint8 (H, W, 3)
    raw_ct: np.ndarray          # normalised CT as grey RGB, uint8 (H, W, 3)
    mask: np.ndarray            # (H, W) bool
    rois: Rois
    cupping: Any = None         # the hpcstain.ct.cupping.Cupping applied to ``ct``, if any
    ct_slab: np.ndarray | None = None  # raw (k, H, W) CT planes about ``ct`` (2.5D model)


@dataclass
class PairResult:
    id: str
    material: str
    split: str
    slide: np.ndarray           # masked model output, uint8 (H, W, 3)
    rows: list[PatchRow]
    seam_index: float | None
    patches_total: int
    roi_method: str
    tissue: Any = None          # metrics.tissue.TissueTally of the kept patches (phantoms)


@dataclass
class EvaluationReport:
    out_dir: Path
    rows: list[PatchRow]
    summary: dict[str, Any]
    table: str
    lpips_message: str | None = None
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- splits


def read_splits(path: str | os.PathLike[str], fold: int = 0) -> dict[str, str]:
    """id → ``train``/``val``/``test`` from a run folder, its ``split.json`` or ``folds.json``.

    A run folder's ``split.json`` (the split the run trained on) wins over ``folds.json``;
    from ``folds.json`` fold ``fold`` is taken.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "split.json" if (path / "split.json").is_file() else path / "folds.json"
    if not path.is_file():
        raise InputError(f"{path}: split file not found (give a run folder, split.json or "
                         "folds.json)")
    try:
        data = json.loads(path.read_text())
        if "train_ids" in data:
            groups = {"train": data["train_ids"], "val": data["val_ids"],
                      "test": data["test_ids"]}
        else:
            groups = _folds_groups(data, fold, path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a split.json or folds.json ({exc})") from None
    return {str(i): name for name, ids in groups.items() for i in ids}


def _folds_groups(data: dict[str, Any], fold: int, path: Path) -> dict[str, list[str]]:
    folds = data["folds"]
    if not folds:
        return {"train": data["train"], "val": [], "test": data["test"]}
    if not 0 <= fold < len(folds):
        raise UsageError(f"{path}: fold {fold} does not exist (0–{len(folds) - 1})")
    return {"train": folds[fold]["train"], "val": folds[fold]["val"], "test": data["test"]}


def check_split_record(assignment: dict[str, str], checkpoint: str | os.PathLike[str],
                       split: str | os.PathLike[str] | None, ids: Sequence[str]) -> None:
    """[no silent wrong answers] Refuse a split file that calls pairs ``test`` or ``val``
    which the checkpoint trained on (its run's ``split.json``, else recomputed from the
    manifest and folds recorded in it); unknown training records are not guessed."""
    ckpt = load_checkpoint(checkpoint)
    source = Path(str(ckpt.get("pinned_from") or checkpoint))
    record = _training_pairs(source, (ckpt.get("config") or {}).get("data", {}))
    if not record:
        return
    trained = set(record["train_ids"])
    leaked = sorted(i for i in ids if assignment.get(i) in ("test", "val") and i in trained)
    if leaked:
        shown = ", ".join(leaked[:5]) + (" …" if len(leaked) > 5 else "")
        raise InputError(f"{split}: calls {len(leaked)} pair(s) test/val that {checkpoint} "
                         f"trained on ({shown}; its record: {record['source']}); pass "
                         "--split the checkpoint's own run folder")


def check_patches(results: Sequence[PairResult], patch: int, min_coverage: float) -> None:
    """[no silent wrong answers] An evaluation that scored no patch is an error naming why
    and what to change, not a table of dashes."""
    if any((row.method, row.reference) == ("model", "histology")
           for r in results for row in r.rows):
        return
    sizes = sorted({tuple(r.slide.shape[:2]) for r in results})
    small = [s for s in sizes if min(s) < patch]
    why = (f"slides of {sizes[0][0]}×{sizes[0][1]} px are smaller than one {patch}² patch"
           if small else f"no {patch}² patch has ≥ {min_coverage:.0%} mask coverage")
    raise InputError(f"no usable patch in {len(results)} pair(s): {why}; use a smaller "
                     "--patch or a lower --min-coverage")


def select_pairs(pairs: Sequence[Pair], ids: Sequence[str] | None, source: str
                 ) -> list[Pair]:
    """The pairs named by ``ids`` (all when None), in manifest order."""
    if ids is None:
        return list(pairs)
    known = {p.id for p in pairs}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UsageError(f"{source}: no pair(s) {unknown} in the manifest")
    wanted = set(ids)
    chosen = [p for p in pairs if p.id in wanted]
    if not chosen:
        raise UsageError(f"{source}: no pairs selected")
    return chosen


# --------------------------------------------------------------------------- per pair


def pair_cuppings(pairs: Sequence[Pair], stainer: Stainer, choice: str = "checkpoint",
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """pair id → the cupping correction of its CT under a ``radial`` checkpoint (empty
    otherwise); ``choice`` as :func:`hpcstain.ct.cupping.slide_fits` (``checkpoint``: the
    training set's stored fit for slides of its size; ``set``: one fit over these pairs'
    equally sized slides, the training rule; ``slide``: each alone). A fallback is said in
    one ``log`` line. Reads each pair's CT once here."""
    check_fit_choice(choice)
    if stainer.conventions.cupping != "radial":
        return {}

    def read_ct(i: int) -> np.ndarray:
        p = pairs[i]
        try:
            return as_ct(read_image(p.ct), f"ct {p.ct}")
        except InputError as exc:
            raise InputError(f"{p.source or p.id} (id {p.id}): {exc}") from None

    fits, note = slide_fits(read_ct, len(pairs), stainer.conventions.stored_fits, choice,
                            [f"ct {p.id}" for p in pairs])
    if note and log is not None:
        log(note)
    return {p.id: c for p, c in zip(pairs, fits, strict=True)}


def load_pair(pair: Pair, stainer: Stainer, cupping: Any = None) -> PairImagesNormalised:
    """Read a pair and bring it into the evaluation's spaces (§2.5, §2.8).

    Under a ``radial`` checkpoint the CT is cupping-corrected first, as in training (ROIs,
    levels, mask and the raw-CT baseline all see the corrected CT): with ``cupping`` (see
    :func:`pair_cuppings`), else the checkpoint's stored fit for the slide's size, else a
    fit on this slide alone.
    """
    try:
        images = read_pair(pair, with_truth=True)
        if stainer.conventions.cupping == "radial":
            from dataclasses import replace

            if cupping is None:
                (cupping,), _ = slide_fits(lambda _: images.ct, 1,
                                           stainer.conventions.stored_fits,
                                           names=[f"ct {pair.id}"])
            images = replace(images, ct=apply_cupping(images.ct, cupping))
        slab = None
        if stainer.context_slices > 1:  # a 2.5D model: the pair's CT planes, corrected alike
            slab = read_ct_slab(pair, stainer.context_slices, images.ct.shape)
            if cupping is not None:
                slab = np.stack([apply_cupping(p, cupping) for p in slab])
        rois = pair_rois(pair, images.ct, images.histology)
        bone, background = ct_levels(images.ct, rois)
        ct16 = normalise_ct(images.ct, bone, background, *stainer.levels)
        stretch = histology_stretch(images.histology, rois, *stainer.stretch_c)
        truth = None
        if images.truth is not None:
            truth = signed_to_rgb8(normalise_histology(images.truth, rois, *stainer.stretch_c)[0])
        mask = load_or_compute_mask(pair, images, rois, None)
    except InputError as exc:
        raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None
    raw_ct = signed_to_rgb8(np.repeat(ct16_to_signed(ct16)[..., None], 3, axis=-1))
    return PairImagesNormalised(pair.id, pair.material, images.ct,
                                signed_to_rgb8(apply_stretch(images.histology, stretch)),
                                truth, raw_ct, mask, rois, cupping, slab)


def seam_of(rgb: np.ndarray, tiling: Tiling) -> float | None:
    """Seam index of a tiled output; None when the image holds no tile boundary."""
    if all(tile_boundaries(n, tiling.tile, tiling.step).size == 0 for n in rgb.shape[:2]):
        return None
    return seam_index(rgb, tiling.tile, tiling.step)


def score_images(images: dict[str, np.ndarray], mask: np.ndarray, background: np.ndarray,
                 *, patch: int = PATCH, min_coverage: float = MIN_COVERAGE,
                 lpips: LPIPS | None = None, pixel_size_um: float | None = None
                 ) -> dict[tuple[str, str], list[PatchScore]]:
    """Every available comparison of ``images`` (by name), masked as §2.8: outside the mask
    the model output, the histology and the truth all take the real histology's mean
    background colour (the model is never trained there); the raw CT keeps its own."""
    fill = mean_colour(images["histology"], background, mask) if "histology" in images else None
    masked = {k: (apply_mask(v, mask, fill) if fill is not None and k != "raw_ct"
                  else mask_outside(v, mask, background)) for k, v in images.items()}
    return {(m, r): evaluate_patches(masked[m], masked[r], mask, patch=patch,
                                     min_coverage=min_coverage, lpips=lpips, with_frc=True,
                                     pixel_size_um=pixel_size_um)
            for m, r in COMPARISONS if m in masked and r in masked}


def evaluate_pair(data: PairImagesNormalised, stainer: Stainer, split: str, *,
                  tiling: Tiling = PAPER_TILING, patch: int = PATCH,
                  min_coverage: float = MIN_COVERAGE, lpips: LPIPS | None = None,
                  pixel_size_um: float | None = None, batch_size: int = 0) -> PairResult:
    """Stain one pair's CT, score every comparison, measure the seam index."""
    ct = data.ct   # cupping-corrected by load_pair under a radial checkpoint
    output = predict_slide(ct, stainer.fn, stainer.in_channels, rois=data.rois,
                           tiling=tiling, target=stainer.levels, batch_size=batch_size,
                           size_multiple=stainer.conventions.size_multiple, slab=data.ct_slab)
    images = {"model": output, "histology": data.histology, "raw_ct": data.raw_ct}
    if data.truth is not None:
        images["truth"] = data.truth
    scores = score_images(images, data.mask, data.rois.background, patch=patch,
                          min_coverage=min_coverage, lpips=lpips, pixel_size_um=pixel_size_um)
    rows = [PatchRow(data.id, data.material, split, m, r, s)
            for (m, r), group in scores.items() for s in group]
    n_total = (output.shape[0] // patch) * (output.shape[1] // patch)
    fill = mean_colour(data.histology, data.rois.background, data.mask)
    return PairResult(data.id, data.material, split, apply_mask(output, data.mask, fill), rows,
                      seam_of(output, tiling), n_total, data.rois.method)


def pair_tissue(pair: Pair, data: PairImagesNormalised, result: PairResult, patch: int,
                pixel_size_um: float | None = None) -> Any:
    """Tissue classes and histomorphometry of one phantom pair over its kept patches
    (model output, truth, CT baseline vs the labels; ``metrics.tissue``); None without
    truth, labels or kept patches."""
    spec = labels_spec(pair)
    if spec is None or data.truth is None:
        return None
    labels = np.asarray(read_image(spec))
    if labels.shape != data.mask.shape:
        raise InputError(f"labels {spec}: shape {labels.shape}, the slide is "
                         f"{data.mask.shape}")
    region = np.zeros(data.mask.shape, bool)
    for row in result.rows:
        if (row.method, row.reference) == ("model", "truth"):
            region[row.score.row:row.score.row + patch, row.score.col:row.score.col + patch] = True
    if not (region & data.mask & (labels > 1)).any():
        return None
    tally = TissueTally()
    spacing = None if pixel_size_um is None else (pixel_size_um, pixel_size_um)
    score_readings(tally, result.slide, labels, data.mask, data.truth, data.ct, spacing, region)
    return tally


def pooled_tissue(tallies: Sequence[Any], patches: int) -> dict[str, Any]:
    """One split's tissue classes, counts pooled over its pairs' kept patches."""
    total = TissueTally()
    for t in tallies:
        total.merge(t)
    return {"pairs": total.units, "patches": patches, "readings": total.summary()}


# --------------------------------------------------------------------------- summaries


def _finite(value: Any) -> Any:
    """JSON-safe number: inf/nan (identical patches give PSNR = inf) as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _split_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def summarise(results: Sequence[PairResult], *, lpips_message: str | None = None,
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians per split and comparison, counts, per-pair seam indices (JSON-ready)."""
    splits: dict[str, Any] = {}
    for split in sorted({r.split for r in results}, key=_split_key):
        group = [r for r in results if r.split == split]
        entry: dict[str, Any] = {"pairs": len(group)}
        for m, ref in COMPARISONS:
            scores = [row.score for r in group for row in r.rows
                      if (row.method, row.reference) == (m, ref)]
            if scores or ref == "histology":
                entry[f"{m}_vs_{ref}"] = {k: _finite(v) for k, v in medians(scores).items()}
        tallies = [r.tissue for r in group if r.tissue is not None]
        if tallies:
            n = sum(1 for r in group if r.tissue is not None for row in r.rows
                    if (row.method, row.reference) == ("model", "truth"))
            entry["tissue"] = pooled_tissue(tallies, n)
        splits[split] = entry
    pairs = [{"id": r.id, "material": r.material, "split": r.split,
              "roi_method": r.roi_method, "seam_index": _finite(r.seam_index),
              "patches_total": r.patches_total,
              "patches_kept": sum(1 for row in r.rows
                                  if (row.method, row.reference) == ("model", "histology"))}
             for r in results]
    return {**(settings or {}), "lpips_skipped": lpips_message, "splits": splits,
            "pairs": pairs}


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """Table 1 layout: one row per comparison, SSIM ↑ / LPIPS ↓ / PSNR ↑ / FRC ↓ per split."""
    splits = list(summary["splits"])
    head = ["Comparison"] + [f"{s} {m}" for s in splits
                             for m in ("SSIM ↑", "LPIPS ↓", "PSNR ↑", "FRC px ↓")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, ref in COMPARISONS:
        key = f"{m}_vs_{ref}"
        if not any(key in summary["splits"][s] for s in splits):
            continue
        cells = [LABELS[(m, ref)]]
        for s in splits:
            med = summary["splits"][s].get(key) or {}
            cells += [_fmt(med.get("ssim"), 2), _fmt(med.get("lpips"), 2),
                      _fmt(med.get("psnr"), 1), _fmt(med.get("frc_px"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{s}: {summary['splits'][s]['pairs']} WSI, "
                       f"{summary['splits'][s]['model_vs_histology']['patches']} patches"
                       for s in splits)
    notes = [f"Medians over {summary.get('patch', PATCH)}² patches with ≥ "
             f"{summary.get('min_coverage', MIN_COVERAGE):.0%} mask coverage ({counts})."]
    if summary.get("lpips_skipped"):
        notes.append(summary["lpips_skipped"] + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + tissue_tables(summary)


def tissue_tables(summary: dict[str, Any]) -> str:
    """Per split: Dice of the tissue readings and histomorphometry (phantoms with labels)."""
    out = ""
    unit = "µm" if summary.get("pixel_size_um") else "px"
    for split, entry in summary["splits"].items():
        t = entry.get("tissue")
        if t:
            note = (f"{split}: tissue classes pooled over N = {t['patches']} kept patches of "
                    f"{t['pairs']} slides (mask ∩ patches); BIC and thickness in 2D.")
            out += f"\n{format_tissue_table(t['readings'], unit, note)}"
    return out


def metrics_csv(rows: Sequence[PatchRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.as_dict().items()})
    return buf.getvalue()


def plot_boxes(rows: Sequence[PatchRow], path: Path) -> None:
    """Box plots (PNG): one panel per metric, one box per split × comparison."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [m for m in ("ssim", "psnr", "lpips", "frc_px")
             if any(getattr(r.score, m) is not None for r in rows)]
    groups = sorted({(r.split, r.method, r.reference) for r in rows},
                    key=lambda g: (_split_key(g[0]), COMPARISONS.index(g[1:])))
    if not names:
        fig = Figure(figsize=(4.0, 2.0))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "no patch passed the mask-coverage threshold", ha="center")
        fig.savefig(path, format="png", dpi=100)
        return
    fig = Figure(figsize=(max(4.0, 1.0 + 0.7 * len(groups)) * len(names) / 1.5, 4.5))
    FigureCanvasAgg(fig)
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        data = [[v for r in rows if (r.split, r.method, r.reference) == g
                 and (v := getattr(r.score, name)) is not None and math.isfinite(v)]
                for g in groups]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(groups) + 1),
                      [f"{s}\n{LABELS[(m, ref)]}" for s, m, ref in groups],
                      rotation=60, fontsize=7)
        ax.set_title(name.upper().replace("_PX", " (px)"))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG")


# --------------------------------------------------------------------------- entry point


def evaluate_manifest(manifest: str | os.PathLike[str], checkpoint: str | os.PathLike[str],
                      out_dir: str | os.PathLike[str], *, split: str | os.PathLike[str] | None
                      = None, fold: int = 0, ids: Sequence[str] | None = None,
                      tiling: Tiling = PAPER_TILING, patch: int = PATCH,
                      min_coverage: float = MIN_COVERAGE,
                      lpips_path: str | os.PathLike[str] | None = None,
                      pixel_size_um: float | None = None, device: str = "cpu",
                      batch_size: int = 0, overwrite: bool = False,
                      cupping_fit: str = "checkpoint",
                      log: Callable[[str], None] = print) -> EvaluationReport:
    """Evaluate a checkpoint on a manifest's pairs and write the report folder ``out_dir``.

    ``split``: a run folder, ``split.json`` or ``folds.json`` assigning pairs to
    train/val/test (others: ``unassigned``); without it every pair is in split ``all``.
    ``cupping_fit``: how a ``radial`` checkpoint's cupping correction is chosen
    (:func:`pair_cuppings`); the corrections used are recorded in ``summary.json``.
    """
    out_dir = check_output(out_dir, overwrite)
    check_tiling(tiling.tile, tiling.step, tiling.window)
    if patch < 1 or not 0.0 <= min_coverage <= 1.0:
        raise UsageError(f"need patch >= 1 and 0 <= min_coverage <= 1, got {patch}, "
                         f"{min_coverage}")
    pairs = select_pairs(read_manifest(manifest), ids, str(manifest))
    assignment = read_splits(split, fold) if split is not None else {}
    if assignment:  # [no silent wrong answers] "test" must not be what it trained on
        check_split_record(assignment, checkpoint, split, [p.id for p in pairs])
    stainer = load_stainer(checkpoint, device)
    cuppings = pair_cuppings(pairs, stainer, cupping_fit, log)
    lpips, message = try_load_lpips(lpips_path)
    if lpips is None:
        log(str(message))
    else:
        lpips = lpips.to(device)
    settings = {"manifest": str(manifest), "checkpoint": str(checkpoint),
                "split_file": None if split is None else str(split), "fold": fold,
                "tiling": {"tile": tiling.tile, "step": tiling.step, "window": tiling.window},
                "patch": patch, "min_coverage": min_coverage, "pixel_size_um": pixel_size_um}
    if cuppings:
        settings["cupping"] = {"fit": cupping_fit, "depth": {
            i: round(c.depth, 1) for i, c in cuppings.items()}}
    with atomic_output(out_dir, overwrite) as tmp:
        (tmp / "slides").mkdir(parents=True)
        results = []
        for pair in pairs:
            name = assignment.get(pair.id, "unassigned") if split is not None else "all"
            data = load_pair(pair, stainer, cuppings.get(pair.id))
            result = evaluate_pair(data, stainer, name, tiling=tiling,
                                   patch=patch, min_coverage=min_coverage, lpips=lpips,
                                   pixel_size_um=pixel_size_um, batch_size=batch_size)
            result.tissue = pair_tissue(pair, data, result, patch, pixel_size_um)
            write_png(tmp / "slides" / f"{pair.id}.png", result.slide)
            results.append(result)
        rows = [row for r in results for row in r.rows]
        check_patches(results, patch, min_coverage)  # none usable: an error, no report
        summary = summarise(results, lpips_message=message, settings=settings)
        table = format_table(summary)
        (tmp / "metrics.csv").write_text(metrics_csv(rows))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (tmp / "table.md").write_text(table)
        plot_boxes(rows, tmp / "boxplots.png")
    files = [out_dir / n for n in ("metrics.csv", "summary.json", "table.md", "boxplots.png")]
    return EvaluationReport(out_dir, rows, summary, table, message,
                            files + [out_dir / "slides" / f"{p.id}.png" for p in pairs])
