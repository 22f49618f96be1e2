"""Damaged data: one line on stderr, exit 2, nothing written, and a way out.

Inputs whose bytes no longer decode (a zarr chunk, an HDF5 chunk, an image, a checkpoint)
are :class:`InputError` naming the file, the chunk or region and the codec's complaint. A
damaged chunk of a run's per-axis array found by ``fuse`` names the array and the chunk
and the command that re-stains just that chunk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hpcstain.cli import main
from hpcstain.errors import InputError, UsageError

SHAPE = (32, 48, 48)
STAIN = ["--chunk", "16", "--tile", "32", "--step", "16", "--no-progress"]
LEVELS = ["--bone-level", "30000", "--background-level", "10000"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained generator saved like a ``min-*.pt`` (generators only)."""
    from micro import untrained_generator_checkpoint

    return untrained_generator_checkpoint(tmp_path_factory.mktemp("ckpt") / "g.pt")


def phantom(path: Path) -> Path:
    from hpcstain.phantom import write_volume_file

    return write_volume_file(path, SHAPE, "mg", seed=1, chunk=16)


def garble(file: Path) -> None:
    """Replace a storage file's bytes with garbage (same length as a torn write would)."""
    file.write_bytes(np.random.default_rng(0).integers(0, 256, 200, np.uint8).tobytes())


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hpcstain: error: ") and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- stain inputs


@pytest.mark.parametrize("levels", [[], LEVELS], ids=["found-at-plan", "found-by-worker"])
def test_damaged_zarr_chunk_is_one_line_exit_2_and_leaves_no_run(
        tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str],
        levels: list[str]) -> None:
    vol = phantom(tmp_path / "v.zarr")
    garble(vol / "ct" / "c" / "1" / "0" / "2")
    run = tmp_path / "run"
    code = main(["stain", str(vol), "--checkpoint", str(checkpoint), "--out", str(run),
                 *levels, *STAIN])
    err = one_error_line(capsys)
    assert code == 2
    assert "storage chunk 1,0,2" in err and "z 16:32, y 0:16, x 32:48" in err
    assert str(vol / "ct" / "c" / "1" / "0" / "2") in err and "Zstd" in err
    assert not run.exists()  # created only after validation, or removed again


