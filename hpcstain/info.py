"""Environment report for `hpcstain info`: library versions, devices, SLURM/MPI context."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from typing import Any

from hpcstain import __version__
from hpcstain.data.folds import make_folds, split_for_fold
from hpcstain.data.manifest import read_manifest
from hpcstain.errors import InputError

LIBRARIES = ("torch", "numpy", "zarr", "h5py", "dask", "distributed", "submitit", "mpi4py",
             "scipy", "skimage")

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION",
              "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE")
MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
            "PMIX_RANK")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def library_versions() -> dict[str, str]:
    """Installed version of each library, or 'not installed'; nothing is imported."""
    dist_names = {"skimage": "scikit-image"}
    out: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(dist_names.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}",
                 "bf16": torch.cuda.is_bf16_supported()}
            )
    return info


def launch_context(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Which launcher this process runs under (SLURM, MPI, torchrun), from the environment."""
    env = dict(os.environ) if env is None else env
    ctx: dict[str, Any] = {
        "slurm": {k: env[k] for k in SLURM_VARS if k in env} or None,
        "mpi": {k: env[k] for k in MPI_VARS if k in env} or None,
        "torchrun": {k: env[k] for k in TORCHRUN_VARS if k in env} or None,
    }
    return ctx


def cpu_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "usable_cpus": affinity,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def collect() -> dict[str, Any]:
    return {
        "hpcstain": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "devices": devices(),
        "cpu": cpu_info(),
        "launch": launch_context(),
        "scheduler": scheduler_commands(),
    }


