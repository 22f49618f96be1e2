"""§2.8 sample-correspondence masks: where CT and histology show the same sample.

Per modality the rigid sample (bone + screw) is segmented by intensity and replaced by its
convex hull (which takes in enclosed soft tissue and a rim of background); the two hulls
are intersected (so the tube wall, seen only in CT, and tissue lost in sectioning drop
out) and AND-ed with any extra hand-made masks. A mask given in the manifest replaces the
computed one (extras still apply). Masks are cached as ``.npz`` keyed by a hash of the
input files' paths, sizes and mtimes plus the ROIs, so training never recomputes them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from hpcstain.atomic import write_bytes_atomic
from hpcstain.data.manifest import Pair, PairImages
from hpcstain.data.normalise import Rois, ct_levels, slide_background
from hpcstain.data.readers import file_signature
from hpcstain.errors import InputError

MASK_VERSION = 1
MIN_OBJECT_FRACTION = 5e-4  # specks smaller than this share of the slide are ignored


def _remove_small(seg: np.ndarray, min_size: int) -> np.ndarray:
    """Drop specks (noise, dust, stain droplets) that would inflate a convex hull."""
    labels, n = ndimage.label(seg)
    if n == 0:
        return seg
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def _min_size(shape: tuple[int, ...]) -> int:
    return max(32, int(MIN_OBJECT_FRACTION * shape[0] * shape[1]))


def segment_ct(ct: np.ndarray, rois: Rois) -> np.ndarray:
    """Rigid sample in CT: above the midpoint of the bone and background means."""
    bone, background = ct_levels(ct, rois)
    return _remove_small(ct > 0.5 * (bone + background), _min_size(ct.shape))


def segment_histology(rgb: np.ndarray) -> np.ndarray:
    """Sample in histology: every pixel not near the slide-background colour."""
    return _remove_small(~slide_background(rgb), _min_size(rgb.shape))


def hull(seg: np.ndarray, what: str) -> np.ndarray:
    if not seg.any():
        raise InputError(f"{what}: nothing segmented for the correspondence mask")
    return convex_hull_image(seg)


def correspondence_mask(ct_seg: np.ndarray, hist_seg: np.ndarray,
                        extras: list[np.ndarray] | tuple[np.ndarray, ...] = (),
                        what: str = "pair") -> np.ndarray:
    """Intersection of the two convex hulls, AND-ed with every extra mask (bool)."""
    mask = hull(ct_seg, f"{what} CT") & hull(hist_seg, f"{what} histology")
    for extra in extras:
        mask &= extra
    return mask


def pair_mask(images: PairImages, rois: Rois, what: str = "pair") -> np.ndarray:
    """The correspondence mask of one pair: the manifest's, or computed; extras AND-ed."""
    if images.mask is not None:
        mask = images.mask.copy()
        for extra in images.extra_masks:
            mask &= extra
    else:
        mask = correspondence_mask(segment_ct(images.ct, rois),
                                   segment_histology(images.histology),
                                   images.extra_masks, what)
    if not mask.any():
        raise InputError(f"{what}: correspondence mask is empty")
    return mask


def mask_key(pair: Pair) -> str:
    """Hash of everything the mask depends on: files (path, size, mtime), ROIs, version."""
    desc = {"version": MASK_VERSION, "files": [file_signature(s) for s in pair.files],
            "bone_roi": pair.bone_roi, "background_roi": pair.background_roi}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _save(path: Path, mask: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, bits=np.packbits(mask), shape=np.asarray(mask.shape))
    write_bytes_atomic(path, buf.getvalue())


def _load(path: Path) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            shape = tuple(int(v) for v in data["shape"])
            bits = np.unpackbits(data["bits"], count=int(np.prod(shape)))
        return bits.reshape(shape).astype(bool)
    except (OSError, KeyError, ValueError):
        return None  # unreadable cache entry: recompute


def load_or_compute_mask(pair: Pair, images: PairImages, rois: Rois,
                         cache_dir: str | Path | None) -> np.ndarray:
    """The pair's correspondence mask from ``cache_dir`` if cached, else computed + cached."""
    if cache_dir is None:
        return pair_mask(images, rois, pair.id)
    path = Path(cache_dir) / f"mask-{pair.id}-{mask_key(pair)}.npz"
    if path.is_file():
        cached = _load(path)
        if cached is not None and cached.shape == images.ct.shape:
            return cached
    mask = pair_mask(images, rois, pair.id)
    _save(path, mask)
    return mask
