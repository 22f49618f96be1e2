"""Stain and fuse as one task graph (issue 27: one block-task engine): a job runs only
after its upstream jobs, on every runner; a graph of stain then fuse writes the bytes of
`stain` then `fuse`, and resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_volume_stain import (
    ConvStainer,
    MakeConvStainer,
    new_run,
    store_bytes,
    write_ct_volume,
)

from hpcstain.executors import run_fuse, run_local, run_stain_fuse
from hpcstain.volume.fuse import chunk_needs
from hpcstain.volume.rundir import done_names
from hpcstain.volume.tasks import (
    TaskGraph,
    TaskPass,
    run_graph_processes,
    run_graph_serial,
)


class Logged:
    """A picklable task that logs when each job started and ended (files in ``folder``),
    and fails on job ``fail``."""

    def __init__(self, folder: Path, tag: str, fail: int | None = None) -> None:
        self.folder, self.tag, self.fail = str(folder), tag, fail

    def __call__(self, job: int) -> list[str]:
        start = time.time()
        if job == self.fail:
            raise RuntimeError(f"{self.tag}{job} failed")
        time.sleep(0.05)
        Path(self.folder, f"{self.tag}{job}.json").write_text(
            json.dumps({"start": start, "end": time.time()}))
        return [f"{self.tag}{job}"]


def diamond(folder: Path, fail: int | None = None) -> TaskGraph:
    """Six upstream jobs; downstream job d waits for upstream jobs d and d+3."""
    up = TaskPass(Logged(folder, "u", fail), list(range(6)))
    down = TaskPass(Logged(folder, "d"), list(range(3)))
    return TaskGraph([up, down], {1: [[(0, d), (0, d + 3)] for d in range(3)]})


def logged(folder: Path, name: str) -> dict[str, float]:
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.parametrize("workers", [1, 3])
def test_a_job_starts_only_after_its_upstream_jobs(tmp_path, workers):
    names = (run_graph_serial(diamond(tmp_path)) if workers == 1
             else run_graph_processes(diamond(tmp_path), workers=workers))
    assert sorted(names[0]) == [f"u{i}" for i in range(6)]
    assert sorted(names[1]) == ["d0", "d1", "d2"]
    for d in range(3):
        ends = [logged(tmp_path, f"u{u}")["end"] for u in (d, d + 3)]
        assert logged(tmp_path, f"d{d}")["start"] >= max(ends)


def test_a_failed_job_stops_what_waits_for_it(tmp_path):
    with pytest.raises(RuntimeError, match="u1 failed"):
        run_graph_processes(diamond(tmp_path, fail=1), workers=2)
    assert not (tmp_path / "d1.json").exists()  # its downstream job never ran


def test_upstream_must_name_earlier_jobs(tmp_path):
    up = TaskPass(Logged(tmp_path, "u"), [0, 1])
    with pytest.raises(ValueError, match="earlier passes"):
        TaskGraph([up, TaskPass(Logged(tmp_path, "d"), [0])], {1: [[(1, 0)]]})
    with pytest.raises(ValueError, match="one list per job"):
        TaskGraph([up, TaskPass(Logged(tmp_path, "d"), [0])], {1: []})


def fused_bytes(run: Path) -> dict[str, bytes]:
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")
    out = {}
    for group, prefix in ((root, ""), (root["disagreement"], "disagreement/")):
        for key in sorted(group.array_keys()):
            out[prefix + key] = np.asarray(group[key][...]).tobytes()
    return out


FUSE = {"method": "median", "pyramid_levels": 2, "fill_outside": True}


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory) -> Path:
    return write_ct_volume(tmp_path_factory.mktemp("input") / "ct.zarr")


@pytest.fixture(scope="module")
def apart(tmp_path_factory, volume_path):
    """`stain` then `fuse`, the reference bytes."""
    run, _ = new_run(tmp_path_factory.mktemp("apart"), volume_path, (10, 13, 15))
    run_local(run, ConvStainer(), progress=False)
    report = run_fuse(run, **FUSE)
    assert report.complete
    return run


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor, workers", [("local", 1), ("local", 2), ("dask", 2)])
def test_stain_and_fuse_as_one_graph_write_the_bytes_of_two_passes(
        tmp_path, volume_path, apart, executor, workers):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15))
    stained, fused = run_stain_fuse(run, ConvStainer(), executor, workers, progress=False,
                                    **FUSE)  # the function itself goes to the workers
    assert len(stained.stained) == plan.n_units
    assert fused is not None and fused.complete and len(fused.fused) == plan.n_chunks
    assert store_bytes(run) == store_bytes(apart)
    assert fused_bytes(run) == fused_bytes(apart)
    again, refused = run_stain_fuse(run, ConvStainer(), progress=False, **FUSE)
    assert again.stained == [] and refused is not None and refused.fused == []


def test_a_graph_resumes_a_run_stained_in_part(tmp_path, volume_path, apart):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15))
    run_local(run, ConvStainer(), units=range(0, plan.n_units, 2), progress=False)
    stained, fused = run_stain_fuse(run, None, "local", 2, make_fn=MakeConvStainer(),
                                    progress=False, **FUSE)
    assert len(stained.stained) == plan.n_units - len(range(0, plan.n_units, 2))
    assert fused is not None and fused.complete
    assert fused_bytes(run) == fused_bytes(apart)


def test_a_fuse_group_needs_the_units_under_its_grown_chunks(tmp_path, volume_path):
    run, plan = new_run(tmp_path, volume_path, (10, 13, 15))
    corner = chunk_needs(plan, [0], plan.axes, "mean")    # no halo: only the chunk
    grown = chunk_needs(plan, [0], plan.axes, "consistency")  # a halo reaches neighbours
    assert all(corner[a] and corner[a] <= grown[a] for a in plan.axes)
    assert any(corner[a] < grown[a] for a in plan.axes)
    assert done_names(run, "axis-z") == set()


def test_stain_fuse_on_the_command_line_is_stain_then_fuse(tmp_path, capsys):
    from micro import untrained_generator_checkpoint

    from hpcstain.cli import main
    from hpcstain.phantom import write_volume_file

    vol = write_volume_file(tmp_path / "ct.zarr", (12, 24, 24), "mg", 1, chunk=12)
    ckpt = untrained_generator_checkpoint(tmp_path / "gen.pt")
    common = [str(vol), "--checkpoint", str(ckpt), "--chunk", "12", "--tile", "16",
              "--step", "8", "--device", "cpu", "--no-progress"]
    assert main(["stain", *common, "--out", str(tmp_path / "apart")]) == 0
    assert main(["fuse", str(tmp_path / "apart"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stain", *common, "--out", str(tmp_path / "graph"), "--fuse",
                 "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "stained 5 unit(s)" in out and "fused 4 new chunk(s)" in out, out
    assert fused_bytes(tmp_path / "graph") == fused_bytes(tmp_path / "apart")
