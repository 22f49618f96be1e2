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


# --------------------------------------------------------------------------- scanned CT

# [issue 23 item 3] What a reconstructed scan does to the CT that our renderer does not, as
# ranges drawn per patch (``data.scan_augment`` = the probability a patch gets them). In
# units of the levelled gap (0 = background level, 1 = bone level) unless named otherwise;
# sized from the phantom scanned by ``--physics tomo`` at the label medians' levels
# (docs/results.md, session 10): soft tissue 0.05-0.11 of the gap above the renderer's,
# background noise 0.034-0.041 (signed units) in both, Ti soft tissue's spread 4× the
# renderer's (streaks), and the level estimator's errors (up to ±19 % of the gap on Mg).
SCAN_CURVE = 0.6        # u + c u (1 - u), |c| ≤ this: soft tissue's contrast to bone
SCAN_GAIN = 0.12        # levels read off by up to this fraction of the gap ...
SCAN_OFFSET = 0.04      # ... and the background level by up to this fraction
SCAN_NOISE = 0.03       # extra noise, σ in signed units, high-passed (FBP's texture) or not
SCAN_RINGS = 6          # up to this many rings about an axis within a patch of the centre
SCAN_RING_AMP = 0.04    # ring amplitude, signed units
SCAN_STREAKS = 3        # up to this many straight streaks (beam hardening, starvation)
SCAN_STREAK_AMP = (-0.15, 0.08)  # streak amplitude, signed units (dark ones stronger)
SCAN_BURST = 32         # up to this many streaks through a metal part in the patch
SCAN_BURST_AMP = 0.15   # their amplitude, signed units, either sign (Ti: soft tissue σ 0.15)
METAL_GAP = 1.6         # a metal: above this many gaps over the background level
SCAN_BLUR = 0.8         # Gaussian blur up to this σ (px) ...
SCAN_SHARPEN = 0.8      # ... or an unsharp mask up to this amount (phase-contrast fringes)


@dataclass(frozen=True)
class ScanDraw:
    """One patch's draw of :func:`scan_ct`; the same for every CT plane of the patch."""

    curve: float
    gain: float
    offset: float
    noise: float
    highpass: bool
    rings: tuple[tuple[float, float], ...]      # (radius px, amplitude)
    centre: tuple[float, float]                 # the rings' axis (y, x) in px
    streaks: tuple[tuple[float, float, float, float, float], ...]  # y, x, angle, width, amp
    burst: tuple[tuple[float, float], ...]       # (angle, amp) of streaks through a metal
    blur: float                                  # > 0: blur σ; < 0: unsharp amount
    seed: int                                    # the noise planes


def draw_scan(rng: np.random.Generator, patch: int) -> ScanDraw:
    """A random scanned-CT appearance for a ``patch × patch`` CT patch."""
    u = rng.uniform
    n_rings = int(rng.integers(0, SCAN_RINGS + 1))
    n_streaks = int(rng.integers(0, SCAN_STREAKS + 1))
    rings = tuple((float(u(0, 1.5 * patch)), float(u(-SCAN_RING_AMP, SCAN_RING_AMP)))
                  for _ in range(n_rings))
    streaks = tuple((float(u(0, patch)), float(u(0, patch)), float(u(0, np.pi)),
                     float(u(0.5, 2.0)), float(u(*SCAN_STREAK_AMP))) for _ in range(n_streaks))
    burst = tuple((float(u(0, np.pi)), float(u(-SCAN_BURST_AMP, SCAN_BURST_AMP)))
                  for _ in range(int(rng.integers(0, SCAN_BURST + 1))))
    blur = float(u(0, SCAN_BLUR)) if rng.random() < 0.5 else -float(u(0, SCAN_SHARPEN))
    return ScanDraw(curve=float(u(-SCAN_CURVE, SCAN_CURVE)),
                    gain=float(u(1 - SCAN_GAIN, 1 + SCAN_GAIN)),
                    offset=float(u(-SCAN_OFFSET, SCAN_OFFSET)),
                    noise=float(u(0, SCAN_NOISE)), highpass=bool(rng.random() < 0.5),
                    rings=rings,
                    centre=(float(u(-0.5, 1.5) * patch), float(u(-0.5, 1.5) * patch)),
                    streaks=streaks, burst=burst, blur=blur, seed=int(rng.integers(2**31)))


def _gaussian(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, H, W) planes, σ in px, mirrored at the edges."""
    r = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=planes.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    p = F.pad(planes[:, None], (r, r, r, r), mode="reflect")
    p = F.conv2d(p, k.view(1, 1, 1, -1))
    return F.conv2d(p, k.view(1, 1, -1, 1))[:, 0]


def _pattern(d: ScanDraw, h: int, w: int, metal: tuple[float, float] | None
             ) -> torch.Tensor:
    """Rings and streaks of ``d`` over an (h, w) plane, signed units; the burst's streaks
    cross at ``metal`` (y, x), none without one."""
    streaks = list(d.streaks)
    if metal is not None:
        streaks += [(metal[0], metal[1], angle, 0.7, amp) for angle, amp in d.burst]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.zeros(h, w)
    radius = torch.hypot(yy - d.centre[0], xx - d.centre[1])
    for r, amp in d.rings:
        out += amp * torch.exp(-0.5 * ((radius - r) / 0.7) ** 2)
    for y0, x0, angle, width, amp in streaks:
        dist = (yy - y0) * np.cos(angle) - (xx - x0) * np.sin(angle)
        out += amp * torch.exp(-0.5 * (dist / width) ** 2)
    return out


def scan_ct(planes: torch.Tensor, d: ScanDraw, bone: float, background: float
            ) -> torch.Tensor:
    """[issue 23 item 3] (n, H, W) levelled CT planes in signed units, re-imaged as a
    reconstructed scan might show them (:class:`ScanDraw`): a different contrast of the
    tissues between background and bone, levels read a little off, blur or phase fringes,
    rings, streaks and FBP-like noise. ``bone``/``background``: the target levels in signed
    units. Every plane gets the same draw except the noise (independent per plane)."""
    gap = bone - background
    u = (planes - background) / gap
    hot = torch.nonzero(u[u.shape[0] // 2] > METAL_GAP)
    metal = None if hot.numel() == 0 else tuple(float(v) for v in hot.float().mean(0))
    inside = (u > 0) & (u < 1)
    u = torch.where(inside, u + d.curve * u * (1 - u), u)
    x = (u * d.gain + d.offset) * gap + background
    if d.blur > 0.05:
        x = _gaussian(x, d.blur)
    elif d.blur < -0.05:
        x = x - d.blur * (x - _gaussian(x, 1.0))
    x = x + _pattern(d, *x.shape[-2:], metal)
    if d.noise > 0:
        g = torch.Generator().manual_seed(d.seed)
        noise = torch.randn(x.shape, generator=g) * d.noise
        if d.highpass:   # white minus its σ = 1 px blur (σ × 0.87), rescaled: the same σ
            noise = (noise - _gaussian(noise, 1.0)) * 1.15
        x = x + noise
    return x.clamp_(-1.0, 1.0)
