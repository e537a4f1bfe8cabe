"""How the Triton dequant kernel splits each quant type's blocks into programs, per GPU.

Kept apart from the kernels (no Triton import) so that the tables can be read, tested and chosen
without a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType as T


class Tile(NamedTuple):
    """How a type's blocks are split: sub-blocks per block (the [blocks, NSUB, SUB] tile's; Q3_K,
    Q6_K and IQ4_XS have tiles of fixed shapes, and the dequant kernel's IQ4_NL tile is of words),
    blocks per program."""
    nsub: int
    blocks: int
    num_warps: int = 4


# Chosen with bench/dequant_bandwidth.py --sweep on an H100 (the best or within 1% of it). Q6_K, IQ4_NL
# and IQ4_XS: their word kernels' best (or within 1%) in a sweep of 1-8 warps by an experiment script
# of 2026-12-01 on an H200 (Q6_K 94.8%, IQ4_NL 94.6%, IQ4_XS 94.1% of the copy bandwidth); no H100 was
# lent to sweep them.
TILES = {
    T.Q4_0: Tile(2, 64), T.Q4_1: Tile(2, 64), T.Q5_0: Tile(2, 64), T.Q5_1: Tile(2, 64),
    T.Q8_0: Tile(1, 128), T.IQ4_NL: Tile(2, 64, 2),
    T.Q2_K: Tile(16, 8), T.Q3_K: Tile(16, 16), T.Q4_K: Tile(8, 16), T.Q5_K: Tile(8, 32),
    T.Q6_K: Tile(16, 16, 8), T.IQ4_XS: Tile(16, 8, 2),
}

# GPUs whose own sweep found better tiles, by a whole word of the device's name ("H200" is not a
# GH200, which nobody swept); the others take TILES.
# On an H200 (the H100's SMs with 1.4x its memory bandwidth) these types ran 3-10 points of the copy
# bandwidth higher with fewer warps or other block counts (2026-12-01: Q5_0 81% -> 88%, Q5_1 91% ->
# 96%, Q2_K 83% -> 92%, Q3_K 78% -> 83%, Q5_K 88% -> 91%).
GPU_TILES = {
    "H200": {**TILES, T.Q5_0: Tile(2, 256, 2), T.Q5_1: Tile(2, 64, 2), T.Q2_K: Tile(16, 8, 2),
             T.Q3_K: Tile(16, 8, 2), T.Q5_K: Tile(8, 16, 2)},
}


@functools.lru_cache(maxsize=None)
def tiles_for(device_index: int) -> dict[T, Tile]:
    """The tile table for the CUDA device ``device_index`` (TILES for anything else, the CPU under
    Triton's interpreter included)."""
    words = torch.cuda.get_device_name(device_index).split() if device_index >= 0 else []
    return next((tiles for word, tiles in GPU_TILES.items() if word in words), TILES)
