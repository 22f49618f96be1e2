"""Checkpoint files: atomic writes, weights-only loading, RNG round trip."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcstain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hpcstain.errors import InputError


class _Exploit:
    def __reduce__(self):  # a pickle that would run code when unpickled
        return (os.system, ("touch /tmp/hpcstain-pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"format": "hpcstain-checkpoint/1", "payload": _Exploit()}, bad)
    with pytest.raises(InputError, match="refused to load"):
        load_checkpoint(bad)
    assert not Path("/tmp/hpcstain-pwned").exists()


def test_missing_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an hpcstain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.zeros(3)})
    save_checkpoint(path, {"x": torch.ones(3)})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    before = (torch.rand(4), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    after = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_generator_only_state_loads_for_inference_and_is_checked() -> None:
    from dataclasses import replace

    from hpcstain.config import LossConfig, ModelConfig
    from hpcstain.errors import UsageError
    from hpcstain.models import build_model

    tiny = ModelConfig(ngf=4, ndf=4, n_blocks=1)
    model = build_model(tiny, LossConfig(), "cpu", seed=1)
    assert set(model.state_dict()) == {"generators", "discriminators", "pools"}
    assert set(model.state_dict(include=("generators", "discriminators"))) == {
        "generators", "discriminators"}
    state = model.generator_state_dict()
    assert set(state) == {"generators"}
    with pytest.raises(UsageError, match="optimiser"):
        model.state_dict(include=("optimiser",))
    other = build_model(tiny, LossConfig(), "cpu", seed=2)
    other.load_state_dict(state, generators_only=True)
    ct = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    assert torch.equal(other.stain(ct), model.stain(ct))  # same weights, same process
    with pytest.raises(InputError, match="no discriminator"):
        other.load_state_dict(state)  # a training state needs the discriminators
    with pytest.raises(InputError, match="no generator 'hist2ct'"):
        other.load_state_dict({"generators": {"ct2hist": state["generators"]["ct2hist"]}},
                              generators_only=True)
    wider = build_model(replace(tiny, ngf=8), LossConfig(), "cpu")
    with pytest.raises(InputError, match="ct2hist.*does not fit") as err:
        wider.load_state_dict(state, generators_only=True)
    assert "\n" not in str(err.value)


def test_truncated_or_bit_rotten_checkpoints_are_one_line_input_errors(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(4096, dtype=torch.float32)})
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        (tmp_path / "t.pt").write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a readable checkpoint") as err:
            load_checkpoint(tmp_path / "t.pt")
        assert "\n" not in str(err.value) and "t.pt" in str(err.value)
    rotten = bytearray(data)
    start = data.index(b"data/0") + 200  # inside the tensor bytes, past the member header
    rotten[start:start + 16] = bytes(16)
    (tmp_path / "r.pt").write_bytes(bytes(rotten))
    with pytest.raises(InputError, match="damaged checkpoint.*CRC") as err:
        load_checkpoint(tmp_path / "r.pt")
    assert "\n" not in str(err.value)
