"""Bytes of ``latest.pt`` and ``min-*.pt`` for a model profile, before and after slimming.

    .venv/bin/python benchmarks/checkpoint_sizes.py [--config modcyclegan] [--out /tmp/ckpt-sizes]

Builds the model (no training), gives both Adam optimisers their state (one step on zero
gradients, which leaves the weights unchanged) and fills every image pool to
``model.pool_size`` with ``data.patch_size``² fakes, as after the first epoch. Then it writes

* ``latest-old.pt``: the former layout, pools in ``model`` *and* in ``pools_by_rank`` (the
  gathered copy of a DDP/GPU run; a single CPU process shared the storages);
* ``latest.pt``: pools once, in ``pools_by_rank``;
* ``min-old.pt``: the former ``min-*.pt`` (generators, discriminators, pools);
* ``min.pt``: generators + conventions only,

and prints their sizes. One rank; every further DDP rank adds its own pools and RNG state.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from hpcstain.checkpoint import load_checkpoint, rng_state, save_checkpoint
from hpcstain.config import load_config, to_dict
from hpcstain.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="modcyclegan")
    p.add_argument("--out", default="/tmp/ckpt-sizes")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    cfg = load_config(args.config, ["data.manifest=unused.csv"])
    model = build_model(cfg.model, cfg.loss, "cpu")
    opts = [torch.optim.Adam(params, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
            for params in (model.parameters_g(), model.parameters_d())]
    for opt in opts:
        for group in opt.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        opt.step()
    size = cfg.data.patch_size
    for index, pool in enumerate(model.pools.values()):
        channels = cfg.model.histology_channels if index == 0 else cfg.model.ct_channels
        while len(pool) < cfg.model.pool_size:
            pool.query(torch.rand(1, channels, size, size) * 2 - 1)

    pools = {n: p.state_dict() for n, p in model.pools.items()}
    common = {"architecture": model.architecture(), "config": to_dict(cfg)}
    train_state = {"opt_g": opts[0].state_dict(), "opt_d": opts[1].state_dict(),
                   "sched_g": {}, "sched_d": {}, "scaler": {}, "rng": [rng_state()],
                   "epoch": 1, "step": 1, "batch_in_epoch": 0, "minima": {},
                   "epoch_sums": {}, "reason": "size measurement"}
    files = {
        "latest-old.pt": {**common, **train_state, "model": model.state_dict(),
                          "pools_by_rank": [copy.deepcopy(pools)]},
        "latest.pt": {**common, **train_state,
                      "model": model.state_dict(include=("generators", "discriminators")),
                      "pools_by_rank": [pools]},
        "min-old.pt": {**common, "model": model.state_dict(), "epoch": 1, "step": 1,
                       "minima": {}, "reason": "size measurement"},
        "min.pt": {**common, "model": model.generator_state_dict(), "epoch": 1, "step": 1,
                   "minima": {}, "reason": "size measurement"},
    }
    sizes = {}
    for name, payload in files.items():
        path = save_checkpoint(out / name, payload)
        sizes[name] = path.stat().st_size
    slim = load_checkpoint(out / "min.pt")  # and it loads for inference
    build_model(cfg.model, cfg.loss, "cpu").load_state_dict(slim["model"], generators_only=True)
    params = {"generators": sum(p.numel() for p in model.parameters_g()),
              "discriminators": sum(p.numel() for p in model.parameters_d())}
    print(json.dumps({"config": args.config, "parameters": params,
                      "pool_images": {n: len(p) for n, p in model.pools.items()},
                      "bytes": sizes,
                      "MB": {k: round(v / 1e6, 1) for k, v in sizes.items()}}, indent=2))


if __name__ == "__main__":
    main()
