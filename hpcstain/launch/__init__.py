"""Launchers: submitit executors built from cluster profiles (configs/clusters/*.yaml)."""
