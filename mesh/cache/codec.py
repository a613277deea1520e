"""The binary payload of one cached KV block: a small header, the raw tensor bytes, a checksum.

Layout (little-endian): `_HEADER` = magic b"MKV1", format version u16, dtype code u16, ndim u16,
shape 5 x u32 ([layers, 2 (K, V), block_size, kv_heads, head_dim]), data length u64; then the data;
then an 8-byte blake2b checksum of header and data. A payload with a wrong magic, version, dtype,
shape, length or checksum decodes to None, so a corrupt or truncated entry is a miss, never bad KV.
"""

from __future__ import annotations

import hashlib
import struct

import torch

MAGIC = b"MKV1"
VERSION = 1
_DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_CODES = {v: k for k, v in _DTYPES.items()}
_HEADER = struct.Struct("<4sHHH5IQ")  # magic, version, dtype, ndim, shape[5], data bytes
_SUM = 8


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_SUM).digest()


def encode_block(kv: torch.Tensor) -> bytes:
    """kv [L, 2, block_size, Hk, D] -> payload bytes."""
    if kv.dim() != 5:
        raise ValueError(f"a KV block is 5-dimensional, got shape {tuple(kv.shape)}")
    raw = kv.contiguous().view(torch.uint8).numpy().tobytes()
    head = _HEADER.pack(MAGIC, VERSION, _DTYPES[kv.dtype], 5, *kv.shape, len(raw))
    body = head + raw
    return body + _checksum(body)


def decode_block(payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Payload -> kv tensor of `shape`/`dtype`, or None if anything about it is off."""
    if len(payload) < _HEADER.size + _SUM:
        return None
    magic, version, code, ndim, *rest = _HEADER.unpack_from(payload)
    dims, nbytes = tuple(rest[:5]), rest[5]
    if (magic != MAGIC or version != VERSION or _CODES.get(code) != dtype or ndim != 5
            or dims != tuple(shape) or len(payload) != _HEADER.size + nbytes + _SUM):
        return None
    body = memoryview(payload)[:-_SUM]
    if _checksum(body) != payload[-_SUM:]:
        return None
    data = torch.frombuffer(bytearray(body[_HEADER.size:]), dtype=torch.uint8)
    return data.view(dtype).view(shape)
