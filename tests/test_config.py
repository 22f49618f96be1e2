"""Config profiles: typed loading, dotted overrides, errors that name the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcstain.config import Config, config_dir, from_dict, load_config, save_config, to_dict
from hpcstain.errors import ConfigError

PROFILES = ["modcyclegan", "cyclegan", "cyclegan_invct", "pix2pix"]


@pytest.mark.parametrize("name", PROFILES + [f"{p}-tiny" for p in PROFILES])
def test_every_shipped_profile_loads(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.profile == name


def test_paper_profile_has_the_paper_numbers() -> None:
    cfg = load_config("modcyclegan")
    assert (cfg.loss.lambda_cyc, cfg.loss.lambda_id, cfg.loss.lambda_px, cfg.loss.lambda_gs) == (
        6.0, 3.0, 6.0, 1.0)
    assert (cfg.model.ngf, cfg.model.n_blocks, cfg.model.pool_size) == (64, 9, 50)
    assert (cfg.data.patch_size, cfg.data.patches_per_pair, cfg.data.batch_size) == (256, 100, 4)
    assert (cfg.train.lr, cfg.train.beta1, cfg.train.beta2, cfg.train.epochs) == (
        2e-4, 0.5, 0.999, 500)


def test_standard_cyclegan_drops_supervision_and_greyscale() -> None:
    cfg = load_config("cyclegan")
    assert cfg.loss.lambda_px == 0.0 and cfg.loss.lambda_gs == 0.0
    assert load_config("cyclegan_invct").data.invert_ct is True


def test_override_sets_a_typed_value() -> None:
    cfg = load_config("modcyclegan", ["train.lr=1e-3", "data.patch_size=128", "train.amp=bf16"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.patch_size == 128 and cfg.train.amp == "bf16"


def test_int_is_accepted_for_a_float_key() -> None:
    assert load_config(None, ["loss.lambda_cyc=10"]).loss.lambda_cyc == 10.0


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train\.lrr'"):
        load_config("modcyclegan", ["train.lrr=1"])


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian.lr'"):
        load_config(None, ["trian.lr=1"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="train.amp: must be one of"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="data.flips: expected bool"):
        load_config(None, ["data.flips=3"])


def test_bad_key_in_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: modcyclegan\nmodel:\n  ngff: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(bad) in str(err.value) and "model.ngff" in str(err.value)


def test_wrong_type_in_a_base_profile_names_that_file(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: ten\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=f"{base}: train.epochs"):
        load_config(str(child))


def test_malformed_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not section.key=value"):
        load_config(None, ["train.lr"])


def test_missing_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="modcyclegan"):
        load_config("no-such-profile")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("pix2pix-tiny", ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    again.profile = cfg.profile
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_config_dir_holds_the_profiles() -> None:
    assert (config_dir() / "modcyclegan.yaml").is_file()
