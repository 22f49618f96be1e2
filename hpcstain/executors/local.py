"""In-process executor: chunks one after another, with a progress bar."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import (
    ChunkResult,
    LoadedChunk,
    StainFn,
    load_chunk,
    pending_chunks,
    resolve_fn,
    stain_chunk,
)

MakeFn = Callable[[], StainFn]


@dataclass
class StainReport:
    """Which chunks a pass stained (the rest of the plan was already done)."""

    run_dir: Path
    n_chunks: int
    stained: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.run_dir}: stained {len(self.stained)} chunk(s), {self.skipped} already "
                f"done, {self.n_chunks} in the plan ({self.seconds:.1f} s)")


def process_chunk(run_dir: str | os.PathLike[str], chunk_index: int,
                  make_fn: MakeFn | None = None, batch_size: int = 16,
                  device: str = "cpu") -> ChunkResult:
    """The unit of work every executor runs: open the run, stain one chunk, record it.

    ``make_fn`` builds the staining function in the worker (default: the plan's
    checkpoint, loaded once per process).
    """
    plan = load_plan(run_dir)
    fn = resolve_fn(None, make_fn, plan, device)
    return stain_chunk(run_dir, chunk_index, fn, batch_size=batch_size, plan=plan)


def run_local(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
              make_fn: MakeFn | None = None, chunks: Iterable[int] | None = None,
              batch_size: int = 16, device: str = "cpu", progress: bool = True,
              prefetch: bool = True) -> StainReport:
    """Stain every pending chunk (or the given ``chunks``) in this process.

    With ``prefetch`` a background thread reads and preprocesses the next chunk (read +
    halo, Gaussian, normalisation) while the generator works on the current one.
    """
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    pending = set(pending_chunks(run_dir, plan))
    todo = [i for i in (range(plan.n_chunks) if chunks is None else chunks) if i in pending]
    report = StainReport(Path(run_dir), plan.n_chunks, skipped=plan.n_chunks - len(pending))
    if not todo:
        return report
    fn = resolve_fn(fn, make_fn, plan, device)
    bar = todo
    if progress:
        from tqdm import tqdm

        bar = tqdm(todo, desc="stain", unit="chunk")
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead: Future[LoadedChunk] | None = None
        for n, i in enumerate(bar):
            loaded = ahead.result() if ahead is not None else None
            ahead = (pool.submit(load_chunk, run_dir, todo[n + 1], plan)
                     if prefetch and n + 1 < len(todo) else None)
            result = stain_chunk(run_dir, i, fn, batch_size=batch_size, plan=plan,
                                 loaded=loaded)
            report.stained.append(result.name)
    report.seconds = time.perf_counter() - t0
    return report
