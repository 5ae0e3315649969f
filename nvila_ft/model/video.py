"""Video input for NVILA: frame sampling and decoding (decord), an opt-in frame cache, temporal pooling.

    from nvila_ft.model.video import load_video
    frames = load_video("clip.mp4", num_frames=8)          # 8 PIL images, uniformly spaced
    frames = load_video("clip_frames/", num_frames=8)      # a folder of frame images, natural order

Sampling follows the official NVILA code (NVlabs/VILA `llava/utils/media.py::_load_video`,
`llava/mm_utils.py::get_frame_from_vcap_with_fps`); see `frame_indices`. Frames become single 448 px
resizes in the processor (no tiling); `pool_frames` is the temporal (and spatial) averaging of NVILA's
`TSPVideoEncoder` (paper, temporal compression), applied to projected frame tokens in the model.

Decoding needs the `video` extra (`pip install "nvila-ft[video]"`, which installs decord).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nvila_ft.model.image_processing import to_rgb

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VideoSource = str | os.PathLike | bytes


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, truncated, or too short; the message names it."""


# ---------------------------------------------------------------------------------------------- sampling
def frame_indices(n_frames: int, num_frames: int, fps: float = 0.0, video_fps: float | None = None) -> list[int]:
    """Indices of the frames to decode, in time order.

    Uniform (`fps == 0`, NVILA's default, `_load_video`): `round(linspace(0, n_frames - 1, num_frames))`
    with numpy's rounding (half to even), exactly `num_frames` indices. A video with fewer frames than
    `num_frames` gets repeated indices (what the official inference code does); preflight reports such videos.

    By frame rate (`fps > 0`, the official training sampler `get_frame_from_vcap_with_fps`): `fps` is the
    most frames per second of video. A video long enough for `num_frames` at that rate (duration * fps >=
    num_frames) is sampled uniformly as above; a shorter one gets `int(duration * fps)` frames (at least 2, as
    the official sampler does for one), spread uniformly over the whole video. So `num_frames` is an upper bound.

    Args:
        n_frames: frames in the video (> 0).
        num_frames: frames to sample (> 0); config `num_video_frames` (8 in NVILA's configs).
        fps: 0 for uniform sampling, else the sampling rate in frames per second (config `fps`).
        video_fps: the video's frame rate in frames per second; required when `fps > 0`.

    Returns:
        Frame indices in [0, n_frames - 1], non-decreasing.

    Raises:
        VideoError: `n_frames` or `num_frames` < 1, `fps` < 0, or `fps > 0` without a positive `video_fps`.
    """
    if n_frames < 1:
        raise VideoError(f"the video has no frames (n_frames={n_frames})")
    if num_frames < 1:
        raise VideoError(f"num_frames must be >= 1 (got {num_frames})")
    if fps < 0:
        raise VideoError(f"fps must be >= 0 (got {fps}); 0 samples num_frames uniformly")
    count = num_frames
    if fps > 0:
        if not video_fps or video_fps <= 0:
            raise VideoError(f"sampling at fps={fps} needs the video's frame rate (got video_fps={video_fps})")
        duration = n_frames / video_fps
        count = min(num_frames, max(2, int(duration * fps)))
    return np.round(np.linspace(0, n_frames - 1, count)).astype(int).tolist()


