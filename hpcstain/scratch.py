"""Scratch arrays reused by name while a task walks its chunks (fewer page faults)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Workspace:
    """Scratch arrays reused from chunk to chunk, by name, shape and dtype.

    Fresh memory is paid for in page faults on first touch (about as much as the
    arithmetic here on some virtual machines); a fuse task's chunks mostly share a shape.
    ``None`` instead of a workspace allocates as usual.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (name, tuple(shape), np.dtype(dtype).str)
        if key not in self._arrays:
            if len(self._arrays) > 64:  # many edge shapes: start over rather than grow
                self._arrays.clear()
            self._arrays[key] = np.empty(shape, dtype)
        return self._arrays[key]


def scratch(work: Workspace | None, name: str, shape: tuple[int, ...], dtype: Any
             ) -> np.ndarray:
    return np.empty(shape, dtype) if work is None else work.get(name, shape, dtype)
