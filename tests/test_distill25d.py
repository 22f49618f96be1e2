"""Distilling a 2.5D teacher (model.context_slices K > 1) into a student with its K planes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from micro import MICRO_DISTILL, untrained_generator_checkpoint

from hpcstain.checkpoint import load_checkpoint
from hpcstain.config import load_config
from hpcstain.errors import ConfigError, InputError
from hpcstain.inference import conventions_of, load_generator
from hpcstain.train.teacher import (
    PLANES_FILE,
    DistillPatchDataset,
    Plane,
    _label,
    adopt_teacher,
    build_planes,
    load_planes,
    teacher_overrides,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 5  # the CPU reference recipe's context (configs/tissue-cpu-k5.yaml)
MICRO = MICRO_DISTILL


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hpcstain.phantom import write_pairs, write_volume_file

    root = tmp_path_factory.mktemp("distill25d")
    manifest = write_pairs(root / "pairs", n=4, seed=3, size=(64, 64), ct_slab=K)
    volume = write_volume_file(root / "target.zarr", (12, 40, 40), "mg", seed=1)
    # untrained, with weights large enough that its answer varies with every input plane
    teacher = untrained_generator_checkpoint(root / "teacher.pt", variant="pix2pix",
                                             context_slices=K, init_gain=1.0)
    flat = untrained_generator_checkpoint(root / "teacher-k1.pt", variant="pix2pix")
    return {"manifest": manifest, "volume": volume, "teacher": teacher, "flat": flat,
            "root": root}


def student_args(d: dict[str, Path], teacher: Path | None = None) -> list[str]:
    return [*teacher_overrides(teacher or d["teacher"]), f"data.manifest={d['manifest']}",
            f'distill.volumes=["{d["volume"]}:ct"]', *MICRO]


def stain_axes(volume: Path, checkpoint: Path, out: Path) -> dict[str, np.ndarray]:
    """`hpcstain stain` (default tiling, the checkpoint's sigma) → the per-axis RGB arrays."""
    import zarr

    from hpcstain.cli import main

    assert main(["stain", f"{volume}:ct", "--checkpoint", str(checkpoint), "--out", str(out),
                 "--chunk", "8", "--no-progress"]) == 0
    return {a: zarr.open_array(str(out / f"axis-{a}.zarr"), mode="r")[...] for a in "zyx"}


def section(stained: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Slice ``…:z5`` of a stain run as a (3, H, W) label."""
    where = name.rsplit(":", 1)[1]
    rgb = np.take(stained[where[0]], int(where[1:]), axis="zyx".index(where[0]))
    return np.moveaxis(rgb, -1, 0)


def assert_same_stain(label: np.ndarray, stained: np.ndarray, name: str) -> None:
    """Equal but for float32 rounding (the stain run prepares and batches a slab of slices
    at a time, the label one slice: ~1e-6 apart, so a rare uint8 value lands one off)."""
    diff = np.abs(label.astype(int) - stained.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (name, diff.max(), (diff > 0).mean())


def test_the_teachers_labels_are_what_stain_writes_for_those_slices(data, tmp_path):
    """Every labelled slice (with slices 1 and n-2, whose context planes are mirrored at the
    volume border) equals the teacher's own `hpcstain stain` output of that slice, axis by
    axis; fed copies of the section instead, the labels would differ."""
    cfg = adopt_teacher(load_config("student-fast", [
        *student_args(data), "distill.use_pairs=false", "distill.slices_per_axis=40"]))
    assert cfg.model.context_slices == K
    groups, _ = build_planes(cfg, tmp_path / "run")
    planes = groups["train"]
    names = {p.name.rsplit(":", 1)[1] for p in planes}
    assert {"z1", "z10", "y1", "x38"} <= names  # border slices: mirrored context
    stained = stain_axes(data["volume"], data["teacher"], tmp_path / "stain")
    teacher = load_generator(data["teacher"])
    differs = 0
    for p in planes:
        assert p.context is not None and p.context.shape == (K, *p.shape), p.name
        np.testing.assert_array_equal(p.context[K // 2], p.ct)
        assert_same_stain(p.label, section(stained, p.name), p.name)
        copies = _label(teacher, np.repeat(p.ct[None], K, axis=0))
        differs += int((np.abs(copies.astype(int) - p.label) > 1).mean() > 0.05)
    assert differs == len(planes)


def test_a_2p5d_teacher_distils_into_a_student_that_stain_reads_with_its_planes(data, tmp_path,
                                                                               capsys):
    from hpcstain.cli import main

    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(data["teacher"]), "--config", "student-fast",
                 "--out", str(run), "--volume", f"{data['volume']}:ct", "--pairs",
                 str(data["manifest"]), "--no-progress", *MICRO, "train.max_steps=4",
                 "distill.axes=z"]) == 0  # (y/x planes of the tiny volume: < a patch)
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.model.context_slices == K
    ckpt = run / "checkpoints" / "latest.pt"
    student = load_checkpoint(ckpt)
    assert student["architecture"]["context_slices"] == K
    assert conventions_of(student).context_slices == K
    assert conventions_of(student) == conventions_of(load_checkpoint(data["teacher"]))

    # the cached planes: pair planes from each pair's ct_slab, volume planes with context
    key = str(np.load(run / "cache" / PLANES_FILE)["key"])
    assert json.loads(key)["context_slices"] == K
    planes = load_planes(run / "cache" / PLANES_FILE, key)["train"]
    assert {p.name.split(":")[0] for p in planes} == {"pair", "target.zarr"}
    assert all(p.context is not None and p.context.shape[0] == K for p in planes)

    capsys.readouterr()
    assert main(["info", "--checkpoint", str(ckpt)]) == 0
    assert f"2.5D: the slice and its neighbours, {K} CT planes" in capsys.readouterr().out
    stained = stain_axes(data["volume"], ckpt, tmp_path / "stain")
    stainer = load_generator(ckpt)
    assert stainer.context_slices == K
    volume = [p for p in planes if p.name.startswith("target.zarr")]
    for p in volume:  # stain fed the student the K planes of each slice, as it was trained
        assert_same_stain(_label(stainer, p.context), section(stained, p.name), p.name)
    assert all((np.abs(_label(stainer, np.repeat(p.ct[None], K, 0)).astype(int)
                       - section(stained, p.name)) > 1).mean() > 0.01 for p in volume)


def test_patches_carry_the_k_planes_transformed_like_the_section(data):
    """Crop, flips and rotations: the same on every plane, the centre plane is the section;
    inverted with data.invert_ct; the DistillModel feeds the K planes to its student."""
    from hpcstain.models.distill import DistillModel

    cfg = adopt_teacher(load_config("student-fast", student_args(data)))
    cfg.data.invert_ct = True  # (the teacher's convention would be taken otherwise)
    rng = np.random.default_rng(0)
    ctx = rng.uniform(-1, 1, (K, 40, 48)).astype(np.float32)
    plane = Plane("p", ctx[K // 2].copy(), rng.integers(0, 256, (3, 40, 48), dtype=np.uint8),
                  np.ones((40, 48), bool), ctx)
    ds = DistillPatchDataset([plane], cfg.data, cfg.model.ct_channels, seed=1,
                             context_slices=K)
    seen = set()
    for i in range(len(ds)):
        for epoch in range(4):
            ds.set_epoch(epoch)
            item = ds[i]
            slab = item["ct_context"]
            assert slab.shape == (K, 32, 32)
            assert cfg.data.invert_ct
            torch.testing.assert_close(slab[K // 2], item["ct"][0], atol=0, rtol=0)
            # each plane is the same dihedral transform of the same crop of its own plane
            found = _locate(ctx, -slab.numpy())
            assert found is not None
            seen.add(found[1:])
    assert len(seen) > 2  # several transforms were drawn
    with pytest.raises(InputError, match="context_slices=1"):
        DistillPatchDataset([plane], cfg.data, cfg.model.ct_channels)

    model = DistillModel(cfg.model, cfg.loss, "cpu")
    batch = {k: v[None] for k, v in ds[0].items() if isinstance(v, torch.Tensor)}
    fake = model._forward_generators(batch)["fake_hist"]
    torch.testing.assert_close(fake, model.generators["ct2hist"](batch["ct_context"]))


def _locate(planes: np.ndarray, patch: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, flip code, turns) with ``patch`` = that dihedral transform of that crop of
    every plane, or None."""
    p = patch.shape[-1]
    for turns in range(4):
        for code in range(4):
            t = np.rot90(patch, -turns, axes=(-2, -1))
            if code & 1:
                t = t[..., ::-1, :]
            if code & 2:
                t = t[..., ::-1]
            for y0 in range(planes.shape[1] - p + 1):
                for x0 in range(planes.shape[2] - p + 1):
                    if np.array_equal(planes[:, y0:y0 + p, x0:x0 + p], t):
                        return y0, x0, code, turns
    return None


def test_a_student_with_other_context_than_its_teacher_is_refused(data, tmp_path, capsys):
    from hpcstain.cli import main

    out = tmp_path / "r"
    assert main(["distill", "--teacher", str(data["teacher"]), "--config", "student-fast",
                 "--out", str(out), "--pairs", str(data["manifest"]), *MICRO,
                 "model.context_slices=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"sees {K} CT plane(s) per slice" in err[0], err
    assert not out.exists()
    with pytest.raises(ConfigError, match="the student has 3"):  # and a 1-plane teacher's
        adopt_teacher(load_config("student-fast", [*student_args(data, data["flat"]),
                                                   "model.context_slices=3"]))
    # the documented `train` spelling without the teacher's overrides: refused, not guessed
    with pytest.raises(ConfigError, match=f"set model.context_slices={K}"):
        adopt_teacher(load_config("student-fast", [f"distill.teacher={data['teacher']}"]))


def test_a_cache_of_the_older_plane_version_is_relabelled_other_inputs_refused(data, tmp_path,
                                                                               capsys):
    """Version 1 (before 2.5D teachers) cached 1-plane labels under a key without
    context_slices: a resumed run from the same inputs relabels (the same planes), a cache
    of other inputs is still refused."""
    from hpcstain.train.trainer import train

    cfg = load_config("student-fast", [*student_args(data, data["flat"]), "distill.axes=z",
                                       "train.max_steps=1"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    path = run / "cache" / PLANES_FILE

    def rewrite_as_version_1(**changes: object) -> dict[str, np.ndarray]:
        with np.load(path) as npz:
            arrays = {f: npz[f] for f in npz.files}
        key = json.loads(str(arrays["key"]))
        assert key["version"] == 2 and key["context_slices"] == 1
        key = {**{k: v for k, v in key.items() if k != "context_slices"}, "version": 1,
               **changes}
        np.savez(path, **{**arrays, "key": np.array(json.dumps(key, sort_keys=True))})
        return arrays

    before = rewrite_as_version_1()
    capsys.readouterr()
    cfg.train.max_steps = 2
    assert train(cfg, run, progress=False).step == 2
    assert "labelled by an older version" in capsys.readouterr().out
    with np.load(path) as npz:
        assert json.loads(str(npz["key"]))["version"] == 2
        for f in before:
            if f != "key":
                np.testing.assert_array_equal(npz[f], before[f], err_msg=f)
    rewrite_as_version_1(slices_per_axis=5)
    cfg.train.max_steps = 3
    with pytest.raises(InputError, match="other inputs"):
        train(cfg, run, progress=False)