def test_damaged_hdf5_chunk_is_one_line_exit_2_and_leaves_no_run(
        tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    vol = (np.arange(np.prod(SHAPE)) % 20000 + 10000).astype(np.uint16).reshape(SHAPE)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("/entry/data/data", data=vol, chunks=(16, 16, 16),
                               compression="gzip")
        info = ds.id.get_chunk_info_by_coord((16, 16, 0))
    with open(path, "r+b") as fh:  # corrupt the deflate stream of one chunk
        fh.seek(info.byte_offset + 4)
        fh.write(b"\xff" * 32)
    run = tmp_path / "run"
    code = main(["stain", str(path), "--checkpoint", str(checkpoint), "--out", str(run),
                 *LEVELS, *STAIN])
    err = one_error_line(capsys)
    assert code == 2
    assert f"{path}:/entry/data/data" in err and "storage chunk 1,1,0" in err
    assert "z 16:32, y 16:32, x 0:16" in err and "filter" in err
    assert not run.exists()


def test_truncated_checkpoint_is_one_line_exit_2(tmp_path: Path, checkpoint: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    vol = phantom(tmp_path / "v.zarr")
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    code = main(["stain", str(vol), "--checkpoint", str(cut), "--out", str(tmp_path / "run"),
                 *STAIN])
    err = one_error_line(capsys)
    assert code == 2 and str(cut) in err and "not a readable checkpoint" in err
    assert not (tmp_path / "run").exists()
    slide = tmp_path / "slide.tif"
    import tifffile

    tifffile.imwrite(slide, np.full((64, 64), 20000, np.uint16))
    code = main(["predict", str(slide), "--checkpoint", str(cut), "--out",
                 str(tmp_path / "out.png"), "--bone-level", "30000", "--background-level",
                 "10000"])
    err = one_error_line(capsys)
    assert code == 2 and str(cut) in err
    assert not (tmp_path / "out.png").exists()


def test_damaged_tiff_page_or_slice_names_it(tmp_path: Path) -> None:
    import tifffile

    from hpcstain.volume.io import open_volume

    vol = (np.arange(np.prod(SHAPE)) % 20000 + 10000).astype(np.uint16).reshape(SHAPE)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, vol, compression="zlib")  # one page per z slice
    with tifffile.TiffFile(stack) as tf:
        offset = tf.pages[7].dataoffsets[0]
    with open(stack, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff" * 32)
    src = open_volume(stack)
    with pytest.raises(InputError, match=r"stack.tif: damaged data in page 7 \(voxels z 7:8"):
        src.read((slice(0, 16), slice(0, 48), slice(0, 48)))
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(4):
        tifffile.imwrite(folder / f"s{z:02d}.tif", vol[z], compression="zlib")
    (folder / "s02.tif").write_bytes((folder / "s02.tif").read_bytes()[:300])
    with pytest.raises(InputError, match=r"damaged data in slice 2 .*s02.tif") as err:
        open_volume(folder).read((slice(0, 4), slice(0, 48), slice(0, 48)))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- images


def test_damaged_images_are_input_errors_naming_the_file(
        tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile
    from PIL import Image

    from hpcstain.data.readers import read_image

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "h.png")
    tifffile.imwrite(tmp_path / "c.tif", rgb[..., 0], compression="zlib")
    for name in ("h.png", "c.tif"):
        data = bytearray((tmp_path / name).read_bytes())
        torn = tmp_path / f"torn-{name}"
        torn.write_bytes(bytes(data[:len(data) // 2]))
        rotten = tmp_path / f"rotten-{name}"
        data[len(data) // 2:len(data) // 2 + 64] = b"\xaa" * 64
        rotten.write_bytes(bytes(data))
        for bad in (torn, rotten):
            with pytest.raises(InputError, match="not a readable") as err:
                read_image(bad)
            assert str(bad) in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "out.png"
    code = main(["predict", str(tmp_path / "rotten-c.tif"), "--checkpoint", str(checkpoint),
                 "--out", str(out), "--bone-level", "30000", "--background-level", "10000"])
    err = one_error_line(capsys)
    assert code == 2 and "rotten-c.tif" in err
    assert not out.exists()


# --------------------------------------------------------------------------- fuse


def _fused(run: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(run / "fused.ome.zarr"), mode="r")["0"][...])


def test_damaged_axis_chunk_at_fuse_names_it_and_the_repair_redoes_just_that(
        tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpcstain.volume import repair

    vol = phantom(tmp_path / "v.zarr")
    run = tmp_path / "run"
    assert main(["stain", str(vol), "--checkpoint", str(checkpoint), "--out", str(run),
                 *LEVELS, *STAIN]) == 0
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    assert main(["fuse", str(clean), "--no-progress"]) == 0
    capsys.readouterr()

    store = run / "axis-z.zarr"
    chunk_file = store / "c" / "1" / "2" / "0" / "0"
    assert chunk_file.is_file()
    garble(chunk_file)
    others = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and p != chunk_file}
    code = main(["fuse", str(run), "--no-progress"])
    err = one_error_line(capsys)
    assert code == 2
    assert str(store) in err and "storage chunk 1,2,0" in err and str(chunk_file) in err
    command = repair.repair_command(run, "z", (1, 2, 0))
    assert command in err and "Zstd" in err
    assert {p: p.read_bytes() for p in others} == others  # nothing else touched

    # The way out, exactly as the message says (argv after `python -m hpcstain.volume.repair`)
    assert repair.main(command.split()[3:]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 completion record(s) of axis z" in out and "stained 1 unit(s)" in out
    assert main(["fuse", str(run), "--no-progress"]) == 0
    np.testing.assert_array_equal(_fused(run), _fused(clean))  # same bytes as undamaged


def test_drop_records_matches_write_regions_not_names(tmp_path: Path, checkpoint: Path
                                                      ) -> None:
    from hpcstain.volume.repair import drop_records, records_covering

    vol = phantom(tmp_path / "v.zarr")
    run = tmp_path / "run"
    assert main(["stain", str(vol), "--checkpoint", str(checkpoint), "--out", str(run),
                 *LEVELS, *STAIN, "--plan-only"]) == 0
    folder = run / "done" / "axis-y"
    folder.mkdir(parents=True)
    regions = {"anything": [[0, 32], [0, 16], [0, 48]], "else": [[0, 32], [16, 32], [0, 48]],
               "third": [[0, 32], [32, 48], [0, 48]]}
    for name, box in regions.items():
        (folder / f"{name}.json").write_text(json.dumps({"write_region": box}))
    (folder / "torn.json").write_text("{")  # a damaged record is dropped too
    chunk = (0, 1, 2)  # voxels z 0:16, y 16:32, x 32:48
    assert {p.stem for p in records_covering(run, "y", (slice(0, 16), slice(16, 32),
                                                        slice(32, 48)))} == {"else", "torn"}
    dropped = drop_records(run, "y", chunk)
    assert sorted(p.stem for p in dropped) == ["else", "torn"]
    assert sorted(p.stem for p in folder.glob("*.json")) == ["anything", "third"]
    assert drop_records(run, "y", "0:32,30:40,0:1") == [folder / "third.json"]
    with pytest.raises(UsageError, match="outside the chunk grid"):
        drop_records(run, "y", (5, 0, 0))
