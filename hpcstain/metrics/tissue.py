"""Tissue classes read from a stain, and the histomorphometry implant studies report.

Pure functions over numpy arrays (2D slides or 3D volumes, any ``ndim``); the colour
reading works slab by slab along the first axis, so it never holds more than a slab of
distances.

* **Classes** (:data:`CLASSES`, ids 0–5): background (resin, air, tube wall), soft tissue
  (vessels merged in), bone (cortical, trabecular; osteocyte lacunae merged in), new bone,
  degradation layer, implant. :func:`phantom_classes` maps the phantom's labels onto them.
* **Palette**: named RGB entries, each naming a class (a class may have several shades).
  :func:`read_classes` gives each voxel the class of the nearest entry (Euclidean RGB).
  Palettes come from labels (:func:`palette_from_labels`: k-means shades of each label's
  colours), from a YAML file (:func:`read_palette_file`), from a checkpoint (key
  ``palette``, :func:`checkpoint_palette`), or from unlabelled histology
  (:func:`palette_from_kmeans`, seeded with the phantom's stain colours).
* **CT-threshold baseline** (:func:`ct_threshold_classes`): each voxel to the class whose
  median CT value over the true labels is nearest.
* **Dice** per class, pooled from counts so slides and patches add up
  (:func:`dice_counts`, :func:`dice_from_counts`).
* **Histomorphometry** (:func:`morphometry_counts`, :func:`morphometry`):
  BV/TV, BIC and the degradation layer's local thickness; definitions in docs/metrics.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from scipy import ndimage

from hpcstain.data.manifest import labels_spec
from hpcstain.data.normalise import signed_to_rgb8
from hpcstain.data.readers import read_image
from hpcstain.errors import InputError
from hpcstain.phantom.render import PALETTE
from hpcstain.phantom.sample import LABELS

CLASSES: tuple[str, ...] = ("background", "soft_tissue", "bone", "new_bone", "degradation",
                            "implant")
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
TISSUES: tuple[str, ...] = CLASSES[1:]
CT_SEPARABLE: tuple[str, ...] = ("soft_tissue", "bone", "degradation", "implant")
BONE: tuple[str, ...] = ("bone", "new_bone")
IMPLANT_BODY: tuple[str, ...] = ("implant", "degradation")   # the implant as it is now
# label colours for viewers (RGBA), close to the phantom's toluidine-blue palette
CLASS_RGBA: dict[str, tuple[int, int, int, int]] = {
    "background": (0, 0, 0, 0), "soft_tissue": (106, 142, 212, 255),
    "bone": (204, 170, 214, 255), "new_bone": (52, 110, 226, 255),
    "degradation": (150, 120, 40, 255), "implant": (40, 40, 40, 255)}
# entry names a palette may use (phantom label and stain-palette names included) → class
ALIASES: dict[str, str] = {
    **{c: c for c in CLASSES}, "resin": "background", "tube": "background",
    "air": "background", "soft_tissue_alt": "soft_tissue", "vessel": "soft_tissue",
    "cortical_bone": "bone", "trabecular_bone": "bone", "bone_old": "bone",
    "bone_young": "bone", "lacuna": "bone", "screw": "implant"}
SHADES = 6          # k-means shades per label in palettes learned from labels
MAX_SAMPLES = 20000  # colours per label fed to k-means


def class_of(name: str) -> int:
    """Class id of a palette entry name (a class, phantom label or stain-palette name)."""
    base = str(name).split("#", 1)[0].strip().lower()
    if base not in ALIASES:
        raise InputError(f"palette entry {name!r}: unknown tissue (use one of "
                         f"{', '.join(sorted(ALIASES))})")
    return CLASS_ID[ALIASES[base]]


def phantom_lut() -> np.ndarray:
    """Phantom label code → class id (uint8 lookup table over 0–255)."""
    lut = np.zeros(256, np.uint8)
    for name, code in LABELS.items():
        lut[code] = class_of(name)
    return lut


def phantom_classes(labels: np.ndarray) -> np.ndarray:
    """Phantom labels → class ids (uint8, same shape)."""
    return phantom_lut()[np.asarray(labels, dtype=np.uint8)]


# --------------------------------------------------------------------------- palettes


@dataclass(frozen=True)
class Palette:
    """Named RGB entries (``names[i]`` → ``colours[i]``, float32 (K, 3) on 0–255)."""

    names: tuple[str, ...]
    colours: np.ndarray
    source: str = ""

    def classes(self) -> np.ndarray:
        return np.array([class_of(n) for n in self.names], np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints loaded with ``weights_only=True``)."""
        return {"source": self.source, "entries": [
            [n, *(round(float(v), 2) for v in c)] for n, c in zip(self.names, self.colours,
                                                                 strict=True)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "palette") -> Palette:
        try:
            entries = [(str(e[0]), [float(v) for v in e[1:4]]) for e in data["entries"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{where}: not a palette record ({exc})") from None
        return make_palette(entries, str(data.get("source", where)), where)


def make_palette(entries: Sequence[tuple[str, Sequence[float]]], source: str,
                 where: str = "palette") -> Palette:
    """A checked palette: known names, RGB triples on 0–255, at least one tissue entry."""
    names, colours = [], []
    for name, rgb in entries:
        class_of(name)
        c = np.asarray(rgb, dtype=np.float32)
        if c.shape != (3,) or not np.isfinite(c).all() or (c < 0).any() or (c > 255).any():
            raise InputError(f"{where}: entry {name!r} is not an RGB triple on 0–255: {rgb!r}")
        names.append(str(name))
        colours.append(c)
    pal = Palette(tuple(names), np.asarray(colours, np.float32).reshape(-1, 3), source)
    if not (pal.classes() > 0).any():
        raise InputError(f"{where}: no tissue entries (only background)")
    return pal


def _shades(colours: np.ndarray, shades: int, seed: int) -> np.ndarray:
    """Up to ``shades`` k-means centres of (N, 3) colours (deterministic)."""
    from scipy.cluster.vq import kmeans2

    rng = np.random.default_rng(seed)
    x = colours[rng.permutation(len(colours))[:MAX_SAMPLES]].astype(np.float64)
    unique = np.unique(x, axis=0)
    if len(unique) <= shades:
        return unique.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        centres, _ = kmeans2(x, shades, minit="++", seed=seed)
    return centres.astype(np.float32)


def palette_from_labels(rgb: np.ndarray, labels: np.ndarray, names: Mapping[int, str],
                        mask: np.ndarray | None = None, shades: int = SHADES,
                        source: str = "labels", seed: int = 0) -> Palette:
    """Each label's colours over ``labels`` (inside ``mask``) as ``shades`` k-means shades
    (1: the label's mean colour), entries named ``<label>#<k>``."""
    rgb = np.asarray(rgb)
    sel = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    entries: list[tuple[str, Sequence[float]]] = []
    for code in np.unique(labels[sel]):
        name = names.get(int(code))
        if name is None:
            continue
        x = rgb[sel & (labels == code)].astype(np.float32)
        centres = x.mean(0, keepdims=True) if shades <= 1 else _shades(x, shades, seed)
        entries += [(f"{name}#{k}", c) for k, c in enumerate(centres)]
    return make_palette(entries, source)


def phantom_names() -> dict[int, str]:
    return {code: name for name, code in LABELS.items()}


def palette_from_kmeans(pixels: np.ndarray, source: str = "k-means", iters: int = 20
                        ) -> Palette:
    """Cluster unlabelled stained pixels (N, 3), each centre seeded with (and named by)
    one colour of the phantom's stain palette; centres left without pixels are dropped."""
    names = [n for n in PALETTE if n != "tube"]
    centres = np.array([PALETTE[n] for n in names], np.float64)
    x = np.asarray(pixels, np.float64).reshape(-1, 3)[:MAX_SAMPLES * 4]
    for _ in range(iters):
        nearest = _nearest(x, centres)
        for k in range(len(centres)):
            if (nearest == k).any():
                centres[k] = x[nearest == k].mean(0)
    used = np.unique(_nearest(x, centres))
    return make_palette([(names[k], centres[k]) for k in used], source)


def read_palette_file(path: str | os.PathLike[str]) -> Palette:
    """A YAML palette: ``name: [r, g, b]`` or ``name: [[r, g, b], ...]`` (several shades)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read palette ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a mapping 'tissue: [r, g, b]'")
    entries: list[tuple[str, Sequence[float]]] = []
    for name, value in data.items():
        rows = value if isinstance(value, list) and value and isinstance(value[0], list) \
            else [value]
        for k, rgb in enumerate(rows):
            if not isinstance(rgb, list | tuple) or len(rgb) != 3:
                raise InputError(f"{path}: {name}: expected [r, g, b], got {rgb!r}")
            entries.append((f"{name}#{k}" if len(rows) > 1 else str(name), rgb))
    return make_palette(entries, f"file {os.fspath(path)}", os.fspath(path))


def checkpoint_palette(checkpoint: Mapping[str, Any], where: str = "checkpoint"
                       ) -> Palette | None:
    """The palette a checkpoint stores (key ``palette``), None for older checkpoints."""
    record = checkpoint.get("palette")
    return None if not record else Palette.from_dict(record, where)


# --------------------------------------------------------------------------- reading


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row of ``x`` (N, 3)."""
    d = (x * x).sum(-1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(-1)[None]
    return d.argmin(-1)


def read_classes(rgb: np.ndarray, palette: Palette, mask: np.ndarray | None = None,
                 tissues_only: bool = False, slab: int = 8) -> np.ndarray:
    """Class id of each pixel/voxel of ``rgb`` (..., 3+): the class of the nearest palette
    entry. ``mask``: only there (0 elsewhere); ``tissues_only``: background entries are
    not candidates (scoring inside a known sample)."""
    cls = palette.classes()
    keep = cls > 0 if tissues_only else np.ones(len(cls), bool)
    centres = palette.colours[keep].astype(np.float32)
    cls = cls[keep]
    rgb = np.asarray(rgb)
    out = np.zeros(rgb.shape[:-1], np.uint8)
    for i in range(0, max(1, out.shape[0]), slab):
        block = rgb[i:i + slab, ..., :3].astype(np.float32)
        sel = np.ones(block.shape[:-1], bool) if mask is None else np.asarray(mask[i:i + slab])
        out[i:i + slab][sel] = cls[_nearest(block[sel], centres)]
    return out


def ct_medians(ct: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Median CT value of each tissue class present in ``truth`` inside ``mask``."""
    return {name: float(np.median(ct[mask & (truth == CLASS_ID[name])]))
            for name in TISSUES if (mask & (truth == CLASS_ID[name])).any()}


def ct_threshold_classes(ct: np.ndarray, truth: np.ndarray, mask: np.ndarray
                         ) -> tuple[np.ndarray, dict[str, float]]:
    """The grey-value baseline: each voxel in ``mask`` to the class with the nearest
    median CT value (medians over the true classes), 0 outside; and those medians."""
    medians = ct_medians(ct, truth, mask)
    if not medians:
        raise InputError("CT threshold: no tissue class inside the sample mask")
    order = sorted(medians, key=medians.get)  # type: ignore[arg-type]
    levels = np.array([medians[n] for n in order])
    ids = np.array([CLASS_ID[n] for n in order], np.uint8)
    cuts = (levels[1:] + levels[:-1]) / 2.0
    out = np.zeros(truth.shape, np.uint8)
    out[mask] = ids[np.digitize(ct[mask].astype(np.float64), cuts)]
    return out, medians


# --------------------------------------------------------------------------- Dice


def dice_counts(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
                ) -> dict[str, list[int]]:
    """Per tissue class ``[intersection, predicted, true]`` voxel counts (inside ``mask``)."""
    p, t = (pred, truth) if mask is None else (pred[mask], truth[mask])
    out = {}
    for name in TISSUES:
        a, b = p == CLASS_ID[name], t == CLASS_ID[name]
        out[name] = [int((a & b).sum()), int(a.sum()), int(b.sum())]
    return out


def add_counts(total: dict[str, list[int]], more: Mapping[str, Sequence[int]]) -> None:
    """Pool counts (in place): slides and patches add up before the ratio is taken."""
    for k, v in more.items():
        total[k] = [a + b for a, b in zip(total.get(k, [0] * len(v)), v, strict=True)]


def dice_from_counts(counts: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
    """Dice = 2|P∩T| / (|P| + |T|) per class; None when the class is absent from the truth."""
    return {k: (2.0 * i / (p + t) if t else None) for k, (i, p, t) in counts.items()}


def mean_dice(dice: Mapping[str, float | None], classes: Sequence[str] = CT_SEPARABLE
              ) -> float | None:
    """Mean Dice over ``classes`` present in the truth (None when none is)."""
    vals = [dice[c] for c in classes if dice.get(c) is not None]
    return float(np.mean(vals)) if vals else None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- morphometry


def _is(classes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return np.isin(classes, [CLASS_ID[n] for n in names])


def _face_neighbour(region: np.ndarray) -> np.ndarray:
    """Voxels with at least one face neighbour (2·ndim of them) in ``region``."""
    struct = ndimage.generate_binary_structure(region.ndim, 1)
    return ndimage.binary_dilation(region, struct)


def _sample(classes: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return classes > 0 if mask is None else (np.asarray(mask, bool) & (classes > 0))


def bvtv_counts(classes: np.ndarray, region: np.ndarray | None = None) -> tuple[int, int]:
    """``(BV, TV)`` voxel counts: TV = sample voxels (class > 0, inside ``region``) outside
    the implant body (implant and degradation layer); BV = bone and new bone among them."""
    tv = _sample(classes, region) & ~_is(classes, IMPLANT_BODY)
    return int((tv & _is(classes, BONE)).sum()), int(tv.sum())


def bic_counts(classes: np.ndarray, region: np.ndarray | None = None) -> tuple[int, int]:
    """``(contact, surface)``: implant-body voxels with a face neighbour in the tissue
    (sample outside the body), and those of them with a face neighbour in bone."""
    body = _is(classes, IMPLANT_BODY)
    tissue = _sample(classes, None) & ~body
    surface = body & _face_neighbour(tissue)
    if region is not None:
        surface &= np.asarray(region, bool)
    contact = surface & _face_neighbour(tissue & _is(classes, BONE))
    return int(contact.sum()), int(surface.sum())


def _crop(region: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``region`` grown by one voxel (inside the array)."""
    idx = np.nonzero(region)
    return tuple(slice(max(0, int(i.min()) - 1), min(n, int(i.max()) + 2))
                 for i, n in zip(idx, region.shape, strict=True))


def layer_thickness(classes: np.ndarray, spacing: Sequence[float] | None = None,
                    layer: str = "degradation", core: str = "implant") -> np.ndarray:
    """Local thickness (in units of ``spacing``; voxels without) at each ``layer`` voxel.

    Between a core and the rest: ``d_core + d_out − h``, the distances (voxel centres) to
    the nearest core and nearest outside voxel, ``h`` the mean voxel edge (exact for a flat
    layer of any thickness). Without core or outside in reach: ``2·d − h`` at the ridge
    voxels (local maxima of the distance ``d`` to the nearest non-layer voxel).
    """
    lay = classes == CLASS_ID[layer]
    if not lay.any():
        return np.zeros(0, np.float32)
    sp = tuple(float(s) for s in (spacing or (1.0,) * classes.ndim))
    h = float(np.mean(sp))
    box = _crop(lay | (classes == CLASS_ID[core]))
    lay_c, core_c = lay[box], classes[box] == CLASS_ID[core]
    out_c = ~(lay_c | core_c)
    if core_c.any() and out_c.any():
        d_core = ndimage.distance_transform_edt(~core_c, sampling=sp)
        d_out = ndimage.distance_transform_edt(~out_c, sampling=sp)
        return (d_core + d_out - h)[lay_c].astype(np.float32)
    d = ndimage.distance_transform_edt(np.pad(lay_c, 1), sampling=sp)[
        tuple(slice(1, -1) for _ in lay_c.shape)]
    ridge = lay_c & (d >= ndimage.maximum_filter(d, size=3))
    return (2.0 * d - h)[ridge].astype(np.float32)


def morphometry_counts(classes: np.ndarray, spacing: Sequence[float] | None = None,
                       region: np.ndarray | None = None) -> dict[str, Any]:
    """Poolable counts: ``bv``, ``tv``, ``contact``, ``surface`` and the thickness values."""
    bv, tv = bvtv_counts(classes, region)
    contact, surface = bic_counts(classes, region)
    thick = layer_thickness(classes if region is None else
                            np.where(region, classes, 0).astype(np.uint8), spacing)
    return {"bv": bv, "tv": tv, "contact": contact, "surface": surface, "thickness": thick}


def morphometry(counts: Mapping[str, Any]) -> dict[str, float | int | None]:
    """BV/TV, BIC and the layer's mean/median thickness from (pooled) counts."""
    thick = np.asarray(counts["thickness"], np.float64)
    return {"bv_tv": counts["bv"] / counts["tv"] if counts["tv"] else None,
            "bic": counts["contact"] / counts["surface"] if counts["surface"] else None,
            "thickness_mean": float(thick.mean()) if thick.size else None,
            "thickness_median": float(np.median(thick)) if thick.size else None,
            "tv_voxels": int(counts["tv"]), "surface_voxels": int(counts["surface"])}


def pool_morphometry(total: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add one slide's :func:`morphometry_counts` to ``total`` (in place)."""
    for k in ("bv", "tv", "contact", "surface"):
        total[k] = total.get(k, 0) + more[k]
    total["thickness"] = np.concatenate([total.get("thickness", np.zeros(0, np.float32)),
                                         more["thickness"]])


def implant_distance(classes: np.ndarray, spacing: Sequence[float] | None = None
                     ) -> np.ndarray:
    """Distance of every voxel to the nearest implant-body voxel (0 inside the body)."""
    body = _is(classes, IMPLANT_BODY)
    if not body.any():
        raise InputError("no implant in the class volume: distance bands need one")
    return ndimage.distance_transform_edt(~body, sampling=spacing)


def distance_bands(classes: np.ndarray, edges: Sequence[float],
                   spacing: Sequence[float] | None = None) -> list[tuple[str, np.ndarray]]:
    """Shells ``[a, b)`` of distance from the implant-body surface (``edges`` ascending,
    in units of ``spacing``), each as ``("a–b", region)``; the body belongs to none."""
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)) \
            or edges[0] < 0:
        raise InputError(f"distance bands {list(edges)}: expected ascending edges >= 0")
    d = implant_distance(classes, spacing)
    return [(f"{a:g}–{b:g}", (d > a) & (d <= b))
            for a, b in pairwise(edges)]


# --------------------------------------------------------------------------- reports


class TissueTally:
    """Dice and morphometry counts of several readings, pooled over slides or volumes."""

    def __init__(self) -> None:
        self.dice: dict[str, dict[str, list[int]]] = {}
        self.morph: dict[str, dict[str, Any]] = {}
        self.units = 0

    def add(self, method: str, pred: np.ndarray, truth: np.ndarray | None,
            region: np.ndarray, spacing: Sequence[float] | None = None) -> None:
        """One reading ``pred`` (class ids) of one slide/volume, scored inside ``region``."""
        if truth is not None:
            add_counts(self.dice.setdefault(method, {}), dice_counts(pred, truth, region))
        counts = morphometry_counts(np.where(region, pred, 0).astype(np.uint8), spacing)
        pool_morphometry(self.morph.setdefault(method, {}), counts)

    def merge(self, other: TissueTally) -> None:
        """Pool another tally's counts into this one (in place)."""
        for method, counts in other.dice.items():
            add_counts(self.dice.setdefault(method, {}), counts)
        for method, morph in other.morph.items():
            pool_morphometry(self.morph.setdefault(method, {}), morph)
        self.units += other.units

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for method, counts in self.morph.items():
            entry: dict[str, Any] = {"morphometry": morphometry(counts)}
            if method in self.dice:
                dice = dice_from_counts(self.dice[method])
                entry.update(dice=dice, mean_dice_ct_separable=mean_dice(dice),
                             mean_dice=mean_dice(dice, TISSUES),
                             counts=self.dice[method])
            out[method] = entry
        return out


STAIN_TRUTH = "stain, truth palette"
STAIN_OWN = "stain, own class means"
TRUTH_READ = "truth stain, truth palette"
CT_BASELINE = "CT threshold"
TRUTH = "truth"


def score_readings(tally: TissueTally, prediction: np.ndarray, labels: np.ndarray,
                   mask: np.ndarray, reference: np.ndarray | None = None,
                   ct: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                   region: np.ndarray | None = None) -> dict[str, Any]:
    """Read ``prediction`` (and the reference, the CT) into classes and add them to
    ``tally``: the stain with the truth's palette and with its own class means, the truth
    stain itself (a check of the reading), the CT-threshold baseline and the truth.

    ``labels``: phantom label codes; ``mask``: the sample (where classes are scored);
    ``region``: where (inside ``mask``) to score, e.g. kept patches. Returns the palettes'
    and CT medians' records.
    """
    truth = phantom_classes(labels)
    where = np.asarray(mask, bool) & (truth > 0)
    if region is not None:
        where &= np.asarray(region, bool)
    names = phantom_names()
    info: dict[str, Any] = {}
    if reference is not None:
        pal = palette_from_labels(reference[..., :3], labels, names, where, source="truth")
        tally.add(STAIN_TRUTH, read_classes(prediction, pal, where, True), truth, where,
                  spacing)
        tally.add(TRUTH_READ, read_classes(reference, pal, where, True), truth, where,
                  spacing)
        info["palette_entries"] = len(pal.names)
    own = palette_from_labels(prediction[..., :3], labels, names, where, shades=1,
                              source="own")
    tally.add(STAIN_OWN, read_classes(prediction, own, where, True), truth, where, spacing)
    if ct is not None:
        ct_cls, medians = ct_threshold_classes(np.asarray(ct), truth, where)
        tally.add(CT_BASELINE, ct_cls, truth, where, spacing)
        info["ct_medians"] = medians
    tally.add(TRUTH, truth, truth, where, spacing)
    tally.units += 1
    return info


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def format_tissue_table(summary: Mapping[str, Any], unit: str = "µm",
                        note: str = "") -> str:
    """Markdown: per-class Dice of each reading, the means, BV/TV, BIC, layer thickness."""
    head = ["reading", *TISSUES, "mean (4 CT-separable)", "BV/TV", "BIC",
            f"layer thickness mean / median ({unit})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, entry in summary.items():
        dice = entry.get("dice", {})
        m = entry["morphometry"]
        thick = (f"{_cell(m['thickness_mean'], '{:.1f}')} / "
                 f"{_cell(m['thickness_median'], '{:.1f}')}")
        cells = [method, *(_cell(dice.get(c)) for c in TISSUES),
                 _cell(entry.get("mean_dice_ct_separable")), _cell(m["bv_tv"]),
                 _cell(m["bic"]), thick]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    return text + (f"\n{note}\n" if note else "")


# --------------------------------------------------------------------------- training hook

PIXELS_PER_SLIDE = 50000   # pixels sampled from each training slide for its palette


def _interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3×3 neighbourhood holds one label (away from misregistered edges)."""
    return ndimage.minimum_filter(labels, size=3) == ndimage.maximum_filter(labels, size=3)


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)[:k]


def training_palette(pairs: Sequence[Any], slides: Sequence[Any], seed: int = 0
                     ) -> dict[str, Any] | None:
    """The palette stored in checkpoints: the training histology's class colours in the
    model's output space (``slide.histology``, §2.5-normalised). With label images (phantom
    pairs: ``labels/<id>.png``) each label's shades over the pixels away from label edges
    (inside the correspondence mask, or background); without, k-means of the pixels
    seeded with the phantom's stain colours. None without slides."""
    rgb, lab, free = [], [], []
    for i, (pair, slide) in enumerate(zip(pairs, slides, strict=True)):
        hist = signed_to_rgb8(slide.histology, channel_axis=0)
        spec = labels_spec(pair)
        labels = np.asarray(read_image(spec)) if spec else None
        if labels is not None and labels.shape == hist.shape[:2]:
            sel = np.flatnonzero(_interior(labels) & (slide.mask | (labels <= 1)))
            pick = sel[_subsample(len(sel), PIXELS_PER_SLIDE, seed + i)]
            rgb.append(hist.reshape(-1, 3)[pick])
            lab.append(labels.reshape(-1)[pick])
        else:
            flat = hist.reshape(-1, 3)
            free.append(flat[_subsample(len(flat), PIXELS_PER_SLIDE, seed + i)])
    if rgb:
        pal = palette_from_labels(np.concatenate(rgb), np.concatenate(lab), phantom_names(),
                                  source="training histology, phantom labels", seed=seed)
    elif free:
        pal = palette_from_kmeans(np.concatenate(free), source="training histology, k-means")
    else:
        return None
    return pal.to_dict()
