"""How the Triton dequant kernel splits a type's blocks into programs (each type's own tiles are in
its registry entry, ``formats``). Kept apart from the kernels (no Triton import) so that the
registry can be read, tested and chosen from without a GPU."""

from __future__ import annotations

from typing import NamedTuple


class Tile(NamedTuple):
    """How a type's blocks are split: sub-blocks per block (the [blocks, NSUB, SUB] tile's; Q3_K,
    Q6_K and IQ4_XS have tiles of fixed shapes, and the dequant kernel's IQ4_NL tile is of words),
    blocks per program."""
    nsub: int
    blocks: int
    num_warps: int = 4
