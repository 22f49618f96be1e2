"""LPIPS with the SqueezeNet 1.1 backbone (Zhang et al. 2018, the ``lpips`` 'squeeze' net).

Plain torch: no torchvision, no ``lpips`` package. Images in [-1, 1] are shifted/scaled by
the LPIPS scaling layer, passed through SqueezeNet 1.1 ``features``, tapped after 7 stages
(64, 128, 256, 384, 384, 512, 512 channels); each tap is unit-normalised over channels, the
squared difference is weighted by a non-negative 1×1 "lin" layer, averaged over space and
summed over taps.

Weights come from a local file only: a state dict (``torch.load(weights_only=True)``) with
``features.<i>.…`` keys as in torchvision's ``squeezenet1_1`` (``features.0.weight``,
``features.3.squeeze.weight``, ``features.3.expand1x1.weight``, ``features.3.expand3x3.bias``
…) and ``lins.<l>.weight`` of shape (1, C_l, 1, 1). :func:`convert_state_dict` also accepts
torchvision's full ``squeezenet1_1`` dict plus the ``lpips`` package's ``squeeze.pth``
(``lin<l>.model.1.weight``) or a saved ``lpips.LPIPS`` state dict (``net.slice<k>.<i>.…``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpcstain.errors import HpcstainError, InputError

TAP_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
TAP_AFTER = (1, 4, 7, 9, 10, 11, 12)  # last `features` index of each tapped stage
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class LpipsUnavailable(HpcstainError):
    """LPIPS weights are not available locally; ``evaluate`` prints the message and goes on."""


class Fire(nn.Module):
    """SqueezeNet fire module: 1×1 squeeze, then 1×1 and 3×3 expands concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def squeezenet11_features() -> nn.Sequential:
    """SqueezeNet 1.1 feature extractor, indexed as torchvision's ``features``."""
    def pool() -> nn.MaxPool2d:
        return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(),
        pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
        pool(), Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
        pool(), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


class LPIPS(nn.Module):
    """LPIPS-SqueezeNet distance between image batches in [-1, 1] → (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = squeezenet11_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False)
                                  for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised feature maps at the 7 tapped stages."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAP_AFTER:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for lin, fa, fb in zip(self.lins, self.taps(a), self.taps(b), strict=True):
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def convert_state_dict(*parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge torchvision / ``lpips`` state dicts into this module's key names."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            if key.startswith(("features.", "lins.")):
                out[key] = value
            elif m := re.fullmatch(r"(?:net\.)?slice\d+\.(\d+\..+)", key):
                out[f"features.{m.group(1)}"] = value
            elif m := re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key):
                out[f"lins.{m.group(1)}.weight"] = value
            # classifier.*, scaling_layer.* (fixed constants here) are dropped
    return out


def load_lpips(path: str | Path | None, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS model with weights from ``path``; LpipsUnavailable when there is no such file."""
    if path is None or not Path(path).is_file():
        raise LpipsUnavailable(f"LPIPS skipped: weights not found at {path or '(no path given)'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        raise InputError(f"{path}: cannot read LPIPS weights ({exc})") from exc
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: LPIPS weights must be a state dict, got {type(state).__name__}")
    model = LPIPS()
    state = convert_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{path}: LPIPS weights lack {len(missing)} keys, e.g. {missing[:3]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise InputError(f"{path}: LPIPS key {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(value.shape)}")
    model.load_state_dict({k: state[k] for k in expected})
    return model.to(device).eval()


def try_load_lpips(path: str | Path | None) -> tuple[LPIPS | None, str | None]:
    """(model, None) or (None, "LPIPS skipped: …") so a caller can print and go on."""
    try:
        return load_lpips(path), None
    except LpipsUnavailable as exc:
        return None, str(exc)


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB → (N, 3, H, W) float32 in [-1, 1]."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise InputError(f"LPIPS needs RGB images shaped (N, H, W, 3), got {rgb.shape}")
    x = torch.from_numpy(rgb.astype(np.float32)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def lpips_batch(model: LPIPS, a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """LPIPS distance of each pair of 8-bit RGB images (N, H, W, 3) → (N,) float64."""
    if np.shape(a) != np.shape(b):
        raise InputError(f"cannot compare images of shapes {np.shape(a)} and {np.shape(b)}")
    ta, tb = rgb_to_tensor(a), rgb_to_tensor(b)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(ta), batch_size):
            d = model(ta[i:i + batch_size].to(device), tb[i:i + batch_size].to(device))
            out.append(d.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
