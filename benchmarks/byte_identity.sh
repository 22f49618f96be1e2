#!/usr/bin/env bash
# byte-identity check: phantom volume + tiny untrained checkpoint + stain(3 axes) + fuse; hash arrays
# usage: benchmarks/byte_identity.sh [REPO] [OUT]; run it on two commits and diff the hash lines.
# The hashes of the refactor commits of issue 27 are in its closing notes (docs/architecture.md).
# BYTEID_CKPT=path: stain with that checkpoint instead of the tiny untrained ResNet (e.g. a
# U-Net with resize up-levels, which hpcstain.models.fastpath rewrites).
set -euo pipefail
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd); OUT=${2:-/tmp/byteid/out}
rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT"
PY=$REPO/.venv/bin/python; H=$REPO/.venv/bin/hpcstain
export OMP_NUM_THREADS=1
$H phantom volume vol.zarr --shape 48 80 80 --seed 11 --material mg --chunk 32 >/dev/null
$H phantom volume volti.zarr --shape 40 64 64 --seed 12 --material ti --chunk 32 --cupping 0.2 >/dev/null
$PY - <<PYEOF
import sys; sys.path.insert(0, "$REPO/tests")
from pathlib import Path
from micro import untrained_generator_checkpoint
untrained_generator_checkpoint(Path("g.pt"))
PYEOF
if [ -n "${BYTEID_CKPT:-}" ]; then cp "$BYTEID_CKPT" g.pt; fi
$H stain vol.zarr --checkpoint g.pt --out run --chunk 32 --tile 64 --step 48 --no-progress > stain.log 2>&1
$H fuse run --no-progress > fuse.log 2>&1
$H stain volti.zarr --checkpoint g.pt --out runti --chunk 32 --tile 64 --step 48 --cupping auto --cupping-override --no-progress > stainti.log 2>&1
$H fuse runti --method median --no-progress > fuseti.log 2>&1
$H predict --help >/dev/null
$PY - <<PYEOF
import hashlib, zarr, pathlib
for r in ["run", "runti"]:
    root = pathlib.Path(r)
    for p in sorted(root.rglob("zarr.json")) + sorted(root.rglob(".zarray")):
        d = p.parent
        try:
            a = zarr.open_array(str(d), mode="r")
        except Exception:
            continue
        print(d, a.shape, a.dtype, hashlib.sha256(a[...].tobytes()).hexdigest()[:16])
PYEOF
