"""User-facing errors: the CLI prints them as one line and exits with their code."""

from __future__ import annotations


class HpcstainError(Exception):
    """An error the user can fix (bad input, bad config); never a traceback."""

    exit_code = 1


class UsageError(HpcstainError):
    """Bad command-line arguments (wrong shape, unknown material, existing output)."""

    exit_code = 2


class ConfigError(HpcstainError):
    """Unknown key, wrong type or unreadable YAML; the message names key and file."""

    exit_code = 2


class InputError(HpcstainError):
    """Input data that cannot be used (missing file/dataset, wrong shape/dtype, NaN)."""

    exit_code = 2
