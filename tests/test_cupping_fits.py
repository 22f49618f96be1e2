"""The training set's cupping fit travels in the checkpoint: training stores it, predict and
evaluate apply exactly it (--cupping-fit checkpoint|set|slide), info shows it, checkpoints
from before it was stored still work, and the sampler reads each pair once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from micro import micro_config

from hpcstain.cli import main
from hpcstain.ct.cupping import (
    Cupping,
    apply_cupping,
    fit_cupping,
    fit_slides,
    fits_from_record,
    fits_record,
)
from hpcstain.errors import InputError
from hpcstain.phantom import make_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A stored "training fit" no slide would give itself: the tests can tell it apart.
STORED = Cupping((47.5, 47.5), 48.0, (5000.0,), {"slides": 16})


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three 96² axial phantom CT slides with strong cupping (0.15 = 3000 grey values)."""
    out = tmp_path_factory.mktemp("slides")
    paths = []
    for i, (material, seed) in enumerate([("ti", 4), ("mg", 3), ("peek", 5)]):
        ct = make_volume((1, 96, 96), material, seed, cupping=0.15).ct[0]
        tifffile.imwrite(out / f"s{i}.tif", ct)
        paths.append(out / f"s{i}.tif")
    return paths


@pytest.fixture(scope="module")
def cupped_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom pairs (96²) rendered with strong cupping (0.15: ``phantom.render.CUPPING``
    for axial sections, ``phantom.pairs.CUPPING`` for oblique ones)."""
    import hpcstain.phantom.pairs as phantom_pairs
    import hpcstain.phantom.render as render

    old = render.CUPPING, phantom_pairs.CUPPING
    render.CUPPING = phantom_pairs.CUPPING = 0.15
    try:
        return phantom_pairs.write_pairs(tmp_path_factory.mktemp("pairs") / "p", 3, seed=3,
                                         size=(96, 96))
    finally:
        render.CUPPING, phantom_pairs.CUPPING = old


def radial_checkpoint(path: Path, fits: dict | None) -> Path:
    """A tiny untrained generator checkpoint trained 'with' data.cupping=radial; ``fits``
    None: written like a checkpoint from before the fits were stored."""
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    cfg.data.cupping = "radial"
    model = build_model(cfg.model, cfg.loss, "cpu", seed=0)
    payload = {"architecture": architecture_of(cfg.model), "config": to_dict(cfg),
               "model": model.generator_state_dict()}
    if fits is not None:
        payload["cupping_fits"] = fits_record(fits)
    return save_checkpoint(path, payload)


def by_hand(ct_path: Path, ckpt: Path, cupping: Cupping) -> np.ndarray:
    """The stain of one slide with ``cupping`` applied by hand before predict's path."""
    from hpcstain.inference import load_generator
    from hpcstain.predict import predict_slide

    s = load_generator(ckpt)
    ct = apply_cupping(tifffile.imread(ct_path).astype(np.float32), cupping)
    return predict_slide(ct, s.fn, s.in_channels, target=s.levels,
                         size_multiple=s.conventions.size_multiple)


def predicted(paths: list[Path], ckpt: Path, out: Path, *extra: str) -> list[np.ndarray]:
    from PIL import Image

    assert main(["predict", *map(str, paths), "--checkpoint", str(ckpt), "--out", str(out),
                 *extra]) == 0
    return [np.asarray(Image.open(out / f"{p.stem}.png")) for p in paths]


