"""Cluster profiles: where and how jobs run (partition, GPUs, time, account, QoS, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpcstain.config import config_dir, load_config
from hpcstain.errors import ConfigError


@dataclass
class ClusterConfig:
    """One cluster profile; every key can be overridden as ``cluster.key=value``."""

    executor: Literal["slurm", "local"] = "slurm"
    partition: str = ""
    constraint: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: int = 0
    time_min: int = 60
    exclusive: bool = False
    signal_delay_s: int = 120
    max_requeues: int = 3
    ddp_timeout_s: int = 0  # DDP collective timeout (0: HPCSTAIN_DDP_TIMEOUT_S or 30 min)
    array_parallelism: int = 64
    log_folder: str = "slurm-logs"
    setup: list[str] = field(default_factory=list)
    additional: list[str] = field(default_factory=list)  # extra sbatch options "key=value"


@dataclass
class ClusterFile:
    profile: str = ""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def load_cluster(profile: str, overrides: list[str] | None = None) -> ClusterConfig:
    """A profile name in configs/clusters/ (or a YAML path) plus ``cluster.*`` overrides."""
    path = Path(profile)
    if not path.is_file():
        path = config_dir() / "clusters" / f"{profile}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (config_dir() / "clusters").glob("*.yaml"))
            raise ConfigError(f"{profile}: no such cluster profile (known: {known})")
    return load_config(str(path), overrides or [], cls=ClusterFile).cluster


def additional_parameters(cluster: ClusterConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in cluster.additional:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"cluster.additional: {item!r} is not key=value")
        out[key.strip().lstrip("-")] = value.strip()
    return out


def slurm_parameters(cluster: ClusterConfig, *, tasks_per_node: int | None = None,
                     gpus_per_node: int | None = None) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for a SLURM job of this profile."""
    params: dict[str, Any] = {
        "nodes": cluster.nodes,
        "tasks_per_node": cluster.tasks_per_node if tasks_per_node is None else tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "timeout_min": cluster.time_min,
        "slurm_signal_delay_s": cluster.signal_delay_s,
        "slurm_array_parallelism": cluster.array_parallelism,
    }
    gpus = cluster.gpus_per_node if gpus_per_node is None else gpus_per_node
    if gpus:
        params["gpus_per_node"] = gpus
    if cluster.mem_gb:
        params["mem_gb"] = cluster.mem_gb
    for key in ("partition", "constraint", "account", "qos"):
        value = getattr(cluster, key)
        if value:
            params[f"slurm_{key}"] = value
    if cluster.exclusive:
        params["slurm_exclusive"] = True
    if cluster.setup:
        params["slurm_setup"] = list(cluster.setup)
    extra = additional_parameters(cluster)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params
