"""The `hpcstain` command: each verb parses its arguments and calls one module function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcstain import __version__
from hpcstain.errors import HpcstainError, InputError, UsageError

# --------------------------------------------------------------------------- verbs


def cmd_info(args: argparse.Namespace) -> int:
    from hpcstain.info import checkpoint_report, collect, format_checkpoint, format_report

    if args.checkpoint:
        report = checkpoint_report(args.checkpoint)
        print(json.dumps(report, indent=2) if args.json else format_checkpoint(report))
        return 0
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hpcstain.status import collect_status, format_status, watch

    if args.watch is not None:
        return watch(args.run_dir, args.watch, as_json=args.json,
                     require_fused=args.require_fused)
    report = collect_status(args.run_dir, require_fused=args.require_fused)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return int(report["exit_code"])


def cmd_phantom_volume(args: argparse.Namespace) -> int:
    from hpcstain.phantom import write_volume_file

    out = write_volume_file(args.out, tuple(args.shape), args.material, args.seed,
                            overwrite=args.overwrite, chunk=args.chunk,
                            screw_scale=args.screw_scale, cupping=args.cupping,
                            tomo=_tomo_params(args))
    print(f"wrote {out}")
    return 0


def cmd_phantom_pairs(args: argparse.Namespace) -> int:
    from hpcstain.phantom import write_pairs

    manifest = write_pairs(args.outdir, args.n, args.seed, size=tuple(args.size),
                           overwrite=args.overwrite, orientation=args.orientation,
                           misalignment=args.misalignment, ct_slab=args.ct_slab,
                           tomo=_tomo_params(args))
    print(f"wrote {manifest}")
    return 0


_TOMO_FLAGS = {"flux": "flux", "rings": "rings", "phase_distance": "phase_distance",
               "paganin": "paganin", "spectrum": "spectrum", "energy": "energy_kev",
               "angles": "angles", "sample_radius": "sample_radius_mm"}


def _tomo_params(args: argparse.Namespace) -> Any:
    """[physics] TomoParams from the phantom's --physics tomo knobs (None: the renderer);
    a knob given without --physics tomo is a UsageError."""
    from hpcstain.phantom.tomo import TomoParams

    given = {field: getattr(args, flag) for flag, field in _TOMO_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.grey is not None:
        given.update(grey_offset=args.grey[0], grey_scale=args.grey[1])
    if args.physics != "tomo":
        if given:
            flag = next((f for f, v in _TOMO_FLAGS.items() if v in given), "grey")
            raise UsageError(f"phantom: --{flag.replace('_', '-')} needs --physics tomo")
        return None
    return TomoParams(**given)


def _add_tomo_args(p: argparse.ArgumentParser) -> None:
    """[physics] The physical CT chain's knobs (docs/phantom.md, *Physical CT*)."""
    p.add_argument("--physics", default="render", choices=("render", "tomo"),
                   help="render: the phantom's CT renderer (default); tomo: a physical CT "
                   "chain (polychromatic projection, Poisson counts, rings, optional phase "
                   "contrast, filtered back-projection); labels and truth stain unchanged")
    p.add_argument("--flux", type=float, default=None, metavar="N",
                   help="tomo: photons per detector pixel per projection (default 1e4; "
                   "1e3 starves behind Ti; 0 noiseless)")
    p.add_argument("--rings", type=float, default=None, metavar="S",
                   help="tomo: detector gain-error (ring) strength, 0 off, default 1")
    p.add_argument("--phase-distance", type=float, default=None, metavar="M",
                   help="tomo: propagation distance in m for phase contrast (default 0: off)")
    p.add_argument("--paganin", type=float, default=None, metavar="DB",
                   help="tomo: Paganin phase retrieval with this delta/beta at --energy "
                   "(default 0: off; ~800 bone, ~2200 soft tissue at 40 keV)")
    p.add_argument("--spectrum", default=None, choices=("poly", "mono"),
                   help="tomo: polychromatic (5 bins, default) or monochromatic beam")
    p.add_argument("--energy", type=float, default=None, metavar="KEV",
                   help="tomo: mean energy of the spectrum (default 40 keV)")
    p.add_argument("--angles", type=int, default=None, metavar="N",
                   help="tomo: projections over 180 degrees (default pi/2 x detector width)")
    p.add_argument("--sample-radius", type=float, default=None, metavar="MM",
                   help="tomo: physical radius of the field of view (default 3 mm)")
    p.add_argument("--grey", type=float, nargs=2, default=None, metavar=("OFFSET", "SCALE"),
                   help="tomo: uint16 = OFFSET + SCALE * mu[1/cm] (default 4000 6000)")


def cmd_train(args: argparse.Namespace) -> int:
    from hpcstain.train.runs import resolve_run_config

    return _train_and_report(resolve_run_config(Path(args.out), args.config,
                                                _device_override(args)), args)


def _device_override(args: argparse.Namespace) -> list[str]:
    """[device] `train/distill --device X` is `train.device=X` (a resume may change it)."""
    device = getattr(args, "device", None)
    return [*args.overrides, *([f"train.device={device}"] if device else [])]


def _train_and_report(cfg: Any, args: argparse.Namespace) -> int:
    """Run (or resume) a training run; one line on how it ended, 75 when preempted."""
    from hpcstain.train.trainer import EXIT_PREEMPTED, train

    result = train(cfg, args.out, progress=not args.no_progress)
    if result.status == "preempted":
        print(f"stopped by signal at epoch {result.epoch}, step {result.step}; checkpoint "
              f"{result.checkpoint}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"{result.status} at epoch {result.epoch}, step {result.step}: {result.checkpoint}")
    return 0


def _distill_config(args: argparse.Namespace, run_over: list[str]) -> Any:
    """The run config of `distill` / `submit distill`: student profile + teacher + data."""
    from hpcstain.train.runs import resolve_run_config
    from hpcstain.train.teacher import teacher_overrides

    out = Path(args.out)
    if args.teacher is None and not (out / "config.yaml").exists():
        raise UsageError(f"{out}: no distillation run here to resume; give --teacher CKPT "
                         "and --config student-PROFILE")
    over = teacher_overrides(args.teacher) if args.teacher else []
    if args.volume:
        specs = [v.partition(":") for v in args.volume]  # PATH[:dataset]
        over.append("distill.volumes=" + json.dumps([str(Path(p).resolve()) + c + d
                                                     for p, c, d in specs]))
    if args.pairs:
        over.append(f"data.manifest={json.dumps(str(Path(args.pairs).resolve()))}")
    cfg = resolve_run_config(out, args.config, [*over, *run_over])
    if cfg.model.variant != "distill":
        raise UsageError(f"{args.config or out}: not a student profile (model.variant is "
                         f"{cfg.model.variant!r}, distillation needs 'distill'; e.g. "
                         "--config student-fast)")
    return cfg


def cmd_distill(args: argparse.Namespace) -> int:
    return _train_and_report(_distill_config(args, _device_override(args)), args)


def cmd_submit_distill(args: argparse.Namespace) -> int:
    from hpcstain.launch.profiles import load_cluster

    run_over, cluster_over = _split_overrides(args.overrides)
    cluster = load_cluster(args.profile, cluster_over)
    return _submit_training(_distill_config(args, run_over), args, cluster)


def _submit_training(cfg: Any, args: argparse.Namespace, cluster: Any) -> int:
    """Submit one training (or distillation) job; with --wait, one progress line, exit 0/1."""
    from hpcstain.launch.submit import describe, submit_train

    job = submit_train(cfg, Path(args.out), cluster)
    print(describe(job))
    if args.wait:
        from hpcstain.launch.watch import wait_train

        outcome = wait_train([job], [Path(args.out)])[0]
        if not outcome.ok:
            return 1
        print(f"job {job.job_id} finished: {outcome.result}")
    return 0


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="the trained checkpoint to learn from (a new run needs it)")
    p.add_argument("--config", "-c", default=None,
                   help="student profile (student-fast, student-small) or YAML; omit to resume")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--volume", action="append", default=[], metavar="VOL",
                   help="target volume whose slices the teacher labels (repeatable)")
    p.add_argument("--pairs", default=None, metavar="MANIFEST",
                   help="pair manifest whose training CT the teacher labels (data.manifest)")


