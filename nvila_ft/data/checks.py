"""Preflight: every sample checked before training starts, so that a bad row fails now rather than hours in.

    report = preflight(samples, on_bad_row="skip")   # report.ok: rows safe to train on
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Callable

from PIL import Image
from tqdm.auto import tqdm

from nvila_ft.data.rows import DataError
from nvila_ft.model.image_processing import to_rgb
from nvila_ft.model.media import MediaConfig
from nvila_ft.model.processing import placeholder_problem
from nvila_ft.model.video import VideoError, frame_indices, load_video, probe_video

logger = logging.getLogger("nvila_ft.data")

MAX_LISTED_BAD_ROWS = 50


@dataclasses.dataclass
class BadRow:
    """A row that preflight refused: where it is and why."""

    source: str
    index: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}[{self.index}] id={self.id}: {self.reason}"


@dataclasses.dataclass
class VideoCheck:
    """How preflight samples and checks videos (the processor's settings, so that counts agree: build it with
    :meth:`for_media` from the run's `MediaConfig`).

    Attributes:
        num_frames: frames sampled per video (model.num_video_frames).
        fps: 0 = uniform, > 0 = at most this many frames per second (model.video_fps).
        short_videos: "bad_row" reports videos with fewer frames than sampled; "repeat" accepts them.
        sample: decode only this many videos, drawn at random with `seed` (others: header only); None = all.
        seed: seed of that draw.
        cache_dir: frame cache shared with training (data.video_cache_dir): decoded frames land there.
        tokens_fn: frames -> embedding rows of a video (`NvilaProcessor.count_video_tokens`), for the report.
    """

    num_frames: int = 8
    fps: float = 0.0
    short_videos: str = "bad_row"
    sample: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    tokens_fn: Callable[[int], int] | None = None

    @classmethod
    def for_media(cls, media: MediaConfig, **kwargs) -> VideoCheck:
        """The check for a run's resolved media config: `num_frames` and `fps` are `media.num_video_frames`
        and `media.video_fps` (what the processor samples); `kwargs` set the other fields."""
        return cls(num_frames=media.num_video_frames, fps=media.video_fps, **kwargs)


@dataclasses.dataclass
class PreflightReport:
    """Outcome of `preflight`: the rows safe to train on, the refused ones, and per video row its token cost."""

    ok: list[dict]
    bad: list[BadRow]
    videos: list[tuple[str, list[int], list[int]]] = dataclasses.field(default_factory=list)
    """(`<source>[<index>] id=<id>`, frames per video, visual tokens per video) of every ok row with videos."""

    def summary(self) -> str:
        """Counts, one line per bad row (`<source>[<index>] id=<id>: <reason>`), then per video row its frames
        and visual tokens (pooling applied); at most 50 lines of each."""
        lines = [
            f"preflight: {len(self.ok) + len(self.bad)} rows checked, {len(self.ok)} ok, {len(self.bad)} bad"
        ]
        lines += [f"  {row}" for row in self.bad[:MAX_LISTED_BAD_ROWS]]
        if len(self.bad) > MAX_LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(self.bad) - MAX_LISTED_BAD_ROWS} more bad rows")
        if self.videos:
            tokens = [sum(t) for _, _, t in self.videos]
            lines.append(f"video rows: {len(self.videos)}, visual tokens per row (frames x tokens per frame / t, "
                         f"+ end tokens) min {min(tokens)} max {max(tokens)}")
            lines += [f"  {where}: frames {frames} -> {tokens} visual tokens"
                      for where, frames, tokens in self.videos[:MAX_LISTED_BAD_ROWS]]
            if len(self.videos) > MAX_LISTED_BAD_ROWS:
                lines.append(f"  ... and {len(self.videos) - MAX_LISTED_BAD_ROWS} more video rows")
        return "\n".join(lines)


def preflight(
    samples: list[dict],
    *,
    on_bad_row: str = "error",
    length_fn: Callable[[dict], int] | None = None,
    max_length: int | None = None,
    check_images: bool = True,
    progress: bool = True,
    video_check: VideoCheck | None = None,
) -> PreflightReport:
    """Checks every sample before training, so that a bad row fails now rather than hours in.

    Per row: the load error if any, a human turn present, every gpt turn non-empty, media placeholders
    matching the media (none, or one per image / video), each image file present and fully decodable (PIL
    open + load; files are closed again), each video present, readable, not truncated (its sampled frames
    decode) and not shorter than the frames requested (unless `video_check.short_videos` is "repeat"), and
    `length_fn(sample) <= max_length` when both are given (checked only on rows that passed the rest).
    Rows that pass get `sample["video_frames"]`: the frames each video decodes to, and, when `length_fn` is
    given, `sample["num_tokens"]`: the length it returned (length-grouped batching reuses it).

    Args:
        samples: Normalized samples from `load_samples`.
        on_bad_row: "error" to raise on any bad row, "skip" to drop bad rows with a warning.
        length_fn: Returns a sample's token count after media expansion (visual tokens included).
        max_length: Longest allowed sample in tokens (e.g. the recipe's `max_length`).
        check_images: Open and decode every image (the slow part: a few ms per image).
        progress: Show a tqdm progress bar.
        video_check: Video sampling settings and how many videos to decode; None = `VideoCheck()` defaults.

    Returns:
        The report; `ok` holds the good samples in order.

    Raises:
        ValueError: If `on_bad_row` is not "error"/"skip", or `length_fn` is given without `max_length`.
        DataError: If `on_bad_row` is "error" and any row is bad; the message lists them (`summary()`).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row is {on_bad_row!r}; choose 'error' or 'skip'.")
    if length_fn is not None and max_length is None:
        raise ValueError("preflight got length_fn but no max_length; pass max_length (tokens).")
    report = PreflightReport(ok=[], bad=[])
    checked: dict[str, str | None] = {}  # image path -> problem; VQA-RAD has ~10 questions per image
    video_check = video_check or VideoCheck()
    decode = _videos_to_decode(samples, video_check)
    for i, sample in enumerate(tqdm(samples, desc="preflight", unit="row", disable=not progress)):
        problems = _row_problems(sample, checked if check_images else None)
        if not problems and sample.get("videos"):
            frames, video_problems = _video_frames(sample, video_check, decode[i])
            problems += video_problems
            if not video_problems:
                sample["video_frames"] = frames
        if not problems and length_fn is not None:
            try:
                length = sample["num_tokens"] = length_fn(sample)
                if length > max_length:
                    problems.append(
                        f"{length} tokens > max_length {max_length}; shorten it or raise max_length"
                    )
            except Exception as e:  # one odd row must not hide the others
                problems.append(f"length_fn failed: {type(e).__name__}: {e}")
        if problems:
            report.bad.append(
                BadRow(
                    sample.get("source", "?"), sample.get("index", -1), sample.get("id"), "; ".join(problems)
                )
            )
        else:
            report.ok.append(sample)
            if sample.get("videos") and video_check.tokens_fn is not None:
                where = f"{sample.get('source', '?')}[{sample.get('index', -1)}] id={sample.get('id')}"
                frames = sample["video_frames"]
                report.videos.append((where, frames, [video_check.tokens_fn(f) for f in frames]))
    if report.bad:
        if on_bad_row == "error":
            raise DataError(f"{report.summary()}\nFix the rows or set data.on_bad_row=skip.")
        logger.warning("%s\nskipping %d bad row(s) (data.on_bad_row=skip)", report.summary(), len(report.bad))
    return report


def _row_problems(sample: dict, checked: dict[str, str | None] | None) -> list[str]:
    """Everything wrong with one sample; images are checked unless `checked` (a path -> problem cache) is None."""
    if sample.get("error"):
        return [sample["error"]]
    problems = []
    turns = sample.get("conversations") or []
    if not any(turn["from"] == "human" for turn in turns):
        problems.append("no human turn")
    answers = [turn["value"] for turn in turns if turn["from"] == "gpt"]
    if not answers:
        problems.append("no gpt turn (nothing to learn)")
    elif not all(answer.strip() for answer in answers):
        problems.append("empty answer (a gpt turn is empty or whitespace)")
    images = sample.get("images") or []
    problem = placeholder_problem(turns, len(images), len(sample.get("videos") or []))
    if problem:
        problems.append(problem)
    if checked is not None:
        for image in images:
            if not isinstance(image, str):
                problem = _image_problem(image)
            elif image in checked:
                problem = checked[image]
            else:
                problem = checked[image] = _image_problem(image)
            problems += [problem] if problem else []
    return problems


def _videos_to_decode(samples: list[dict], check: VideoCheck) -> list[list[bool]]:
    """Per sample, per video: decode it in preflight (True) or only read its header (False)."""
    flags = [[True] * len(s.get("videos") or []) for s in samples]
    slots = [(i, j) for i, row in enumerate(flags) for j in range(len(row))]
    if check.sample is not None and check.sample < len(slots):
        import random

        chosen = set(random.Random(check.seed).sample(slots, check.sample))
        flags = [[(i, j) in chosen for j in range(len(row))] for i, row in enumerate(flags)]
    return flags


def _video_frames(sample: dict, check: VideoCheck, decode: list[bool]) -> tuple[list[int], list[str]]:
    """(frames each video decodes to, problems) of a sample's videos."""
    frames, problems = [], []
    for video, full in zip(sample["videos"], decode):
        name = f"{len(video)} bytes of video" if isinstance(video, bytes | bytearray) else video
        try:
            n_frames, video_fps = probe_video(video)
            if check.fps > 0 and video_fps is None:
                raise VideoError(f"{name}: a frames folder has no frame rate; set model.video_fps=0")
            wanted = len(frame_indices(n_frames, check.num_frames, check.fps, video_fps))
            if n_frames < wanted and check.short_videos != "repeat":
                problems.append(f"video {name} has {n_frames} frames, fewer than the {wanted} sampled "
                                "(data.short_videos=repeat keeps such videos)")
                continue
            if full:
                wanted = len(load_video(video, check.num_frames, check.fps, check.cache_dir))
            frames.append(wanted)
        except VideoError as e:
            problems.append(str(e))
        except Exception as e:  # one odd file must not hide the others
            problems.append(f"unreadable video {name} ({type(e).__name__}: {e})")
    return frames, problems


def _image_problem(image: str | Image.Image) -> str | None:
    """Why an image cannot be used, or None. Decodes it fully, converts it as training will (`to_rgb`: 16-bit
    and float modes scaled, alpha on white) and refuses a conversion that loses the picture; closes what it opened."""
    try:
        if isinstance(image, Image.Image):
            if isinstance(getattr(image, "fp", None), io.BytesIO):  # lazily opened: decode a copy, keep it lazy
                with Image.open(io.BytesIO(image.fp.getvalue())) as copy_:
                    copy_.load()
                    return _pixel_problem(copy_, "in-memory image")
            image.load()
            return _pixel_problem(image, "in-memory image")
        if not os.path.isfile(image):
            return f"image file not found: {image}"
        with Image.open(image) as opened:
            opened.load()
            return _pixel_problem(opened, image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        name = image if isinstance(image, str) else "in-memory image"
        return f"unreadable image {name} ({type(e).__name__}: {e})"


def _pixel_problem(image: Image.Image, name: str) -> str | None:
    """None unless converting the image as training will (`to_rgb`) loses all its contrast: a source with
    varying pixels that comes out as one flat colour is garbage to train on (a blank source is the data's own)."""
    converted = to_rgb(image).getextrema()  # ((min, max),) per channel
    if any(low != high for low, high in converted):
        return None
    source = image.getextrema()
    source = source if isinstance(source[0], tuple) else (source,)
    if all(low == high for low, high in source):
        return None
    return (f"image {name} (mode {image.mode}, {image.size[0]}x{image.size[1]}) becomes one flat colour "
            f"{tuple(low for low, _ in converted)} in 8-bit RGB although its pixels vary; convert it to an 8-bit "
            "RGB or grayscale PNG")
