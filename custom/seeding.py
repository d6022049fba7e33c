"""One seeding rule for every simulated draw (training clicks, validation and evaluation clicks, sampling order):
a base seed combined with the keys that identify the draw, so that a draw does not depend on what ran before it
(a resumed run, another rank, another order of cases draws alike)."""

from __future__ import annotations

import zlib

import torch

#: a prime beyond any key in use (iteration, epoch, position), so that (seed, key) pairs do not collide
_STRIDE = 1_000_003


def seed_value(seed: int, *keys: int | str) -> int:
    """``seed`` combined with ``keys`` in order: ``(seed * stride + key1) * stride + key2 ...``; a string key counts
    as its CRC-32 (stable across processes, unlike ``hash``)."""
    value = int(seed)
    for key in keys:
        value = value * _STRIDE + (zlib.crc32(key.encode()) if isinstance(key, str) else int(key))
    return value


def seeded_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded with :func:`seed_value`."""
    return torch.Generator().manual_seed(seed_value(seed, *keys))
