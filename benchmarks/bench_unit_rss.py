"""Peak RSS of staining a few units of a planned run in one process (issue 25, item 4): the
slab being stained beside the next one read ahead, under a read-ahead budget.

    .venv/bin/python benchmarks/bench_realsize.py --out /tmp/rs --checkpoint C --kill-after 1
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_unit_rss.py --run /tmp/rs/run \\
        --units 0,1 [--read-ahead-mib 1280 | --no-prefetch]

Each call stains the given units of a copy of ``--run``'s plan (a fresh run directory,
removed afterwards) with the run's pinned generator and prints the process's peak RSS
(``ru_maxrss``) and wall time. Units 0, 1 of the 512×1024×1024 run are two z slabs of 128
whole 1024² planes, the plan's largest units; 4, 5, 8 are y slabs and the first x slab.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from hpcstain.executors.local import stain_here, stain_pass
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import init_run, unit_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a planned run (its plan.json)")
    p.add_argument("--units", default="0,1")
    p.add_argument("--read-ahead-mib", type=int, default=None,
                   help="read-ahead budget (default: the engine's READ_AHEAD_BYTES)")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/bench-unit-rss"))
    args = p.parse_args()
    units = [int(u) for u in args.units.split(",")]
    plan = load_plan(args.run)
    shutil.rmtree(args.scratch, ignore_errors=True)
    run = init_run(args.scratch, plan)
    budget = None if args.read_ahead_mib is None else args.read_ahead_mib << 20
    t0 = time.perf_counter()
    stain_here(stain_pass(run, load_plan(run), units), prefetch=not args.no_prefetch,
               read_ahead_bytes=budget)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    est = [tuple(round(b / 2**30, 2) for b in unit_bytes(plan, u)) for u in units]
    print(f"units {units} (estimated GiB held / read peak: {est}), prefetch "
          f"{not args.no_prefetch}, budget {args.read_ahead_mib or 'default'} MiB: "
          f"peak RSS {peak:.2f} GiB, {wall:.1f} s")
    shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
