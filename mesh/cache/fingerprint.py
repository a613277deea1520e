"""A model fingerprint for namespacing cached KV: two gateways share cached blocks only when they
run the same architecture, the same weights, the same dtype and the same block size."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_EDGE = 1 << 20  # bytes read from each end of every weights file


def weights_digest(model_dir: str | Path) -> str:
    """blake2b over config.json, each safetensors file's header (names, dtypes, shapes, offsets),
    size, and its first and last MiB of data. Reading whole multi-GB checkpoints at every start
    would cost minutes; headers pin the layout and the sampled bytes tell different weights apart."""
    d = Path(model_dir)
    h = hashlib.blake2b(digest_size=8)
    h.update((d / "config.json").read_bytes())
    for path in sorted(d.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(path.name.encode() + struct.pack("<Q", size))
            h.update(f.read(n))  # the JSON header
            h.update(f.read(_EDGE))
            if size > 8 + n + 2 * _EDGE:
                f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def model_namespace(model_dir: str | Path, family: str, dtype: str, block_size: int) -> str:
    return f"{family}:{weights_digest(model_dir)}:{dtype}:bs{block_size}"