# ---------------------------------------------------------------------------------------------- decoding
def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` names a video: a video file extension (`VIDEO_EXTENSIONS`, case-insensitive) or an
    existing folder holding at least one frame image (`FRAME_EXTENSIONS`)."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return True
    return path.is_dir() and any(p.suffix.lower() in FRAME_EXTENSIONS for p in path.iterdir())


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: `frame_2.png` before `frame_10.png`."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a frames folder in natural order (`frame_2` before `frame_10`).

    Raises:
        VideoError: the folder has no image file.
    """
    files = sorted((p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_EXTENSIONS),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise VideoError(f"{folder}: frames folder has no image files ({', '.join(FRAME_EXTENSIONS)})")
    return files


def _name(source: VideoSource) -> str:
    return f"<{len(source)} bytes of video>" if isinstance(source, bytes | bytearray) else str(source)


def _video_reader(source: VideoSource):
    try:
        import decord
    except ImportError as err:  # optional dependency
        raise ImportError('decoding videos needs decord: pip install "nvila-ft[video]"') from err
    if not isinstance(source, bytes | bytearray) and not os.path.isfile(source):
        raise VideoError(f"video file not found: {source}")
    try:
        return decord.VideoReader(io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source),
                                  num_threads=1)
    except Exception as err:  # decord raises DECORDError / RuntimeError for every container problem
        raise VideoError(f"unreadable video {_name(source)} (truncated or not a video: {str(err).splitlines()[0]})") from err


def probe_video(source: VideoSource) -> tuple[int, float | None]:
    """(frame count, frames per second) of a video file, video bytes or frames folder (fps None for a folder).

    Reads the container header only (cheap). Raises `VideoError` for a missing or unreadable source.
    """
    if not isinstance(source, bytes | bytearray) and os.path.isdir(source):
        return len(frame_files(source)), None
    reader = _video_reader(source)
    return len(reader), float(reader.get_avg_fps())


def load_video(
    source: VideoSource,
    num_frames: int = 8,
    fps: float = 0.0,
    cache_dir: str | os.PathLike | None = None,
) -> list[Image.Image]:
    """Decodes the sampled frames of a video (see `frame_indices`) as RGB PIL images.

    Args:
        source: a video file path, the bytes of a video file, or a folder of frame images (sorted in
            natural order, `frame_2` before `frame_10`; a folder has no frame rate, so `fps` must be 0).
        num_frames: frames to sample (config `num_video_frames`, NVILA default 8).
        fps: 0 = uniform; > 0 = at most this many frames per second (see `frame_indices`).
        cache_dir: opt-in cache of decoded frames (video files only; bytes and folders are not cached). The
            key is the absolute path, mtime, size, `num_frames` and `fps`; entries are written atomically
            (temp file, then rename) as `.npy` uint8 arrays of shape (k, H, W, 3).

    Returns:
        `len(frame_indices(...))` images in time order, at the video's resolution.

    Raises:
        VideoError: missing file, unreadable or truncated video (decoding a sampled frame fails), empty
            folder, or `fps > 0` with a frames folder.
        ImportError: decord is not installed (the `video` extra).
    """
    is_bytes = isinstance(source, bytes | bytearray)
    if not is_bytes and os.path.isdir(source):
        if fps > 0:
            raise VideoError(f"{source}: a frames folder has no frame rate; sample it with fps=0 (num_frames)")
        files = frame_files(source)
        frames = []
        for index in frame_indices(len(files), num_frames):
            try:
                with Image.open(files[index]) as im:
                    frames.append(to_rgb(im))
            except Exception as err:  # PIL raises many types for a broken image
                raise VideoError(f"unreadable frame {files[index]} ({type(err).__name__}: {err})") from err
        return frames
    cache_file = None if cache_dir is None or is_bytes else _cache_path(source, num_frames, fps, cache_dir)
    if cache_file is not None and cache_file.is_file():
        try:
            return [Image.fromarray(a) for a in np.load(cache_file)]
        except (OSError, ValueError) as err:  # a damaged entry is decoded again and rewritten
            logger.warning("ignoring unreadable frame cache %s (%s)", cache_file, err)
    reader = _video_reader(source)
    indices = frame_indices(len(reader), num_frames, fps, float(reader.get_avg_fps()))
    try:
        array = reader.get_batch(indices).asnumpy()
    except Exception as err:  # a truncated or corrupt stream fails here even when the header was read
        raise VideoError(f"truncated or corrupt video {_name(source)}: cannot decode frames {indices} "
                         f"of {len(reader)} ({str(err).splitlines()[0]})") from err
    if cache_file is not None:
        _write_atomic(cache_file, array)
    return [Image.fromarray(a) for a in array]


def _cache_path(source, num_frames: int, fps: float, cache_dir) -> Path:
    path = Path(source).resolve()
    try:
        stat = path.stat()
    except OSError as err:
        raise VideoError(f"video file not found: {source}") from err
    key = f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{num_frames}|{float(fps)}"
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


def _write_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- pooling
PoolSize = tuple[int, int, int]


def parse_video_encoder(video_encoder: str | dict | None) -> list[PoolSize]:
    """Pool sizes (t, h, w) of an official `video_encoder` config entry; [] means no pooling.

    The official configs store a hydra target, as a JSON string or a dict:
    `{"_target_": "llava.model.encoders.BasicVideoEncoder"}` (NVILA-8B, NVILA-Lite: no pooling) or
    `{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}` (NVILA-8B-Video).
    A TSPVideoEncoder without `pool_sizes` gets [[8, 1, 1]], the value the hub remote code hard-codes.

    Raises:
        ValueError: unparsable JSON, an unknown encoder, or a pool size that is not three integers >= 1.
    """
    import json

    if video_encoder is None:
        return []
    cfg = json.loads(video_encoder) if isinstance(video_encoder, str) else dict(video_encoder)
    target = str(cfg.get("_target_", ""))
    if target.endswith("BasicVideoEncoder"):
        return []
    if not target.endswith("TSPVideoEncoder"):
        raise ValueError(f"config video_encoder: unknown encoder {target!r} (BasicVideoEncoder or TSPVideoEncoder)")
    pools = [tuple(int(x) for x in p) for p in cfg.get("pool_sizes", [[8, 1, 1]])]
    if not pools or any(len(p) != 3 or min(p) < 1 for p in pools):
        raise ValueError(f"config video_encoder: pool_sizes must be [[t, h, w], ...] of integers >= 1, got {pools}")
    return pools


def video_encoder_config(pool_sizes: Sequence[Sequence[int]]) -> dict:
    """The official `video_encoder` config entry for these pool sizes ([] -> BasicVideoEncoder)."""
    if not pool_sizes or all(tuple(p) == (1, 1, 1) for p in pool_sizes):
        return {"_target_": "llava.model.encoders.BasicVideoEncoder"}
    return {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [list(p) for p in pool_sizes]}


def frames_multiple(pool_sizes: Sequence[PoolSize]) -> int:
    """Frame counts must be a multiple of this (the lcm of the temporal pool sizes; 1 without pooling)."""
    return math.lcm(*[p[0] for p in pool_sizes]) if pool_sizes else 1


def pool_frames(features: torch.Tensor, pool_size: Sequence[int]) -> torch.Tensor:
    """Averages frame tokens over groups of t consecutive frames and h x w token windows (`TSPVideoEncoder`).

    Args:
        features: (T, N, C) projected tokens of T frames; N = n * n tokens laid out row-major on a square grid.
        pool_size: (t, h, w); T must be a multiple of t, n a multiple of h and w (as in the official code,
            whose reshape fails otherwise). (1, 1, 1) returns the input unchanged.

    Returns:
        (T / t, (n / h) * (n / w), C), same dtype: group g is the mean of frames g*t .. g*t + t - 1.

    Raises:
        ValueError: T not a multiple of t, N not a square, or n not a multiple of h / w.
    """
    t, h, w = (int(x) for x in pool_size)
    frames, tokens, channels = features.shape
    n = math.isqrt(tokens)
    if n * n != tokens:
        raise ValueError(f"temporal pooling needs a square token grid per frame, got {tokens} tokens")
    if frames % t or n % h or n % w:
        raise ValueError(f"pool size {(t, h, w)} does not divide {frames} frames of {n}x{n} tokens; the processor "
                         "pads frame counts to a multiple of t (repeating the last frame)")
    grid = features.reshape(frames // t, t, n // h, h, n // w, w, channels)
    return grid.mean(dim=(1, 3, 5)).reshape(frames // t, (n // h) * (n // w), channels)
