"""Cluster profiles → submitit parameters and sbatch text, without a scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcstain.errors import ConfigError
from hpcstain.launch.profiles import load_cluster, slurm_parameters
from hpcstain.launch.submit import make_executor


def test_maxwell_profile_asks_for_exclusive_gpu_nodes() -> None:
    params = slurm_parameters(load_cluster("maxwell"))
    assert params["slurm_partition"] == "allgpu"
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4
    assert params["slurm_exclusive"] is True
    assert params["slurm_signal_delay_s"] >= 120


def test_cluster_keys_are_overridable_and_checked() -> None:
    cluster = load_cluster("maxwell", ["cluster.nodes=3", "cluster.partition=maxgpu",
                                       "cluster.additional=[mail-type=END]"])
    params = slurm_parameters(cluster)
    assert params["nodes"] == 3 and params["slurm_partition"] == "maxgpu"
    assert params["slurm_additional_parameters"] == {"mail-type": "END"}
    with pytest.raises(ConfigError, match="cluster.gpus"):
        load_cluster("maxwell", ["cluster.gpus=4"])
    with pytest.raises(ConfigError, match="no such cluster profile"):
        load_cluster("nowhere")


def test_sbatch_text_carries_the_profile(tmp_path: Path) -> None:
    cluster = load_cluster("maxwell", ["cluster.account=mygroup", "cluster.qos=normal"])
    ex = make_executor(cluster, tmp_path / "logs", job_name="hpcstain-test")
    text = ex._make_submission_file_text("echo hi", "uid")
    for line in ("#SBATCH --partition=allgpu", "#SBATCH --exclusive",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --account=mygroup", "#SBATCH --qos=normal",
                 "#SBATCH --signal=USR2@300", "#SBATCH --job-name=hpcstain-test",
                 "module load maxwell"):
        assert line in text, line
    assert "#SBATCH --constraint='A100|V100'" in text  # quoted for the shell


def test_local_profile_makes_a_local_executor(tmp_path: Path) -> None:
    import submitit

    ex = make_executor(load_cluster("local"), tmp_path, job_name="x")
    assert isinstance(ex, submitit.LocalExecutor)