def scheduler_commands() -> dict[str, str | None]:
    """Where SLURM's and MPI's commands are (a login node has them without a job's env)."""
    import shutil

    return {name: shutil.which(name) for name in ("sbatch", "squeue", "srun", "mpirun")}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"hpcstain {report['hpcstain']}  (python {report['python']}, {report['platform']})",
             "libraries:"]
    lines += [f"  {k:12s} {v}" for k, v in report["libraries"].items()]
    dev = report["devices"]
    lines.append(f"cuda: {'yes' if dev['cuda_available'] else 'no'}"
                 + (f" (CUDA {dev['cuda_version']})" if dev["cuda_version"] else ""))
    for g in dev["gpus"]:
        lines.append(f"  gpu {g['index']}: {g['name']}, {g['memory_gib']} GiB, sm {g['capability']}"
                     f", bf16 {'yes' if g['bf16'] else 'no'}")
    cpu = report["cpu"]
    lines.append(f"cpu: {cpu['cpu_count']} cores, {cpu['usable_cpus']} usable, "
                 f"torch threads {dev['torch_threads']}, OMP_NUM_THREADS={cpu['omp_num_threads']}")
    launch = report["launch"]
    tools = report.get("scheduler") or {}
    for name in ("slurm", "mpi", "torchrun"):
        val = launch[name]
        if val:
            text = " ".join(f"{k}={v}" for k, v in val.items())
        elif name == "slurm" and tools.get("sbatch"):
            text = (f"available (sbatch at {tools['sbatch']}); this process is not inside a "
                    "job — `hpcstain submit` submits one")
        elif name == "mpi" and tools.get("mpirun"):
            text = f"available (mpirun at {tools['mpirun']}); not launched by it"
        else:
            text = "not detected"
        lines.append(f"{name}: {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoints

TRAINING_DATA_KEYS = ("manifest", "n_folds", "fold", "n_test", "seed", "patch_size",
                      "patches_per_pair", "batch_size")
TRAINING_KEYS = ("epochs", "max_steps", "lr", "decay_epochs", "amp", "seed")


def checkpoint_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint is: architecture, size and cost, conventions, training, hash.

    Works on full training checkpoints (``latest.pt``), ``min-*.pt`` and a staining run's
    pinned ``generator.pt``; loads with ``weights_only`` (never unpickles code).
    """
    from pathlib import Path

    # lazy: the model stack (scipy, networks) would add 0.5 s to plain `hpcstain info`
    from hpcstain.checkpoint import file_sha256, load_checkpoint
    from hpcstain.ct.conventions import conventions_of
    from hpcstain.inference import generator_net
    from hpcstain.models.flops import flops_per_pixel, parameter_count

    path = Path(path)
    ckpt = load_checkpoint(path)
    arch = ckpt.get("architecture")
    if not isinstance(arch, dict):
        raise InputError(f"{path}: checkpoint has no architecture record")
    conv = conventions_of(ckpt)
    gen = generator_net(ckpt, "ct2hist", str(path), "cpu")
    tile = 256 if arch.get("generator") == "unet256" else 64
    model = ckpt.get("model") or {}
    nets = {f"{group}/{name}": _state_parameters(state)
            for group in ("generators", "discriminators")
            for name, state in sorted((model.get(group) or {}).items())}
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = config.get("data") or {}
    train = config.get("train") or {}
    report: dict[str, Any] = {
        "path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size,
        "kind": _checkpoint_kind(ckpt),
        "architecture": dict(arch),
        "generator": {"name": "ct2hist", "parameters": parameter_count(gen),
                      "flops_per_pixel": flops_per_pixel(gen, conv.generator_channels, tile),
                      "flops_tile": tile},
        "networks": nets,
        "conventions": conv.to_dict(),
        "training": {
            "profile": config.get("profile"),
            "data": {k: data[k] for k in TRAINING_DATA_KEYS if k in data},
            "train": {k: train[k] for k in TRAINING_KEYS if k in train},
            "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
            "reason": ckpt.get("reason"), "minima": ckpt.get("minima") or {},
            "pairs": _training_pairs(path, data),
        },
    }
    if ckpt.get("pinned_from"):
        report["pinned_from"] = _pinned_source(path, str(ckpt["pinned_from"]))
    return report


def _cupping_line(c: dict[str, Any]) -> str:
    """``cupping: radial; training fit 128×128: +2688 grey values on the axis (…)``."""
    from hpcstain.ct.cupping import describe_fit, fits_from_record  # lazy: scipy (plain `info`)

    mode = c.get("cupping", "none")
    if mode != "radial":
        return f"cupping: {mode}"
    fits = fits_from_record(c.get("cupping_fits"))
    if not fits:
        return ("cupping: radial; no stored training fit (older checkpoint: predict/evaluate "
                "fit one correction over the given slides of each size)")
    return "cupping: radial; training fit " + "; ".join(
        f"{ny}×{nx}: {describe_fit(f)}" for (ny, nx), f in fits.items())


def _state_parameters(state: Any) -> int:
    """Learned parameters in a network's state dict (norm running statistics excluded)."""
    if not isinstance(state, dict):
        return 0
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(int(v.numel()) for k, v in state.items()
               if hasattr(v, "numel") and not k.endswith(skip))


def _checkpoint_kind(ckpt: dict[str, Any]) -> str:
    if ckpt.get("pinned_from"):
        return "pinned generator (a staining run's generator.pt)"
    if "opt_g" in ckpt:
        return "training checkpoint (full state: networks, optimisers, RNG, pools)"
    return "generators only (" + str(ckpt.get("reason") or "inference checkpoint") + ")"


def _training_pairs(path: Any, data: dict[str, Any]) -> dict[str, Any] | None:
    """Train/validation/test pair ids: the run's split.json, else recomputed from the
    manifest and the fold settings (None when neither is available)."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.parent.name == "checkpoints":
        split = path.parent.parent / "split.json"
        if split.is_file():
            try:
                ids = json.loads(split.read_text())
                return {"source": str(split), **{k: list(ids.get(k, [])) for k in
                                                 ("train_ids", "val_ids", "test_ids")}}
            except (OSError, ValueError):
                pass
    manifest = data.get("manifest")
    if not manifest or not Path(manifest).is_file():
        return None
    try:
        folds = make_folds(read_manifest(manifest), n_folds=int(data.get("n_folds", 5)),
                           n_test=int(data.get("n_test", 3)), seed=int(data.get("seed", 0)))
        train, val = split_for_fold(folds, int(data.get("fold", 0)))
    except Exception:  # the manifest changed since: the split cannot be recomputed
        return None
    return {"source": f"recomputed from {manifest}", "train_ids": train, "val_ids": val,
            "test_ids": list(folds.test_ids)}


def _pinned_source(path: Any, source: str) -> dict[str, Any]:
    """Where a pinned generator came from, checked against its run's plan.json."""
    import json
    from pathlib import Path

    out: dict[str, Any] = {"checkpoint": source}
    plan = Path(path).parent / "plan.json"
    if plan.is_file():
        try:
            p = json.loads(plan.read_text())
            out["checkpoint_sha256"] = p.get("checkpoint_sha256", "")
            out["plan_generator_sha256"] = p.get("generator_sha256", "")
        except (OSError, ValueError):
            pass
    return out


def format_checkpoint(r: dict[str, Any]) -> str:
    a, g, c, t = r["architecture"], r["generator"], r["conventions"], r["training"]
    gen = f"{a.get('generator')} ngf {a.get('ngf')}"
    if a.get("generator") == "resnet":
        gen += f", {a.get('n_blocks')} blocks, {a.get('upsampling')} upsampling"
    lines = [f"{r['path']}",
             f"  sha256: {r['sha256']}  ({r['bytes'] / 2**20:.1f} MiB)",
             f"  kind: {r['kind']}",
             f"  model: {a.get('variant')}: {gen}, {a.get('norm')} norm; "
             f"CT {a.get('ct_channels')} ch → histology {a.get('histology_channels')} ch"
             + (f"; 2.5D: the slice and its neighbours, {a['context_slices']} CT planes "
                "per slice" if int(a.get("context_slices", 1)) > 1 else ""),
             f"  generator ct2hist: {g['parameters']:,} parameters, "
             f"{g['flops_per_pixel'] / 1e6:.3g} MFLOP per output pixel "
             f"(multiply-add = 2; counted on a {g['flops_tile']}² tile)"]
    others = {k: v for k, v in r["networks"].items() if k != "generators/ct2hist"}
    if others:
        lines.append("  other networks: " + ", ".join(f"{k} {v:,}" for k, v in others.items()))
    lines.append(f"  CT conventions: target levels bone {c['target_levels'][0]:g} / "
                 f"background {c['target_levels'][1]:g} (16-bit), invert "
                 f"{'yes' if c['invert_ct'] else 'no'}, stretch c {c['stretch_c'][0]:g} / "
                 f"c' {c['stretch_c'][1]:g}, tiles multiple of {c['size_multiple']}")
    lines.append("  " + _cupping_line(c))
    d = t["data"]
    if d:
        folds = "no folds (all non-test pairs train)" if d.get("n_folds") == 0 else \
            f"fold {d.get('fold')} of {d.get('n_folds')}"
        lines.append(f"  trained on: {d.get('manifest') or '?'}, {folds}, {d.get('n_test')} "
                     f"test pair(s), split seed {d.get('seed')}, {d.get('patch_size')}² "
                     f"patches, batch {d.get('batch_size')}")
    pairs = t["pairs"]
    if pairs:
        lines.append(f"  pairs: {len(pairs['train_ids'])} train, {len(pairs['val_ids'])} "
                     f"validation, {len(pairs['test_ids'])} test ({pairs['source']})")
    target = t["train"]
    reached = f"  reached: epoch {t['epoch']}, step {t['step']}"
    if target:
        reached += f" (of {target.get('epochs')} epochs" + (
            f", max_steps {target['max_steps']}" if target.get("max_steps") else "") + ")"
    if t["reason"]:
        reached += f"; written because: {t['reason']}"
    lines.append(reached)
    if t["minima"]:
        lines.append("  minima: " + ", ".join(
            f"{k} {v.get('value', float('nan')):.4g} @ epoch {int(v.get('epoch', 0))}"
            for k, v in t["minima"].items() if isinstance(v, dict)))
    if "pinned_from" in r:
        pf = r["pinned_from"]
        lines.append(f"  pinned from: {pf['checkpoint']}"
                     + (f" (sha256 {pf['checkpoint_sha256'][:16]}…)"
                        if pf.get("checkpoint_sha256") else ""))
        if pf.get("plan_generator_sha256"):
            ok = pf["plan_generator_sha256"] == r["sha256"]
            lines.append("  run plan: " + ("this file's hash matches plan.json" if ok else
                                           "HASH DIFFERS from plan.json (file changed)"))
    return "\n".join(lines)
