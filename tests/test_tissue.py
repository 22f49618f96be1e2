"""Tissue classes and histomorphometry (hpcstain.metrics.tissue, score, evaluate, morph)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from hpcstain.errors import InputError, UsageError
from hpcstain.metrics.tissue import (
    CLASS_ID,
    Palette,
    bic_counts,
    bvtv_counts,
    checkpoint_palette,
    ct_threshold_classes,
    dice_counts,
    dice_from_counts,
    distance_bands,
    layer_thickness,
    make_palette,
    mean_dice,
    palette_from_labels,
    phantom_classes,
    phantom_names,
    read_classes,
    read_palette_file,
    training_palette,
)
from hpcstain.phantom import make_volume, write_pairs, write_volume_file

sys.path.insert(0, str(Path(__file__).parent))

S, B, N, D, IMP = (CLASS_ID[c] for c in ("soft_tissue", "bone", "new_bone", "degradation",
                                         "implant"))


def test_dice_known_counts():
    truth = np.array([S, S, B, B, IMP, IMP, 0, 0])
    pred = np.array([S, B, B, B, IMP, S, 0, S])
    dice = dice_from_counts(dice_counts(pred, truth, truth > 0))
    assert dice["soft_tissue"] == pytest.approx(2 * 1 / (2 + 2))  # in the mask: pred S at 0, 5
    assert dice["bone"] == pytest.approx(2 * 2 / (3 + 2))
    assert dice["implant"] == pytest.approx(2 * 1 / (1 + 2))
    assert dice["new_bone"] is None and dice["degradation"] is None  # absent from truth
    assert mean_dice(dice) == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def bar_volume(side: int = 4) -> np.ndarray:
    """A square implant bar along z in soft tissue; bone fills the half-space beyond +x."""
    vol = np.full((6, 20, 20), S, np.uint8)
    vol[:, 8:8 + side, 8:8 + side] = IMP
    vol[:, :, 8 + side:] = B
    return vol


def test_bic_and_bvtv_of_a_bar_are_exact():
    vol = bar_volume()
    contact, surface = bic_counts(vol)
    assert surface == 6 * 12 and contact == 6 * 4           # the +x face of each slice
    bv, tv = bvtv_counts(vol)
    assert tv == vol.size - 6 * 16 and bv == 6 * 20 * 8


def test_bic_of_a_cylinder_half_in_bone():
    _, y, x = np.mgrid[0:4, 0:48, 0:48]
    r = np.hypot(y - 23.5, x - 23.5)
    vol = np.where(r < 10, IMP, np.where(x >= 24, B, S)).astype(np.uint8)
    contact, surface = bic_counts(vol)
    assert contact / surface == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize("t", [2, 3, 4, 7])
def test_layer_thickness_of_a_slab(t):
    vol = np.full((5, 6, 30), S, np.uint8)
    vol[..., :8] = IMP
    vol[..., 8:8 + t] = D
    th = layer_thickness(vol, spacing=(5.0, 5.0, 5.0))
    np.testing.assert_allclose(th, 5.0 * t)                 # every layer voxel, in µm


def test_layer_thickness_without_core_uses_the_ridge():
    vol = np.full((5, 6, 30), S, np.uint8)
    vol[..., 8:13] = D                                      # 5 voxels, no implant core
    assert np.median(layer_thickness(vol)) == pytest.approx(5.0)


def test_distance_bands_cover_the_tissue_once():
    vol = bar_volume()
    bands = distance_bands(vol, [0, 2, 5, 100])
    total = sum(r.astype(int) for _, r in bands)
    assert total.max() == 1 and (total[vol == IMP] == 0).all()
    assert total[vol != IMP].sum() == (vol != IMP).sum()
    with pytest.raises(InputError):
        distance_bands(np.full((4, 4, 4), S, np.uint8), [0, 5])


def test_reading_recovers_the_phantom_labels_from_its_truth_stain():
    v = make_volume((24, 40, 40), "mg", 0)
    mask = v.labels > 1
    pal = palette_from_labels(v.stain, v.labels, phantom_names(), mask)
    read = read_classes(v.stain, pal, mask, tissues_only=True)
    np.testing.assert_array_equal(read[mask], phantom_classes(v.labels)[mask])
    assert (read[~mask] == 0).all()


def test_ct_threshold_baseline_nearest_median():
    truth = np.array([S] * 4 + [B] * 4 + [IMP] * 4, np.uint8)
    ct = np.array([10, 12, 30, 11, 50, 52, 49, 35, 90, 91, 89, 60], np.float32)
    pred, medians = ct_threshold_classes(ct, truth, truth > 0)
    assert medians == {"soft_tissue": 11.5, "bone": 49.5, "implant": 89.5}
    # cuts at 30.5 and 69.5: 30 → soft, 35 → bone, 60 → bone
    np.testing.assert_array_equal(pred, [S, S, S, S, B, B, B, B, IMP, IMP, IMP, B])


def test_palette_file_and_record(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("background: [243, 241, 236]\nsoft_tissue: [[106, 142, 212], [148, 136, 152]]\n"
                 "cortical_bone: [204, 170, 214]\nscrew: [18, 18, 22]\n")
    pal = read_palette_file(f)
    assert list(pal.classes()) == [0, S, S, B, IMP]
    again = Palette.from_dict(pal.to_dict())
    assert again.names == pal.names and np.allclose(again.colours, pal.colours)
    (tmp_path / "bad.yaml").write_text("osteoid: [1, 2, 3]\n")
    with pytest.raises(InputError, match="osteoid"):
        read_palette_file(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="RGB"):
        make_palette([("bone", (0, 300, 0))], "test")


def test_palette_round_trip_through_a_checkpoint(tmp_path):
    from hpcstain.checkpoint import load_checkpoint, save_checkpoint

    pal = make_palette([("background", (240, 240, 240)), ("bone", (200, 160, 210)),
                        ("screw", (20, 20, 20))], "test")
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.zeros(1)}, "palette": pal.to_dict()})
    got = checkpoint_palette(load_checkpoint(tmp_path / "c.pt"))
    assert got is not None and got.names == pal.names
    np.testing.assert_allclose(got.colours, pal.colours)
    save_checkpoint(tmp_path / "old.pt", {"model": {"w": torch.zeros(1)}})
    assert checkpoint_palette(load_checkpoint(tmp_path / "old.pt")) is None


def test_training_palette_from_phantom_pairs(tmp_path):
    from hpcstain.data.manifest import read_manifest

    manifest = write_pairs(tmp_path / "pairs", 2, 3, size=(64, 64))
    pairs = read_manifest(manifest)
    from PIL import Image

    slides = []
    for p in pairs:
        rgb = np.asarray(Image.open(p.truth).convert("RGB"), np.float32)
        slides.append(SimpleNamespace(histology=np.moveaxis(rgb / 127.5 - 1, -1, 0),
                                      mask=np.ones(rgb.shape[:2], bool)))
    record = training_palette(pairs, slides)
    pal = Palette.from_dict(record)
    assert "phantom labels" in pal.source and {S, B} <= set(pal.classes().tolist())
    free = training_palette([SimpleNamespace(truth=None, extra={})], slides[:1])
    assert "k-means" in Palette.from_dict(free).source


# --------------------------------------------------------------------------- commands


def test_score_reports_tissue_dice_of_the_truth(tmp_path):
    from hpcstain.score import score_files

    vol = write_volume_file(tmp_path / "v.zarr", (16, 40, 40), "mg", 0)
    truth = zarr.open_group(str(vol), mode="r")["stain"][...]
    np.save(tmp_path / "t.npy", truth)
    report = score_files(tmp_path / "t.npy", tmp_path / "sc", reference=vol, normalise=False)
    tissue = report.score.summary["tissue"]
    own = tissue["readings"]["stain, truth palette"]
    assert own["mean_dice_ct_separable"] == 1.0 and own["dice"]["new_bone"] == 1.0
    assert tissue["spacing_um"] == [5.0, 5.0, 5.0]
    ct = tissue["readings"]["CT threshold"]
    assert 0 < ct["mean_dice_ct_separable"] < 1
    truth_m = tissue["readings"]["truth"]["morphometry"]
    assert own["morphometry"] == truth_m and 0 < truth_m["bv_tv"] < 1
    assert "CT threshold" in report.table


def test_evaluate_reports_tissue_over_kept_patches(tmp_path):
    from micro import untrained_generator_checkpoint

    from hpcstain.evaluate import evaluate_manifest

    manifest = write_pairs(tmp_path / "pairs", 2, 1, size=(96, 96))
    ckpt = untrained_generator_checkpoint(tmp_path / "g.pt")
    report = evaluate_manifest(manifest, ckpt, tmp_path / "ev", patch=32, log=lambda _: None)
    t = report.summary["splits"]["all"]["tissue"]
    assert t["patches"] >= 2 and t["pairs"] >= 1
    check = t["readings"]["truth stain, truth palette"]
    # the §2.5 stretch clips the darkest colours: degradation layer and screw may touch
    assert check["dice"]["soft_tissue"] == check["dice"]["bone"] == 1.0
    assert check["mean_dice_ct_separable"] > 0.9
    assert "CT threshold" in report.table and f"N = {t['patches']}" in report.table


def fused_run(tmp_path: Path, checkpoint: Path | None = None) -> tuple[Path, np.ndarray]:
    """A phantom stained along z and fused, level 0 then replaced by the truth stain."""
    from hpcstain.executors import run_stain
    from hpcstain.volume import fuse_run, init_run, make_plan, open_volume
    from hpcstain.volume.omezarr import build_pyramid

    vol = write_volume_file(tmp_path / "v.zarr", (16, 48, 48), "mg", 0)
    src = open_volume(f"{vol}:ct")
    plan = make_plan(src, chunk=16, axes="z", tile=16, step=8, checkpoint=checkpoint,
                     levels=None if checkpoint else (30000.0, 10000.0))
    run = init_run(tmp_path / "run", plan)
    run_stain(run, None if checkpoint else (lambda b: b[:, :3] * 0), progress=False)
    fuse_run(run)
    g = zarr.open_group(str(vol), mode="r")
    stain, labels = g["stain"][...], g["labels"][...]
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r+")
    rgba = np.concatenate([stain, np.full((*stain.shape[:3], 1), 255, np.uint8)], -1)
    root["0"][...] = np.moveaxis(rgba, -1, 0)
    build_pyramid(root, [tuple(slice(0, n) for n in stain.shape[:3])])
    return run, labels


def truth_palette_file(tmp_path: Path, run: Path, labels: np.ndarray) -> Path:
    import yaml

    stain = np.moveaxis(zarr.open_group(str(run / "fused.ome.zarr"))["0"][:3], 0, -1)
    pal = palette_from_labels(stain, labels, phantom_names())
    path = tmp_path / "palette.yaml"
    rows: dict[str, list[list[float]]] = {}
    for name, c in zip(pal.names, pal.colours, strict=True):
        rows.setdefault(name.split("#")[0], []).append([float(v) for v in c])
    path.write_text(yaml.safe_dump(rows))
    return path


def test_morph_end_to_end(tmp_path, capsys):
    from hpcstain.cli import main
    from hpcstain.metrics.tissue import morphometry, morphometry_counts

    run, labels = fused_run(tmp_path)
    palette = truth_palette_file(tmp_path, run, labels)
    assert main(["morph", str(run), "--palette", str(palette), "--regions", "0,20,60"]) == 0
    out = capsys.readouterr().out
    assert "BV/TV" in out and "0–20" in out
    img = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")
    assert img["labels"].attrs["labels"] == ["tissue"]
    tissue = img["labels/tissue"]
    np.testing.assert_array_equal(tissue["0"][...], phantom_classes(labels))
    assert len(list(tissue.array_keys())) == len(list(img.array_keys()))
    meta = dict(tissue.attrs)
    assert meta["image-label"]["source"] == {"image": "../../"}
    assert meta["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] \
        == [5.0, 5.0, 5.0]
    models = pytest.importorskip("ome_zarr_models.v04.image_label")
    models.ImageLabel.from_zarr(tissue)
    rows = list(csv.DictReader((run / "morph.csv").open()))
    assert [r["region"] for r in rows] == ["sample", "0–20", "20–60"]
    want = morphometry(morphometry_counts(phantom_classes(labels), (5.0, 5.0, 5.0)))
    assert float(rows[0]["bv_tv"]) == pytest.approx(want["bv_tv"])
    assert float(rows[0]["bic"]) == pytest.approx(want["bic"])
    assert float(rows[0]["thickness_mean"]) == pytest.approx(want["thickness_mean"], rel=1e-5)
    assert main(["morph", str(run), "--palette", str(palette)]) == 2   # exists
    assert main(["morph", str(run), "--palette", str(palette), "--regions", "5,1",
                 "--overwrite"]) == 2


def test_morph_palette_from_the_checkpoint_or_a_clear_error(tmp_path, capsys):
    from test_volume_e2e import tiny_checkpoint

    from hpcstain.checkpoint import load_checkpoint, save_checkpoint
    from hpcstain.cli import main

    ckpt, _ = tiny_checkpoint(tmp_path / "old.pt")
    run, labels = fused_run(tmp_path, checkpoint=ckpt)
    assert main(["morph", str(run)]) == 2
    assert "no tissue palette" in capsys.readouterr().err
    payload = load_checkpoint(ckpt)
    stain = np.moveaxis(zarr.open_group(str(run / "fused.ome.zarr"))["0"][:3], 0, -1)
    payload["palette"] = palette_from_labels(stain, labels, phantom_names()).to_dict()
    save_checkpoint(ckpt, payload)          # the run's plan names this path
    assert main(["morph", str(run)]) == 0
    classes = zarr.open_group(str(run / "fused.ome.zarr/labels/tissue"))["0"][...]
    np.testing.assert_array_equal(classes, phantom_classes(labels))


def test_morph_bad_input_is_one_line(tmp_path, capsys):
    from hpcstain.cli import main

    assert main(["morph", str(tmp_path)]) == 2
    assert "fused.ome.zarr" in capsys.readouterr().err
    with pytest.raises(UsageError):
        from hpcstain.morph import parse_regions

        parse_regions("a,b")
