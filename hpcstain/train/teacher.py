"""Knowledge distillation's data: a trained teacher labels CT planes for a student.

``hpcstain distill --teacher CKPT --config student-PROFILE --out RUN [--volume VOL ...]
[--pairs MANIFEST]`` is the trainer (:func:`hpcstain.train.trainer.train`: DDP, resume,
signals, ``submit``) with model variant ``distill``
(:class:`hpcstain.models.distill.DistillModel`); this module is its data:

1. **Conventions.** The student takes the teacher's CT conventions (target levels,
   inversion, channels, histology stretch; :func:`adopt_teacher`), so its checkpoint is an
   ordinary checkpoint that ``predict``, ``evaluate``, ``stain`` and ``fuse`` use unchanged.
2. **Planes.** The teacher labels whole CT planes once, on the main rank, cached in
   ``RUN/cache/distill-planes.npz`` (a resumed run reads them back; changed inputs are
   refused): the CT of the manifest's training pairs (§2.5 with each pair's ROIs, as in
   training) and ``distill.slices_per_axis`` evenly spaced slices of every target volume
   along ``distill.axes``, prepared exactly as ``stain`` prepares them (CT levels estimated
   by :func:`hpcstain.ct.levels.volume_levels`, the 3D Gaussian ``distill.sigma`` (default:
   the teacher's ``data.stain_sigma``),
   :func:`hpcstain.ct.prepare.prepare_block`). Labels are the teacher's output on the default
   tiling, rounded to uint8 like a stain run's output.
   A 2.5D teacher (``model.context_slices`` K > 1; the student takes the same K) labels
   each plane from its K CT planes: a volume slice's neighbours as ``stain`` reads them
   (:func:`hpcstain.ct.prepare.prepare_context`, mirrored at the volume border), a pair's
   from its ``ct_slab`` as training reads them (:func:`hpcstain.data.sampler.with_context`);
   :class:`Plane` keeps them (``context``) and the patches carry them (``ct_context``).
3. **Loss.** ℓ1 of the student to the teacher's label inside the sample (CT above the
   embedding medium, the rule ``fuse`` paints by, grown by ``distill.mask_margin`` px, plus
   a pair's correspondence mask), times ``loss.lambda_l1``; optionally a conditional
   patch-GAN term with weight ``loss.lambda_kd_gan`` (teacher output = real).

Patches are random crops with the dihedral flips/rotations of ``data.flips``/``data.rot90``
(applied to CT, its context planes, label and mask alike); no rescaling or intensity
jitter, which would change what the teacher answers.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import Dataset

from hpcstain.atomic import write_bytes_atomic, write_text_atomic
from hpcstain.checkpoint import read_checkpoint
from hpcstain.config import Config, DataConfig
from hpcstain.ct.conventions import CONVENTION_KEYS
from hpcstain.ct.cupping import fits_record, resolve_cupping
from hpcstain.ct.levels import RawLevels, TargetLevels, require_confident, volume_levels
from hpcstain.ct.outside import outside_threshold
from hpcstain.ct.prepare import CtRecipe, gaussian_halo, prepare_block, prepare_context
from hpcstain.ct.signed import CT_FULL_SCALE
from hpcstain.data.folds import make_folds, split_for_fold, write_folds
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import EpochSampler, _centre_planes, load_slides, with_context
from hpcstain.errors import ConfigError, InputError
from hpcstain.geometry import AXIS_INDEX
from hpcstain.inference import checkpoint_conventions, generator_net, load_generator
from hpcstain.models.flops import flops_per_pixel, parameter_count
from hpcstain.models.gans import generator_in_channels
from hpcstain.models.networks import build_generator
from hpcstain.tiles import auto_batch, plane_tiles, resolve_tiling, stain_image, to_uint8
from hpcstain.train import distributed
from hpcstain.volume.io import CorrectedSource, open_volume

# 2: the key records model.context_slices and a 2.5D teacher's planes carry their K CT
# planes; a version-1 cache of the same inputs (all 1-plane) is relabelled, not reused
PLANES_VERSION = 2
PLANES_FILE = "distill-planes.npz"
TEACHER_FILE = "teacher.json"
MASK_RETRIES = 10


# --------------------------------------------------------------------------- the teacher


def _teacher_checkpoint(path: str) -> dict[str, Any]:
    if not path:
        raise InputError("distill.teacher: no teacher checkpoint given (--teacher CKPT)")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such teacher checkpoint")
    ckpt = read_checkpoint(path).data
    if not isinstance(ckpt.get("architecture"), dict):
        raise InputError(f"{path}: checkpoint has no architecture record")
    return ckpt


def teacher_settings(path: str) -> dict[str, Any]:
    """``{"section.key": value}`` of the teacher's CT conventions and channel counts."""
    ckpt = _teacher_checkpoint(path)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    arch, default = ckpt["architecture"], DataConfig()
    out: dict[str, Any] = {f"data.{k}": data.get(k, getattr(default, k))
                           for k in CONVENTION_KEYS}
    out["model.ct_channels"] = int(arch["ct_channels"])
    out["model.histology_channels"] = int(arch["histology_channels"])
    out["model.context_slices"] = int(arch.get("context_slices", 1))  # 2.5D: its K planes
    return out


