"""Ways to cut one input into feeds, h11-style: whole, byte by byte, every two-piece split, seeded random.

Every unit test here feeds a valid input in each of these ways and compares the result with the one-shot
result, so a reader that depends on where a chunk boundary falls fails a test.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

Cuts = list[bytes]


def whole(data: bytes) -> Cuts:
    return [data]


def bytewise(data: bytes) -> Cuts:
    return [data[i:i + 1] for i in range(len(data))]


def two_pieces(data: bytes) -> Iterator[tuple[int, Cuts]]:
    """Every split into two non-empty pieces, with its position."""
    for at in range(1, len(data)):
        yield at, [data[:at], data[at:]]


def random_cuts(data: bytes, seed: int, most: int = 40) -> Cuts:
    """Pieces of 1..*most* bytes, the same for the same seed (a failure is reproducible)."""
    rng = random.Random(seed)
    out: Cuts = []
    pos = 0
    while pos < len(data):
        n = rng.randint(1, most)
        out.append(data[pos:pos + n])
        pos += n
    return out


def all_cuts(data: bytes, seeds: int = 8) -> Iterator[tuple[str, Cuts]]:
    """Whole, bytewise, each two-piece split and *seeds* random cuttings, each named for the failure message."""
    yield "whole", whole(data)
    yield "bytewise", bytewise(data)
    for at, cuts in two_pieces(data):
        yield f"split at {at}", cuts
    for seed in range(seeds):
        yield f"random seed {seed}", random_cuts(data, seed)
