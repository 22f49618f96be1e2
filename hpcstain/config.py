"""Typed configuration: YAML profiles in ``configs/`` → dataclasses, plus CLI overrides.

A profile is a YAML mapping of sections (``data``, ``model``, ``loss``, ``train``).
``extends: other.yaml`` (a path relative to the profile, or a profile name) layers a
profile on top of another. Any key can be overridden on the command line as
``section.key=value`` (the value is parsed as YAML). Unknown keys and values of the wrong
type are :class:`ConfigError` naming the key and the file the value came from.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hpcstain.atomic import write_text_atomic
from hpcstain.errors import ConfigError

# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Paired slides, normalisation (§2.5), masks (§2.8), augmentation/sampling (§2.7)."""

    manifest: str = ""
    patch_size: int = 256
    patches_per_pair: int = 100
    batch_size: int = 4
    num_workers: int = 2
    # §2.7 augmentation
    rescale_min: float = 0.9
    rescale_max: float = 1.1
    flips: bool = True
    rot90: bool = False   # one of the 8 dihedral transforms (90° rotations, flips, transpose)
    brightness_jitter: float = 0.1
    contrast_jitter: float = 0.1
    min_mask_coverage: float = 0.0
    # [issue 23 item 3] probability that a patch's CT is re-imaged as a reconstructed scan
    # might show it (data/augment.scan_ct: tissue contrast, levels read off, blur or phase
    # fringes, rings, streaks, FBP-like noise); 0 = the CT as rendered
    scan_augment: float = 0.0
    # §2.5 normalisation (the target levels: also ct.levels.DEFAULT_TARGET, for checkpoints
    # that record none)
    ct_bone_level: float = 30000.0
    ct_background_level: float = 10000.0
    stretch_c: float = 0.0
    stretch_c_prime: float = 0.0
    invert_ct: bool = False
    # CT preprocessing before §2.5 (hpcstain/cupping.py): none, or radial = each CT slide's
    # cupping fitted and removed (axial slides; the axis at the slide centre)
    cupping: Literal["none", "radial"] = "none"
    # the 3D Gaussian (voxels) the volume engine applies to the CT before staining with this
    # model (§2.11: 1; 0 for a model trained on unblurred slides; `stain --sigma` overrides)
    stain_sigma: float = 1.0
    # how `fuse` merges the axes' stains by default for this model (mean, as in the paper's
    # recipes; median for tissue-cpu: one axis that misreads a structure is outvoted)
    fuse_method: Literal["mean", "median", "consistency"] = "mean"
    # §2.4 folds
    n_folds: int = 5
    fold: int = 0
    n_test: int = 3
    seed: int = 0


@dataclass
class ModelConfig:
    """Networks of §2.6: ResNet/U-Net generators, 70×70 PatchGAN, image pool."""

    variant: Literal["modcyclegan", "cyclegan", "pix2pix", "distill"] = "modcyclegan"
    # unet: a U-Net of n_blocks stride-2 levels (>= 5), any input size (padded), upsampling
    generator: Literal["resnet", "unet256", "unet", "s2dnet", "dsresnet"] = "resnet"
    ct_channels: int = 3
    histology_channels: int = 3
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_d: int = 3
    upsampling: Literal["transpose", "resize"] = "transpose"
    norm: Literal["instance", "batch", "none"] = "instance"  # none: student generators only
    use_dropout: bool = False
    init_gain: float = 0.02
    pool_size: int = 50
    # learned alignment of misaligned pairs (models/registration.py; training only)
    align: bool = False        # warp G's output onto the histology before the pixel loss
    align_smooth: float = 0.5  # weight of the displacement field's smoothness term
    align_width: int = 16      # registration net width
    align_start: int = 0       # warm start: steps with the identity warp and R frozen first
    align_ngf: float = 0.0     # weight of an edge term (warped CT vs histology) training R
    align_by: str = "pixel"    # what trains R: "pixel" (+ edge term) or "edges" (edge term only)
    # 2.5D input: k (odd) neighbouring CT planes as the CT→histology generator's channels,
    # the centre one stained (needs a ct_slab per pair); 1 = one slice (docs/models.md)
    context_slices: int = 1

    def __post_init__(self) -> None:
        k = self.context_slices
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ConfigError(f"model.context_slices: must be an odd integer >= 1 (1 = one "
                              f"slice, 3 = the slice and its two neighbours), got {k!r}")


