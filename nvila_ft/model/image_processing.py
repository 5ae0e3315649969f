"""NVILA image tiling: `dynamic_s2` (NVILA), `dynamic` (NVILA-Lite) and plain `resize`.

Geometry follows `../shared/docs/nvila-architecture.md` ("Image tiling") and NVlabs/VILA `mm_utils.py`
(`dynamic_s2_preprocess`, `dynamic_preprocess`): PIL bicubic resizes of the whole image, 448 px tiles cut
row-major, pixel values `(u8 / 255 - mean) / std` with mean = std = 0.5 (SigLIP `preprocessor_config.json`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_MODES = ("dynamic_s2", "dynamic", "resize")


@dataclass(frozen=True)
class TilingConfig:
    """What the image processor needs from a checkpoint's `config.json`.

    Attributes:
        image_aspect_ratio: `dynamic_s2` | `dynamic` | `resize` (config field `image_aspect_ratio`).
        tile_size: tile side in pixels (vision tower `image_size`, 448 for SigLIP so400m-448).
        s2_scales: image sides of the S2 scales, ascending (config `s2_scales`, "448,896,1344").
        max_tiles: largest tile grid of the aspect-aware scale (config `max_tiles`, 12).
        min_tiles: smallest grid for `dynamic` (config `min_tiles`, 1).
        image_mean, image_std: per-channel normalisation (preprocessor_config.json, 0.5).
    """

    image_aspect_ratio: str = "dynamic_s2"
    tile_size: int = 448
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    max_tiles: int = 12
    min_tiles: int = 1
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(
                f"image_aspect_ratio must be one of {IMAGE_MODES}, got {self.image_aspect_ratio!r}"
            )
        if self.image_aspect_ratio == "dynamic_s2" and any(s % self.s2_scales[0] for s in self.s2_scales):
            raise ValueError(f"s2_scales must be multiples of the first scale, got {self.s2_scales}")


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, sorted by tile count.

    Mirrors the official candidate order (a Python set of tuples, stable-sorted by product) so that
    exact ties resolve as they do in NVlabs/VILA.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """Picks the (cols, rows) grid whose cols/rows is closest to width/height.

    On an exact tie the later candidate wins if the image area exceeds half the grid's pixel area
    (`area > 0.5 * tile_size**2 * cols * rows`), as in the official `find_closest_aspect_ratio`.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_grid(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """(cols, rows) of the aspect-aware tiling: the whole image for `dynamic`, the last scale for `dynamic_s2`
    (which needs at least (last/first scale)^2 tiles, 9 for 448/896/1344)."""
    if cfg.image_aspect_ratio == "dynamic":
        low, high = cfg.min_tiles, cfg.max_tiles
    else:
        low = (cfg.s2_scales[-1] // cfg.s2_scales[0]) ** 2
        high = max(cfg.max_tiles, low)
    return closest_grid(width, height, candidate_grids(low, high), cfg.tile_size)


def _cut_tiles(image: Image.Image, cols: int, rows: int, tile: int) -> list[Image.Image]:
    """Resizes `image` (bicubic) to (cols*tile, rows*tile) and cuts it into row-major tiles."""
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of any PIL image, as a person would see it.

    - 8-bit modes without alpha (RGB, L, P, 1, CMYK, YCbCr, ...): `convert("RGB")`, what NVIDIA's preprocessing
      does (so the pixels equal the official pipeline's).
    - 16/32-bit integer and float modes (I;16, I;16B, I;16L, I, F: medical and scientific images): scaled
      linearly from the image's own min..max to 0..255 (a plain `convert("RGB")` clips them to 255: a 12-bit
      radiograph becomes an almost white image). A constant image becomes black.
    - Alpha (RGBA, LA, PA, P with a transparency key): composited on white, as a viewer shows it (a plain
      convert keeps the colour of transparent pixels, often black, under black text).

    Raises:
        OSError / ValueError: PIL cannot read or convert the pixels.
    """
    mode = image.mode
    if mode == "RGB":  # a copy: callers convert inside `with Image.open(...)`, which closes the original
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def tile_image(image: Image.Image, cfg: TilingConfig, single: bool = False) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """Cuts one RGB image into the tiles the vision tower sees.

    Args:
        image: PIL image of any mode (made 8-bit RGB here by :func:`to_rgb`).
        cfg: tiling settings.
        single: force one `tile_size` resize (video frames, and images of multi-image samples, as in
            the official code).

    Returns:
        (tiles, block_size): `tiles` are `tile_size` square PIL images. For `dynamic_s2`,
        1 + 4 + rows*cols tiles (scales 448, 896, then the aspect-aware last scale) and
        `block_size = (rows, cols)` of the last scale; otherwise `block_size` is None. For `dynamic`,
        1..max_tiles tiles plus a whole-image thumbnail when there is more than one tile.
    """
    image = to_rgb(image)
    t = cfg.tile_size
    if single or cfg.image_aspect_ratio == "resize":
        return [image.resize((t, t), Image.Resampling.BICUBIC)], None
    w, h = image.size
    cols, rows = tile_grid(w, h, cfg)
    if cfg.image_aspect_ratio == "dynamic":
        tiles = _cut_tiles(image, cols, rows, t)
        if len(tiles) > 1:
            tiles.append(image.resize((t, t), Image.Resampling.BICUBIC))
        return tiles, None
    # dynamic_s2: square scales first, then the aspect-aware last scale with at least (last/first)^2 tiles.
    scales = cfg.s2_scales
    tiles: list[Image.Image] = []
    for scale in scales[:-1]:
        n = scale // scales[0]
        tiles += _cut_tiles(image, n, n, t)
    tiles += _cut_tiles(image, cols, rows, t)
    return tiles, (rows, cols)


def tiles_to_uint8(tiles: list[Image.Image]) -> np.ndarray:
    """(num_tiles, H, W, 3) uint8 array of the tiles."""
    return np.stack([np.asarray(tile, dtype=np.uint8) for tile in tiles])


def normalize(pixels_u8: np.ndarray, cfg: TilingConfig) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 `pixel_values` (N, 3, H, W) = (u8 / 255 - mean) / std."""
    x = torch.from_numpy(pixels_u8.astype(np.float64) / 255.0).float()
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
    std = torch.tensor(cfg.image_std, dtype=torch.float32)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def preprocess_image(
    image: Image.Image, cfg: TilingConfig, single: bool = False
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Tiles and normalises one image.

    Returns:
        pixel_values: (num_tiles, 3, tile_size, tile_size) float32, and the block size (rows, cols)
        for `dynamic_s2` (None otherwise or when `single`).
    """
    tiles, block_size = tile_image(image, cfg, single=single)
    return normalize(tiles_to_uint8(tiles), cfg), block_size


def num_tiles(width: int, height: int, cfg: TilingConfig, single: bool = False) -> tuple[int, tuple[int, int] | None]:
    """Tile count and block size for an image of this size, without touching pixels (for planning/preflight)."""
    if single or cfg.image_aspect_ratio == "resize":
        return 1, None
    cols, rows = tile_grid(width, height, cfg)
    if cfg.image_aspect_ratio == "dynamic":
        return cols * rows + (1 if cols * rows > 1 else 0), None
    scales = cfg.s2_scales
    return sum((s // scales[0]) ** 2 for s in scales[:-1]) + rows * cols, (rows, cols)