def test_training_stores_its_set_fit_in_every_checkpoint(cupped_pairs: Path, tmp_path: Path
                                                         ) -> None:
    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.data.manifest import read_manifest, read_pair
    from hpcstain.inference import load_generator, pin_generator
    from hpcstain.train.trainer import train

    cfg = micro_config(cupped_pairs, "train.epochs=1", "train.checkpoint_every=0",
                       "data.cupping=radial")
    result = train(cfg, tmp_path / "run", progress=False)
    expected = fit_slides([read_pair(p).ct for p in read_manifest(cupped_pairs)])
    assert list(expected) == [(96, 96)] and expected[(96, 96)].depth > 0  # a real correction
    latest = load_checkpoint(result.checkpoint)
    assert fits_from_record(latest["cupping_fits"]) == expected
    assert latest["cupping_fits"][0]["slides"] == 3
    for minimum in (tmp_path / "run" / "checkpoints").glob("min-*.pt"):
        assert fits_from_record(load_checkpoint(minimum)["cupping_fits"]) == expected
    assert "cupping_fits" not in (tmp_path / "run" / "split.json").read_text()
    pin_generator(result.checkpoint, tmp_path / "pinned.pt")     # a stain run's copy keeps it
    assert load_generator(tmp_path / "pinned.pt").conventions.stored_fits == expected
    plain = micro_config(cupped_pairs, "train.epochs=1", "train.checkpoint_every=0")
    assert "cupping_fits" not in load_checkpoint(train(plain, tmp_path / "p", progress=False)
                                                 .checkpoint)


