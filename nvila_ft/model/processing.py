"""`NvilaProcessor`: conversations + images -> `input_ids`, `labels`, `pixel_values`, `block_sizes`.

Behaviour pinned by `../shared/parity` (NVIDIA's own implementation):
- media placeholders are moved to the start of the first user turn, glued to the text
  (`<image>Describe ...`); NVILA-Lite (`dynamic`) writes `<image>\\n` once per tile;
- the chat template is the tokenizer's (Qwen2: default system "You are a helpful assistant");
- labels cover each assistant content plus its end token (`<|im_end|>`); everything else is -100.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, ProcessorMixin

from nvila_ft.model.checkpoint import add_media_tokens, read_checkpoint, resolve_checkpoint
from nvila_ft.model.configuration import IGNORE_INDEX, MEDIA_TOKENS, NvilaConfig
from nvila_ft.model.image_processing import num_tiles, preprocess_image, to_rgb
from nvila_ft.model.media import (
    OVERRIDES,
    MediaConfig,
    embedded_text_tokens,
    expanded_length,
    image_rows,
    segment_skip_ids,
    video_rows,
)
from nvila_ft.model.video import VideoSource, frames_multiple, load_video

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"  # transformers' PROCESSOR_NAME
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class SampleTooLongError(ValueError):
    """A sample's expanded length (text + visual tokens) exceeds `max_length`."""


@dataclass
class MediaLayout:
    """How the images and videos of one sample become placeholders and tiles.

    Attributes:
        pixel_values: (T, 3, 448, 448) float32 tiles, or None without images.
        block_sizes: one entry per `<image>` placeholder: (rows, cols) for a dynamic_s2 image, else None.
        placeholder_text: text prepended to the first user turn (image placeholders, then video placeholders).
        media_tokens: embedding rows each `<image>` placeholder expands to (visual tokens + end tokens).
        pixel_values_videos: (F, 3, 448, 448) float32 frames of all videos in order, or None without videos.
        video_frames: frames per video (after padding to a multiple of the temporal pool size).
        video_tokens: embedding rows each `<vila/video>` placeholder expands to.
        image_sizes: (width, height) of each image, in order.
    """

    pixel_values: torch.Tensor | None
    block_sizes: list[tuple[int, int] | None]
    placeholder_text: str
    media_tokens: list[int]
    pixel_values_videos: torch.Tensor | None = None
    video_frames: list[int] = dataclasses.field(default_factory=list)
    video_tokens: list[int] = dataclasses.field(default_factory=list)
    image_sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def placeholder_problem(conversations: Sequence[dict], n_images: int, n_videos: int) -> str | None:
    """Why a sample's media placeholders do not match its media, or None when they do.

    Text without any placeholder is fine (media go to the start of the first user turn). Otherwise the
    `<image>` count must equal the image count and the `<vila/video>` count the video count; a video-only
    sample may also mark its videos with `<image>` (the LLaVA-Video convention).
    """
    texts = [str(t.get("value", t.get("content")) or "") for t in conversations]
    n_image_ph = sum(t.count(MEDIA_TOKENS["image"]) for t in texts)
    n_video_ph = sum(t.count(MEDIA_TOKENS["video"]) for t in texts)
    if n_image_ph + n_video_ph == 0 or (n_image_ph, n_video_ph) == (n_images, n_videos):
        return None
    if n_images == 0 and n_video_ph == 0 and n_image_ph == n_videos:
        return None
    if n_videos == 0 and n_video_ph == 0:
        return f"{n_image_ph} {MEDIA_TOKENS['image']} placeholder(s) but {n_images} image(s)"
    return (f"{n_image_ph} {MEDIA_TOKENS['image']} and {n_video_ph} {MEDIA_TOKENS['video']} placeholder(s) but "
            f"{n_images} image(s) and {n_videos} video(s)")