@dataclass
class LossConfig:
    """Loss weights: Eq. 7 (modified CycleGAN), Eq. 4 (standard), Eq. 10 (Pix2Pix)."""

    gan_mode: Literal["lsgan", "vanilla"] = "lsgan"
    lambda_cyc: float = 6.0
    lambda_id: float = 3.0
    lambda_px: float = 6.0
    lambda_gs: float = 1.0
    lambda_l1: float = 20.0
    lambda_kd_gan: float = 0.0  # distill: conditional patch-GAN term (0: L1 to the teacher only)
    # adversarial terms of the generator: weight (0: pixel/cycle terms only, e.g. pix2pix
    # with lambda_gan=0 is plain L1 regression), and steps with the pixel terms only first
    lambda_gan: float = 1.0
    gan_start: int = 0


@dataclass
class TrainConfig:
    """Optimisation and run control; see docs/training.md."""

    epochs: int = 500
    max_steps: int = 0
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_epochs: int = 0
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    val_every: int = 0


@dataclass
class DistillConfig:
    """Knowledge distillation (variant ``distill``, docs/distillation.md): what the teacher
    labels. The student always takes the teacher's CT conventions (data.ct_*, cupping...)."""

    teacher: str = ""
    volumes: list[str] = field(default_factory=list)  # target volumes whose slices it labels
    axes: str = "z,y,x"
    slices_per_axis: int = 16  # evenly spaced, per volume and axis
    # the stain engine's 3D Gaussian (hpcstain stain --sigma) on the volume planes it
    # labels; None: the teacher's data.stain_sigma, as `stain` applies it to the teacher
    sigma: float | None = None
    use_pairs: bool = True     # also the CT of data.manifest's training pairs
    mask_margin: int = 8       # px the sample mask is grown by (outside is not learned)


@dataclass
class Config:
    """The whole resolved configuration of a run; saved beside every output."""

    profile: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# --------------------------------------------------------------------------- profiles


def config_dir() -> Path:
    """Where named profiles live: ``$HPCSTAIN_CONFIG_DIR`` or the repository's configs/."""
    env = os.environ.get("HPCSTAIN_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def resolve_profile(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A YAML path as given, relative to another profile, or a name in configs/."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to.parent / name_or_path)
    for stem in (name_or_path, f"{name_or_path}.yaml"):
        candidates.append(config_dir() / stem)
    for cand in candidates:
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in config_dir().glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such config file or profile (profiles: {known})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


# Every leaf value is kept with the file (or "command line") it came from, for errors.
def _layer(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    """Flatten a profile (following ``extends``) into ``{"section.key": (value, file)}``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle")
    raw = _read_yaml(path)
    flat: dict[str, tuple[Any, str]] = {}
    base = raw.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'extends' must be a profile name or path")
        flat.update(_layer(resolve_profile(base, path), (*seen, path)))
    for section, body in raw.items():
        if not isinstance(body, dict):
            flat[str(section)] = (body, str(path))
            continue
        for key, value in body.items():
            flat[f"{section}.{key}"] = (value, str(path))
    return flat


def parse_overrides(items: list[str]) -> dict[str, tuple[Any, str]]:
    """``["train.lr=1e-3", ...]`` → ``{"train.lr": (0.001, "command line")}``."""
    out: dict[str, tuple[Any, str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: override {item!r} is not section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out[key.strip()] = (value, "command line")
    return out


# --------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int→float is the only widening."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, list | dict):
            raise bad
        return str(value)
    raise bad


def build(cls: type, flat: dict[str, tuple[Any, str]], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from flattened, sourced values; reject unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        full = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            sub = {k: v for k, v in flat.items() if k.startswith(full + ".")}
            if full in flat:
                raise ConfigError(f"{flat[full][1]}: {full}: is a section, not a value")
            kwargs[f.name] = build(tp, sub, full + ".")
        elif full in flat:
            value, source = flat[full]
            kwargs[f.name] = coerce(value, tp, full, source)
    for key, (_, source) in flat.items():
        head = key[len(prefix):].split(".", 1)[0]
        if head not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key {key!r} (known here: {known})")
    return cls(**kwargs)


def load_config(
    profile: str | None = None, overrides: list[str] | None = None, cls: type = Config
) -> Any:
    """Resolve ``profile`` (name or path, optional) plus ``section.key=value`` overrides."""
    flat: dict[str, tuple[Any, str]] = {}
    if profile:
        path = resolve_profile(profile)
        flat.update(_layer(path))
        if "profile" in {f.name for f in dataclasses.fields(cls)}:
            flat.setdefault("profile", (path.stem, str(path)))
    flat.update(parse_overrides(overrides or []))
    return build(cls, flat)


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any], cls: type = Config, source: str = "<dict>") -> Any:
    """Rebuild a config saved by :func:`save_config` (e.g. from a checkpoint)."""
    flat: dict[str, tuple[Any, str]] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = (v, source)

    walk(data, "")
    return build(cls, flat)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (provenance) atomically as YAML."""
    write_text_atomic(path, dump_config(cfg))