def test_predict_applies_exactly_the_stored_fit(slides: list[Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = radial_checkpoint(tmp_path / "ck.pt", {(96, 96): STORED})
    alone = predicted(slides[:1], ckpt, tmp_path / "one")[0]
    together = predicted(slides, ckpt, tmp_path / "all")
    expected = [by_hand(p, ckpt, STORED) for p in slides]
    np.testing.assert_array_equal(alone, expected[0])   # a single slide: no per-slide fit
    for got, want in zip(together, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert "cupping:" not in capsys.readouterr().err       # nothing to note
    # --cupping-fit slide: each slide alone (the old behaviour), a different correction
    own = predicted(slides[:1], ckpt, tmp_path / "slide", "--cupping-fit", "slide")[0]
    slide_fit = fit_cupping(tifffile.imread(slides[0]).astype(np.float32))
    assert abs(slide_fit.depth - STORED.depth) > 500
    np.testing.assert_array_equal(own, by_hand(slides[0], ckpt, slide_fit))
    assert np.abs(own.astype(int) - alone.astype(int)).max() > 0
    # --cupping-fit set: the training rule over the given slides
    pooled = fit_slides([tifffile.imread(p).astype(np.float32) for p in slides])[(96, 96)]
    got = predicted(slides, ckpt, tmp_path / "set", "--cupping-fit", "set")
    for g, p in zip(got, slides, strict=True):
        np.testing.assert_array_equal(g, by_hand(p, ckpt, pooled))
    assert "cupping: --cupping-fit set; fitted one correction" in capsys.readouterr().err


def test_a_slide_size_never_trained_on_is_set_fitted_and_noted(slides: list[Path],
                                                               tmp_path: Path) -> None:
    from hpcstain.predict import predict_files

    ckpt = radial_checkpoint(tmp_path / "ck.pt", {(128, 128): STORED})
    notes: list[str] = []
    predict_files([str(p) for p in slides], ckpt, tmp_path / "out", log=notes.append)
    assert len(notes) == 1
    assert "no training fit for this slide size (the checkpoint has 128×128)" in notes[0]
    assert "96×96: " in notes[0] and "3 slides" in notes[0]


def test_old_checkpoints_without_a_stored_fit_still_work(slides: list[Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from hpcstain.inference import load_generator

    old = radial_checkpoint(tmp_path / "old.pt", None)
    conv = load_generator(old).conventions
    assert conv.cupping == "radial" and conv.cupping_fits == ()
    got = predicted(slides[:2], old, tmp_path / "out")
    pooled = fit_slides([tifffile.imread(p).astype(np.float32) for p in slides[:2]])[(96, 96)]
    for g, p in zip(got, slides[:2], strict=True):
        np.testing.assert_array_equal(g, by_hand(p, old, pooled))
    assert "the checkpoint stores no training fit" in capsys.readouterr().err
    assert main(["info", "--checkpoint", str(old)]) == 0
    assert "cupping: radial; no stored training fit" in capsys.readouterr().out


def test_info_shows_the_stored_fit_and_a_bad_record_is_one_error(tmp_path: Path,
                                                                 capsys) -> None:
    import json

    from hpcstain.checkpoint import load_checkpoint, save_checkpoint
    from hpcstain.inference import load_generator

    ckpt = radial_checkpoint(tmp_path / "ck.pt", {(96, 96): STORED})
    assert main(["info", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "cupping: radial; training fit 96×96: +5000 grey values on the axis (16 slides" in out
    assert main(["info", "--checkpoint", str(ckpt), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["conventions"]["cupping_fits"]
    assert fits_from_record(record) == {(96, 96): STORED}
    payload = load_checkpoint(ckpt)
    payload["cupping_fits"] = [{"shape": [96, 96], "fit": {"model": "other"}}]
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(InputError, match=r"bad\.pt: bad cupping record"):
        load_generator(tmp_path / "bad.pt")


@pytest.mark.parametrize("fit", ["abc", [1, 2], {**STORED.to_dict(), "radius": 10 ** 400},
                                 {**STORED.to_dict(), "info": {"slides": None}}])
def test_a_wrong_type_in_the_stored_fits_is_one_error_not_a_crash(fit) -> None:
    with pytest.raises(InputError, match="ck.pt: bad"):
        fits_from_record([{"shape": [96, 96], "fit": fit}], "ck.pt")


def test_evaluate_applies_the_stored_fit(cupped_pairs: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from hpcstain.data.manifest import read_manifest, read_pair
    from hpcstain.data.masks import load_or_compute_mask
    from hpcstain.data.sampler import pair_rois
    from hpcstain.evaluate import evaluate_manifest
    from hpcstain.inference import load_generator
    from hpcstain.predict import predict_slide
    from hpcstain.tiles import PAPER_TILING

    ckpt = radial_checkpoint(tmp_path / "ck.pt", {(96, 96): STORED})
    pair = read_manifest(cupped_pairs)[0]
    notes: list[str] = []
    report = evaluate_manifest(cupped_pairs, ckpt, tmp_path / "ev", ids=[pair.id], patch=32,
                               log=notes.append)
    assert report.summary["cupping"] == {"fit": "checkpoint", "depth": {pair.id: 5000.0}}
    assert not [n for n in notes if n.startswith("cupping")]
    # by hand: the pair's CT corrected with the stored fit, ROIs and levels on it (training)
    s = load_generator(ckpt)
    images = read_pair(pair)
    ct = apply_cupping(images.ct, STORED)
    rois = pair_rois(pair, ct, images.histology)
    want = predict_slide(ct, s.fn, s.in_channels, rois=rois, tiling=PAPER_TILING,
                         target=s.levels, size_multiple=s.conventions.size_multiple)
    mask = load_or_compute_mask(pair, replace(images, ct=ct), rois, None)
    from PIL import Image

    got = np.asarray(Image.open(tmp_path / "ev" / "slides" / f"{pair.id}.png"))
    np.testing.assert_array_equal(got[mask], want[mask])
    per_slide = evaluate_manifest(cupped_pairs, ckpt, tmp_path / "ev2", ids=[pair.id],
                                  patch=32, cupping_fit="slide", log=notes.append)
    assert per_slide.summary["cupping"]["depth"][pair.id] != 5000.0


def test_load_slides_reads_each_pair_once(cupped_pairs: Path, monkeypatch) -> None:
    import hpcstain.data.sampler as sampler
    from hpcstain.config import DataConfig
    from hpcstain.data.manifest import read_manifest

    pairs = read_manifest(cupped_pairs)
    reads: list[str] = []
    original = sampler.read_pair
    monkeypatch.setattr(sampler, "read_pair", lambda p, **kw: reads.append(p.id) or
                        original(p, **kw))
    got = sampler.load_slides(pairs, DataConfig(cupping="radial"))
    assert sorted(reads) == sorted(p.id for p in pairs)    # was 3 reads per pair
    pooled = fit_slides([original(p).ct for p in pairs])[(96, 96)]
    assert all(s.cupping == pooled for s in got)
    known = sampler.load_slides(pairs[:1], DataConfig(cupping="radial"), None,
                                {(96, 96): STORED})           # validation: the training fit
    assert known[0].cupping == STORED
    ref = sampler.load_slide(pairs[0], DataConfig(cupping="radial"), None, STORED)
    np.testing.assert_array_equal(known[0].image, ref.image)
