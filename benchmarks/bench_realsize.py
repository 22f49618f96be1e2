"""A real-size run on this machine (issue 25, item 4): a uint16 volume of ``--shape``
(default 512×1024×1024, 1 GiB) stained along z, y and x with a checkpoint (the distilled
student), SIGKILLed once in the middle, resumed, and fused; ``hpcstain status`` read while
it runs. Each command is a child process whose peak RSS comes from ``wait4``.

    .venv/bin/python benchmarks/bench_realsize.py --out /tmp/realsize \\
        --checkpoint runs/student/checkpoints/latest.pt [--kill-after 60] [--shape 512 1024 1024]

Prints one line per phase (wall s, peak RSS) and the whole run's voxel·axis/s; the status
lines (units done, ETA) read during the run go to OUT/status.log.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
HPCSTAIN = str(Path(sys.executable).with_name("hpcstain"))


def run_child(cmd: list[str], kill_after: float | None, status_of: Path | None,
              log: Path) -> tuple[float, float, int, list[str]]:
    """(wall s, peak RSS GiB, exit status, status lines) of ``cmd``; SIGKILL it after
    ``kill_after`` seconds; every 10 s read ``hpcstain status`` of ``status_of``."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    lines: list[str] = []
    next_status = time.perf_counter() + 10
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter()
        if kill_after is not None and now - t0 > kill_after:
            proc.send_signal(signal.SIGKILL)
            kill_after = None
        if status_of is not None and now > next_status:
            out = subprocess.run([HPCSTAIN, "status", str(status_of)], capture_output=True,
                                 text=True).stdout
            lines.append(f"[{now - t0:6.1f} s] " + " | ".join(
                ln.strip() for ln in out.splitlines()
                if ln.strip().startswith(("axis", "ETA", "throughput", "state"))))
            next_status = now + 10
        time.sleep(0.2)
    rss = usage.ru_maxrss / 2**20  # KiB → GiB
    code = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, rss, code, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--shape", type=int, nargs=3, default=(512, 1024, 1024))
    p.add_argument("--kill-after", type=float, default=60.0,
                   help="seconds after which the first stain is SIGKILLed (0: no kill)")
    args = p.parse_args()
    from bench_engine import synthetic_ct

    args.out.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    vol = args.out / f"ct-{'x'.join(map(str, shape))}.zarr"
    if not vol.exists():
        t = time.perf_counter()
        synthetic_ct(vol, shape)
        print(f"volume {shape} uint16 ({2 * shape[0] * shape[1] * shape[2] / 2**30:.2f} GiB) "
              f"written in {time.perf_counter() - t:.0f} s", flush=True)
    run = args.out / "run"
    log, status_log = args.out / "commands.log", args.out / "status.log"
    stain = [HPCSTAIN, "stain", f"{vol}", "--checkpoint", str(args.checkpoint),
             "--out", str(run), "--axes", "z,y,x", "--no-progress", "--device", "cpu"]
    phases = []
    wall, rss, code, lines = run_child([*stain, "--overwrite"], args.kill_after or None, run,
                                       log)
    phases.append(("stain (killed)" if code != 0 else "stain", wall, rss, code))
    status_log.write_text("\n".join(lines) + "\n")
    if code != 0:
        out = subprocess.run([HPCSTAIN, "status", str(run)], capture_output=True, text=True)
        with status_log.open("a") as fh:
            fh.write("after the kill:\n" + out.stdout)
        wall2, rss2, code2, lines2 = run_child(stain, None, run, log)
        phases.append(("stain (resumed)", wall2, rss2, code2))
        with status_log.open("a") as fh:
            fh.write("\n".join(lines2) + "\n")
    wall3, rss3, code3, _ = run_child([HPCSTAIN, "fuse", str(run), "--no-progress"], None,
                                      None, log)
    phases.append(("fuse", wall3, rss3, code3))
    n = shape[0] * shape[1] * shape[2]
    stain_wall = sum(w for name, w, _, _ in phases if name.startswith("stain"))
    print("| phase | wall s | peak RSS GiB | exit |\n|---|---|---|---|")
    for name, w, r, c in phases:
        print(f"| {name} | {w:.1f} | {r:.2f} | {c} |")
    print(f"stain: {3 * n / stain_wall / 1e6:.1f} M voxel·axis/s over {stain_wall:.0f} s "
          f"(3 axes, kill and resume included); stain + fuse {stain_wall + wall3:.0f} s; "
          f"status lines in {status_log}")


if __name__ == "__main__":
    main()
