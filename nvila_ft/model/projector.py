"""The NVILA multimodal projector (`mm_projector`): spatial-to-channel (STC) downsampling + MLP.

Layouts follow the official checkpoints (`mm_projector/model.safetensors`, keys `layers.<i>.*`,
index 0 being the parameter-free STC reshape); see NVlabs/VILA `base_projector.py` and
`../shared/docs/nvila-architecture.md` ("Projector").
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Projector types with a k x k spatial-to-channel reshape, and their k.
# `mlp_downsample` is the original (NVILA-8B) name of the 2x2 projector; its padding rule is the
# same as `mlp_downsample_2x2_fix` (one zero row/column when the side is odd).
STC_FACTOR = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", *STC_FACTOR)


def spatial_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """Folds each k x k window of a square token grid into one token (NVILA's STC reshape).

    Tokens are laid out row-major on an f x f grid (f = sqrt(N)). When f is not a multiple of k,
    zero rows are appended at the bottom and zero columns at the right. Output token (i, j) of the
    ceil(f/k) x ceil(f/k) grid comes out in row-major order; its channels are the window's vectors
    concatenated in row-major window order (0,0), (0,1), ..., (k-1,k-1).

    Args:
        x: (B, N, C) tokens, N a perfect square.
        k: window side (2 for `mlp_downsample*`, 3 for `mlp_downsample_3x3_fix`).

    Returns:
        (B, ceil(f/k)**2, k*k*C) tensor, same dtype and device as `x`.

    Raises:
        ValueError: if N is not a perfect square.
    """
    b, n, c = x.shape
    f = math.isqrt(n)
    if f * f != n:
        raise ValueError(f"spatial_to_channel needs a square token grid, got {n} tokens")
    grid = x.reshape(b, f, f, c)
    pad = (-f) % k
    if pad:
        # F.pad pads from the last dim backwards: (C: 0,0), (cols: 0,pad), (rows: 0,pad).
        grid = nn.functional.pad(grid, (0, 0, 0, pad, 0, pad))
    g = (f + pad) // k
    # (B, g, k, g, k, C) -> (B, g, g, k, k, C): window rows/cols next to the channel dim.
    grid = grid.reshape(b, g, k, g, k, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, g * g, k * k * c)


def num_output_tokens(mm_projector_type: str, num_input_tokens: int) -> int:
    """Tokens out of the projector for `num_input_tokens` (a square count) in: ceil(sqrt(N)/k)**2 for a
    k x k STC projector (32x32 -> 256 for 2x2, 121 for 3x3), N otherwise."""
    k = STC_FACTOR.get(mm_projector_type, 1)
    return num_input_tokens if k == 1 else (-(-math.isqrt(num_input_tokens) // k)) ** 2


class SpatialToChannel(nn.Module):
    """`nn.Module` wrapper of :func:`spatial_to_channel` (index 0 of the projector Sequential)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_to_channel(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class MultimodalProjector(nn.Module):
    """`mm_projector`: maps vision features (B, N, mm_hidden_size) to LLM embeddings (B, N', hidden_size).

    Layers (config field `mm_projector_type`), C = mm_hidden_size, H = LLM hidden_size:
      - `linear`: Linear(C, H)
      - `mlp2x_gelu`: Linear(C, H) | GELU | Linear(H, H)
      - `mlp_downsample`, `mlp_downsample_2x2_fix`: STC k=2 | LayerNorm(4C) | Linear(4C, H) | GELU | Linear(H, H)
      - `mlp_downsample_3x3_fix`: STC k=3 | LayerNorm(9C) | Linear(9C, 3C) | GELU | LayerNorm(3C)
        | Linear(3C, H) | GELU | Linear(H, H)
    GELU is exact (`nn.GELU()`), LayerNorm eps is PyTorch's default 1e-5, as in the official code.

    Raises:
        ValueError: for an unknown `mm_projector_type`.
    """

    def __init__(self, mm_projector_type: str, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.mm_projector_type = mm_projector_type
        c, h = mm_hidden_size, hidden_size
        mlp_match = re.fullmatch(r"mlp(\d+)x_gelu", mm_projector_type)
        if mm_projector_type == "linear":
            self.layers = nn.Sequential(nn.Linear(c, h))
        elif mlp_match:
            mods: list[nn.Module] = [nn.Linear(c, h)]
            for _ in range(int(mlp_match.group(1)) - 1):
                mods += [nn.GELU(), nn.Linear(h, h)]
            self.layers = nn.Sequential(*mods)
        elif STC_FACTOR.get(mm_projector_type) == 2:
            self.layers = nn.Sequential(
                SpatialToChannel(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h)
            )
        elif STC_FACTOR.get(mm_projector_type) == 3:
            self.layers = nn.Sequential(
                SpatialToChannel(3),
                nn.LayerNorm(9 * c),
                nn.Linear(9 * c, 3 * c),
                nn.GELU(),
                nn.LayerNorm(3 * c),
                nn.Linear(3 * c, h),
                nn.GELU(),
                nn.Linear(h, h),
            )
        else:
            raise ValueError(
                f"Unknown mm_projector_type {mm_projector_type!r}; supported: {', '.join(PROJECTOR_TYPES)}"
            )
        # The official `linear` projector is a bare Linear (keys `layers.weight`); keep that naming.
        if mm_projector_type == "linear":
            self.layers = self.layers[0]

    @property
    def downsample(self) -> int:
        """Side k of the STC window (1 when the projector does not downsample)."""
        return STC_FACTOR.get(self.mm_projector_type, 1)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """Tokens out for `num_input_tokens` (a square count) in; see :func:`num_output_tokens`."""
        return num_output_tokens(self.mm_projector_type, num_input_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