def _plan_from_args(args: argparse.Namespace) -> Path:
    """Open and validate the input, write (or re-check) RUN_DIR/plan.json."""
    from hpcstain.tiles import resolve_tiling
    from hpcstain.volume import init_run, make_plan, open_volume
    from hpcstain.volume.stain import checkpoint_changed

    levels = None
    if (args.bone_level is None) != (args.background_level is None):
        raise UsageError("give both --bone-level and --background-level (or neither)")
    if args.bone_level is not None:
        levels = (args.bone_level, args.background_level)
    tiling = resolve_tiling(args.tiling, args.tile, args.step, args.window)
    src = open_volume(args.input, nan_policy="error" if args.nan_value is None else "replace",
                      nan_value=args.nan_value or 0.0)
    chunk = args.chunk[0] if len(args.chunk) == 1 else tuple(args.chunk)
    plan = make_plan(src, chunk=chunk, axes=args.axes, tile=tiling.tile, step=tiling.step,
                     window=tiling.window, sigma=args.sigma, levels=levels,
                     voxel_size_um=args.voxel_size,  # "Z,Y,X" / Z Y X / S, parsed there
                     checkpoint=args.checkpoint, max_unit_voxels=args.max_unit_voxels,
                     autocast=args.autocast, memory_format=args.memory_format,
                     max_tile=tiling.max_tile,
                     cupping=args.cupping, cupping_override=args.cupping_override,
                     report=print)  # [CT levels, cupping] decided in the plan, printed here
    run = init_run(args.out, plan, overwrite=args.overwrite)
    tiles = ", ".join(f"{a} {t[0]}x{t[1]}" for a in plan.axes
                      for t in [plan.plane_tiling(a)[0]])
    print(f"plan: {plan.n_units} slab unit(s) over axes {','.join(plan.axes)}, storage chunk "
          f"{plan.chunk}, tiles {tiles} ({plan.window}), levels "
          f"bone={plan.bone_level:g} background={plan.background_level:g}")
    if plan.voxel_size_um is not None:
        from hpcstain.volume.voxelsize import format_zyx

        print(f"voxel size: {format_zyx(plan.voxel_size_um)} µm (z, y, x) from "
              f"{plan.voxel_size_from}")
    else:
        print(f"note: {src.voxel_size_note()}")  # with the plan (stderr: errors only)
    note = checkpoint_changed(run)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return Path(run)


def _plan_on_rank0(args: argparse.Namespace) -> Path:
    """Under MPI only rank 0 validates the input and writes the plan; the others wait."""
    from hpcstain.executors.mpi import world_comm

    comm = world_comm()
    run, error = None, None
    if comm.Get_rank() == 0:
        try:
            run = _plan_from_args(args)
        except HpcstainError as exc:
            error = (type(exc).__name__, str(exc), exc.exit_code)
    run, error = comm.bcast((run, error), root=0)
    if error is not None:
        exc = HpcstainError(error[1])
        exc.exit_code = error[2]
        raise exc
    return Path(run)


def cmd_stain(args: argparse.Namespace) -> int:
    from hpcstain.executors import run_stain, run_stain_fuse

    # [device] checked before the plan is written: an absent --device leaves nothing behind
    device = args.device if args.plan_only else _use_device(
        args.device, args.autocast, local_rank=_mpi_local_rank() if args.executor == "mpi"
        else 0, quiet=args.executor == "mpi" and _mpi_rank() != 0)
    run = _plan_on_rank0(args) if args.executor == "mpi" else _plan_from_args(args)
    if args.plan_only:
        return 0
    if args.executor == "dask":  # workers resolve `auto` where they run (GPU nodes)
        device = args.device
    kw: dict[str, object] = {"batch_size": args.batch_size, "device": device,
                             "progress": not args.no_progress}
    workers = args.workers or (2 if args.executor == "dask" else 1)
    dask_cluster = None
    if args.executor == "dask":
        address: object = args.scheduler
        if args.dask_slurm:
            from hpcstain.launch.dask_slurm import slurm_cluster
            from hpcstain.launch.profiles import load_cluster

            dask_cluster = slurm_cluster(load_cluster(args.dask_slurm, args.overrides),
                                         jobs=workers, log_dir=run / "dask-logs")
            address = dask_cluster
        kw.update(address=address, n_workers=workers)
    if args.executor == "mpi":
        kw["progress"] = False
    fused = None
    try:
        if args.fuse:  # one task graph: each fuse group once the slabs it reads are stained
            kw["workers"] = workers
            kw.pop("n_workers", None)
            report, fused = run_stain_fuse(run, executor=args.executor, **kw)
        else:
            report = run_stain(run, executor=args.executor, **kw)
    finally:
        if dask_cluster is not None:
            dask_cluster.close()
    if args.executor != "mpi" or _mpi_rank() == 0:
        print(report.summary())
        if fused is not None:
            print(fused.summary())
            return 0 if fused.complete else 3
    return 0


