"""Raw CT → the generator's input range, and back (§2.5).

A linear map sends the CT's raw bone level to the checkpoint's target bone level and its raw
background level to the target background level on the 16-bit scale
(:func:`normalise_ct`); the generator sees ``clip(v, 0, 65535) / 65535 * 2 - 1``
(:func:`ct16_to_signed`; bone ≈ -0.085, background ≈ -0.695 at the paper's 30000/10000).
:func:`ct_to_signed` is both steps: the one path from raw grey values to [-1, 1] used by
training, predict, evaluate, stain and distill. Inversion (``invert_ct``) is applied by the
generator's tile function, not here.
"""

from __future__ import annotations

import numpy as np

from hpcstain.ct.levels import DEFAULT_TARGET, RawLevels, TargetLevels
from hpcstain.errors import InputError

CT_FULL_SCALE = 65535.0


def _gain(bone_mean: float, background_mean: float, bone_level: float,
          background_level: float) -> float:
    """The linear map's gain, or the one error message for levels that cannot map."""
    if not np.isfinite(bone_mean - background_mean) or bone_mean == background_mean:
        raise InputError(f"CT bone mean {bone_mean:g} equals background mean "
                         f"{background_mean:g}: cannot normalise")
    return (bone_level - background_level) / (bone_mean - background_mean)


def normalise_ct(ct: np.ndarray, bone_mean: float, background_mean: float,
                 bone_level: float = DEFAULT_TARGET.bone,
                 background_level: float = DEFAULT_TARGET.background) -> np.ndarray:
    """Linear map of the CT onto the 16-bit scale: bone → bone_level, background → ..."""
    gain = _gain(bone_mean, background_mean, bone_level, background_level)
    return ((ct.astype(np.float32) - np.float32(background_mean)) * np.float32(gain)
            + np.float32(background_level))


def ct16_to_signed(ct16: np.ndarray) -> np.ndarray:
    """16-bit-scale CT → network range: clip to [0, 65535], then v / 65535 * 2 - 1."""
    v = np.clip(ct16, 0.0, CT_FULL_SCALE).astype(np.float32)
    return v * np.float32(2.0 / CT_FULL_SCALE) - np.float32(1.0)


def signed_to_ct16(signed: np.ndarray) -> np.ndarray:
    """Network range → 16-bit-scale CT as uint16."""
    v = (np.clip(signed, -1.0, 1.0) + 1.0) * (CT_FULL_SCALE / 2.0)
    return np.rint(v).astype(np.uint16)


def ct_to_signed(ct: np.ndarray, raw: RawLevels | tuple[float, float],
               target: TargetLevels | tuple[float, float] = DEFAULT_TARGET) -> np.ndarray:
    """Raw CT → the generator's [-1, 1] input: ``raw`` levels onto ``target`` levels."""
    return to_signed_inplace(np.array(ct, np.float32), raw, target)


def to_signed_inplace(ct: np.ndarray, raw: RawLevels | tuple[float, float],
                    target: TargetLevels | tuple[float, float] = DEFAULT_TARGET) -> np.ndarray:
    """:func:`ct_to_signed` of a float32 array the caller owns, in place (no temporaries): the
    float32 operations of :func:`normalise_ct` then :func:`ct16_to_signed`, in their order."""
    raw, target = RawLevels(*raw), TargetLevels(*target)
    gain = _gain(raw.bone, raw.background, target.bone, target.background)
    np.subtract(ct, np.float32(raw.background), out=ct)
    np.multiply(ct, np.float32(gain), out=ct)
    np.add(ct, np.float32(target.background), out=ct)
    np.clip(ct, 0.0, CT_FULL_SCALE, out=ct)
    np.multiply(ct, np.float32(2.0 / CT_FULL_SCALE), out=ct)
    np.subtract(ct, np.float32(1.0), out=ct)
    return ct
