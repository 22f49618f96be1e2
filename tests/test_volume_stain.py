"""Slab-wise multi-axis staining: decomposition invariance, Gaussian halo, records, resume,
plans, generator cost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hpcstain.ct.prepare import prepare_block, whole_volume_smooth
from hpcstain.ct.signed import ct_to_signed as unit_ct
from hpcstain.errors import InputError, UsageError
from hpcstain.executors import run_local, run_stain
from hpcstain.executors.array import run_array_task, task_from_env, unit_group
from hpcstain.tiles import grid_pixels, stain_image, to_uint8
from hpcstain.volume import stain as stain_mod
from hpcstain.volume.io import open_volume
from hpcstain.volume.plan import load_plan, make_plan
from hpcstain.volume.rundir import axis_store, done_names, record_path
from hpcstain.volume.stain import (
    generator_cost,
    init_run,
    pending_units,
    stain_unit,
)

SHAPE = (20, 26, 30)
TILE, STEP = 16, 8
LEVELS = (30000.0, 9000.0)


def ct_to_signed(ct: np.ndarray, bone: float, background: float) -> np.ndarray:
    return unit_ct(ct, (bone, background))


class ConvStainer:
    """A fixed spatial stain: 3×3 zero-padded neighbourhood mixes, softsign to [-1, 1].

    Only exact IEEE arithmetic (add, mul, div), element by element, so a tile's output never
    depends on the batch it came in; the zero padding makes it depend on where the tile
    sits, which is what the global tile grid has to get right.
    """

    def __init__(self, seed: int = 0) -> None:
        self.w = np.random.default_rng(seed).normal(0, 0.5, (3, 9)).astype(np.float32)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.shape[1] == 3 and batch.min() >= -1 and batch.max() <= 1
        assert torch.equal(batch[:, 0], batch[:, 2])
        x = torch.nn.functional.pad(batch[:, 0], (1, 1, 1, 1))
        h, w = batch.shape[-2:]
        taps = [x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]
        out = []
        for w in self.w:
            acc = taps[4] * 1.5
            for k in range(9):
                acc = acc + taps[k] * float(w[k])
            out.append(acc / (1.0 + acc.abs()))
        return torch.stack(out, dim=1)


class MakeConvStainer:
    """Picklable make_fn for executors (built once per worker)."""

    def __call__(self) -> ConvStainer:
        return ConvStainer()


def ct_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    bone = (np.sin(z / 3.0) + np.cos(y / 4.0) * np.sin(x / 5.0)) > 0.3
    vol = np.where(bone, 30000, 9000) + rng.normal(0, 2500, shape)
    return np.clip(vol, 0, 65535).astype(np.uint16)


def write_ct_volume(path: Path) -> Path:
    """:func:`ct_volume` as a zarr array (chunks of 8³, 5 µm voxels) at ``path``."""
    zarr.create_array(str(path), data=ct_volume(), chunks=(8, 8, 8),
                      attributes={"voxel_size_um": 5.0})
    return path


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory) -> Path:
    return write_ct_volume(tmp_path_factory.mktemp("input") / "ct.zarr")


@pytest.fixture(scope="module")
def reference(volume_path) -> dict[str, np.ndarray]:
    """Whole-volume result per axis, computed without chunks or plans."""
    vol = open_volume(volume_path).read(tuple(slice(0, n) for n in SHAPE))
    ct = ct_to_signed(whole_volume_smooth(vol, 1.0, 4), *LEVELS)
    fn = ConvStainer()
    out = {}
    for a, axis in enumerate("zyx"):
        planes = np.moveaxis(ct, a, 0)[:, None]
        rgb = stain_image(planes, lambda b: fn(b.expand(-1, 3, -1, -1)), tile=TILE, step=STEP,
                          window="mean", batch_size=7)
        out[axis] = np.moveaxis(to_uint8(np.moveaxis(rgb, 1, -1)), 0, a)
    return out


def new_run(tmp_path: Path, volume_path: Path, chunk, axes="z,y,x", sigma=1.0, **kw):
    plan = make_plan(open_volume(volume_path), chunk=chunk, axes=axes, tile=TILE, step=STEP,
                     window="mean", sigma=sigma, levels=LEVELS, **kw)
    run = init_run(tmp_path / f"run-{'x'.join(map(str, plan.chunk))}", plan)
    return run, load_plan(run)


def unit_names(plan, indices) -> list[str]:
    return sorted(f"{plan.unit(i).axis}/{plan.unit(i).name}" for i in indices)


def axis_output(run: Path, axis: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(axis_store(run, axis)), mode="r")[...])


def store_bytes(run: Path) -> dict[str, bytes]:
    """Every file of the per-axis stores (chunk files and metadata), by relative path."""
    out = {}
    for axis in "zyx":
        root = axis_store(run, axis)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if not f.endswith(".partial"):
                    p = Path(dirpath) / f
                    out[str(p.relative_to(run))] = p.read_bytes()
    return out


@pytest.mark.parametrize("chunk, max_unit", [((20, 26, 30), 1 << 27), ((8, 8, 8), 1 << 27),
                                             ((6, 11, 9), 1 << 27), ((20, 9, 30), 1 << 27),
                                             ((8, 8, 8), 500), ((6, 11, 9), 700)])
def test_slab_output_equals_whole_volume_on_every_axis(tmp_path, volume_path, reference,
                                                       chunk, max_unit):
    """Slabs (and, under a small memory bound, slabs split in-plane) == whole volume."""
    run, plan = new_run(tmp_path, volume_path, chunk, max_unit_voxels=max_unit)
    if max_unit < 1000:
        assert any(n > 1 for a in "zyx" for n in plan.unit_grid(a)[1:])
    report = run_local(run, ConvStainer(), batch_size=5, progress=False)
    assert len(report.stained) == plan.n_units
    for axis in "zyx":
        np.testing.assert_array_equal(axis_output(run, axis), reference[axis], err_msg=axis)


def test_units_are_slabs_of_whole_slices_aligned_to_storage_chunks(tmp_path, volume_path):
    _, plan = new_run(tmp_path, volume_path, (6, 11, 9))
    assert plan.unit_grid("z") == (4, 1, 1) and plan.unit_grid("x") == (4, 1, 1)
    seen = {a: np.zeros(SHAPE, int) for a in "zyx"}
    for u in plan.units:
        region = plan.unit_write_region(u)
        seen[u.axis][region] += 1
        for s, k, n in zip(region, plan.chunk, SHAPE, strict=True):
            assert s.start % k == 0 and (s.stop % k == 0 or s.stop == n)
    assert all((v == 1).all() for v in seen.values())  # every voxel owned once per axis


def test_engine_counts_exactly_the_generator_pixels_of_whole_planes(tmp_path, volume_path):
    run, plan = new_run(tmp_path, volume_path, (6, 11, 9))
    run_local(run, ConvStainer(), progress=False)
    cost = generator_cost(run)
    for a, axis in enumerate("zyx"):
        tile, step = plan.plane_tiling(axis)
        per_slice = grid_pixels(plan.plane(axis), tile, step)
        voxels_per_slice = np.prod(SHAPE) / SHAPE[a]
        assert cost[axis] == pytest.approx(per_slice / voxels_per_slice)


def test_tiles_are_clamped_to_thin_planes():
    from hpcstain.volume.plan import Plan

    plan = Plan(input="v", shape=(37, 131, 97), chunk=(37, 128, 97), size_multiple=4)
    assert plan.plane_tiling("z") == ((132, 100), (132, 100))
    assert plan.plane_tiling("y") == ((40, 100), (40, 100))
    big = Plan(input="v", shape=(300, 600, 700), chunk=(128, 128, 128))
    assert big.plane_tiling("z") == ((256, 256), (192, 192))


def test_prefetching_the_next_unit_changes_no_byte(tmp_path, volume_path):
    plan = make_plan(open_volume(volume_path), chunk=(8, 8, 8), axes="z,y,x", tile=TILE,
                     step=STEP, window="mean", sigma=1.0, levels=LEVELS)
    with_prefetch = init_run(tmp_path / "ahead", plan)
    without = init_run(tmp_path / "plain", plan)
    run_local(with_prefetch, ConvStainer(), batch_size=5, progress=False, prefetch=True)
    run_local(without, ConvStainer(), batch_size=5, progress=False, prefetch=False)
    a, b = store_bytes(with_prefetch), store_bytes(without)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_a_unit_that_does_not_fit_beside_the_next_is_read_after_its_ct_is_freed(
        tmp_path, volume_path, monkeypatch):
    """[issue 25] Over the read-ahead budget the next unit is read only once the current
    unit's CT is released (while its RGB is written): no read overlaps a unit's generator
    calls. The bytes are those of a full read-ahead."""
    from hpcstain.executors import local as local_mod
    from hpcstain.executors.local import stain_here, stain_pass

    plan = make_plan(open_volume(volume_path), chunk=(8, 8, 8), axes="z", tile=TILE,
                     step=STEP, window="mean", sigma=1.0, levels=LEVELS)
    full, tight = init_run(tmp_path / "full", plan), init_run(tmp_path / "tight", plan)
    events: list[str] = []
    load = local_mod.load_unit

    def logged_load(*args, **kwargs):
        events.append("read")
        return load(*args, **kwargs)

    inner = ConvStainer()

    def fn(batch):
        events.append("stain")
        return inner(batch)

    write = stain_mod.write_axis_region

    def logged_write(*args, **kwargs):
        events.append("write")
        return write(*args, **kwargs)

    monkeypatch.setattr(local_mod, "load_unit", logged_load)
    monkeypatch.setattr(stain_mod, "write_axis_region", logged_write)
    todo = pending_units(tight)
    assert len(todo) == 3 and stain_mod.unit_bytes(plan, 0)[0] > 0
    stain_here(stain_pass(tight, plan, todo, fn, batch_size=4), fn=fn, read_ahead_bytes=0)
    codes = "".join(e[0] for e in events)  # s(tain) r(ead) w(rite)
    assert codes.count("r") == 2 and codes.count("w") == 3
    writes = [i for i, c in enumerate(codes) if c == "w"]
    reads = [i for i, c in enumerate(codes) if c == "r"]
    for k, read in enumerate(reads):  # unit k+1 is read after unit k's last generator call
        assert read > codes.rindex("s", 0, writes[k]), codes
    run_local(full, ConvStainer(), batch_size=4, progress=False, prefetch=True)
    assert store_bytes(tight) == store_bytes(full)


def test_axes_differ_so_each_axis_is_really_slicewise(reference):
    assert not np.array_equal(reference["z"], reference["y"])
    assert not np.array_equal(reference["z"], reference["x"])


def test_gaussian_with_halo_is_chunk_invariant(tmp_path):
    vol = np.random.default_rng(3).integers(0, 60000, (11, 3, 17), dtype=np.uint16)
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol)
    src = open_volume(tmp_path / "v.zarr")
    plan = make_plan(src, chunk=4, tile=4, step=2, sigma=1.0, levels=LEVELS)
    whole = ct_to_signed(whole_volume_smooth(vol, 1.0, plan.halo), *LEVELS)
    boxes = [(slice(0, 11), slice(0, 3), slice(0, 17)), (slice(3, 7), slice(1, 2), slice(5, 16)),
             (slice(0, 2), slice(0, 3), slice(15, 17)), (slice(9, 11), slice(2, 3), slice(0, 1))]
    for box in boxes:
        np.testing.assert_array_equal(prepare_block(src, box, plan.ct_recipe), whole[box],
                                      err_msg=str(box))
    plain = make_plan(src, chunk=4, tile=4, step=2, sigma=0.0, levels=LEVELS)
    assert plain.halo == 0
    np.testing.assert_array_equal(prepare_block(src, boxes[1], plain.ct_recipe),
                                  ct_to_signed(vol.astype(np.float32), *LEVELS)[boxes[1]])


def test_subset_of_axes_writes_only_those(tmp_path, volume_path, reference):
    run, _ = new_run(tmp_path, volume_path, (10, 13, 15), axes="x,z")
    run_local(run, ConvStainer(), progress=False)
    assert sorted(p.name for p in run.glob("axis-*.zarr")) == ["axis-x.zarr", "axis-z.zarr"]
    np.testing.assert_array_equal(axis_output(run, "x"), reference["x"])


def test_completion_record_written_only_after_the_data(tmp_path, volume_path, reference,
                                                       monkeypatch):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15))
    real_write_record = stain_mod.write_record
    seen = []

    def checking_write_record(run_dir, task, name, info):
        axis = task.removeprefix("axis-")
        region = tuple(slice(a, b) for a, b in info["write_region"])
        on_disk = np.asarray(zarr.open_array(str(axis_store(run, axis)), mode="r")[region])
        np.testing.assert_array_equal(on_disk, reference[axis][region])
        seen.append((axis, name))
        return real_write_record(run_dir, task, name, info)

    monkeypatch.setattr(stain_mod, "write_record", checking_write_record)
    run_local(run, ConvStainer(), progress=False)
    assert len(seen) == plan.n_units

    def failing_write(*args, **kwargs):
        raise OSError("disk full")

    run2, plan2 = new_run(tmp_path / "b", volume_path, (10, 13, 15))
    monkeypatch.setattr(stain_mod, "write_axis_region", failing_write)
    with pytest.raises(OSError):
        stain_unit(run2, 0, ConvStainer(), plan=plan2)
    assert not record_path(run2, "axis-z", plan2.unit(0).name).exists()


class FailingAfter:
    """Raises on its n-th call, like a job dying mid-run."""

    def __init__(self, n: int) -> None:
        self.inner, self.calls, self.n = ConvStainer(), 0, n

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("simulated crash")
        return self.inner(batch)


def test_rerun_after_crash_redoes_only_incomplete_units_and_gives_identical_bytes(
        tmp_path, volume_path):
    clean, plan = new_run(tmp_path / "clean", volume_path, (10, 13, 15))
    run_local(clean, ConvStainer(), batch_size=8, progress=False)
    crashed, _ = new_run(tmp_path / "crashed", volume_path, (10, 13, 15))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_local(crashed, FailingAfter(40), batch_size=8, progress=False)
    pending = pending_units(crashed)
    assert 0 < len(pending) < plan.n_units
    done_before = {a: done_names(crashed, f"axis-{a}") for a in "zyx"}
    report = run_local(crashed, ConvStainer(), batch_size=8, progress=False)
    assert sorted(report.stained) == unit_names(plan, pending)
    assert report.skipped == plan.n_units - len(pending)
    assert all(done_before[a] <= done_names(crashed, f"axis-{a}") for a in "zyx")
    assert store_bytes(crashed) == store_bytes(clean)
    assert pending_units(crashed) == []


def test_killed_process_resumes_to_identical_bytes(tmp_path, volume_path):
    clean, plan = new_run(tmp_path / "clean", volume_path, (10, 13, 15), axes="z")
    run_local(clean, ConvStainer(), progress=False)
    killed, _ = new_run(tmp_path / "killed", volume_path, (10, 13, 15), axes="z")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_volume_stain import ConvStainer
        from hpcstain.executors import run_local
        inner, calls = ConvStainer(), [0]
        def fn(batch):
            calls[0] += 1
            if calls[0] == 14:
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(batch)
        run_local({str(killed)!r}, fn, batch_size=8, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    left = pending_units(killed)
    assert 0 < len(left) < plan.n_units
    report = run_local(killed, ConvStainer(), progress=False)
    assert len(report.stained) == len(left)
    assert store_bytes(killed) == store_bytes(clean)


def test_dask_local_cluster_equals_in_process(tmp_path, volume_path):
    local, _ = new_run(tmp_path / "local", volume_path, (10, 13, 15), axes="z,y")
    run_local(local, ConvStainer(), progress=False)
    dask_run, plan = new_run(tmp_path / "dask", volume_path, (10, 13, 15), axes="z,y")
    report = run_stain(dask_run, executor="dask", make_fn=MakeConvStainer(), n_workers=2,
                       processes=False)
    assert len(report.stained) == plan.n_units
    assert store_bytes(dask_run) == store_bytes(local)
    again = run_stain(dask_run, executor="dask", make_fn=MakeConvStainer(), processes=False)
    assert again.stained == [] and again.skipped == plan.n_units


def test_array_tasks_cover_every_unit_once(tmp_path, volume_path, reference):
    assert unit_group(10, 1, 3) == [1, 4, 7]
    assert sorted(i for t in range(3) for i in unit_group(10, t, 3)) == list(range(10))
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                          "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    with pytest.raises(UsageError):
        task_from_env({})
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15), axes="z")
    first = run_array_task(run, 0, 2, make_fn=MakeConvStainer())
    assert sorted(first.stained) == unit_names(plan, unit_group(plan.n_units, 0, 2))
    run_array_task(run, 1, 2, make_fn=MakeConvStainer())
    assert pending_units(run) == []
    np.testing.assert_array_equal(axis_output(run, "z"), reference["z"])


def test_different_plan_in_same_run_dir_is_refused_naming_keys(tmp_path, volume_path):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15))
    init_run(run, plan)  # same plan: resume is fine
    other = make_plan(open_volume(volume_path), chunk=(10, 13, 15), tile=TILE, step=4,
                      sigma=0.5, levels=LEVELS)
    with pytest.raises(UsageError, match=r"different plan.*sigma: 1\.0 -> 0\.5.*step: 8 -> 4"):
        init_run(run, other)
    init_run(run, other, overwrite=True)
    assert load_plan(run).step == 4


def test_plan_records_what_determines_the_output(tmp_path, volume_path):
    run, plan = new_run(tmp_path, volume_path, 64, config={"model.ngf": 8})
    saved = load_plan(run)
    assert saved == plan
    assert saved.shape == SHAPE and saved.chunk == SHAPE  # chunk clipped to the volume
    assert saved.voxel_size_um == (5.0, 5.0, 5.0) and saved.halo == 4
    assert saved.target_levels == (30000.0, 10000.0) and saved.config == {"model.ngf": 8}
    assert (saved.tile, saved.step, saved.window) == (TILE, STEP, "mean")
    with pytest.raises(UsageError, match="axes"):
        make_plan(open_volume(volume_path), axes="z,w", levels=LEVELS)
    with pytest.raises(UsageError, match="window"):
        make_plan(open_volume(volume_path), window="box", levels=LEVELS)


def test_changed_input_is_refused(tmp_path, volume_path):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15), axes="z")
    zarr.create_array(str(tmp_path / "other.zarr"), data=ct_volume((4, 4, 4)))
    bad = open_volume(tmp_path / "other.zarr")
    with pytest.raises(InputError, match="differs from the plan"):
        stain_unit(run, 0, ConvStainer(), plan=plan, source=bad)


def test_the_stain_gaussian_follows_the_checkpoint_unless_given(tmp_path, volume_path):
    """A model trained on unblurred slides records data.stain_sigma 0: its runs skip the 3D
    Gaussian (the halo shrinks with it); older checkpoints read as the paper's σ = 1."""
    from micro import untrained_generator_checkpoint

    from hpcstain.checkpoint import load_checkpoint, save_checkpoint

    paper = untrained_generator_checkpoint(tmp_path / "paper.pt")
    ckpt = load_checkpoint(paper)
    ckpt["config"]["data"]["stain_sigma"] = 0.0
    sharp = save_checkpoint(tmp_path / "sharp.pt", ckpt)
    del ckpt["config"]["data"]["stain_sigma"]   # a checkpoint from before the key
    old = save_checkpoint(tmp_path / "old.pt", ckpt)
    src = open_volume(volume_path)
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=sharp).sigma == 0
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=sharp).halo == 0
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=old).sigma == 1
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=paper).sigma == 1
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=sharp,
                     sigma=1.5).sigma == 1.5
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS).sigma == 1


def test_the_plan_records_the_checkpoints_fuse_method(tmp_path, volume_path):
    """data.fuse_method (tissue-cpu: median) is recorded in the plan for `fuse`; older
    checkpoints and runs without a checkpoint read as mean; it is not part of what a stain
    writes, so a resume does not compare it."""
    from micro import untrained_generator_checkpoint

    from hpcstain.checkpoint import load_checkpoint, save_checkpoint
    from hpcstain.volume.plan import plan_differences

    paper = untrained_generator_checkpoint(tmp_path / "paper.pt")
    ckpt = load_checkpoint(paper)
    ckpt["config"]["data"]["fuse_method"] = "median"
    tissue = save_checkpoint(tmp_path / "tissue.pt", ckpt)
    src = open_volume(volume_path)
    median = make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=tissue)
    mean = make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS, checkpoint=paper)
    assert (median.fuse_method, mean.fuse_method) == ("median", "mean")
    assert make_plan(src, chunk=8, tile=16, step=8, levels=LEVELS).fuse_method == "mean"
    assert "fuse_method" not in plan_differences(mean, median)