# [damaged input] A run directory this invocation created is removed again when staining
# fails before any unit completed (e.g. a damaged input chunk found by a worker): a failed
# first attempt leaves nothing behind. Later failures keep the run (it resumes).
def cmd_stain_or_clean(args: argparse.Namespace) -> int:
    out = Path(args.out)
    fresh = not out.exists() and args.executor != "mpi"
    try:
        return cmd_stain(args)
    except HpcstainError:
        if fresh and out.is_dir() and not any((out / "done").glob("axis-*/*.json")):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def cmd_levels(args: argparse.Namespace) -> int:
    """[CT levels] Estimate and print the raw (bone, background) levels of a CT."""
    from hpcstain.ct.levels import estimate_ct_levels, plot_levels
    from hpcstain.volume.io import level_sample

    raw, smoothed, stride, name = level_sample(args.input, args.max_voxels, args.nan_value)
    est = estimate_ct_levels(raw, name, stride=stride, smoothed=smoothed)
    print(json.dumps(est.to_dict(), indent=2) if args.json else "\n".join(est.lines()))
    if args.png:
        plot_levels(raw, est, args.png, smoothed=smoothed.get(est.smoothing))
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def cmd_cupping(args: argparse.Namespace) -> int:
    """[cupping] Fit the CT's radial cupping correction; print it; write the corrected CT."""
    from hpcstain.ct.cupping import fit_source
    from hpcstain.volume.io import open_volume, write_corrected

    src = open_volume(args.input, nan_policy="error" if args.nan_value is None else "replace",
                      nan_value=args.nan_value or 0.0)
    if args.out:
        from hpcstain.atomic import check_output

        check_output(args.out, args.overwrite)  # before the fit: nothing is half-done
    fitted = fit_source(src, centre_yx=tuple(args.centre) if args.centre else None,
                        radius=args.radius, order=args.order)
    record = fitted.to_dict()
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        centre = ", ".join(f"{v:.1f}" for v in fitted.centre_yx)
        print(f"cupping of {args.input}: +{fitted.depth:.1f} grey values on the axis "
              f"(y, x = {centre}), 0 at r >= {fitted.radius:.1f} voxels; coefficients "
              f"{', '.join(f'{a:.2f}' for a in fitted.coeffs)} ({fitted.info.get('status')}, "
              f"{len(fitted.info.get('classes', []))} grey-level classes, "
              f"{fitted.info.get('iterations')} iterations)")
    if fitted.info.get("converged") is False:  # [no silent wrong answers] not written
        info = fitted.info
        raise InputError(f"the cupping fit of {args.input} did not converge: after "
                         f"{info.get('iterations')} iterations its grey-level classes still "
                         f"asked for a change of {info.get('residual')} grey values "
                         "(tolerance 2); nothing written — look at its classes (--json) or "
                         "give --centre/--radius/--order")
    if args.out:
        out = write_corrected(src, args.out, fitted, chunk=args.chunk, overwrite=args.overwrite)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_cupping(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cupping", help="fit the CT's cupping correction; write the corrected CT",
                       description="Fit a radial cupping correction (an even polynomial in "
                       "the distance from the rotation axis = the volume's z axis) on the CT "
                       "itself: the coefficients that remove the radial trend within its "
                       "grey-level classes (docs/cupping.md). Prints the fit; with --out "
                       "also writes the corrected volume (zarr, array 'ct').")
    p.add_argument("input", help="x.zarr[:array] | x.h5[:/dataset] | stack.tif | folder/")
    p.add_argument("--out", "-o", default=None, help="corrected volume (*.zarr)")
    p.add_argument("--centre", type=float, nargs=2, default=None, metavar=("Y", "X"),
                   help="rotation axis in voxels (default: the centre of the slice plane)")
    p.add_argument("--radius", type=float, default=None, metavar="R",
                   help="correction is 0 at r >= R voxels (default: half the smaller edge)")
    p.add_argument("--order", type=int, default=1, help="polynomial order in r² (1-3)")
    p.add_argument("--chunk", type=int, default=64, help="storage chunk edge of --out")
    p.add_argument("--nan-value", type=float, default=None,
                   help="replace NaN/Inf by this value (default: they are an error)")
    p.add_argument("--json", action="store_true", help="print the fit as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_cupping)


def _add_levels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("levels", help="estimate the CT's raw bone and background levels",
                       description="Estimate the raw (bone, background) CT levels that stain "
                       "and predict use (docs/volume.md, CT levels): prints the levels, the "
                       "histogram classes, the thresholds and the confidence. An ambiguous "
                       "estimate is marked AMBIGUOUS (stain/predict refuse it; pass "
                       "--bone-level/--background-level). Exit 0 whenever levels were found.")
    p.add_argument("input", help="x.zarr[:array] | x.h5[:/dataset] | stack.tif | folder/ | "
                   "a 2D slide (.tif/.png)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="also write the histogram with the classes and levels marked "
                   "(nothing is written without it)")
    p.add_argument("--max-voxels", type=int, default=2_000_000,
                   help="read every k-th plane/voxel so at most N voxels are used")
    p.add_argument("--nan-value", type=float, default=None,
                   help="replace NaN/Inf by this value (default: they are an error)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_levels)


def cmd_register(args: argparse.Namespace) -> int:
    """[register] Co-register each pair's histology onto its CT slice; write a new manifest."""
    from hpcstain.data.coregister import register_pairs

    if args.spacing < 2 or args.max_side < 32 or not args.smooth >= 0:
        raise UsageError("register: --spacing must be >= 2, --max-side >= 32, --smooth >= 0")
    out = register_pairs(args.manifest, args.out, spacing=args.spacing, smooth=args.smooth,
                         max_side=args.max_side, overwrite=args.overwrite,
                         progress=None if args.quiet else print)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="co-register histology slides onto their CT slices",
                       description="Fit, per pair, a smooth warp (affine + control grid) "
                       "that maps the histology into the CT slice's geometry by maximising "
                       "their mutual information; write the warped slides (and masks), the "
                       "fields and a new manifest to train on (docs/data.md, Misaligned "
                       "pairs). A fit that does not raise the mutual information is not "
                       "applied.")
    p.add_argument("manifest", help="pair manifest (CSV or YAML)")
    p.add_argument("--out", "-o", required=True, help="output folder (manifest.csv, "
                   "histology/, mask/, fields/, register.json)")
    p.add_argument("--spacing", type=int, default=16,
                   help="control-point spacing in working-resolution pixels (default 16)")
    p.add_argument("--smooth", type=float, default=0.05,
                   help="weight of the control grid's smoothness term (default 0.05)")
    p.add_argument("--max-side", type=int, default=512,
                   help="fit on slides box-averaged to at most this many pixels (default 512)")
    p.add_argument("--quiet", action="store_true", help="no line per pair")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_register)


def _mpi_rank() -> int:
    from hpcstain.executors.mpi import world_comm

    return int(world_comm().Get_rank())


