"""§2.4 splits: stratified folds by material, an isolated test set, determinism, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpcstain.data.folds import make_folds, read_folds, split_for_fold, write_folds
from hpcstain.errors import ConfigError, InputError


def cohort(mg: int, ti: int, peek: int) -> list[SimpleNamespace]:
    return ([SimpleNamespace(id=f"mg{i:02d}", material="mg") for i in range(mg)]
            + [SimpleNamespace(id=f"ti{i:02d}", material="ti") for i in range(ti)]
            + [SimpleNamespace(id=f"pk{i:02d}", material="peek") for i in range(peek)])


def materials(ids: list[str] | tuple[str, ...]) -> Counter:
    return Counter(i[:2] for i in ids)


def test_paper_cohort_gives_2mg_1peek_test_and_40_10_folds_at_7_1_2() -> None:
    pairs = cohort(38, 5, 10)
    folds = make_folds(pairs, n_folds=5, n_test=3, seed=0)
    assert materials(folds.test_ids) == {"mg": 2, "pk": 1}
    seen_val: list[str] = []
    for k in range(5):
        train, val = split_for_fold(folds, k)
        assert (len(train), len(val)) == (40, 10)
        assert not set(train) & set(val)
        assert not (set(train) | set(val)) & set(folds.test_ids)   # test never in a fold
        m = materials(val)
        assert m["ti"] == 1 and 7 <= m["mg"] <= 8 and 1 <= m["pk"] <= 2
        seen_val += val
    assert sorted(seen_val) == sorted(set(p.id for p in pairs) - set(folds.test_ids))


def test_folds_are_deterministic_from_the_seed_and_ignore_row_order() -> None:
    pairs = cohort(20, 4, 6)
    a = make_folds(pairs, 5, 3, seed=4)
    b = make_folds(list(reversed(pairs)), 5, 3, seed=4)
    assert sorted(a.test_ids) == sorted(b.test_ids)  # listed in manifest order
    assert [sorted(v) for v in a.val_ids] == [sorted(v) for v in b.val_ids]
    assert make_folds(pairs, 5, 3, seed=5).val_ids != a.val_ids


def test_small_phantom_set_works_and_no_folds_means_train_on_all() -> None:
    pairs = cohort(6, 2, 2)
    folds = make_folds(pairs, n_folds=5, n_test=3, seed=1)
    assert len(folds.test_ids) == 3 and materials(folds.test_ids)["mg"] == 2
    assert sorted(len(v) for v in folds.val_ids) == [1, 1, 1, 2, 2]
    assert all(materials(folds.pool)[m] >= 1 for m in ("mg", "ti", "pk"))
    none = make_folds(pairs, n_folds=0, n_test=0)
    assert split_for_fold(none, 0) == ([p.id for p in pairs], [])


def test_impossible_requests_are_clear_errors() -> None:
    pairs = cohort(3, 1, 1)
    with pytest.raises(InputError, match=r"n_folds=5: needs at least 5 pairs outside the 3"):
        make_folds(pairs, n_folds=5, n_test=3)
    with pytest.raises(ConfigError, match="n_test=5"):
        make_folds(pairs, n_folds=0, n_test=5)
    with pytest.raises(ConfigError, match="n_folds=1"):
        make_folds(pairs, n_folds=1, n_test=0)
    with pytest.raises(ConfigError, match=r"data.fold=2: there are 2 folds \(0–1\)"):
        split_for_fold(make_folds(pairs, n_folds=2, n_test=1), 2)


def test_write_folds_round_trips_json(tmp_path: Path) -> None:
    folds = make_folds(cohort(10, 2, 3), n_folds=3, n_test=2, seed=9)
    write_folds(tmp_path / "run" / "folds.json", folds)
    data = json.loads((tmp_path / "run" / "folds.json").read_text())
    assert data["test"] == list(folds.test_ids) and len(data["folds"]) == 3
    assert data["folds"][1]["val"] == list(split_for_fold(folds, 1)[1])
    assert sum(data["folds"][0]["val_materials"].values()) == len(data["folds"][0]["val"])
    assert read_folds(tmp_path / "run" / "folds.json") == folds
