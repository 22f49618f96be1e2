"""Knowledge distillation: the student learns the teacher, is an ordinary checkpoint, resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from micro import MICRO_DISTILL, StopAfter

from hpcstain.checkpoint import load_checkpoint, save_checkpoint
from hpcstain.config import Config, load_config, to_dict
from hpcstain.errors import InputError
from hpcstain.inference import conventions_of, load_generator
from hpcstain.models.distill import DistillModel
from hpcstain.train.logs import read_losses
from hpcstain.train.teacher import (
    Plane,
    _label,
    held_out_l1,
    sample_mask,
    teacher_overrides,
    volume_units,
)
from hpcstain.train.trainer import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The teacher's conventions differ from the defaults, so adopting them is visible.
TEACHER_DATA = {"ct_bone_level": 28000.0, "ct_background_level": 11000.0, "invert_ct": True,
                "cupping": "radial"}
MICRO = MICRO_DISTILL


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hpcstain.models import architecture_of, build_model
    from hpcstain.phantom import write_pairs, write_volume_file

    root = tmp_path_factory.mktemp("distill")
    manifest = write_pairs(root / "pairs", n=4, seed=3, size=(64, 64), orientation="mixed")
    volume = write_volume_file(root / "target.zarr", (32, 48, 48), "mg", seed=1)
    other = write_volume_file(root / "other.zarr", (32, 48, 48), "mg", seed=2)
    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 8, 4, 1
    for k, v in TEACHER_DATA.items():
        setattr(cfg.data, k, v)
    teacher = build_model(cfg.model, cfg.loss, "cpu", seed=5)
    save_checkpoint(root / "teacher.pt", {"architecture": architecture_of(cfg.model),
                                          "config": to_dict(cfg), "model": teacher.state_dict()})
    return {"manifest": manifest, "volume": volume, "other": other,
            "teacher": root / "teacher.pt"}


def student_config(d: dict[str, Path], *extra: str) -> Config:
    return load_config("student-fast", [*teacher_overrides(d["teacher"]),
                                        f"data.manifest={d['manifest']}",
                                        f'distill.volumes=["{d["volume"]}:ct"]', *MICRO,
                                        *extra])


def held_out_planes(d: dict[str, Path]) -> list[Plane]:
    """Teacher-labelled slices of a volume the student never saw, along z, y and x."""
    stainer = load_generator(d["teacher"])
    target = stainer.conventions.target_levels
    units = volume_units(f"{d['other']}:ct", ["z", "y", "x"], 2, 1.0, target, str(d["teacher"]))
    return [Plane(n, u, _label(stainer, u), sample_mask(u, target, 2)) for n, u in units]


def test_volume_slices_are_prepared_exactly_as_stain_prepares_them(data):
    """Cupping fit, levels, Gaussian, target levels: the teacher labels what stain feeds it."""
    from hpcstain.ct.prepare import prepare_block
    from hpcstain.volume import make_plan, open_volume

    src = open_volume(f"{data['volume']}:ct")
    plan = make_plan(src, chunk=16, axes="z,y,x", tile=32, step=16,
                     checkpoint=str(data["teacher"]))
    assert plan.cupping  # the teacher was trained with the radial correction
    units = volume_units(f"{data['volume']}:ct", ["z", "y", "x"], 2, plan.sigma,
                         plan.target_levels, str(data["teacher"]))
    whole = prepare_block(src, tuple(slice(0, n) for n in src.shape), plan.ct_recipe)
    assert len(units) == 6
    for name, unit in units:
        where = name.rsplit(":", 1)[1]
        expected = np.take(whole, int(where[1:]), axis="zyx".index(where[0]))
        np.testing.assert_allclose(unit, expected, rtol=0, atol=1e-5, err_msg=name)


def student_net(ckpt: Path) -> torch.nn.Module:
    from hpcstain.inference import generator_net

    return generator_net(load_checkpoint(ckpt), "ct2hist", str(ckpt), "cpu")


def test_distilling_lowers_the_students_l1_to_the_teacher_on_held_out_ct(data, tmp_path):
    from hpcstain.cli import main

    run = tmp_path / "run"
    rc = main(["distill", "--teacher", str(data["teacher"]), "--config", "student-fast",
               "--out", str(run), "--volume", f"{data['volume']}:ct", "--pairs",
               str(data["manifest"]), "--no-progress", *MICRO, "train.epochs=3"])
    assert rc == 0
    cfg = load_config(str(run / "config.yaml"))
    for k, v in TEACHER_DATA.items():  # the teacher's conventions, not the profile's
        assert getattr(cfg.data, k) == v
    split = __import__("json").loads((run / "split.json").read_text())
    assert sum(p.startswith("target.zarr:") for p in split["planes"]) == 9  # 3 per axis
    assert len(split["test_ids"]) == 1 and split["test_ids"][0] not in split["train_ids"]

    planes = held_out_planes(data)
    untrained = DistillModel(cfg.model, cfg.loss, "cpu", seed=cfg.train.seed)
    before = held_out_l1(untrained.generators["ct2hist"], planes, invert_ct=True)
    after = held_out_l1(student_net(run / "checkpoints" / "latest.pt"), planes, invert_ct=True)
    print("held-out L1", before, after)
    assert after < 0.6 * before, (before, after)
    rows = read_losses(run)
    assert np.mean([r["distill_l1"] for r in rows[-5:]]) < np.mean(
        [r["distill_l1"] for r in rows[:5]])


def test_student_checkpoint_runs_through_predict_stain_and_fuse(data, tmp_path):
    from hpcstain.executors import run_stain
    from hpcstain.volume import fuse_run, init_run, make_plan, open_volume

    cfg = student_config(data, "train.max_steps=2")
    train(cfg, tmp_path / "run", progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    teacher = load_checkpoint(data["teacher"])
    student = load_checkpoint(ckpt)
    assert conventions_of(student) == conventions_of(teacher)
    assert student["architecture"]["generator"] == "s2dnet"

    stainer = load_generator(ckpt)  # the inference path: inversion applied by the tile fn
    unit = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    torch.testing.assert_close(stainer.fn(unit), student_net(ckpt)(-unit))

    src = open_volume(f"{data['volume']}:ct")
    plan = make_plan(src, chunk=16, axes="z,y,x", tile=32, step=16, window="hann",
                     checkpoint=str(ckpt))
    run = init_run(tmp_path / "stain", plan)
    report = run_stain(run, progress=False)
    assert len(report.stained) == plan.n_units
    fused = fuse_run(run, method="mean")
    assert fused.complete
    import zarr

    rgba = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")["0"][...]
    assert rgba.shape == (4, 32, 48, 48) and rgba[:3].std() > 0


def test_predict_reads_the_student_like_any_checkpoint(data, tmp_path):
    from hpcstain.data.manifest import read_manifest
    from hpcstain.predict import predict_files

    cfg = student_config(data, "train.max_steps=1", "distill.volumes=[]")
    train(cfg, tmp_path / "run", progress=False)
    from hpcstain.data.manifest import read_pair
    from hpcstain.data.normalise import ct_levels
    from hpcstain.data.sampler import pair_rois

    pair = read_manifest(data["manifest"])[0]
    images = read_pair(pair)  # the slide's own levels (auto-estimation is for real sizes)
    levels = ct_levels(images.ct, pair_rois(pair, images.ct, images.histology))
    outs = predict_files([str(pair.ct)], tmp_path / "run" / "checkpoints" / "latest.pt",
                         tmp_path / "pred", levels=levels)
    assert len(outs) == 1 and Path(outs[0]).is_file()


def test_resume_after_a_signal_continues_exactly(data, tmp_path):
    cfg = student_config(data, "train.epochs=2", "loss.lambda_kd_gan=0.5", "model.pool_size=4")
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", stop=StopAfter(5), progress=False)
    assert first.status == "preempted" and first.step == 5 < straight.step
    second = train(cfg, tmp_path / "b", progress=False)
    assert second.status == "finished" and second.step == straight.step
    la, lb = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    keys = [k for k in la[0] if k not in ("data_wait_s", "step_s")]
    assert {"distill_l1", "G_gan_ct2hist", "D_hist"} <= set(keys)
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]
    wa = load_checkpoint(tmp_path / "a/checkpoints/latest.pt")["model"]["generators"]
    wb = load_checkpoint(tmp_path / "b/checkpoints/latest.pt")["model"]["generators"]
    for k, v in wa["ct2hist"].items():
        torch.testing.assert_close(v, wb["ct2hist"][k], atol=0, rtol=0)


def test_a_changed_teacher_or_volume_list_is_refused_on_resume(data, tmp_path):
    cfg = student_config(data, "train.max_steps=1")
    train(cfg, tmp_path / "run", progress=False)
    other = load_checkpoint(data["teacher"])
    other["model"]["generators"]["ct2hist"] = {
        k: v + 0.01 for k, v in other["model"]["generators"]["ct2hist"].items()}
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(InputError, match="differs from the one this run started with"):
        train(student_config({**data, "teacher": tmp_path / "other.pt"}, "train.max_steps=2"),
              tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="other inputs"):
        train(student_config(data, "train.max_steps=2", "distill.slices_per_axis=2"),
              tmp_path / "run", progress=False)


def test_no_teacher_or_nothing_to_learn_from_is_one_clear_error(data, tmp_path, capsys):
    from hpcstain.cli import main

    assert main(["distill", "--config", "student-fast", "--out", str(tmp_path / "r")]) == 2
    assert "give --teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path / "nope.pt"), "--config",
                 "student-fast", "--out", str(tmp_path / "r")]) == 2
    assert "nope.pt: no such teacher checkpoint" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(data["teacher"]), "--config", "modcyclegan-tiny",
                 "--out", str(tmp_path / "r")]) == 2
    assert "not a student profile" in capsys.readouterr().err
    with pytest.raises(InputError, match="nothing to learn from"):
        train(load_config("student-fast", [*teacher_overrides(data["teacher"]), *MICRO]),
              tmp_path / "r2", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_radial_student_is_corrected_with_and_records_the_teachers_stored_fit(data, tmp_path):
    """A teacher trained with data.cupping=radial stores its training fit; the student's
    pair planes are corrected with exactly that fit (as predict corrects them for the
    teacher), and every student checkpoint carries it, so predict applies it to the
    student too."""
    from hpcstain.ct.cupping import Cupping, fits_from_record, fits_record
    from hpcstain.data.manifest import read_manifest
    from hpcstain.data.sampler import load_slide
    from hpcstain.train.teacher import PLANES_FILE, load_planes

    fit = Cupping((31.5, 31.5), 40.0, (2500.0,), {"slides": 3})
    ckpt = load_checkpoint(data["teacher"])
    teacher = save_checkpoint(tmp_path / "teacher.pt",
                              {**ckpt, "cupping_fits": fits_record({(64, 64): fit})})
    cfg = load_config("student-fast", [*teacher_overrides(teacher),
                                       f"data.manifest={data['manifest']}", *MICRO,
                                       "train.epochs=1"])
    run = tmp_path / "run"
    result = train(cfg, run, progress=False)
    assert fits_from_record(load_checkpoint(result.checkpoint)["cupping_fits"]) == \
        {(64, 64): fit}
    split = __import__("json").loads((run / "split.json").read_text())
    assert "cupping_fits" not in split  # in the checkpoints, not the split record
    key = __import__("numpy").load(run / "cache" / PLANES_FILE)["key"]
    planes = {p.name: p for p in load_planes(run / "cache" / PLANES_FILE, str(key))["train"]}
    by_id = {p.id: p for p in read_manifest(data["manifest"])}
    pid = split["train_ids"][0]
    expected = load_slide(by_id[pid], cfg.data, cupping=fit).ct
    np.testing.assert_array_equal(planes[f"pair:{pid}"].ct, expected)
    own = load_slide(by_id[pid], cfg.data).ct  # a fit of its own would differ
    assert np.abs(own - expected).max() > 1e-3


def test_the_volume_planes_take_the_teachers_stain_sigma(data, tmp_path):
    """distill.sigma follows the teacher's data.stain_sigma (as `stain` feeds the teacher):
    1 for a paper-recipe teacher, 0 for one trained on unblurred slides; an explicit
    distill.sigma still wins."""
    from hpcstain.train.teacher import adopt_teacher

    assert adopt_teacher(student_config(data)).distill.sigma == 1.0
    ckpt = load_checkpoint(data["teacher"])
    ckpt["config"]["data"]["stain_sigma"] = 0.0
    sharp = tmp_path / "teacher-sigma0.pt"
    save_checkpoint(sharp, ckpt)
    cfg = load_config("student-fast", [*teacher_overrides(sharp),
                                       f"data.manifest={data['manifest']}", *MICRO])
    assert cfg.distill.sigma is None  # the profile leaves it to the teacher
    assert adopt_teacher(cfg).distill.sigma == 0.0
    forced = load_config("student-fast", [*teacher_overrides(sharp), "distill.sigma=2",
                                          f"data.manifest={data['manifest']}", *MICRO])
    assert adopt_teacher(forced).distill.sigma == 2.0