def _mpi_local_rank() -> int:
    import os

    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _device_help() -> str:
    from hpcstain.device import DEVICE_HELP

    return DEVICE_HELP


def _use_device(requested: str, autocast: str = "none", local_rank: int = 0,
                quiet: bool = False) -> str:
    """[device] Resolve --device (auto → CUDA when present, else CPU) before anything is
    written; an absent device is one UsageError. Prints the one start line (stdout)."""
    from hpcstain.device import announce, autocast_dtype, resolve_device

    device = resolve_device(requested, local_rank)
    if not quiet:
        announce(device, autocast_dtype(autocast))
    return device


def cmd_submit_cv(args: argparse.Namespace) -> int:
    from hpcstain.launch.profiles import load_cluster
    from hpcstain.launch.submit import cv_runs, describe, submit_cv

    run_over, cluster_over = _split_overrides(args.overrides)
    cluster = load_cluster(args.profile, cluster_over)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = Path(args.out)
    runs = cv_runs(variants, args.folds, out, run_over)
    jobs = submit_cv(runs, cluster, name=out.name)
    print(f"cross-validation: {len(variants)} variant(s) × {args.folds} folds = "
          f"{len(jobs)} array task(s)")
    for (_, run_dir), job in zip(runs, jobs, strict=True):
        print(f"  {job.job_id}: {run_dir}")
    print(describe(jobs[0]))
    if args.wait:
        from hpcstain.launch.watch import wait_train

        outcomes = wait_train(jobs, [run_dir for _, run_dir in runs])
        for o in outcomes:
            if o.ok:
                print(o.result)
        return 1 if not all(o.ok for o in outcomes) else 0
    return 0


def cmd_submit_stain(args: argparse.Namespace) -> int:
    from hpcstain.device import check_device_name
    from hpcstain.launch.profiles import load_cluster
    from hpcstain.launch.submit import describe, submit_fuse, submit_stain
    from hpcstain.launch.watch import quiet_submitit, wait_stain

    cluster = load_cluster(args.profile, args.overrides)
    check_device_name(args.device)  # [device] resolved on the node that runs each task
    run = _plan_from_args(args)
    quiet_submitit()  # repeated scheduler/accounting warnings: one line each
    jobs = submit_stain(run, cluster, args.tasks, device=args.device,
                        batch_size=args.batch_size)
    print(f"stain array: {len(jobs)} task(s)")
    print(describe(jobs[0]))
    fuse_job = None
    # Local processes have no dependencies: with --wait the fuse job follows the array.
    if args.fuse and not (args.wait and cluster.executor != "slurm"):
        fuse_job = submit_fuse(run, cluster, after=jobs, method=args.method)
        print("fuse job (afterok):")
        print(describe(fuse_job))
    if args.wait:
        return wait_stain(run, cluster, jobs, fuse_job, fuse=args.fuse, method=args.method)
    return 0


def cmd_submit_fuse(args: argparse.Namespace) -> int:
    from hpcstain.launch.profiles import load_cluster
    from hpcstain.launch.submit import describe, submit_fuse

    cluster = load_cluster(args.profile, args.overrides)
    job = submit_fuse(Path(args.run_dir), cluster, method=args.method,
                      single_axis=args.single_axis)
    print(describe(job))
    if args.wait:
        from hpcstain.launch.watch import print_summary, quiet_submitit, wait_for_jobs

        filt = quiet_submitit()
        report = wait_for_jobs([job], "fuse")
        print_summary(report, filt)
        if report.failed:
            return 1
        print(report.outcomes[0].result)
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from hpcstain.executors import run_fuse
    from hpcstain.volume.voxelsize import parse_voxel_size

    kw: dict[str, object] = {"workers": args.workers}
    if args.executor == "dask":
        kw["address"] = args.scheduler
    report = run_fuse(args.run_dir, executor=args.executor, method=args.method,
                      single_axis=args.single_axis,
                      voxel_size_um=parse_voxel_size(args.voxel_size) if args.voxel_size
                      else None,
                      pyramid_levels=args.levels, out=args.out, overwrite=args.overwrite,
                      progress=not args.no_progress and args.executor != "mpi",
                      ngff=args.ngff, fill_outside=not args.no_fill,
                      confidence=not args.no_confidence, **kw)
    if report is None:  # an MPI rank other than 0: rank 0 reports
        return 0
    print(report.summary())
    return 0 if report.complete else 3  # 3: chunks still missing; re-run fuse later