class NvilaProcessor(ProcessorMixin):
    """Turns LLaVA-style conversations and images into model inputs for NVILA (a transformers `ProcessorMixin`).

    Its only sub-processor is the tokenizer; tiling, video sampling and pooling and `max_length` are one
    :class:`~nvila_ft.model.media.MediaConfig` (`self.media`), saved in `processor_config.json` with the
    system prompt. `AutoProcessor.from_pretrained` gives an `NvilaProcessor` for a run folder or an official
    checkpoint folder once `nvila_ft` is imported (see :meth:`from_pretrained`).

    Args:
        tokenizer: tokenizer with NVILA's media tokens (from :func:`nvila_ft.model.checkpoint.load_tokenizer`).
        config: the checkpoint's :class:`NvilaConfig` (tiling, projector and token geometry); not needed with
            `media`.
        image_aspect_ratio: override the checkpoint's image mode (`dynamic_s2` | `dynamic` | `resize`).
        max_tiles: override the checkpoint's `max_tiles`.
        max_length: largest expanded sequence (tokens incl. visual tokens); default the tokenizer's
            `model_max_length` (4096 NVILA-Lite SFT, 8192 NVILA).
        system_prompt: system message for every conversation; None keeps the template's default.
        num_video_frames: frames sampled per video; None = config `num_video_frames` (8 for NVILA).
        video_fps: 0 = uniform sampling, > 0 = at most this many frames per second; None = config `fps`.
        temporal_pool: (t, h, w) or a list of them: average every t consecutive frames' tokens and h x w
            token windows (paper, temporal compression); None = the config's `video_encoder` pool_sizes
            ([8, 1, 1] for NVILA-8B-Video, none for NVILA-8B). Must divide `num_video_frames` (t) and the
            per-frame token grid (h, w: 16 for 2x2 projectors, 11 for 3x3).
        video_cache_dir: opt-in folder caching decoded frames between epochs (see `nvila_ft.model.video.load_video`).
        media: the resolved media config (a run's); the settings above then override its fields.

    Raises:
        ValueError: a bad tiling mode, `num_video_frames` not a multiple of the temporal pool size t, or a
            spatial pool size that does not divide the frame token grid.
    """

    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer,
        config: NvilaConfig | None = None,
        image_aspect_ratio: str | None = None,
        max_tiles: int | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
        num_video_frames: int | None = None,
        video_fps: float | None = None,
        temporal_pool: Sequence[int] | Sequence[Sequence[int]] | None = None,
        video_cache_dir: str | os.PathLike | None = None,
        media: MediaConfig | dict | None = None,
    ):
        super().__init__(tokenizer)
        settings = {"image_aspect_ratio": image_aspect_ratio, "max_tiles": max_tiles, "max_length": max_length,
                    "num_video_frames": num_video_frames, "video_fps": video_fps, "temporal_pool": temporal_pool}
        if media is not None:
            media = MediaConfig.from_dict(media) if isinstance(media, dict) else media
            self.media = media.replace(**settings)
        elif config is not None:
            settings["max_length"] = max_length or min(getattr(tokenizer, "model_max_length", 4096), 10**6)
            self.media = MediaConfig.resolve(config, **settings)
        else:
            raise TypeError("NvilaProcessor needs the checkpoint's config or a resolved media config (media=...)")
        self.config = config
        self.system_prompt = system_prompt
        self.video_cache_dir = video_cache_dir
        self.image_token = MEDIA_TOKENS["image"]
        self.image_token_id = tokenizer.media_token_ids["image"]
        self.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        self.video_token = MEDIA_TOKENS["video"]
        self.video_token_id = tokenizer.media_token_ids["video"]

    # Read-only views of `self.media`, the one owner of these settings.
    tiling = property(lambda self: self.media.tiling, doc="`TilingConfig` of `media`.")
    max_length = property(lambda self: self.media.max_length, doc="`media.max_length` (tokens).")
    tokens_per_tile = property(lambda self: self.media.tokens_per_tile, doc="`media.tokens_per_tile`.")
    num_video_frames = property(lambda self: self.media.num_video_frames, doc="`media.num_video_frames`.")
    video_fps = property(lambda self: self.media.video_fps, doc="`media.video_fps`.")
    pool_sizes = property(lambda self: self.media.pool_sizes, doc="`media.pool_sizes`: [(t, h, w), ...].")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> NvilaProcessor:
        """Processor of a run folder (`processor_config.json` + tokenizer, as :meth:`save_pretrained` writes
        them) or of an official checkpoint folder / hub id (`config.json` + `llm/` tokenizer).

        Keyword arguments named like `__init__`'s settings override the saved ones; hub arguments that
        `AutoProcessor` passes (`revision`, `trust_remote_code`, ...) are ignored.

        Raises:
            FileNotFoundError: neither a run folder nor a checkpoint (see `resolve_checkpoint`).
        """
        own = {k: kwargs.pop(k) for k in (*OVERRIDES, "system_prompt", "video_cache_dir") if k in kwargs}
        folder = Path(pretrained_model_name_or_path).expanduser()
        saved_file = folder / PROCESSOR_CONFIG
        if saved_file.is_file():
            saved = json.loads(saved_file.read_text())
            tokenizer = add_media_tokens(AutoTokenizer.from_pretrained(folder, padding_side="right"))
            own.setdefault("system_prompt", saved.get("system_prompt"))
            return cls(tokenizer, media=MediaConfig.from_dict(saved), **own)
        config, tokenizer = read_checkpoint(resolve_checkpoint(pretrained_model_name_or_path))
        return cls(tokenizer, config, **own)

    def to_dict(self) -> dict:
        """What `processor_config.json` holds: the media config's fields, the system prompt, the class name."""
        return {**self.media.to_dict(), "system_prompt": self.system_prompt, "processor_class": type(self).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Writes the tokenizer and `processor_config.json` (:meth:`to_dict`) to `save_directory`; returns the
        path of `processor_config.json`."""
        files = super().save_pretrained(str(save_directory), **kwargs)
        return Path(files[0])

    # ------------------------------------------------------------------ media
    def _image_mode_single(self, n_images: int) -> bool:
        # The official code tiles (dynamic / dynamic_s2) only when a sample has exactly one image.
        return n_images != 1

    def layout_media(
        self,
        images: Sequence[Image.Image | str | os.PathLike],
        videos: Sequence[VideoSource | Sequence[Image.Image]] = (),
    ) -> MediaLayout:
        """Loads and tiles the images, and loads and resizes the video frames, of one sample.

        Returns:
            :class:`MediaLayout`. dynamic_s2: one placeholder per image with its block size;
            dynamic: one placeholder per tile (`<image>\\n` each); resize or several images: one per image.
            Videos: one `<vila/video>` placeholder each, frames as single 448 resizes (see :meth:`load_frames`).
        """
        layout = self._layout_images(images) if images else MediaLayout(None, [], "", [])
        if videos:
            frames = [self.load_frames(video) for video in videos]
            layout.pixel_values_videos = torch.cat([self.frame_pixels(f) for f in frames])
            layout.video_frames = [len(f) for f in frames]
            layout.video_tokens = [self.count_video_tokens(len(f)) for f in frames]
            layout.placeholder_text += self.video_token * len(videos)
        return layout

    def load_frames(self, video: VideoSource | Sequence[Image.Image]) -> list[Image.Image]:
        """A video's sampled frames, padded to a multiple of the temporal pool size t by repeating the last frame.

        Args:
            video: a path, bytes or frames folder (decoded with `num_video_frames`, `video_fps`,
                `video_cache_dir`), or frames already decoded (PIL images, used as given).

        Padding only happens with `video_fps > 0` (the frame count then depends on the video's length) or
        with pre-decoded frames; a `num_video_frames` that t does not divide is refused at construction.
        """
        if isinstance(video, str | os.PathLike | bytes | bytearray):
            frames = load_video(video, self.num_video_frames, self.video_fps, self.video_cache_dir)
        else:
            frames = list(video)
        multiple = frames_multiple(self.pool_sizes)
        if not frames:
            raise ValueError("a video without frames")
        return frames + [frames[-1]] * (-len(frames) % multiple)

    def frame_pixels(self, frames: Sequence[Image.Image]) -> torch.Tensor:
        """(F, 3, 448, 448) float32 pixels of video frames: each a single 448 resize, as NVILA does for frames."""
        return torch.cat([preprocess_image(frame, self.tiling, single=True)[0] for frame in frames])

    def count_video_tokens(self, num_frames: int | None = None) -> int:
        """Embedding rows a `<vila/video>` placeholder expands to, from the frame count alone
        (:func:`nvila_ft.model.media.video_rows`; None = `num_video_frames`)."""
        num_frames = self.num_video_frames if num_frames is None else num_frames
        return video_rows(self.media, len(self.end_token_ids), num_frames)

    def _layout_images(self, images: Sequence[Image.Image | str | os.PathLike]) -> MediaLayout:
        single = self._image_mode_single(len(images))
        images = [_open_image(image) for image in images]
        tiles, block_sizes, text = [], [], []
        for image in images:
            pixels, block_size = preprocess_image(image, self.tiling, single=single)
            tiles.append(pixels)
            if self.tiling.image_aspect_ratio == "dynamic" and not single:
                # NVILA-Lite: each tile is an image of its own.
                block_sizes += [None] * pixels.shape[0]
                text.append(f"{self.image_token}\n" * pixels.shape[0])
            else:
                block_sizes.append(block_size)
                text.append(self.image_token)
        tokens = image_rows(self.media, len(self.end_token_ids), [image.size for image in images])
        return MediaLayout(torch.cat(tiles), block_sizes, "".join(text), tokens,
                           image_sizes=[image.size for image in images])

    # ------------------------------------------------------------------ text
    def to_messages(self, conversations: Sequence[dict], placeholder_text: str = "") -> list[dict]:
        """LLaVA turns (`from`/`value`) -> chat messages (`role`/`content`), media moved to the first user turn.

        Media tokens found in the text are removed (the official `extract_media` does the same) and
        `placeholder_text` is prepended to the first user message.
        """
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        placed = False
        for i, turn in enumerate(conversations):
            role = ROLES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"turn {i}: unknown speaker {turn.get('from', turn.get('role'))!r} (human|gpt|system)")
            text = turn.get("value", turn.get("content"))
            if text is None:
                raise ValueError(f"turn {i}: no 'value'")
            for token in MEDIA_TOKENS.values():
                if token in text:
                    text = text.replace(token, "").strip()
            text = text.strip()
            if role == "user" and not placed:
                text, placed = placeholder_text + text, True
            if role == "system" and messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": text}
                continue
            messages.append({"role": role, "content": text})
        if placeholder_text and not placed:
            raise ValueError("the conversation has images but no user turn to attach them to")
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize_messages(
        self, messages: list[dict], add_generation_prompt: bool = False, with_labels: bool = True
    ) -> tuple[list[int], list[int] | None]:
        """Applies the chat template and tokenizes; labels cover assistant content + its end token.

        The label span of assistant turn i is found by rendering the conversation up to turn i with a
        generation prompt (where the content starts) and up to turn i inclusive (where it ends); the
        first token after the content (the template's stop token, `<|im_end|>` for Qwen2) is labelled too.
        """
        text = self._render(messages, add_generation_prompt)
        enc = self.tokenizer(text, return_offsets_mapping=with_labels)
        ids = list(enc.input_ids)
        if not with_labels:
            return ids, None
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:i], add_generation_prompt=True)
            start = len(prefix)
            if not text.startswith(prefix) or text[start : start + len(message["content"])] != message["content"]:
                raise ValueError("the chat template does not render conversations incrementally; cannot place labels")
            spans.append((start, start + len(message["content"])))
        labels = [IGNORE_INDEX] * len(ids)
        offsets = enc.offset_mapping
        for start, end in spans:
            inside = [k for k, (s, _) in enumerate(offsets) if start <= s < end]
            after = next((k for k, (s, _) in enumerate(offsets) if s >= end), None)
            for k in inside + ([after] if after is not None else []):
                labels[k] = ids[k]
        return ids, labels

    # ------------------------------------------------------------------ samples
    def __call__(
        self,
        conversations: Sequence[dict],
        images: Sequence[Image.Image | str | os.PathLike] = (),
        add_generation_prompt: bool = False,
        sample_id: str | None = None,
        videos: Sequence[VideoSource | Sequence[Image.Image]] = (),
        media_layout: MediaLayout | None = None,
    ) -> dict:
        """Encodes one sample.

        Args:
            conversations: LLaVA turns [{"from": "human"|"gpt"|"system", "value": str}, ...]. For a
                generation prompt, pass the turns up to the last user turn and `add_generation_prompt=True`.
            images: PIL images or paths, in order. A sample with several images gets a single 448 resize per
                image, as the official code does (videos do not count); one image keeps the tiling mode.
            sample_id: named in errors.
            videos: video paths, bytes or frames folders (decoded here, see :meth:`load_frames`), or lists
                of already decoded PIL frames. Each becomes one `<vila/video>` placeholder.
            media_layout: `layout_media(images, videos)` computed once for several samples with the same media
                (shared image prefixes); None = computed here.

        Returns:
            dict with `input_ids` (L,) int64, `attention_mask` (L,), `labels` (L,) int64 (-100 outside
            assistant answers; absent with `add_generation_prompt`), `pixel_values` (T, 3, 448, 448)
            float32 or None, `block_sizes` list, `num_tokens` (expanded length). With videos also
            `pixel_values_videos` (F, 3, 448, 448) float32, `video_frames` (frames per video, list of int) and
            `pool_sizes` (this processor's [t, h, w] list, so that the model pools as the tokens were counted).

        Raises:
            ValueError: the text's media placeholders do not match the media (see `placeholder_problem`);
                the message names the sample.
            SampleTooLongError: expanded length > `max_length` (never truncated: truncation could cut
                visual tokens or the whole answer); the message gives the text, image and video token counts.
            nvila_ft.model.video.VideoError: a video cannot be decoded.
        """
        problem = placeholder_problem(conversations, len(images), len(videos))
        if problem:
            raise ValueError(f"sample {sample_id}: {problem}; put one placeholder per medium in the text, or none")
        media = media_layout if media_layout is not None else self.layout_media(images, videos)
        messages = self.to_messages(conversations, media.placeholder_text)
        ids, labels = self.tokenize_messages(messages, add_generation_prompt, with_labels=not add_generation_prompt)
        n_placeholders = ids.count(self.image_token_id)
        n_video_placeholders = ids.count(self.video_token_id)
        if n_placeholders != len(media.media_tokens) or n_video_placeholders != len(media.video_tokens):
            raise ValueError(f"sample {sample_id}: {n_placeholders} <image> and {n_video_placeholders} <vila/video> "
                             f"tokens after templating but {len(media.media_tokens)} images and "
                             f"{len(media.video_tokens)} videos")
        text_tokens = self._text_tokens(ids)
        num_tokens = expanded_length(self.media, len(self.end_token_ids), text_tokens, media.image_sizes,
                                     media.video_frames)
        if num_tokens > self.max_length:
            video = ""
            if media.video_tokens:
                pool = f" / t={frames_multiple(self.pool_sizes)}" if self.pool_sizes else ""
                video = (f" + {sum(media.video_tokens)} video ({'+'.join(map(str, media.video_frames))} frames x "
                         f"{self.tokens_per_tile} tokens per frame{pool}, plus end tokens)")
            raise SampleTooLongError(
                f"sample {sample_id}: {num_tokens} tokens ({text_tokens} text + "
                f"{sum(media.media_tokens)} visual{video}) > max_length {self.max_length}. Raise data.max_length, "
                "lower model.max_tiles or model.num_video_frames, pool frames (model.temporal_pool), or drop "
                "the sample (data.on_bad_row=skip)."
            )
        out = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "pixel_values": media.pixel_values,
            "block_sizes": media.block_sizes,
            "num_tokens": num_tokens,
        }
        if videos:
            out["pixel_values_videos"] = media.pixel_values_videos
            out["video_frames"] = media.video_frames
            out["pool_sizes"] = [list(p) for p in self.pool_sizes]
        if labels is not None:
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def num_tokens(
        self,
        conversations: Sequence[dict],
        image_sizes: Sequence[tuple[int, int]],
        video_frames: Sequence[int] = (),
    ) -> int:
        """Expanded length of a training sample from image sizes and video frame counts only (for preflight).

        Args:
            image_sizes: (width, height) per image.
            video_frames: decoded frames per video (before padding; see :meth:`count_video_tokens`).
        """
        n = len(image_sizes)
        if self.tiling.image_aspect_ratio == "dynamic" and n == 1:
            w, h = image_sizes[0]
            placeholder = f"{self.image_token}\n" * num_tiles(w, h, self.tiling)[0]
        else:
            placeholder = self.image_token * n
        placeholder += self.video_token * len(video_frames)
        ids, _ = self.tokenize_messages(self.to_messages(conversations, placeholder), with_labels=False)
        text = self._text_tokens(ids)
        return expanded_length(self.media, len(self.end_token_ids), text, image_sizes, video_frames)

    def _text_tokens(self, ids: Sequence[int]) -> int:
        skip = () if getattr(self.config, "hf_model_type", None) else segment_skip_ids(self.tokenizer)  # as the model
        return embedded_text_tokens(ids, (self.image_token_id, self.video_token_id), skip)

    def collate(self, features: Sequence[dict], padding_side: str = "right") -> dict:
        """Pads a list of encoded samples into a batch.

        Returns:
            `input_ids`, `attention_mask`, `labels` (when present) (B, L); `pixel_values` (T, 3, 448, 448)
            concatenated in sample order, or None; `block_sizes` LongTensor (num_images, 2), (0, 0) for
            images without a block size. When any sample has videos: `pixel_values_videos` (F, 3, 448, 448)
            frames of all videos in sample order, `video_frames` LongTensor (num_videos,) frames per video and
            `pool_sizes` LongTensor (num_pools, 3) of (t, h, w), (1, 1, 1) for no pooling.
        """
        length = max(f["input_ids"].shape[0] for f in features)
        pad_id = self.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.full((len(features), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
        }
        has_labels = "labels" in features[0]
        if has_labels:
            batch["labels"] = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for b, f in enumerate(features):
            n = f["input_ids"].shape[0]
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            batch["input_ids"][b, sl] = f["input_ids"]
            batch["attention_mask"][b, sl] = 1
            if has_labels:
                batch["labels"][b, sl] = f["labels"]
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        sizes = [bs or (0, 0) for f in features for bs in f.get("block_sizes", [])]
        batch["block_sizes"] = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
        frames = [f["pixel_values_videos"] for f in features if f.get("pixel_values_videos") is not None]
        if frames:
            batch["pixel_values_videos"] = torch.cat(frames)
            batch["video_frames"] = torch.tensor([n for f in features for n in f.get("video_frames", [])],
                                                 dtype=torch.long)
            pools = {tuple(map(tuple, f["pool_sizes"])) for f in features if f.get("video_frames")}
            if len(pools) > 1:
                raise ValueError(f"samples encoded with different temporal pools {sorted(pools)} cannot share a batch")
            batch["pool_sizes"] = torch.tensor(list(pools.pop()) or [[1, 1, 1]], dtype=torch.long).reshape(-1, 3)
        return batch

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).strip()


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        im.load()
        return to_rgb(im)


# `AutoConfig` / `AutoProcessor.from_pretrained` on a checkpoint (config.json `model_type: llava_llama`) or a
# run folder (`processor_config.json` names `NvilaProcessor`), as transformers documents for custom classes.
AutoConfig.register(NvilaConfig.model_type, NvilaConfig, exist_ok=True)
AutoProcessor.register(NvilaConfig, NvilaProcessor, exist_ok=True)