def teacher_overrides(path: str | Path) -> list[str]:
    """``section.key=value`` overrides that point a run at ``path`` and its conventions."""
    path = str(Path(path).resolve())
    items = [f"distill.teacher={json.dumps(path)}"]
    items += [f"{k}={json.dumps(v)}" for k, v in teacher_settings(path).items()]
    return items


def adopt_teacher(cfg: Config) -> Config:
    """A copy of ``cfg`` whose CT conventions and channel counts are the teacher's.

    The student sees what the teacher sees: its ``model.context_slices`` must be the
    teacher's (``hpcstain distill --teacher`` sets it, :func:`teacher_overrides`); any other
    value is refused rather than replaced (a 1-plane student of a 2.5D teacher could not
    see the neighbouring planes the teacher's answer depends on).
    """
    if cfg.model.variant != "distill":
        raise ConfigError(f"model.variant: distillation needs variant 'distill', got "
                          f"{cfg.model.variant!r}")
    settings = teacher_settings(cfg.distill.teacher)
    k = settings["model.context_slices"]
    if cfg.model.context_slices != k:
        raise ConfigError(f"model.context_slices: the student has "
                          f"{cfg.model.context_slices}, its teacher {cfg.distill.teacher} "
                          f"sees {k} CT plane(s) per slice; a student takes the teacher's "
                          f"(drop the override, or set model.context_slices={k})")
    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    if out.distill.sigma is None:  # label the volume as `stain` feeds the teacher
        out.distill.sigma = float(out.data.stain_sigma)
    return out


# --------------------------------------------------------------------------- planes


@dataclass
class Plane:
    """One teacher-labelled CT plane: unit CT (not inverted), uint8 label, sample mask;
    for a 2.5D teacher also the K CT planes about it (its input; centre = the section)."""

    name: str
    ct: np.ndarray      # (H, W) float32 in [-1, 1], the generator's input before inversion
    label: np.ndarray   # (3, H, W) uint8: the teacher's output, as a stain run writes it
    mask: np.ndarray    # (H, W) bool: where the loss counts
    context: np.ndarray | None = None  # (K, H, W) float32 in [-1, 1] when K > 1, else None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.ct.shape[0]), int(self.ct.shape[1]))

    @property
    def context_slices(self) -> int:
        return 1 if self.context is None else int(self.context.shape[0])


def sample_mask(unit: np.ndarray, target: TargetLevels | tuple[float, float], margin: int
                ) -> np.ndarray:
    """The sample in a unit-CT plane: above the embedding medium (fuse's rule,
    :func:`hpcstain.ct.outside.outside_threshold` on the target scale), grown."""
    ct16 = (np.asarray(unit, np.float32) + 1.0) * (CT_FULL_SCALE / 2.0)
    inside = ct16 >= outside_threshold(target)
    if margin > 0 and inside.any():
        inside = ndimage.binary_dilation(inside, iterations=int(margin))
    return inside