def _add_stain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="x.zarr[:array] | x.h5[:/dataset] | stack.tif | folder/")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--axes", default="z,y,x", help="any of z,y,x (default all three)")
    p.add_argument("--chunk", type=int, nargs="+", default=[128], metavar="N",
                   help="storage chunk edge, or Z Y X (also the slab thickness per axis)")
    p.add_argument("--tiling", default="default", choices=["default", "paper"],
                   help="default: 256/192 Hann (benchmarks/bench_tiles.py); paper: 256/64 mean "
                   "(§2.9)")
    p.add_argument("--tile", type=int, default=None, help="override the tiling's tile edge")
    p.add_argument("--step", type=int, default=None, help="override the tiling's step")
    p.add_argument("--window", default=None, choices=["mean", "hann", "gaussian"],
                   help="override the tiling's blending window")
    p.add_argument("--max-unit-voxels", type=int, default=1 << 27, metavar="N",
                   help="split a slab in-plane when it holds more voxels (memory bound)")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                   help="run the generator under torch autocast (GPU throughput)")
    p.add_argument("--memory-format", default="contiguous",
                   choices=["contiguous", "channels_last"],
                   help="layout the generator runs in (recorded in the plan: channels_last "
                   "differs in the last bits; benchmarks/bench_small_model.py)")
    p.add_argument("--sigma", type=float, default=None,
                   help="3D Gaussian on the CT before staining, voxels; 0: off (default: the "
                   "checkpoint's data.stain_sigma: 1 as in the paper §2.11, 0 for a model "
                   "trained on unblurred slides such as tissue-cpu)")
    p.add_argument("--bone-level", type=float, default=None,
                   help="raw CT bone level (default: estimated, see `hpcstain levels`)")
    p.add_argument("--background-level", type=float, default=None,
                   help="raw CT background level (give both or neither)")
    p.add_argument("--nan-value", type=float, default=None,
                   help="replace NaN/Inf with this value (default: error)")
    p.add_argument("--voxel-size", nargs="+", metavar="Z,Y,X", default=None,
                   help="voxel size in µm, z,y,x or one isotropic value (default: from the "
                   "input's metadata: NeXus, zarr/OME-Zarr, TIFF tags)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="tiles per generator call (0: by device, ~2 tiles of 256² on a CPU)")
    p.add_argument("--device", default="auto", help=_device_help())
    p.add_argument("--cupping", default=None, choices=["auto", "none"],
                   help="cupping correction (docs/cupping.md): auto fits it once on this CT "
                   "and records it in the plan, none skips it (default: as the checkpoint "
                   "was trained, data.cupping)")
    p.add_argument("--cupping-override", action="store_true",
                   help="allow a --cupping other than the checkpoint's training convention")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run directory whose plan differs (its stained slabs "
                   "are lost); without it a different plan is refused")


def _add_volume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stain", help="stain a CT volume chunk-wise along several axes",
                       description="Cut the volume into slabs of whole slices per axis and "
                       "stain every slice on a global tile grid; re-running redoes only "
                       "unfinished slabs. The checkpoint's generator is pinned in RUN_DIR.")
    _add_stain_args(p)
    p.add_argument("--executor", default="local", choices=["local", "dask", "mpi"],
                   help="mpi: run under `mpirun -n N hpcstain stain ...` (rank 0 plans and "
                   "hands out chunks)")
    p.add_argument("--scheduler", default=None, help="dask scheduler address (default: "
                   "a LocalCluster)")
    p.add_argument("--workers", type=int, default=None,
                   help="dask workers (LocalCluster processes, or SLURM jobs with "
                   "--dask-slurm; default 2); with --fuse and the local executor: local "
                   "processes (default 1: in this process)")
    p.add_argument("--fuse", action="store_true",
                   help="fuse as well, as one task graph (each chunk group once the slabs it "
                   "reads are stained; the fuse defaults: the checkpoint's method, "
                   "fused.ome.zarr): the bytes of `stain` then `fuse`")
    p.add_argument("--dask-slurm", default=None, metavar="PROFILE",
                   help="run the dask workers as SLURM jobs of this cluster profile "
                   "(dask-jobqueue); cluster.key=value overrides apply")
    p.add_argument("overrides", nargs="*", metavar="cluster.key=value")
    p.add_argument("--plan-only", action="store_true", help="write plan.json and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stain_or_clean)  # [damaged input] wraps cmd_stain

    p = sub.add_parser("fuse", help="fuse per-axis stains into an RGBA OME-Zarr pyramid",
                       description="Fuse every chunk complete on all axes; re-run as more "
                       "chunks complete. Exit code 3 when chunks are still missing.")
    p.add_argument("run_dir")
    p.add_argument("--method", default=None, choices=["mean", "median", "consistency"],
                   help="how the axes are merged (default: the checkpoint's recipe, "
                   "data.fuse_method: mean for the paper's, median for tissue-cpu)")
    p.add_argument("--single-axis", choices=["z", "y", "x"], default=None,
                   help="the paper's slice-wise volume from one axis")
    p.add_argument("--voxel-size", nargs="+", metavar="Z,Y,X", default=None,
                   help="voxel size in µm, z,y,x or one value (default: the plan's)")
    p.add_argument("--levels", type=int, default=None, help="pyramid levels (default: auto)")
    p.add_argument("--out", default=None, help="image name inside RUN_DIR, e.g. "
                   "fused-05.ome.zarr (a name, not a path; default fused.ome.zarr)")
    p.add_argument("--workers", type=int, default=1,
                   help="fuse chunk groups in parallel on N local processes (with --executor "
                   "dask: a LocalCluster of N workers)")
    p.add_argument("--executor", default="local", choices=["local", "dask", "mpi"],
                   help="who runs the chunk groups (the same executors as stain); mpi: run "
                   "under `mpirun -n N hpcstain fuse ...` (rank 0 prepares the image and "
                   "builds the pyramid)")
    p.add_argument("--scheduler", default=None, help="dask scheduler address (default: "
                   "a LocalCluster of --workers)")
    p.add_argument("--ngff", default="0.4", choices=["0.4", "0.5"],
                   help="OME-Zarr version: 0.4 (zarr v2) or 0.5 (zarr v3, sharded)")
    p.add_argument("--no-fill", action="store_true",
                   help="keep the generator's colours outside the sample (resin, air) "
                   "instead of the slide background")
    p.add_argument("--no-confidence", action="store_true",
                   help="skip the axes' disagreement image (IMAGE/disagreement, written by "
                   "default with 2+ axes)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the image afresh (e.g. after --voxel-size or another "
                   "--method); without it other settings are refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fuse)


def cmd_predict(args: argparse.Namespace) -> int:
    from hpcstain.predict import predict_files
    from hpcstain.tiles import resolve_tiling

    if (args.bone_level is None) != (args.background_level is None):
        raise UsageError("give both --bone-level and --background-level (or neither)")
    levels = None if args.bone_level is None else (args.bone_level, args.background_level)
    tiling = resolve_tiling(args.tiling, args.tile, args.step, args.window)
    device = _use_device(args.device)
    paths = predict_files(args.inputs, args.checkpoint, args.out, masks=args.mask,
                          tiling=tiling, device=device, reverse=args.reverse,
                          overwrite=args.overwrite, levels=levels, batch_size=args.batch_size,
                          cupping_fit=args.cupping_fit,
                          log=lambda message: print(message, file=sys.stderr))
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hpcstain.evaluate import evaluate_manifest
    from hpcstain.tiles import resolve_tiling

    tiling = resolve_tiling(args.tiling, args.tile, args.step, args.window)
    device = _use_device(args.device)
    report = evaluate_manifest(
        args.manifest, args.checkpoint, args.out, split=args.split, fold=args.fold,
        ids=args.ids, tiling=tiling, patch=args.patch, min_coverage=args.min_coverage,
        lpips_path=args.lpips, pixel_size_um=args.pixel_size, device=device,
        batch_size=args.batch_size, overwrite=args.overwrite, cupping_fit=args.cupping_fit,
        log=lambda message: print(message, file=sys.stderr))
    print(report.table, end="")
    print(f"wrote {report.out_dir}")
    return 0


def _ids(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_tiling_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--tiling", default=default, choices=["paper", "default"],
                   help="paper: 256 px tiles, step 64, mean (§2.9); default: 256/192/hann "
                   f"(default: {default})")
    p.add_argument("--tile", type=int, default=None, help="override the tile edge")
    p.add_argument("--step", type=int, default=None, help="override the tile step")
    p.add_argument("--window", default=None, choices=["mean", "hann", "gaussian"],
                   help="override the blending window")
    p.add_argument("--batch-size", type=int, default=0,
                   help="tiles per generator call (0: by device, ~2 tiles of 256² on a CPU)")
    p.add_argument("--device", default="auto", help=_device_help())
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_predict_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="stain 2D CT slides (or unstain histology) with a "
                       "checkpoint", description="Stain whole 2D slides on the global tile "
                       "grid. CT is normalised like in training (bone ROI → 30000, "
                       "background → 10000; ROIs found automatically unless levels are "
                       "given). Output: OUT.png/OUT.tif for one input, else OUT/<stem>.png.")
    p.add_argument("inputs", nargs="+", help="slide.tif | slide.png | x.h5:/ds | x.zarr:arr")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--out", "-o", required=True, help="output file (one input) or folder")
    p.add_argument("--mask", nargs="+", default=None, metavar="MASK",
                   help="correspondence mask per input: outside → mean background (§2.8)")
    p.add_argument("--reverse", action="store_true",
                   help="histology → CT (uint16 TIFF) with a CycleGAN checkpoint")
    p.add_argument("--bone-level", type=float, default=None, help="raw CT bone level")
    p.add_argument("--background-level", type=float, default=None,
                   help="raw CT background level")
    _add_cupping_fit_arg(p, "given slides")
    _add_tiling_args(p, "default")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="§2.10 metrics of a checkpoint on a pair manifest",
                       description="Stain every pair, compare 256² patches (≥ 50 % mask) "
                       "with the histology: SSIM, PSNR, LPIPS (when --lpips weights load), "
                       "FRC; raw-CT baseline; truth scores on phantoms. Writes OUT/ "
                       "metrics.csv, summary.json, table.md, boxplots.png, slides/.")
    p.add_argument("manifest", help="pair manifest (CSV/YAML)")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (.pt)")
    p.add_argument("--out", "-o", required=True, help="report folder (must not exist)")
    p.add_argument("--split", default=None, metavar="RUN_DIR|split.json|folds.json",
                   help="train/val/test assignment (default: one split 'all')")
    p.add_argument("--fold", type=int, default=0, help="fold when --split is a folds.json")
    p.add_argument("--ids", type=_ids, default=None, help="only these pair ids (a,b,c)")
    p.add_argument("--patch", type=int, default=256, help="patch edge (paper: 256)")
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="minimum mask coverage of a patch (paper: 0.5)")
    p.add_argument("--lpips", default=None, metavar="WEIGHTS.pt",
                   help="local LPIPS-SqueezeNet weights (see docs/metrics.md)")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size in µm, to report FRC in µm (paper: 5)")
    _add_cupping_fit_arg(p, "evaluated pairs")
    _add_tiling_args(p, "paper")
    p.set_defaults(func=cmd_evaluate)


