"""Run directories: which config a (new or resumed) run uses, and refusing mix-ups."""

from __future__ import annotations

import json
from pathlib import Path

from hpcstain.config import Config, load_config, to_dict
from hpcstain.data.folds import make_folds, split_for_fold
from hpcstain.data.manifest import read_manifest
from hpcstain.errors import ConfigError, InputError

# Sections that change what is trained; a resumed run may change only train.* (e.g. epochs).
# (distill.* has its own checks on resume: the teacher's hash and the labelled inputs.)
FROZEN_SECTIONS = ("model", "loss", "data")
# Keys of those sections that change how, not what, is trained.
FREE_KEYS = ("data.num_workers",)
# Keys naming files: compared by what they are (same file or same content), not by spelling.
PATH_KEYS = ("data.manifest",)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _value(cfg: dict, key: str) -> object:
    out: object = cfg
    for part in key.split("."):
        out = out.get(part) if isinstance(out, dict) else None
    return out


def same_file(a: object, b: object, base: Path | None = None) -> bool:
    """Two spellings of one input: equal text, the same file, or files of equal content.

    A relative path is tried from the working directory, then from ``base`` (the run
    directory), so a run started with ``pairs/manifest.csv`` resumes from anywhere.
    """
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    pa, pb = locate(a, base), locate(b, base)
    if pa is None or pb is None:
        return False
    try:
        if pa.samefile(pb):
            return True
        return pa.stat().st_size == pb.stat().st_size and pa.read_bytes() == pb.read_bytes()
    except OSError:
        return False


def locate(path: str, base: Path | None = None) -> Path | None:
    """``path`` as it exists: as given, else relative to ``base``; None when neither."""
    p = Path(path)
    if p.exists():
        return p
    if base is not None and not p.is_absolute() and (base / p).exists():
        return base / p
    return None


def frozen_changes(saved: Config, asked: Config, run_dir: Path) -> list[str]:
    """``key: old -> new`` for every key a resume of ``run_dir`` may not change."""
    a, b = to_dict(saved), to_dict(asked)
    keys = [k for s in FROZEN_SECTIONS for k in _diff({s: a.get(s, {})}, {s: b.get(s, {})})]
    out = []
    for key in keys:
        old, new = _value(a, key), _value(b, key)
        if key in FREE_KEYS or (key in PATH_KEYS and same_file(old, new, run_dir)):
            continue
        if key == "data.manifest" and isinstance(old, str) and isinstance(new, str) \
                and locate(old, run_dir) is None and locate(new) is not None:
            continue  # the manifest moved (the run was moved): its pairs are checked against
            # split.json when the data is read (check_split)
        out.append(f"{key}: {old!r} -> {new!r}")
    return out


def check_resume(run_dir: Path, cfg: Config) -> None:
    """[refuse before writing] Refuse ``cfg`` for the existing run in ``run_dir`` when it
    changes a key that defines what the run trains (model, loss, data; only
    ``train.*`` and ``data.num_workers`` may change), before any file of the run is
    touched: the run stays resumable exactly as it was."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return
    saved = load_config(str(saved_path), [])
    manifest = cfg.data.manifest
    if manifest and cfg.model.variant != "distill" and not Path(manifest).is_file():
        raise InputError(f"{manifest}: the run's manifest is not found from {Path.cwd()}; "
                         "resume with data.manifest=PATH where it is now (a moved manifest "
                         "is accepted when its pairs match the run's split.json)")
    changes = frozen_changes(saved, cfg, Path(run_dir))
    if changes:
        raise ConfigError(
            f"{saved_path}: a resume cannot change what the run trains "
            f"({'; '.join(changes)}); nothing was changed — resume without these "
            "overrides, or start a new run with another --out")
    # same keys, so a different split can only come from the manifest's content
    if manifest and cfg.model.variant != "distill" and (Path(run_dir) / "split.json").is_file():
        folds = make_folds(read_manifest(manifest), n_folds=cfg.data.n_folds,
                           n_test=cfg.data.n_test, seed=cfg.data.seed)
        train_ids, val_ids = split_for_fold(folds, cfg.data.fold)
        check_split(Path(run_dir), manifest, {"train_ids": list(train_ids),
                                              "val_ids": list(val_ids),
                                              "test_ids": list(folds.test_ids)})


def absolute_inputs(cfg: Config) -> Config:
    """A new run records its manifest as an absolute path, so the run directory resumes
    (and `info`, `evaluate --split` find its data) from any working directory."""
    if cfg.data.manifest and Path(cfg.data.manifest).exists():
        cfg.data.manifest = str(Path(cfg.data.manifest).resolve())
    return cfg


def resolve_run_config(run_dir: Path, profile: str | None, overrides: list[str]) -> Config:
    """A new run takes ``profile`` + overrides; an existing run its saved config + overrides.

    Giving a profile for an existing run is allowed only when it resolves to the same
    model, loss and data settings (so a job script can always pass the same arguments).
    """
    saved = run_dir / "config.yaml"
    if not saved.exists():
        if profile is None:
            raise ConfigError(f"{run_dir}: no run here to resume; pass --config PROFILE")
        return absolute_inputs(load_config(profile, overrides))
    cfg = load_config(str(saved), overrides)
    check_resume(run_dir, cfg)  # an override that changes what is trained: refused now
    if profile is not None:
        asked = load_config(profile, overrides)
        differ = [c.partition(":")[0] for c in frozen_changes(cfg, asked, run_dir)]
        if differ:
            raise ConfigError(
                f"{saved}: this run was started with a different config ({', '.join(differ)}"
                "); use a new --out, or omit --config to resume it")
        cfg.profile = asked.profile
    return cfg


def check_split(run_dir: Path, manifest: str, split: dict[str, list[str]]) -> None:
    """[refuse before writing] A resumed run trains on the pairs it started with: when the
    manifest's pairs (or their assignment) changed, its ``split.json`` — the checkpoint's
    record of what it trained on — is kept and the resume refused."""
    path = run_dir / "split.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    changed = [k for k in ("train_ids", "val_ids", "test_ids")
               if k in saved and sorted(saved[k]) != sorted(split[k])]
    if changed:
        k = changed[0]
        added = sorted(set(split[k]) - set(saved[k]))[:3]
        gone = sorted(set(saved[k]) - set(split[k]))[:3]
        raise InputError(f"{manifest}: its pairs changed since {run_dir} started ({k}: "
                         f"+{added} -{gone}); the run keeps {path} — restore the manifest, "
                         "or train a new run with another --out")
