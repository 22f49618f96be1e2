"""§2.4 splits: a held-out test set, then stratified k-fold cross-validation by material.

The test set takes ``n_test`` pairs in proportion to the materials (largest remainder,
never a material's last pair): for the paper's 53 pairs (38 Mg / 5 Ti / 10 PEEK) and
``n_test=3`` that is 2 Mg + 1 PEEK. The rest is dealt round-robin into ``n_folds``
validation folds, material after material, with the dealing position carried over between
materials, so folds differ in size by at most one and keep the material ratio (paper: five
folds of 10 validation / 40 training pairs, ~7:1:2 Mg:Ti:PEEK). Everything is a pure
function of the pair ids, materials and the seed; ``n_folds=0`` trains on every non-test
pair with no validation.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hpcstain.atomic import write_text_atomic
from hpcstain.errors import ConfigError, InputError


class HasMaterial(Protocol):
    id: str
    material: str


@dataclass(frozen=True)
class Folds:
    """Held-out test ids and the validation ids of each fold (train = the rest)."""

    test_ids: tuple[str, ...]
    val_ids: tuple[tuple[str, ...], ...]
    materials: dict[str, str]
    seed: int = 0

    @property
    def n_folds(self) -> int:
        return len(self.val_ids)

    @property
    def pool(self) -> tuple[str, ...]:
        """Every id that may be trained on (not in the test set), in manifest order."""
        test = set(self.test_ids)
        return tuple(i for i in self.materials if i not in test)


def _by_material(ids: Iterable[str], materials: dict[str, str], rng: np.random.Generator
                 ) -> list[list[str]]:
    """Groups of ids per material (largest first), each sorted then shuffled by ``rng``."""
    groups: dict[str, list[str]] = {}
    for i in sorted(ids):
        groups.setdefault(materials[i], []).append(i)
    order = sorted(groups, key=lambda m: (-len(groups[m]), m))
    return [[str(i) for i in rng.permutation(groups[m])] for m in order]


def _test_quota(sizes: list[int], n_test: int) -> list[int]:
    """Largest-remainder share of ``n_test`` per group, keeping one pair per group if able."""
    exact = [n_test * s / sum(sizes) for s in sizes]
    cap = [s - 1 if s > 1 else s for s in sizes]
    quota = [min(int(e), c) for e, c in zip(exact, cap, strict=True)]
    while sum(quota) < n_test:
        free = [i for i in range(len(sizes)) if quota[i] < cap[i]] \
            or [i for i in range(len(sizes)) if quota[i] < sizes[i]]
        quota[max(free, key=lambda i: (exact[i] - quota[i], -i))] += 1
    return quota


def make_folds(pairs: Iterable[HasMaterial], n_folds: int = 5, n_test: int = 3,
               seed: int = 0) -> Folds:
    """Test set + stratified folds, deterministic from ``seed`` (see module docstring)."""
    materials: dict[str, str] = {}
    for p in pairs:
        materials[p.id] = p.material
    n = len(materials)
    if n_folds < 0 or n_folds == 1:
        raise ConfigError(f"data.n_folds={n_folds}: use 0 (no validation) or at least 2")
    if not 0 <= n_test < n:
        raise ConfigError(f"data.n_test={n_test}: must be ≥ 0 and leave at least one of the "
                          f"{n} pair(s) for training")
    if n_folds > n - n_test:
        raise InputError(f"data.n_folds={n_folds}: needs at least {n_folds} pairs outside "
                         f"the {n_test} test pair(s); the manifest has {n} pair(s)")
    rng = np.random.default_rng([int(seed), 0xF01D])
    groups = _by_material(materials, materials, rng)
    quota = _test_quota([len(g) for g in groups], n_test)
    test = [i for g, q in zip(groups, quota, strict=True) for i in g[:q]]
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    if n_folds:
        pos = 0
        for g, q in zip(groups, quota, strict=True):
            for i in g[q:]:
                folds[pos % n_folds].append(i)
                pos += 1
        folds = [folds[k] for k in rng.permutation(n_folds)]
    rank = {i: r for r, i in enumerate(materials)}
    return Folds(tuple(sorted(test, key=rank.__getitem__)),
                 tuple(tuple(sorted(f, key=rank.__getitem__)) for f in folds),
                 materials, int(seed))


def split_for_fold(folds: Folds, fold: int) -> tuple[list[str], list[str]]:
    """(train_ids, val_ids) of ``fold``; with no folds every non-test pair trains."""
    if folds.n_folds == 0:
        return list(folds.pool), []
    if not 0 <= fold < folds.n_folds:
        raise ConfigError(f"data.fold={fold}: there are {folds.n_folds} folds "
                          f"(0–{folds.n_folds - 1})")
    val = set(folds.val_ids[fold])
    return [i for i in folds.pool if i not in val], list(folds.val_ids[fold])


def folds_to_dict(folds: Folds) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": folds.seed, "n_folds": folds.n_folds,
                           "test": list(folds.test_ids), "materials": dict(folds.materials),
                           "folds": []}
    for k in range(folds.n_folds):
        train, val = split_for_fold(folds, k)
        out["folds"].append({"fold": k, "train": train, "val": val,
                             "val_materials": dict(Counter(folds.materials[i] for i in val))})
    if folds.n_folds == 0:
        out["train"] = list(folds.pool)
    return out


def write_folds(path: str | os.PathLike[str], folds: Folds) -> None:
    """Write the splits as JSON (atomically) into the run directory."""
    write_text_atomic(path, json.dumps(folds_to_dict(folds), indent=2) + "\n")


def read_folds(path: str | os.PathLike[str]) -> Folds:
    """Read splits written by :func:`write_folds`."""
    try:
        data = json.loads(Path(path).read_text())
        return Folds(tuple(data["test"]), tuple(tuple(f["val"]) for f in data["folds"]),
                     dict(data["materials"]), int(data["seed"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a folds file ({exc})") from None
