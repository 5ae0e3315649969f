"""Feature-map plumbing of `dynamic_s2` (NVILA's multi-scale tiling, `../shared/docs/nvila-architecture.md`):
row-major tile features stitched into one map per scale, and maps cut back into blocks for the projector."""

from __future__ import annotations

import math

import torch


def merge_tiles(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Stitches row-major tile features (rows*cols, f*f, C) into one map (1, C, rows*f, cols*f)."""
    n, tokens, c = features.shape
    f = math.isqrt(tokens)
    grid = features.reshape(rows, cols, f, f, c).permute(4, 0, 2, 1, 3)  # C, rows, f, cols, f
    return grid.reshape(1, c, rows * f, cols * f)


def split_blocks(feature_map: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Cuts a (1, C, H, W) map into rows*cols row-major blocks, returned as tokens (rows*cols, h*w, C)."""
    _, c, h, w = feature_map.shape
    bh, bw = h // rows, w // cols
    blocks = feature_map.reshape(c, rows, bh, cols, bw).permute(1, 3, 2, 4, 0)  # rows, cols, bh, bw, C
    return blocks.reshape(rows * cols, bh * bw, c)
