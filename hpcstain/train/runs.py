"""Run directories: which config a (new or resumed) run uses, and refusing mix-ups."""

from __future__ import annotations

from pathlib import Path

from hpcstain.config import Config, load_config, to_dict
from hpcstain.errors import ConfigError

# Sections that change what is trained; a resumed run may change only train.* (e.g. epochs).
FROZEN_SECTIONS = ("model", "loss", "data")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def resolve_run_config(run_dir: Path, profile: str | None, overrides: list[str]) -> Config:
    """A new run takes ``profile`` + overrides; an existing run its saved config + overrides.

    Giving a profile for an existing run is allowed only when it resolves to the same
    model, loss and data settings (so a job script can always pass the same arguments).
    """
    saved = run_dir / "config.yaml"
    if not saved.exists():
        if profile is None:
            raise ConfigError(f"{run_dir}: no run here to resume; pass --config PROFILE")
        return load_config(profile, overrides)
    cfg = load_config(str(saved), overrides)
    if profile is not None:
        asked = load_config(profile, overrides)
        a, b = to_dict(asked), to_dict(cfg)
        differ = [k for s in FROZEN_SECTIONS for k in _diff({s: a[s]}, {s: b[s]})]
        if differ:
            raise ConfigError(
                f"{saved}: this run was started with a different config ({', '.join(differ)}"
                "); use a new --out, or omit --config to resume it")
        cfg.profile = asked.profile
    return cfg
