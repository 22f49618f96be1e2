"""Image pool (history buffer) of generated images for the discriminator (Shrivastava 2017).

As in CycleGAN: until the pool is full each new fake is stored and passed through; after
that each fake is, with probability 0.5, swapped for a random stored one (which it
replaces). The coin flips come from the pool's own ``torch.Generator``, so the sequence
is reproducible from a seed and resumes exactly from :meth:`ImagePool.state_dict`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from hpcstain.errors import InputError


def pool_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for pool ``index`` of ``rank``; distinct pools get unrelated streams."""
    state = np.random.SeedSequence([seed, rank, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ImagePool:
    """Stores up to ``size`` fakes (detached, float32); ``size`` 0 passes fakes through."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise ValueError(f"image pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []
        self.rng = torch.Generator(device="cpu")
        self.rng.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, fakes: Tensor) -> Tensor:
        """A batch the shape of ``fakes``: new fakes mixed with stored ones, detached."""
        fakes = fakes.detach().float()
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes:
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif torch.rand((), generator=self.rng).item() > 0.5:
                slot = int(torch.randint(0, self.size, (), generator=self.rng).item())
                out.append(self.images[slot])
                self.images[slot] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        """Stored images and the coin-flip generator state (uint8 tensor): tensors only."""
        return {"size": self.size, "images": list(self.images), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore images, size and generator state saved by :meth:`state_dict`."""
        try:
            images, rng, size = list(state["images"]), state["rng"], int(state["size"])
        except (KeyError, TypeError) as exc:
            raise InputError(f"image pool state: missing or malformed entry ({exc})") from None
        if len(images) > size:
            raise InputError(f"image pool state: {len(images)} images for a pool of {size}")
        self.size = size
        self.images = [img.detach().float() for img in images]
        self.rng.set_state(rng.cpu().to(torch.uint8))
