"""Phantom pairs: files line up, 7:1:2 materials, histology close to truth but not equal."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.morphology import convex_hull_image

from hpcstain.errors import UsageError
from hpcstain.phantom import (
    LABELS,
    MANIFEST_COLUMNS,
    RIGID_LABELS,
    allocate_materials,
    render_pair,
    write_pairs,
)

SIZE = (96, 112)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "set"
    write_pairs(out, 10, seed=11, size=SIZE)
    return out


def read_manifest(outdir: Path) -> list[dict[str, str]]:
    with open(outdir / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        return list(reader)


def tree_digest(outdir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(outdir.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(outdir)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64).mean(axis=-1)


def test_manifest_has_exact_columns_and_existing_relative_paths(pairs_dir: Path) -> None:
    rows = read_manifest(pairs_dir)
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    for r in rows:
        for col in ("ct", "histology", "mask", "truth"):
            assert not Path(r[col]).is_absolute()
            assert (pairs_dir / r[col]).is_file()


def test_materials_follow_the_7_1_2_ratio(pairs_dir: Path) -> None:
    counts = Counter(r["material"] for r in read_manifest(pairs_dir))
    assert counts == {"mg": 7, "ti": 1, "peek": 2}
    assert Counter(allocate_materials(20, 0)) == {"mg": 14, "ti": 2, "peek": 4}
    assert Counter(allocate_materials(3, 0)) == {"mg": 2, "peek": 1}
    assert allocate_materials(10, 5) == allocate_materials(10, 5)


def test_pair_files_line_up(pairs_dir: Path) -> None:
    for r in read_manifest(pairs_dir):
        ct = tifffile.imread(pairs_dir / r["ct"])
        hist = np.asarray(Image.open(pairs_dir / r["histology"]))
        mask = np.asarray(Image.open(pairs_dir / r["mask"]))
        truth = np.asarray(Image.open(pairs_dir / r["truth"]))
        assert ct.dtype == np.uint16 and ct.shape == SIZE
        assert hist.shape == truth.shape == (*SIZE, 3) and hist.dtype == np.uint8
        assert mask.shape == SIZE and set(np.unique(mask)) <= {0, 255}
        assert (mask == 255).mean() > 0.2


def test_pairs_are_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    a = write_pairs(tmp_path / "a", 3, seed=4, size=(64, 64)).parent
    b = write_pairs(tmp_path / "b", 3, seed=4, size=(64, 64)).parent
    c = write_pairs(tmp_path / "c", 3, seed=5, size=(64, 64)).parent
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_histology_is_close_to_truth_but_misaligned(pairs_dir: Path) -> None:
    corrs = []
    for r in read_manifest(pairs_dir):
        hist = grey(np.asarray(Image.open(pairs_dir / r["histology"])))
        truth = grey(np.asarray(Image.open(pairs_dir / r["truth"])))
        inside = np.asarray(Image.open(pairs_dir / r["mask"])) == 255
        corr = np.corrcoef(hist[inside], truth[inside])[0, 1]
        corrs.append(corr)
        assert 0.3 < corr < 0.99
        assert np.abs(hist - truth).mean() > 3
    assert np.median(corrs) > 0.6


def test_truth_is_the_exact_stain_of_the_ct_slice() -> None:
    pair = render_pair("mg", 99, (80, 80), seed=1, index=0)
    screw = pair.labels == LABELS["screw"]
    assert screw.any() and np.all(pair.truth[screw] == (18, 18, 22))
    tube = pair.labels == LABELS["tube"]
    assert tube.any() and np.all(pair.truth[tube] == (243, 241, 236))
    # the histology sees a nearby but different plane: labels mostly, not fully, agree
    agree = (pair.histology_labels == pair.labels).mean()
    assert 0.6 < agree < 1.0


def test_mask_is_the_intersection_of_both_hulls_minus_missing_section() -> None:
    for index in range(3):
        pair = render_pair("ti", 7 + index, (80, 96), seed=2, index=index)
        inside = pair.mask == 255
        hull_ct = convex_hull_image(np.isin(pair.labels, RIGID_LABELS))
        hull_hist = convex_hull_image(np.isin(pair.histology_labels, RIGID_LABELS)
                                      & ~pair.missing)
        assert np.array_equal(inside, hull_ct & hull_hist & ~pair.missing)
        assert not (inside & pair.missing).any()


def test_missing_section_shows_as_background_in_histology() -> None:
    pair = next(p for p in (render_pair("mg", 50 + k, (96, 96), 3, k) for k in range(12))
                if p.missing.any())
    lost = pair.histology[pair.missing].astype(float)
    assert lost.mean() > 190


@pytest.mark.parametrize(("n", "size"), [(0, (64, 64)), (-2, (64, 64)), (3, (8, 64)),
                                         (3, (64,))])
def test_bad_pair_arguments_raise_usage_error_and_write_nothing(
        tmp_path: Path, n: int, size: tuple) -> None:
    with pytest.raises(UsageError):
        write_pairs(tmp_path / "out", n, 0, size=size)
    assert list(tmp_path.iterdir()) == []


def test_existing_pair_dir_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="exists"):
        write_pairs(out, 1, 0, size=(32, 32))
    assert (out / "keep.txt").read_text() == "x"
    write_pairs(out, 1, 0, size=(32, 32), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").is_file()
