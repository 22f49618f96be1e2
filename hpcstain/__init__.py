"""hpcstain: virtual staining of synchrotron micro-CT volumes on HPC clusters."""

__version__ = "0.1.0"
