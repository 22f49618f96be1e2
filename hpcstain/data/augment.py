"""§2.7 augmentation: one geometric transform for the whole pair, separate intensity jitter.

Geometry: a random square source region of side ``round(patch / scale)`` (scale uniform in
[rescale_min, rescale_max], i.e. 90–110 %) is resampled to ``patch × patch`` — bilinear
for CT and histology, nearest for the mask, at the same sample positions — then the same
horizontal/vertical flips are applied to all three, so they stay aligned pixel for pixel.
With ``rot90`` (``data.rot90``) the patch instead gets one of the 8 dihedral transforms
(identity, 90°/180°/270° rotations, the two flips, transpose and anti-transpose), uniform:
an optional transpose (swap of rows and columns) followed by the two optional flips, again
identical for CT, histology and mask.

Intensity (in the [0, 1] space ``u = (x + 1) / 2`` of the normalised images), brightness
``b`` and contrast ``k`` drawn uniformly in [1 - a, 1 + a] (a = 10 %):

* CT: ``u' = (u - m) k + m b`` with m the patch mean: contrast scales deviations about the
  mean, brightness scales the mean level.
* Histology: the same map is applied to the per-pixel lightness L = mean(R, G, B) only,
  and every pixel's RGB is multiplied by ``L' / L``; a pixel pushed above 1 is scaled down
  as a whole. Each pixel's R:G:B ratios (its chromaticity) are therefore unchanged —
  brightness and contrast change only how light a pixel is, never its colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometry:
    """Source region ``[y0:y0+size, x0:x0+size]`` → patch, then optional transpose, flips."""

    y0: int
    x0: int
    size: int
    flip_h: bool = False
    flip_v: bool = False
    transpose: bool = False   # rows ↔ columns, applied before the flips


@dataclass(frozen=True)
class Jitter:
    """Brightness and contrast factors for CT and histology (1.0 = unchanged)."""

    ct_brightness: float = 1.0
    ct_contrast: float = 1.0
    hist_brightness: float = 1.0
    hist_contrast: float = 1.0


def draw_geometry(rng: np.random.Generator, shape: tuple[int, int], patch: int,
                  scale: tuple[float, float] = (1.0, 1.0), flips: bool = False,
                  rot90: bool = False) -> Geometry:
    """A random crop of a slide of ``shape`` (H, W); region side = patch / scale.

    ``rot90``: one of the 8 dihedral transforms, uniform (it includes the flips, so
    ``flips`` is then moot); without it the draws are exactly those of ``flips`` alone.
    """
    s = float(rng.uniform(scale[0], scale[1])) if scale[1] > scale[0] else float(scale[0])
    size = int(min(max(round(patch / s), 1), shape[0], shape[1]))
    y0 = int(rng.integers(0, shape[0] - size + 1))
    x0 = int(rng.integers(0, shape[1] - size + 1))
    if rot90:
        d = int(rng.integers(0, 8))
        return Geometry(y0, x0, size, bool(d & 1), bool(d & 2), bool(d & 4))
    fh, fv = (bool(v) for v in rng.random(2) < 0.5) if flips else (False, False)
    return Geometry(y0, x0, size, fh, fv)


def draw_jitter(rng: np.random.Generator, brightness: float, contrast: float) -> Jitter:
    """Independent factors for CT and histology, uniform in [1 - a, 1 + a]."""
    b_ct, c_ct, b_h, c_h = rng.uniform(-1.0, 1.0, size=4)
    return Jitter(1.0 + brightness * float(b_ct), 1.0 + contrast * float(c_ct),
                  1.0 + brightness * float(b_h), 1.0 + contrast * float(c_h))


def apply_geometry(image: torch.Tensor, mask: torch.Tensor, g: Geometry, patch: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop + resample (C, H, W) float and (H, W) uint8/bool mask to (C, P, P), (1, P, P)."""
    img = image[:, g.y0:g.y0 + g.size, g.x0:g.x0 + g.size]
    m = mask[g.y0:g.y0 + g.size, g.x0:g.x0 + g.size]
    if g.size != patch:
        img = F.interpolate(img[None], size=(patch, patch), mode="bilinear",
                            align_corners=False)[0]
        m = F.interpolate(m[None, None].to(torch.uint8), size=(patch, patch),
                          mode="nearest-exact")[0, 0]
    img = img.float()
    m = m.to(torch.float32)[None]
    if g.transpose:
        img, m = img.transpose(-1, -2), m.transpose(-1, -2)
    dims = [d for d, on in ((-1, g.flip_h), (-2, g.flip_v)) if on]
    if dims:
        img, m = torch.flip(img, dims), torch.flip(m, dims)
    return img.contiguous(), m.contiguous()


def jitter_ct(ct: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """Brightness/contrast of a CT patch in [-1, 1] (see module docstring)."""
    u = (ct + 1.0) * 0.5
    m = u.mean()
    u = (u - m) * contrast + m * brightness
    return (u * 2.0 - 1.0).clamp_(-1.0, 1.0)


def jitter_histology(rgb: torch.Tensor, brightness: float, contrast: float,
                     eps: float = 1e-6) -> torch.Tensor:
    """Brightness/contrast of a (3, H, W) patch in [-1, 1], keeping each pixel's R:G:B."""
    u = rgb.add(1.0).mul_(0.5)
    light = u.mean(dim=0, keepdim=True)
    m = float(light.mean())
    # u_c <= 3 L, so u_c * target / max(L, eps) stays bounded; a black pixel stays black
    gain = light.sub(m).mul_(contrast).add_(m * brightness).clamp_(min=0.0)
    u.mul_(gain.div_(light.clamp_(min=eps)))
    peak = u.amax(dim=0, keepdim=True).clamp_(min=1.0)
    return u.div_(peak).mul_(2.0).sub_(1.0)
