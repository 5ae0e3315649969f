"""What the preview app accepts and shows for an upload: the checks an upload passes before any model sees it,
and the tiles (or frames) the vision tower sees, with the visual token count.

    from app.media import check_upload, load_media, tile_preview
    kind = check_upload("scan.png", max_upload_mb=20)            # "image" or "video", or UploadError
    preview = tile_preview(processor, load_media("scan.png", kind), kind)
    print(preview.summary)      # "17 tiles (dynamic_s2, ...) -> 2,305 visual tokens"
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from nvila_ft.model.image_processing import to_rgb
from nvila_ft.model.processing import NvilaProcessor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images before decoding them (a 8000 x 8000 scan is 64 MP)


class UploadError(ValueError):
    """An upload the app refuses (type, size, unreadable); the message says what is accepted."""


def video_support() -> str | None:
    """None when videos can be previewed (`nvila_ft.model.video` and decord import), else why not."""
    try:
        import nvila_ft.model.video  # noqa: F401
    except ImportError:
        return "this version of nvila-ft has no video support (nvila_ft.model.video)"
    if importlib.util.find_spec("decord") is None:
        return 'video needs the video extra: pip install "nvila-ft[video]"'
    return None


def video_extensions() -> tuple[str, ...]:
    """File extensions accepted as video uploads; empty without video support."""
    if video_support() is not None:
        return ()
    from nvila_ft.model.video import VIDEO_EXTENSIONS

    return tuple(VIDEO_EXTENSIONS)


def check_upload(path: str | os.PathLike, max_upload_mb: float) -> str:
    """Checks an uploaded file before any model sees it. Returns its kind, "image" or "video".

    Raises:
        UploadError: unknown extension, larger than `max_upload_mb` (MB = 2**20 bytes), an image over
            `MAX_IMAGE_PIXELS` pixels, an image that does not decode in full (truncated, corrupt), or a video
            that does not open or has no frames. The message names the file, never its folder.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    videos = video_extensions()
    if suffix not in IMAGE_EXTENSIONS + videos:
        accepted = ", ".join(IMAGE_EXTENSIONS + videos)
        why = "" if videos else f" (videos: {video_support()})"
        raise UploadError(f"{path.name}: {suffix or 'no extension'} files are not accepted; upload one of "
                          f"{accepted}{why}")
    size_mb = path.stat().st_size / 2**20
    if size_mb > max_upload_mb:
        raise UploadError(f"{path.name} is {size_mb:.1f} MB; the limit is {max_upload_mb:g} MB (--max-upload-mb)")
    if suffix in videos:
        return _check_video(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UploadError(f"{path.name} is {width} x {height} pixels; the limit is "
                                  f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
            im.load()  # a full decode: a truncated JPEG or PNG fails here, not at the first question
            to_rgb(im)  # the conversion every model input goes through (16-bit, palette, alpha, ...)
    except UploadError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise UploadError(f"{path.name} does not open as an image: {_reason(err, path)}") from err
    return "image"


def _reason(err: BaseException, path: str | os.PathLike) -> str:
    """The library's first line, without the server's (temporary) folder in it."""
    path = Path(path)
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.replace(str(path), path.name).replace(str(path.parent) + os.sep, "")[:200]


def page_message(err: BaseException, path: str | os.PathLike | None) -> str:
    """What the page shows for an error while answering about the upload `path`: one line, with the upload's
    name instead of its path on the server."""
    if path is None:
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return _reason(err, path)


def _check_video(path: Path) -> str:
    """A video upload opens and has frames (`probe_video`: container header and frame count)."""
    from nvila_ft.model.video import VideoError, probe_video

    try:
        n_frames, _ = probe_video(path)
    except VideoError as err:
        raise UploadError(f"{path.name} does not open as a video (truncated or not a video)") from err
    if n_frames < 1:
        raise UploadError(f"{path.name} has no video frames")
    return "video"


def load_media(path: str | os.PathLike, kind: str) -> list:
    """What a model gets for an upload: [RGB image], or [video path] (each model's processor samples the
    frames with its own `num_video_frames` / `video_fps` and pools them with its `temporal_pool`)."""
    if kind == "video":
        return [os.fspath(path)]
    with Image.open(path) as im:
        return [to_rgb(im)]


@dataclass
class TilePreview:
    """What the vision tower sees for one upload.

    Attributes:
        tiles: the tiles (or frames) as RGB PIL images, `tile_size` square, in the order they are encoded.
        captions: one per tile ("448 px scale", "1344 px scale, row 1 col 2", "frame 3", ...).
        media_tokens: LLM embedding rows the media take (visual tokens + end tokens), summed over images.
        block_sizes: (rows, cols) of the last dynamic_s2 scale per image, or None.
        summary: one line for people, e.g. "17 tiles (dynamic_s2, last scale 3 x 3) -> 2,305 visual tokens".
    """

    tiles: list[Image.Image]
    captions: list[str]
    media_tokens: int
    block_sizes: list[tuple[int, int] | None]
    summary: str


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    """(T, 3, H, W) float `pixel_values` -> T RGB PIL images (x * std + mean, then 0..255, rounded).

    Inverts :func:`nvila_ft.model.image_processing.normalize` (mean = std = 0.5 for SigLIP) up to the uint8 rounding.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = ((pixel_values.float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in pixels]


def tile_captions(processor: NvilaProcessor, kind: str, n_tiles: int, block_sizes) -> list[str]:
    """Human names of the tiles of one image (or of the frames of a video), in encoding order."""
    if kind == "video":
        return [f"frame {i + 1}" for i in range(n_tiles)]
    tiling = processor.tiling
    if tiling.image_aspect_ratio == "dynamic_s2" and block_sizes and block_sizes[0]:
        captions = []
        first = tiling.s2_scales[0]
        for scale in tiling.s2_scales[:-1]:
            n = scale // first
            captions += [f"{scale} px scale" + (f", row {r + 1} col {c + 1}" if n > 1 else "")
                         for r in range(n) for c in range(n)]
        rows, cols = block_sizes[0]
        captions += [f"last scale {rows}x{cols}, row {r + 1} col {c + 1}" for r in range(rows) for c in range(cols)]
        return captions
    if tiling.image_aspect_ratio == "dynamic" and n_tiles > 1:
        return [f"tile {i + 1}" for i in range(n_tiles - 1)] + ["thumbnail"]
    return [f"{tiling.tile_size} px resize"] * n_tiles


def tile_preview(processor: NvilaProcessor, media: list, kind: str = "image") -> TilePreview:
    """Tiles (or sampled frames) of `media` as the processor cuts them, with the visual token count.

    `media`: images (PIL or paths), or for `kind="video"` one video (path, frames folder or list of PIL frames).
    """
    if kind == "video":
        layout = processor.layout_media([], videos=media[:1])
        tiles = denormalize(layout.pixel_values_videos, processor.tiling.image_mean, processor.tiling.image_std)
        pools = " x ".join(str(list(p)) for p in processor.pool_sizes) or "none"
        summary = (f"{len(tiles)} frames, one {processor.tiling.tile_size} px resize each, temporal pool {pools} "
                   f"-> {sum(layout.video_tokens):,} visual tokens")
        return TilePreview(tiles, tile_captions(processor, kind, len(tiles), []), sum(layout.video_tokens), [], summary)
    layout = processor.layout_media(media)
    tiles = denormalize(layout.pixel_values, processor.tiling.image_mean, processor.tiling.image_std)
    tokens = sum(layout.media_tokens)
    mode = processor.tiling.image_aspect_ratio
    if mode == "dynamic_s2" and layout.block_sizes and layout.block_sizes[0]:
        rows, cols = layout.block_sizes[0]
        scales = "/".join(str(s) for s in processor.tiling.s2_scales)
        how = f"{len(tiles)} tiles (dynamic_s2, scales {scales} px, last scale {rows} rows x {cols} cols)"
    else:
        how = f"{len(tiles)} tile{'s' if len(tiles) > 1 else ''} ({mode})"
    summary = f"{how} -> {tokens:,} visual tokens"
    return TilePreview(tiles, tile_captions(processor, kind, len(tiles), layout.block_sizes), tokens,
                       list(layout.block_sizes), summary)
