"""2.5D input (``model.context_slices``): k CT planes about the slice as generator channels.

Tiny sizes throughout: 48² phantom pairs with 5-plane slabs, a ResNet of 4 features, one
epoch; the volume tests stain a 14 × 24 × 24 phantom with single 24² tiles.
"""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from hpcstain.checkpoint import load_checkpoint, save_checkpoint
from hpcstain.config import load_config
from hpcstain.ct.conventions import conventions_of
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import PairedPatchDataset, load_slides, with_context
from hpcstain.errors import ConfigError, InputError
from hpcstain.executors import run_stain
from hpcstain.inference import checkpoint_conventions
from hpcstain.models.gans import architecture_of
from hpcstain.phantom import write_pairs, write_volume_file
from hpcstain.volume import init_run, make_plan, open_volume
from hpcstain.volume.rundir import axis_store

TINY = ["data.n_folds=0", "data.n_test=1", "data.patches_per_pair=2", "train.epochs=1",
        "model.ngf=4", "model.ndf=4", "model.n_blocks=1", "data.patch_size=32",
        "data.rot90=true"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Three mixed-orientation pairs (z, y, x) with 5-plane CT slabs."""
    out = tmp_path_factory.mktemp("pairs") / "p"
    return write_pairs(out, 3, seed=5, size=(48, 48), orientation="mixed", ct_slab=5)


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory) -> Path:
    """A k = 3 model after one tiny epoch: its latest checkpoint."""
    from hpcstain.train.trainer import train

    run = tmp_path_factory.mktemp("train-k3")
    cfg = load_config("modcyclegan-tiny", [f"data.manifest={pairs}", *TINY,
                                           "model.context_slices=3"])
    return train(cfg, run, progress=False).checkpoint


def test_default_is_one_slice_and_bad_values_are_refused():
    cfg = load_config("modcyclegan-tiny")
    assert cfg.model.context_slices == 1
    assert "context_slices" not in architecture_of(cfg.model)  # k = 1 checkpoints unchanged
    for bad in ("2", "0", "-1", "true"):
        with pytest.raises(ConfigError, match="context_slices"):
            load_config("modcyclegan-tiny", [f"model.context_slices={bad}"])


def test_phantom_slab_centre_is_the_pair_ct_and_nothing_else_changes(pairs, tmp_path):
    plain = write_pairs(tmp_path / "plain", 3, seed=5, size=(48, 48), orientation="mixed")
    for sub in ("ct", "histology", "mask", "truth", "labels"):
        for f in sorted((plain.parent / sub).iterdir()):
            assert filecmp.cmp(f, pairs.parent / sub / f.name, shallow=False), f
    rows = list(csv.DictReader(pairs.open()))
    assert [r["orientation"] for r in rows] == ["z", "y", "x"]
    for r in rows:
        slab = tifffile.imread(pairs.parent / r["ct_slab"])
        ct = tifffile.imread(pairs.parent / r["ct"])
        assert slab.shape == (5, 48, 48) and slab.dtype == np.uint16
        assert np.array_equal(slab[2], ct)
        # neighbours are other planes, further ones differ more (the sample varies smoothly)
        near = np.abs(slab[1].astype(float) - ct).mean()
        far = np.abs(slab[0].astype(float) - ct).mean()
        assert 0 < near < far


def test_three_plane_slab_is_the_centre_of_the_five_plane_one(pairs):
    from hpcstain.phantom.pairs import allocate_materials, render_ct_slab

    seeds = np.random.default_rng([5, 0x5EED]).integers(0, 2**62, size=3)
    mats = allocate_materials(3, 5)
    for i in range(3):
        five = render_ct_slab(mats[i], int(seeds[i]), (48, 48), 5, i, "mixed", 5)
        three = render_ct_slab(mats[i], int(seeds[i]), (48, 48), 5, i, "mixed", 3)
        assert np.array_equal(five[1:4], three)


def test_sampler_gives_k_planes_aligned_with_the_slice(pairs, tmp_path):
    cfg = load_config("modcyclegan-tiny", [f"data.manifest={pairs}", *TINY]).data
    plist = read_manifest(pairs)
    slides = with_context(load_slides(plist, cfg), plist, cfg, 3)
    ds = PairedPatchDataset(slides, cfg, context_slices=3, seed=3)
    plain = PairedPatchDataset(load_slides(plist, cfg), cfg, seed=3)
    for i in range(len(ds)):
        item, ref = ds[i], plain[i]
        assert item["ct_context"].shape == (3, 32, 32)
        # same crop, resample, dihedral transform and jitter as the slice (and the
        # histology): the centre plane is the slice bit for bit; k = 1 items are unchanged
        assert torch.equal(item["ct_context"][1], item["ct"][0])
        for key in ("ct", "histology", "mask"):
            assert torch.equal(item[key], ref[key])
        assert "ct_context" not in ref

    # neighbours stay registered: a slab whose planes are the slice + d·500 grey values
    # keeps a spatially constant difference to the slice through every augmentation
    base, row = pairs.parent, next(csv.DictReader(pairs.open()))
    ct = tifffile.imread(base / row["ct"]).astype(np.int32)
    np.save(tmp_path / "s.npy", np.stack([ct + d * 500 for d in (-1, 0, 1)]).astype(np.uint16))
    (tmp_path / "m.csv").write_text(
        "id,material,ct,histology,mask,ct_slab\n"
        f"{row['id']},{row['material']},{base / row['ct']},{base / row['histology']},"
        f"{base / row['mask']},{tmp_path / 's.npy'}\n")
    shifted = read_manifest(tmp_path / "m.csv")
    sl = with_context(load_slides(shifted, cfg), shifted, cfg, 3)
    ds = PairedPatchDataset(sl, cfg, context_slices=3, seed=1)
    for i in range(len(ds)):
        c = ds[i]["ct_context"]
        for d in (0, 2):
            diff = (c[d] - c[1])[(c[d].abs() < 0.99) & (c[1].abs() < 0.99)]
            assert float(diff.std()) < 1e-4 and abs(float(diff.mean())) > 1e-3


def test_pair_without_slab_is_one_clear_error_naming_the_file(tmp_path):
    plain = write_pairs(tmp_path / "plain", 2, seed=5, size=(48, 48))
    cfg = load_config("modcyclegan-tiny", [f"data.manifest={plain}", *TINY]).data
    plist = read_manifest(plain)
    with pytest.raises(InputError, match=r"ct/pair_000\.tif: a 3-slice .*ct_slab"):
        with_context(load_slides(plist, cfg), plist, cfg, 3)


def test_k3_training_runs_and_its_checkpoint_records_k3(trained):
    ckpt = load_checkpoint(trained)
    assert ckpt["architecture"]["context_slices"] == 3
    assert conventions_of(ckpt).context_slices == 3
    old = dict(ckpt, architecture={k: v for k, v in ckpt["architecture"].items()
                                   if k != "context_slices"})
    assert conventions_of(old).context_slices == 1  # checkpoints from before read as one


# --------------------------------------------------------------------------- volumes


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vol") / "v.zarr"
    write_volume_file(path, (14, 24, 24), "mg", seed=3)
    return f"{path}:ct"


def stain(volume: str, checkpoint: Path, run: Path, chunk: int, axes: str = "z,y"
          ) -> dict[str, np.ndarray]:
    plan = make_plan(open_volume(volume), chunk=chunk, axes=axes, tile=24, step=16,
                     sigma=1.0, checkpoint=str(checkpoint))
    init_run(run, plan)
    run_stain(run, executor="local", batch_size=8, device="cpu", progress=False)
    return {a: zarr.open_array(str(axis_store(run, a)), mode="r")[:] for a in plan.axes}


def test_stain_with_k3_is_chunk_invariant(trained, volume, tmp_path):
    a = stain(volume, trained, tmp_path / "a", chunk=14)
    b = stain(volume, trained, tmp_path / "b", chunk=5)
    assert make_plan(open_volume(volume), checkpoint=str(trained)).context_slices == 3
    for axis in a:
        assert np.array_equal(a[axis], b[axis]), axis


def _one_plane_checkpoints(trained: Path, tmp_path: Path, plane: int) -> tuple[Path, Path]:
    """A k = 3 checkpoint whose first layer reads only input plane ``plane`` (0: the slice
    before, 2: the one after), and the k = 1 checkpoint with the same weights: it sees the
    slice on every channel, so it computes what the k = 3 one does on that plane alone."""
    ckpt = load_checkpoint(trained)
    gen = {k: v.clone() for k, v in ckpt["model"]["generators"]["ct2hist"].items()}
    first = next(k for k, v in gen.items() if v.ndim == 4)
    w = torch.zeros_like(gen[first])
    w[:, 0] = gen[first].sum(1)  # any weights; all in channel 0
    if plane == 2:
        w = w.flip(1)
    gen[first] = w
    k3 = dict(ckpt, model={"generators": {"ct2hist": gen}})
    k1 = dict(k3, architecture={k: v for k, v in ckpt["architecture"].items()
                                if k != "context_slices"})
    paths = tmp_path / f"k3-{plane}.pt", tmp_path / f"k1-{plane}.pt"
    save_checkpoint(paths[0], k3)
    save_checkpoint(paths[1], k1)
    assert checkpoint_conventions(paths[1]).context_slices == 1
    return paths


@pytest.mark.parametrize("plane", [0, 2])
def test_neighbour_planes_are_the_right_slices_in_order(trained, volume, tmp_path, plane):
    k3, k1 = _one_plane_checkpoints(trained, tmp_path, plane)
    out3 = stain(volume, k3, tmp_path / "r3", chunk=5)
    out1 = stain(volume, k1, tmp_path / "r1", chunk=5)
    shift = -1 if plane == 0 else 1
    for axis, a in (("z", 0), ("y", 1)):
        n = out1[axis].shape[a]
        src = np.abs(np.arange(n) + shift)            # mirrored at the border (edge once)
        src = np.where(src >= n, 2 * (n - 1) - src, src)
        expect = np.take(out1[axis], src, axis=a)
        assert np.abs(expect.astype(int) - out3[axis]).max() <= 1, axis
        wrong = np.take(out1[axis], np.clip(np.arange(n) - shift, 0, n - 1), axis=a)
        assert np.abs(wrong.astype(int) - out3[axis]).mean() > 1.0  # the test can fail


def test_constant_slab_equals_the_one_slice_model(trained, tmp_path, pairs):
    """2D predict: a stack of identical planes through the k = 3 model is the k = 1 model
    with the same weights (it sees the slice repeated on its 3 channels)."""
    from hpcstain.predict import predict_files

    ct = tifffile.imread(pairs.parent / "ct" / "pair_000.tif")
    np.save(tmp_path / "stack.npy", np.stack([ct] * 5))
    ckpt = load_checkpoint(trained)
    k1 = dict(ckpt, architecture={k: v for k, v in ckpt["architecture"].items()
                                  if k != "context_slices"})
    save_checkpoint(tmp_path / "k1.pt", k1)
    levels = (20000.0, 10000.0)  # given: a 48² slide is too small to read them reliably
    a = predict_files([str(tmp_path / "stack.npy")], trained, tmp_path / "a.png",
                      levels=levels)
    b = predict_files([str(pairs.parent / "ct" / "pair_000.tif")], tmp_path / "k1.pt",
                      tmp_path / "b.png", levels=levels)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(b[0])))
    with pytest.raises(InputError, match=r"pair_000\.tif: this 2\.5D model"):
        predict_files([str(pairs.parent / "ct" / "pair_000.tif")], trained, tmp_path / "c.png",
                      levels=levels)


def test_evaluate_uses_the_slab_or_refuses(trained, pairs, tmp_path):
    from hpcstain.evaluate import evaluate_manifest

    report = evaluate_manifest(pairs, trained, tmp_path / "ev", patch=16, log=lambda _m: None)
    assert report.rows
    plain = write_pairs(tmp_path / "plain", 2, seed=5, size=(48, 48))
    with pytest.raises(InputError, match=r"ct/pair_000\.tif: a 3-slice"):
        evaluate_manifest(plain, trained, tmp_path / "ev2", patch=16, log=lambda _m: None)


def test_info_names_the_context_slices(trained):
    from hpcstain.info import checkpoint_report, format_checkpoint

    text = format_checkpoint(checkpoint_report(str(trained)))
    assert "2.5D" in text and "3 CT planes per slice" in text