def _add_cupping_fit_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--cupping-fit", default="checkpoint", choices=["checkpoint", "set", "slide"],
                   help="cupping correction of a data.cupping=radial checkpoint "
                   "(docs/cupping.md): checkpoint = the training set's stored fit for slides "
                   f"of a trained size, else one fit over the {what} of each size (noted); "
                   f"set = one fit over the {what} of each size (the training rule); slide = "
                   "each slide fitted alone (default: checkpoint)")


def cmd_score(args: argparse.Namespace) -> int:
    from hpcstain.score import score_files

    threshold: float | str | None = args.ct_threshold
    if threshold not in ("auto", "none"):
        try:
            threshold = float(str(threshold))
        except ValueError:
            raise UsageError(f"--ct-threshold {threshold!r}: auto, none or a number") from None
    report = score_files(args.prediction, args.out, reference=args.reference,
                         labels=args.labels, ct=args.ct,
                         ct_threshold=None if threshold == "none" else threshold,
                         normalise=not args.no_normalise, stretch_c=args.stretch_c,
                         stretch_c_prime=args.stretch_c_prime, overwrite=args.overwrite)
    print(report.table, end="")
    print(f"wrote {report.out_dir}")
    return 0


def cmd_morph(args: argparse.Namespace) -> int:
    from hpcstain.morph import morph_run

    report = morph_run(args.run_dir, palette=args.palette, regions=args.regions,
                       overwrite=args.overwrite)
    print(report.table, end="")
    return 0


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``cluster.*`` overrides go to the cluster profile, the rest to the run config."""
    cluster = [o for o in items if o.startswith("cluster.")]
    return [o for o in items if not o.startswith("cluster.")], cluster


def cmd_submit_train(args: argparse.Namespace) -> int:
    from hpcstain.launch.profiles import load_cluster
    from hpcstain.train.runs import resolve_run_config

    run_over, cluster_over = _split_overrides(args.overrides)
    cluster = load_cluster(args.profile, cluster_over)
    return _submit_training(resolve_run_config(Path(args.out), args.config, run_over), args,
                            cluster)


def cmd_view(args: argparse.Namespace) -> int:
    """[view] Labelled orthoview PNGs (CT | stain) of a stained or fused run."""
    from hpcstain.view import view_run

    at = None
    if args.at is not None:
        try:
            at = tuple(int(v) for v in args.at.split(","))
        except ValueError:
            at = ()
        if len(at) != 3:
            raise UsageError(f"--at {args.at!r}: give Z,Y,X voxel indices, e.g. 64,128,128")
    report = view_run(args.run_dir, args.out, at=at, image=args.image,  # type: ignore[arg-type]
                      overwrite=args.overwrite)
    print(report.summary())
    return 0


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="orthoview PNGs (CT | stain) of a stained or fused run",
                       description="Write RUN_DIR/view/view-{xy,xz,yz}.png: the run's input "
                       "CT beside its stain on the three centre planes (or --at), planes "
                       "named, scale bar from the voxel size, physical aspect. The stain is "
                       "fused.ome.zarr when fused, else the first stained axis. To browse "
                       "the whole volume open the OME-Zarr in napari (docs/volume.md).")
    p.add_argument("run_dir", help="a staining run (plan.json) or RUN_DIR/IMAGE.ome.zarr")
    p.add_argument("--out", "-o", default=None,
                   help="folder for the PNGs (default RUN_DIR/view, replaced each time)")
    p.add_argument("--at", default=None, metavar="Z,Y,X",
                   help="voxel indices of the planes (default: the centre)")
    p.add_argument("--image", default=None, metavar="NAME",
                   help="fused image inside RUN_DIR (default fused.ome.zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_view)


def cmd_demo(args: argparse.Namespace) -> int:
    from hpcstain.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, physics=args.physics, target=args.target)
    return 0


# --------------------------------------------------------------------------- parser


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="generate synthetic bone-implant data with exact truth",
                       description="Generate the embedded phantom: a CT volume with its "
                       "ground-truth stain and labels, or paired 2D whole slides.")
    psub = p.add_subparsers(dest="what", required=True, metavar="{volume,pairs}")
    v = psub.add_parser("volume", help="3D CT volume + ground-truth stain + labels")
    v.add_argument("out", help="output path ending in .zarr, .h5 or .tif")
    v.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   default=[128, 256, 256])
    v.add_argument("--material", default="mg", help="screw material: mg, ti or peek")
    v.add_argument("--seed", type=int, default=0, help="random seed (same seed: same data)")
    v.add_argument("--chunk", type=int, default=64, help="storage chunk edge (voxels)")
    v.add_argument("--screw-scale", type=float, default=1.0, metavar="F",
                   help="screw radii × F, 0.25–2 (default 1: the M2-like screw)")
    v.add_argument("--cupping", type=float, default=None, metavar="D",
                   help="CT cupping depth at the rotation axis, attenuation units 0–0.5 "
                   "(default 0.05; 1 = dense bone; 0: none); recorded in the attrs")
    v.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _add_tomo_args(v)
    v.set_defaults(func=cmd_phantom_volume)
    pr = psub.add_parser("pairs", help="paired CT / histology whole slides + manifest.csv")
    pr.add_argument("outdir")
    pr.add_argument("--n", type=int, default=10, help="number of pairs (Mg:Ti:PEEK ~ 7:1:2)")
    pr.add_argument("--seed", type=int, default=0, help="random seed (same seed: same data)")
    pr.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[512, 512])
    pr.add_argument("--orientation", default="z",
                    choices=("z", "y", "x", "mixed", "random", "volume"),
                    help="plane of the sections: z (axial, default), y, x, mixed (cycles "
                    "z, y, x), random (a random plane per pair) or volume (z, y, x slices "
                    "anywhere in the sample, not only through the implant)")
    pr.add_argument("--misalignment", type=float, default=1.0, metavar="S",
                    help="strength of the histology's in-plane affine + elastic warp, 0-5 "
                    "(0 none, 1 default, 3 strong)")
    pr.add_argument("--ct-slab", type=int, default=0, metavar="K",
                    help="also write the K (odd) CT planes about each section, one voxel "
                    "apart (ct_slab/<id>.tif, manifest column ct_slab) for 2.5D models "
                    "(model.context_slices); 0: none (default)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    _add_tomo_args(pr)
    pr.set_defaults(func=cmd_phantom_pairs)


def _add_info_status(sub: argparse._SubParsersAction) -> None:
    """The `info` and `status` verbs."""
    p = sub.add_parser("info", help="versions, devices, SLURM/MPI context; or a checkpoint",
                       description="Without options: library versions, devices and the "
                       "SLURM/MPI context. With --checkpoint: a model's architecture, "
                       "parameters, FLOPs per pixel, CT conventions, training data and hash.")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="describe a checkpoint (latest.pt, min-*.pt or a run's generator.pt)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("status", help="how far a staining or training run is",
                       description="Progress of RUN_DIR (a staining run with plan.json or a "
                       "training run): units per axis, fused chunks, running/stale/failed "
                       "units, throughput and ETA; or epoch, step, losses, latest.pt, "
                       "requeues. Exit code: 0 complete, 3 in progress, 1 failed or stale "
                       "work units.")
    p.add_argument("run_dir")
    p.add_argument("--watch", type=float, nargs="?", const=10.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (default 10) until the "
                   "run is complete or has failed work")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--require-fused", action="store_true",
                   help="a staining run counts as complete only once fused")
    p.set_defaults(func=cmd_status)


def _add_train_distill(sub: argparse._SubParsersAction) -> None:
    """The `train` and `distill` verbs."""
    p = sub.add_parser("train", help="train a model (single process, torchrun or SLURM DDP)",
                       description="Train or resume the run in --out. Profiles: configs/*.yaml;"
                       " override any key as section.key=value.")
    p.add_argument("--config", "-c", default=None,
                   help="profile name (e.g. modcyclegan, pix2pix-tiny) or YAML path; "
                   "omit to resume the run in --out with its saved config")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--device", default=None,
                   help="the same as train.device=…: " + _device_help())
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a small student generator on a teacher's output",
                       description="Knowledge distillation (docs/distillation.md): the student "
                       "learns the teacher's CT→stain output on the CT of training pairs and "
                       "on slices of target volumes along z, y, x. Same trainer as `train` "
                       "(DDP, resume, signals); the result is an ordinary checkpoint.")
    _add_distill_args(p)
    p.add_argument("--device", default=None,
                   help="the same as train.device=… (students and the teacher's labels): "
                   + _device_help())
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=cmd_distill)


def _add_score_morph(sub: argparse._SubParsersAction) -> None:
    """The `score` and `morph` verbs (a stained volume's scores and tissue classes)."""
    p = sub.add_parser("score", help="score a stained volume: SSIM/PSNR per plane family, "
                       "stripe ratios", description="Score a stained RGB(A) volume (a run "
                       "folder, fused.ome.zarr, axis-z.zarr, x.zarr[:array], x.h5:/ds, .tif, "
                       ".npy) against a reference stain put through the §2.5 normalisation "
                       "(docs/evaluation.md, 'Scoring volumes'), inside the sample mask. "
                       "Without --reference: stripe ratios against the CT's anisotropy. "
                       "Writes OUT/table.md, summary.json, profiles.png.")
    p.add_argument("prediction", help="RUN_DIR | fused.ome.zarr | axis-z.zarr | RGB volume")
    p.add_argument("--reference", "-r", default=None,
                   help="truth stain: a phantom volume (its labels and CT are used too) or "
                   "any RGB volume")
    p.add_argument("--labels", default=None, help="label volume (phantom codes) for mask/ROIs")
    p.add_argument("--ct", default=None,
                   help="CT volume (default: the reference's, else the run's plan input)")
    p.add_argument("--ct-threshold", default="auto", metavar="auto|none|VALUE",
                   help="sample mask from the CT when there are no labels (default auto: "
                   "what fuse's outside test keeps: at a stained run's levels, or at the "
                   "levels a CT given with --ct or in the reference reads; multi-Otsu "
                   "where those levels are ambiguous)")
    p.add_argument("--no-normalise", action="store_true",
                   help="the reference is already in the model's colour space")
    p.add_argument("--stretch-c", type=float, default=0.0, help="§2.5 c (as in training)")
    p.add_argument("--stretch-c-prime", type=float, default=0.0, help="§2.5 c'")
    p.add_argument("--out", "-o", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("morph", help="3D histomorphometry of a fused stain: tissue classes "
                       "(labels image), BV/TV, BIC, degradation-layer thickness",
                       description="Read RUN_DIR/fused.ome.zarr, give each voxel the tissue "
                       "class of the nearest palette colour, write the classes as the NGFF "
                       "labels image fused.ome.zarr/labels/tissue and RUN_DIR/morph.csv "
                       "(docs/metrics.md, 'Tissue classes and histomorphometry').")
    p.add_argument("run_dir", help="a stained and fused run folder")
    p.add_argument("--palette", default=None, help="YAML palette (tissue: [r, g, b]); "
                   "default: the palette stored in the run's checkpoint")
    p.add_argument("--regions", default=None, metavar="D0,D1,...",
                   help="also per shell at these distances (µm) from the implant surface, "
                   "e.g. 0,50,100,200")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing labels/tissue and morph.csv")
    p.set_defaults(func=cmd_morph)


def _add_submit_training(ssub: argparse._SubParsersAction) -> None:
    """`submit train` and `submit distill`: one DDP job each."""
    t = ssub.add_parser("train", help="one DDP training job (nodes x tasks_per_node ranks)",
                        description="Submit `hpcstain train` as a submitit job. Cluster keys "
                        "are overridden as cluster.key=value (e.g. cluster.nodes=2).")
    t.add_argument("--profile", default="slurm",
                   help="cluster profile in configs/clusters/ (local, slurm, maxwell) or YAML")
    t.add_argument("--config", "-c", default=None, help="training profile (see `train`)")
    t.add_argument("--out", "-o", required=True, help="run directory (shared filesystem)")
    t.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(func=cmd_submit_train)

    t = ssub.add_parser("distill", help="one DDP distillation job (see `distill`)")
    _add_distill_args(t)
    t.add_argument("--profile", default="slurm",
                   help="cluster profile in configs/clusters/ (local, slurm, maxwell) or YAML")
    t.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(func=cmd_submit_distill)


def _add_submit_arrays(ssub: argparse._SubParsersAction) -> None:
    """`submit cv`, `submit stain` and `submit fuse`: job arrays and the fuse job."""
    t = ssub.add_parser("cv", help="k-fold cross-validation x model variants as a job array",
                        description="One training run per (variant, fold) in OUT/<variant>/"
                        "fold-<k>; the held-out test pairs are never in any fold (§2.4).")
    t.add_argument("--profile", default="slurm",
                   help="cluster profile in configs/clusters/ (local, slurm, maxwell) or YAML")
    t.add_argument("--variants", default="modcyclegan",
                   help="comma-separated training profiles (e.g. modcyclegan,pix2pix,cyclegan,"
                   "cyclegan_invct)")
    t.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    t.add_argument("--out", "-o", required=True, help="cross-validation folder")
    t.add_argument("--wait", action="store_true",
                   help="wait for the jobs and print one progress line per change")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.set_defaults(func=cmd_submit_cv)

    t = ssub.add_parser("stain", help="the volume engine as a job array over chunk groups",
                        description="Write the plan here, then submit N array tasks (each "
                        "stains its chunk group; safe to requeue) and, with --fuse, a fuse "
                        "job that starts after the array succeeded (afterok).")
    _add_stain_args(t)
    t.add_argument("--profile", default="slurm", help="cluster profile (local, slurm, maxwell)")
    t.add_argument("--tasks", type=int, default=4, help="array tasks (chunk groups)")
    t.add_argument("--fuse", action="store_true", help="also submit the dependent fuse job")
    t.add_argument("--method", default=None, choices=["mean", "median", "consistency"],
                   help="default: the checkpoint's recipe (data.fuse_method)")
    t.add_argument("--wait", action="store_true",
                   help="wait for the jobs and print one progress line per change")
    t.add_argument("overrides", nargs="*", metavar="cluster.key=value")
    t.set_defaults(func=cmd_submit_stain)

    t = ssub.add_parser("fuse", help="a CPU job fusing a stain run")
    t.add_argument("run_dir")
    t.add_argument("--profile", default="slurm",
                   help="cluster profile in configs/clusters/ (local, slurm, maxwell) or YAML")
    t.add_argument("--method", default=None, choices=["mean", "median", "consistency"],
                   help="default: the checkpoint's recipe (data.fuse_method)")
    t.add_argument("--single-axis", choices=["z", "y", "x"], default=None,
                   help="the paper's slice-wise volume from one axis")
    t.add_argument("--wait", action="store_true",
                   help="wait for the jobs and print one progress line per change")
    t.add_argument("overrides", nargs="*", metavar="cluster.key=value")
    t.set_defaults(func=cmd_submit_fuse)


def _add_submit(sub: argparse._SubParsersAction) -> None:
    """The `submit` verb and its sub-verbs (train, distill, cv, stain, fuse)."""
    p = sub.add_parser("submit", help="submit jobs to SLURM (or local processes) via submitit")
    ssub = p.add_subparsers(dest="what", required=True,
                            metavar="{train,distill,cv,stain,fuse}")
    _add_submit_training(ssub)
    _add_submit_arrays(ssub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """The `demo` verb."""
    p = sub.add_parser("demo", help="run the pipeline end to end on phantom data",
                       description="Generate phantom slide pairs, train the tissue "
                       "recipe (configs/tissue-cpu.yaml), evaluate on held-out slides of "
                       "another seed, stain a phantom volume along z, y, x, fuse it and score "
                       "it (PSNR/SSIM, tissue classes against a CT-threshold baseline); "
                       "writes OUT/ (train/, evaluate/, stain/fused.ome.zarr, "
                       "orthoviews.png, summary.json). Minutes on a CPU (README); --quick: "
                       "smallest sizes, for tests.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out/)")
    p.add_argument("--quick", action="store_true", help="smallest sizes (for tests)")
    p.add_argument("--physics", choices=("render", "tomo"), default="render",
                   help="the phantom's CT: its renderer (default) or the physical CT chain "
                   "(projection, Poisson counts, rings, filtered back-projection; "
                   "docs/phantom.md)")
    p.add_argument("--target", choices=("truth", "histology"), default="truth",
                   help="what the model learns to paint: the phantom's exact truth stain "
                   "(default: perfectly registered, artefact-free slides) or its synthetic "
                   "histology as it comes (misaligned by 1-3 px, cracks, dirt, stain "
                   "variation), as your own pairs are")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The `hpcstain` parser: one helper per verb group, called in the order `--help` lists
    the verbs."""
    parser = argparse.ArgumentParser(
        prog="hpcstain",
        description="Virtual staining of synchrotron micro-CT volumes on HPC clusters.",
    )
    parser.add_argument("--version", action="version", version=f"hpcstain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_info_status(sub)
    _add_phantom(sub)
    _add_train_distill(sub)
    _add_volume(sub)
    _add_levels(sub)
    _add_cupping(sub)
    _add_register(sub)
    _add_predict_evaluate(sub)
    _add_score_morph(sub)
    _add_submit(sub)
    _add_view(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # section.key=value overrides may follow other positionals (e.g. `submit stain INPUT`)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u or "." not in u.split("=")[0]]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`hpcstain info | head -1`) raises here
        return code
    except BrokenPipeError:  # the reader went away: no traceback, nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except HpcstainError as exc:
        print(f"hpcstain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hpcstain: interrupted; re-running the same command resumes (train, distill, "
              "stain and fuse keep their finished work)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
