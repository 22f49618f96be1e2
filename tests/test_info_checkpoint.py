"""hpcstain.models.flops and ``hpcstain info --checkpoint``."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from hpcstain.config import load_config
from hpcstain.models.flops import flops_per_pixel, parameter_count
from hpcstain.models.networks import build_generator


def test_paper_generator_cost() -> None:
    """The paper's ResNet-9/64 generator: 11,378,179 parameters and 1.51 MFLOP per pixel."""
    cfg = load_config("modcyclegan").model
    gen = build_generator(cfg, cfg.ct_channels, cfg.histology_channels)
    assert parameter_count(gen) == 11_378_179
    # Independent of the tile size for a multiple of the stride (4); 64² keeps it fast.
    fpp = flops_per_pixel(gen, cfg.ct_channels, size=64)
    assert fpp == pytest.approx(1.512192e6, rel=1e-6)
    assert fpp == flops_per_pixel(gen, cfg.ct_channels, size=32)


def test_flops_of_one_conv_by_hand() -> None:
    """A 3×3 conv C→K costs 2·9·C·K FLOP per pixel (multiply-add = 2), bias not counted."""
    conv = nn.Conv2d(2, 5, 3, padding=1)
    assert flops_per_pixel(conv, 2, size=16) == 2 * 9 * 2 * 5
    assert parameter_count(conv) == 9 * 2 * 5 + 5
    conv.weight.requires_grad_(False)
    assert parameter_count(conv) == 9 * 2 * 5 + 5


# --------------------------------------------------------------------------- info --checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch micro training run (latest.pt, min-*.pt, split.json)."""
    import warnings

    from micro import micro_config

    from hpcstain.phantom import write_pairs
    from hpcstain.train.trainer import train

    root = tmp_path_factory.mktemp("info")
    pairs = write_pairs(root / "pairs", n=4, seed=5, size=(64, 64))
    cfg = micro_config(pairs, "train.epochs=1", "train.checkpoint_every=0", "data.n_test=1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, root / "run", progress=False)
    return root / "run"


def _expected_generator(ckpt_path: Path) -> tuple[int, float]:
    """Parameters (from the stored tensors) and FLOPs of a freshly built generator."""
    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.models.gans import model_config_of

    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["model"]["generators"]["ct2hist"]
    cfg = model_config_of(ckpt["architecture"])
    gen = build_generator(cfg, cfg.ct_channels, cfg.histology_channels)
    return sum(v.numel() for v in state.values()), flops_per_pixel(gen, cfg.ct_channels, 64)


def test_info_of_a_training_checkpoint(trained: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    import hashlib
    import json

    from hpcstain.cli import main

    latest = trained / "checkpoints" / "latest.pt"
    assert main(["info", "--checkpoint", str(latest), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    params, flops = _expected_generator(latest)
    assert r["sha256"] == hashlib.sha256(latest.read_bytes()).hexdigest()
    assert r["kind"].startswith("training checkpoint")
    assert r["architecture"]["variant"] == "modcyclegan"
    assert (r["architecture"]["ngf"], r["architecture"]["n_blocks"]) == (4, 1)
    assert r["architecture"]["norm"] == "instance"
    assert r["generator"]["parameters"] == params
    assert r["generator"]["flops_per_pixel"] == flops > 0
    assert set(r["networks"]) == {"generators/ct2hist", "generators/hist2ct",
                                  "discriminators/ct", "discriminators/hist"}
    assert r["conventions"]["target_levels"] == [30000.0, 10000.0]
    assert r["conventions"]["size_multiple"] == 4
    t = r["training"]
    split = json.loads((trained / "split.json").read_text())
    assert t["pairs"]["train_ids"] == split["train_ids"] and len(t["pairs"]["test_ids"]) == 1
    assert t["epoch"] == 1 and t["step"] > 0 and t["reason"] == "epoch"
    assert t["data"]["n_test"] == 1 and t["train"]["epochs"] == 1
    assert main(["info", "--checkpoint", str(latest)]) == 0
    text = capsys.readouterr().out
    assert r["sha256"] in text and f"{params:,} parameters" in text
    assert "MFLOP per output pixel" in text and "3 train, 0 validation, 1 test" in text


def test_info_of_min_and_pinned_generator(trained: Path, tmp_path: Path) -> None:
    import numpy as np
    import zarr

    from hpcstain.info import checkpoint_report, format_checkpoint
    from hpcstain.volume import init_run, make_plan, open_volume

    latest = trained / "checkpoints" / "latest.pt"
    params, flops = _expected_generator(latest)
    mins = sorted((trained / "checkpoints").glob("min-*.pt"))
    r = checkpoint_report(mins[0])
    assert r["kind"].startswith("generators only") and "minimum of" in r["kind"]
    assert set(r["networks"]) == {"generators/ct2hist", "generators/hist2ct"}
    assert (r["generator"]["parameters"], r["generator"]["flops_per_pixel"]) == (params, flops)

    vol = np.full((8, 16, 16), 20000, np.uint16)
    zarr.create_array(str(tmp_path / "ct.zarr"), data=vol, chunks=(8, 8, 8))
    plan = make_plan(open_volume(tmp_path / "ct.zarr"), chunk=8, tile=16, step=8,
                     levels=(30000.0, 10000.0), checkpoint=latest)
    run = init_run(tmp_path / "run", plan)
    pinned = checkpoint_report(run / "generator.pt")
    assert pinned["kind"].startswith("pinned generator")
    assert pinned["pinned_from"]["checkpoint"] == str(latest)
    assert pinned["pinned_from"]["plan_generator_sha256"] == pinned["sha256"]
    assert (pinned["generator"]["parameters"], pinned["generator"]["flops_per_pixel"]) == (
        params, flops)
    from hpcstain.checkpoint import load_checkpoint

    assert pinned["training"]["step"] == load_checkpoint(latest)["step"]  # pinned at its step
    assert "this file's hash matches plan.json" in format_checkpoint(pinned)


def test_info_of_a_bad_checkpoint_is_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from hpcstain.cli import main

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["info", "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err
    assert "junk.pt" in err and err.count("\n") == 1


def test_a_2p5d_checkpoint_is_described_with_its_k_input_planes(tmp_path: Path) -> None:
    """FLOPs are counted on the generator's real input (the K planes, not ct_channels)."""
    from micro import untrained_generator_checkpoint

    from hpcstain.info import checkpoint_report, format_checkpoint

    ckpt = untrained_generator_checkpoint(tmp_path / "k5.pt", context_slices=5)
    flat = untrained_generator_checkpoint(tmp_path / "k1.pt")
    r5, r1 = checkpoint_report(ckpt), checkpoint_report(flat)
    assert "5 CT planes per slice" in format_checkpoint(r5)
    # only the first conv sees more channels: 5 instead of 3 inputs, 7×7 kernel, ngf 4
    extra = 2 * 49 * (5 - 3) * 4
    assert r5["generator"]["flops_per_pixel"] == r1["generator"]["flops_per_pixel"] + extra
