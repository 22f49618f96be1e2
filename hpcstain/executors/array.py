"""SLURM-array worker: task ``i`` of ``n`` stains unit group ``i`` (units i, i+n, i+2n …).

A launcher submits ``n`` array tasks that each run::

    python -m hpcstain.executors.array RUN_DIR [--task-id I] [--n-tasks N]

``--task-id`` / ``--n-tasks`` default to ``SLURM_ARRAY_TASK_ID`` (minus
``SLURM_ARRAY_TASK_MIN``) and ``SLURM_ARRAY_TASK_COUNT``. Round-robin groups spread the
small edge slabs over all tasks. Units with completion records are skipped, so a
requeued or re-submitted task only does what is left.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hpcstain.device import announce, resolve_device
from hpcstain.errors import HpcstainError, UsageError
from hpcstain.executors.local import MakeFn, StainReport, run_local
from hpcstain.volume.plan import load_plan


def unit_group(n_units: int, task_id: int, n_tasks: int) -> list[int]:
    """The unit indices of task ``task_id`` out of ``n_tasks`` (round robin)."""
    if n_tasks < 1 or not 0 <= task_id < n_tasks:
        raise UsageError(f"task {task_id} of {n_tasks}: need 0 <= task-id < n-tasks")
    return list(range(task_id, n_units, n_tasks))


def task_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(task id, task count) of this SLURM array task, from the environment."""
    env = dict(os.environ if env is None else env)
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError):
        raise UsageError("not a SLURM array task (SLURM_ARRAY_TASK_ID/COUNT unset); pass "
                         "--task-id and --n-tasks") from None
    return task, count


def run_array_task(run_dir: str | os.PathLike[str], task_id: int, n_tasks: int,
                   make_fn: MakeFn | None = None, batch_size: int = 0, device: str = "cpu",
                   progress: bool = False) -> StainReport:
    """Stain this task's unit group (pending units only)."""
    plan = load_plan(run_dir)
    group = unit_group(plan.n_units, task_id, n_tasks)
    return run_local(run_dir, make_fn=make_fn, units=group, batch_size=batch_size,
                     device=device, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcstain.executors.array",
                                description="Stain unit group i of n of a planned run.")
    p.add_argument("run_dir")
    p.add_argument("--task-id", type=int, default=None)
    p.add_argument("--n-tasks", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=0, help="tiles per call (0: auto)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device, int(os.environ.get("SLURM_LOCALID", "0")
                                                      or 0))
        announce(args.device)
        if args.task_id is None or args.n_tasks is None:
            env_task, env_count = task_from_env()
            args.task_id = env_task if args.task_id is None else args.task_id
            args.n_tasks = env_count if args.n_tasks is None else args.n_tasks
        report = run_array_task(args.run_dir, args.task_id, args.n_tasks,
                                batch_size=args.batch_size, device=args.device)
    except HpcstainError as exc:
        print(f"hpcstain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