def _label(stainer: Any, unit: np.ndarray) -> np.ndarray:
    """The teacher's uint8 (3, H, W) answer for one unit-CT plane on the default tiling.

    ``unit`` is the (H, W) plane, or for a 2.5D teacher (``context_slices`` K > 1) its K
    planes (K, H, W), which are the generator's channels as ``stain`` feeds them
    (:func:`hpcstain.volume.stain.stain_slab`: the planes in order along the axis, centre =
    the section; no copies of the section)."""
    tiling = resolve_tiling("default")
    k = stainer.context_slices
    unit = np.asarray(unit, np.float32)
    if k > 1:
        if unit.ndim != 3 or unit.shape[0] != k:
            raise InputError(f"distill: the teacher sees {k} CT planes per slice, got an "
                             f"input of shape {unit.shape}")
        image = unit
    else:
        image = np.repeat(unit[None], stainer.in_channels, axis=0)
    tile, step = plane_tiles(image.shape[-2:], tiling.tile, tiling.step,  # as Plan.plane_tiling
                             stainer.conventions.size_multiple, minimum=min(16, tiling.tile),
                             max_tile=tiling.max_tile)
    out = stain_image(image, stainer.fn, tile=tile, step=step, window=tiling.window,
                      batch_size=auto_batch(tile, "cpu", 0))
    return np.moveaxis(to_uint8(np.moveaxis(out, 0, -1)), -1, 0)


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` distinct indices spread over ``range(n)``, away from the two ends."""
    k = max(0, min(int(k), n))
    return sorted({int(np.rint(v)) for v in np.linspace(0, n - 1, k + 2)[1:-1]}) if k else []


def volume_units(spec: str, axes: list[str], per_axis: int, sigma: float,
                 target_levels: tuple[float, float], teacher: str | None = None,
                 context_slices: int = 1) -> list[tuple[str, np.ndarray]]:
    """(name, unit CT) of evenly spaced slices along ``axes``, prepared as ``stain`` does
    (:func:`hpcstain.ct.prepare.prepare_block`): the cupping correction the teacher was
    trained with (fitted on this volume), CT levels estimated once, the 3D Gaussian, the
    teacher's target levels.

    With ``context_slices`` K > 1 (a 2.5D teacher) each unit is (K, H, W): the slice and
    its (K - 1) / 2 neighbours on each side along the axis, in order (centre = the slice),
    from :func:`hpcstain.ct.prepare.prepare_context` as ``stain`` reads them (mirrored,
    edge not repeated, past the volume border). K = 1 gives (H, W) planes."""
    src = open_volume(spec)
    trained = checkpoint_conventions(teacher).cupping if teacher else None
    fitted = resolve_cupping(src, None, trained, what=str(teacher)) if teacher else None
    estimate = volume_levels(CorrectedSource(src, fitted) if fitted is not None else src)
    try:
        levels = require_confident(estimate).levels
    except InputError as exc:
        raise InputError(f"{spec}: {exc}") from None
    print(f"distill: {spec}: CT levels bone={levels[0]:g} background={levels[1]:g}"
          + (" (cupping-corrected)" if fitted is not None else ""), flush=True)
    k = int(context_slices)
    recipe = CtRecipe(raw=RawLevels(*levels), target=TargetLevels(*target_levels),
                      sigma=sigma, halo=gaussian_halo(sigma), cupping=fitted,
                      context_halo=k // 2)
    shape = tuple(int(n) for n in src.shape)
    out = []
    for axis in axes:
        a = AXIS_INDEX[axis]
        for i in evenly_spaced(shape[a], per_axis):
            inner = tuple(slice(i, i + 1) if d == a else slice(0, n)
                          for d, n in enumerate(shape))
            if k == 1:
                plane = np.take(prepare_block(src, inner, recipe), 0, axis=a)
            else:  # (K, H, W): the planes along the axis first, as stain_slab stacks them
                plane = np.ascontiguousarray(np.moveaxis(
                    prepare_context(src, inner, axis, recipe), a, 0))  # type: ignore[arg-type]
            out.append((f"{Path(str(spec)).name}:{axis}{i}", plane))
    return out


def pair_planes(pairs: list[Any], data: DataConfig, cache: Path, stainer: Any, margin: int,
                cupping_fits: dict[tuple[int, int], Any] | None = None,
                context_slices: int = 1) -> list[Plane]:
    """Teacher-labelled whole slides: §2.5 CT of each pair (with its ROIs), as in training.

    Under ``data.cupping: radial`` slides of a size in ``cupping_fits`` (the teacher's
    stored fits) are corrected with that fit, as ``predict`` would correct them for the
    teacher; other sizes get a fit of their own (:func:`~hpcstain.data.sampler.load_slides`).
    With ``context_slices`` K > 1 each pair's ``ct_slab`` gives the K planes about the
    slice, normalised like it, as training reads them
    (:func:`~hpcstain.data.sampler.with_context`); the teacher labels those.
    """
    k = int(context_slices)
    planes = []
    slides = load_slides(pairs, data, cache, cupping_fits)
    if k > 1:
        slides = with_context(slides, pairs, data, k)
    for slide in slides:
        unit = slide.ct
        mask = sample_mask(unit, (data.ct_bone_level, data.ct_background_level), margin)
        context = _centre_planes(slide.context, k) if k > 1 else None
        planes.append(Plane(f"pair:{slide.id}", unit,
                            _label(stainer, unit if context is None else context),
                            mask | slide.mask.astype(bool), context))
    return planes


def _key(cfg: Config, teacher_sha: str, train_ids: list[str], val_ids: list[str]) -> str:
    d = cfg.distill
    return json.dumps({"version": PLANES_VERSION, "teacher_sha256": teacher_sha,
                       "context_slices": cfg.model.context_slices,
                       "manifest": cfg.data.manifest if d.use_pairs else "",
                       "train_ids": train_ids, "val_ids": val_ids, "volumes": list(d.volumes),
                       "axes": d.axes, "slices_per_axis": d.slices_per_axis,
                       "sigma": d.sigma, "mask_margin": d.mask_margin}, sort_keys=True)


def save_planes(path: Path, key: str, groups: dict[str, list[Plane]]) -> None:
    arrays: dict[str, Any] = {"key": np.array(key)}
    for group, planes in groups.items():
        arrays[f"{group}_names"] = np.array([p.name for p in planes], dtype=str)
        for i, p in enumerate(planes):
            arrays[f"{group}_{i}_ct"] = p.ct.astype(np.float32)
            arrays[f"{group}_{i}_label"] = p.label
            arrays[f"{group}_{i}_mask"] = p.mask
            if p.context is not None:
                arrays[f"{group}_{i}_context"] = p.context.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_planes(path: Path, key: str) -> dict[str, list[Plane]]:
    try:
        with np.load(path) as npz:
            if str(npz["key"]) != key:
                raise InputError(f"{path}: the run's teacher-labelled planes came from other "
                                 "inputs (teacher, manifest, volumes or distill.* settings); "
                                 "distil into a new --out")
            out: dict[str, list[Plane]] = {}
            for group in ("train", "val"):
                names = [str(n) for n in npz[f"{group}_names"]]
                out[group] = [Plane(n, npz[f"{group}_{i}_ct"], npz[f"{group}_{i}_label"],
                                    npz[f"{group}_{i}_mask"],
                                    npz[f"{group}_{i}_context"]
                                    if f"{group}_{i}_context" in npz.files else None)
                              for i, n in enumerate(names)]
            return out
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: unreadable distillation cache ({exc}); delete it to "
                         "relabel") from None


def older_planes(path: Path, key: str) -> bool:
    """Whether the cache at ``path`` was labelled by an older :data:`PLANES_VERSION` from the
    inputs ``key`` names (then it is relabelled; any other difference is refused)."""
    try:
        with np.load(path) as npz:
            old = json.loads(str(npz["key"]))
        new = json.loads(key)
    except (OSError, ValueError, KeyError):
        return False  # load_planes says what is wrong with it
    if not isinstance(old, dict) or old.get("version") == new.get("version"):
        return False
    # before version 2 every distilled teacher (and student) saw one plane
    return {**old, "version": new["version"],
            "context_slices": old.get("context_slices", 1)} == new


def check_teacher(run_dir: Path, teacher: str, sha: str) -> None:
    """Record the teacher's hash in a new run; refuse a resumed run whose teacher changed."""
    record = run_dir / TEACHER_FILE
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("sha256") != sha:
            raise InputError(f"{teacher}: teacher checkpoint differs from the one this run "
                             f"started with ({saved.get('path')}, sha256 "
                             f"{str(saved.get('sha256'))[:16]}…); distil into a new --out")
        return
    write_text_atomic(record, json.dumps({"path": teacher, "sha256": sha}, indent=2))


def build_planes(cfg: Config, run_dir: Path, main: bool = True
                 ) -> tuple[dict[str, list[Plane]], dict[str, Any]]:
    """Teacher-labelled train/val planes (cached) and the split record of the run.

    Only the ``main`` rank labels and writes (cache, folds, teacher record); the others
    read what it wrote.
    """
    d = cfg.distill
    teacher = d.teacher
    _teacher_checkpoint(teacher)
    sha = read_checkpoint(teacher).sha256
    if main:
        check_teacher(run_dir, teacher, sha)
    axes = [a.strip() for a in d.axes.split(",") if a.strip()]
    bad = [a for a in axes if a not in ("z", "y", "x")]
    if bad or not axes:
        raise ConfigError(f"distill.axes: need a comma list of z, y, x, got {d.axes!r}")
    pairs, train_ids, val_ids, test_ids = [], [], [], []
    if d.use_pairs and cfg.data.manifest:
        pairs = read_manifest(cfg.data.manifest)
        folds = make_folds(pairs, n_folds=cfg.data.n_folds, n_test=cfg.data.n_test,
                           seed=cfg.data.seed)
        if main:
            write_folds(run_dir / "folds.json", folds)
        train_ids, val_ids = split_for_fold(folds, cfg.data.fold)
        test_ids = list(folds.test_ids)
        if cfg.train.val_every <= 0:
            val_ids = []
    if not train_ids and not d.volumes:
        raise InputError("distill: nothing to learn from: give training pairs "
                         "(data.manifest / --pairs) or target volumes (--volume)")
    key = _key(cfg, sha, list(train_ids), list(val_ids))
    cache = run_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / PLANES_FILE
    if main and path.exists() and older_planes(path, key):
        print(f"distill: {path}: labelled by an older version of distillation from the "
              "same inputs; relabelling", flush=True)
        path.unlink()
    k = cfg.model.context_slices
    if path.exists() or not main:
        groups = load_planes(path, key)
    else:
        stainer = load_generator(teacher, cfg.train.device)  # [device] auto: the GPU if any
        target = (cfg.data.ct_bone_level, cfg.data.ct_background_level)
        by_id = {p.id: p for p in pairs}
        fits = stainer.conventions.stored_fits
        groups = {
            "train": pair_planes([by_id[i] for i in train_ids], cfg.data, cache, stainer,
                                 d.mask_margin, fits, k),
            "val": pair_planes([by_id[i] for i in val_ids], cfg.data, cache, stainer,
                               d.mask_margin, fits, k)}
        for spec in d.volumes:
            for name, unit in volume_units(spec, axes, d.slices_per_axis, d.sigma, target,
                                           teacher, k):
                centre = unit if k == 1 else unit[k // 2]  # the section
                groups["train"].append(Plane(name, centre, _label(stainer, unit),
                                             sample_mask(centre, target, d.mask_margin),
                                             None if k == 1 else unit))
        save_planes(path, key, groups)
    split = {"train_ids": list(train_ids), "val_ids": list(val_ids), "test_ids": test_ids,
             "teacher": teacher, "teacher_sha256": sha,
             "planes": [p.name for p in groups["train"]]}
    if cfg.data.cupping == "radial":  # the student is corrected, and records, as the teacher
        fits = checkpoint_conventions(teacher).stored_fits
        if fits:  # into every checkpoint of the student (the trainer pops it)
            split["cupping_fits"] = fits_record(fits)
    return groups, split


def describe(cfg: Config) -> str:
    """One line: student and teacher generators with parameters and FLOP per pixel."""
    c = generator_in_channels(cfg.model)  # a 2.5D student takes K planes, else ct_channels
    student = build_generator(cfg.model, c, cfg.model.histology_channels)
    teacher = generator_net(_teacher_checkpoint(cfg.distill.teacher), "ct2hist",
                             cfg.distill.teacher, "cpu")
    fs, ft = flops_per_pixel(student, c), flops_per_pixel(teacher, c)
    k = cfg.model.context_slices
    return (f"distill: student {cfg.model.generator} ngf {cfg.model.ngf} blocks "
            f"{cfg.model.n_blocks}{f' (2.5D, {k} CT planes)' if k > 1 else ''}: "
            f"{parameter_count(student):,} parameters, "
            f"{fs / 1e3:.1f} kFLOP/px; teacher {parameter_count(teacher):,} parameters, "
            f"{ft / 1e3:.1f} kFLOP/px ({ft / max(fs, 1.0):.1f}× the student's)")


def build_distill_data(cfg: Config, run_dir: Path, env: Any
                       ) -> tuple[Any, Any | None, Any, dict[str, Any]]:
    """The trainer's data for variant ``distill`` (as ``trainer.build_data`` for pairs)."""
    groups: dict[str, list[Plane]] | None = None
    split: dict[str, Any] = {}
    if env.is_main:
        groups, split = build_planes(cfg, run_dir)
        print(describe(cfg), flush=True)
    distributed.barrier(env)
    if groups is None:  # the other ranks read what the main rank labelled
        groups, split = build_planes(cfg, run_dir, main=False)
    k = cfg.model.context_slices
    dataset = DistillPatchDataset(groups["train"], cfg.data, cfg.model.ct_channels,
                                  seed=cfg.data.seed, context_slices=k)
    val_set = None
    if groups["val"]:
        val_set = DistillPatchDataset(groups["val"], cfg.data, cfg.model.ct_channels,
                                      seed=cfg.data.seed + 1, augment=False,
                                      context_slices=k)
    sampler = EpochSampler(dataset, env.world_size, env.rank, cfg.train.seed)
    return dataset, val_set, sampler, split


# --------------------------------------------------------------------------- patches


class DistillPatchDataset(Dataset):
    """Random crops of teacher-labelled planes: ``{"ct", "histology" (= the teacher's
    label), "mask", "pair"}`` like :class:`hpcstain.data.sampler.PairedPatchDataset`.

    With ``context_slices`` K > 1 (a 2.5D teacher) items also hold ``"ct_context": (K, P,
    P)``, the plane's K CT planes cropped, flipped and rotated exactly like the section (and
    inverted with ``data.invert_ct``): the 2.5D generator's input, as in training.

    Item ``i`` reads plane ``i % len(planes)``; its crop and dihedral transform come from
    ``np.random.default_rng([seed, epoch, i])`` (epoch 0 without augmentation).
    """

    def __init__(self, planes: list[Plane], cfg: DataConfig, ct_channels: int = 3,
                 seed: int = 0, augment: bool = True, mask_retries: int = MASK_RETRIES,
                 context_slices: int = 1) -> None:
        if not planes:
            raise InputError("distill: no planes to sample patches from")
        k = int(context_slices)
        wrong = [f"{pl.name} ({pl.context_slices})" for pl in planes
                 if pl.context_slices != k]
        if wrong:
            raise InputError(f"distill: model.context_slices={k}, but planes carry another "
                             f"number of CT planes: {', '.join(wrong[:5])}")
        p = cfg.patch_size
        small = [f"{pl.name} ({pl.shape[0]}×{pl.shape[1]})" for pl in planes
                 if min(pl.shape) < p]
        if small:
            raise InputError(f"distill: planes smaller than the {p}×{p} patch size "
                             f"(data.patch_size): {', '.join(small[:5])}")
        self.planes, self.cfg, self.ct_channels = planes, cfg, ct_channels
        self.seed, self.augment, self.mask_retries = int(seed), augment, mask_retries
        self.context_slices = k
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.planes) * self.cfg.patches_per_pair

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _corner(self, rng: np.random.Generator, plane: Plane) -> tuple[int, int]:
        p, (h, w) = self.cfg.patch_size, plane.shape
        best, best_cov = (0, 0), -1.0
        for _ in range(self.mask_retries + 1):
            y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if self.cfg.min_mask_coverage <= 0:
                return y0, x0
            cov = float(plane.mask[y0:y0 + p, x0:x0 + p].mean())
            if cov >= self.cfg.min_mask_coverage:
                return y0, x0
            if cov > best_cov:
                best, best_cov = (y0, x0), cov
        return best

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = index % len(self.planes)
        plane = self.planes[k]
        rng = np.random.default_rng([self.seed, self.epoch if self.augment else 0, index])
        y0, x0 = self._corner(rng, plane)
        p = self.cfg.patch_size
        ct = torch.from_numpy(np.ascontiguousarray(plane.ct[y0:y0 + p, x0:x0 + p]))[None]
        label = torch.from_numpy(np.ascontiguousarray(plane.label[:, y0:y0 + p, x0:x0 + p]))
        hist = label.float() / 127.5 - 1.0
        mask = torch.from_numpy(np.ascontiguousarray(plane.mask[y0:y0 + p, x0:x0 + p]))
        mask = mask[None].float()
        slab = None if plane.context is None else \
            torch.from_numpy(np.ascontiguousarray(plane.context[:, y0:y0 + p, x0:x0 + p]))
        if self.augment:
            flip_y, flip_x = (bool(rng.integers(2)), bool(rng.integers(2))) \
                if self.cfg.flips else (False, False)
            turns = int(rng.integers(4)) if self.cfg.rot90 else 0
            dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
            ct, hist, mask = (_dihedral(t, dims, turns) for t in (ct, hist, mask))
            if slab is not None:  # the same transform of every plane
                slab = _dihedral(slab, dims, turns)
        if self.cfg.invert_ct:
            ct = -ct
            slab = -slab if slab is not None else None
        item = {"ct": ct.expand(self.ct_channels, -1, -1).contiguous(),
                "histology": hist.contiguous(), "mask": mask.contiguous(), "pair": k}
        if slab is not None:
            item["ct_context"] = slab.contiguous()
        return item


def _dihedral(t: Tensor, flip_dims: list[int], turns: int) -> Tensor:
    if flip_dims:
        t = torch.flip(t, flip_dims)
    return torch.rot90(t, turns, (-2, -1)) if turns else t


# --------------------------------------------------------------------------- checks


def held_out_l1(student: nn.Module, planes: list[Plane], invert_ct: bool = False,
                ct_channels: int = 3) -> float:
    """Masked ℓ1 of a student to the teacher's labels on whole planes (a test/bench helper;
    a 2.5D plane's K CT planes are the input, ``ct_channels`` is then unused)."""
    total, weight = 0.0, 0.0
    student.eval()
    with torch.inference_mode():
        for p in planes:
            sign = -1.0 if invert_ct else 1.0
            if p.context is not None:
                out = student(torch.from_numpy(p.context)[None] * sign)[0]
            else:
                ct = torch.from_numpy(p.ct)[None, None] * sign
                out = student(ct.expand(1, ct_channels, -1, -1))[0]
            label = torch.from_numpy(p.label).float() / 127.5 - 1.0
            m = torch.from_numpy(p.mask).float()
            total += float(((out - label).abs() * m).sum())
            weight += float(m.sum()) * out.shape[0]
    return total / max(weight, 1.0)
