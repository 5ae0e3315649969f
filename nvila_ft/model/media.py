"""The one resolved media config of a run, and the one count of a sample's tokens after media expansion.

    media = MediaConfig.from_recipe(model.config, recipe)   # checkpoint config.json + recipe.model / data.max_length
    expanded_length(media, num_end_tokens=1, text_tokens=40, image_sizes=[(640, 480)], video_frames=[8])

`MediaConfig` is resolved once (checkpoint defaults, recipe overrides), saved with the run in
`processor_config.json` (by `NvilaProcessor.save_pretrained`) and read back by the processor, the planner
(`nvila_ft.plan.memory`), preflight (`nvila_ft.data.checks.VideoCheck.for_media`) and inference
(`nvila_ft.inference.load_processor`). `expanded_length` is the count that the processor's encoding, its
size-only `num_tokens`, preflight and the planner all use.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from nvila_ft.model.configuration import NvilaConfig
from nvila_ft.model.image_processing import TilingConfig, num_tiles
from nvila_ft.model.projector import num_output_tokens
from nvila_ft.model.video import PoolSize, frames_multiple, video_encoder_config

# Settings a recipe (`model.*`) or a caller may override; None keeps the checkpoint's value.
OVERRIDES = ("image_aspect_ratio", "max_tiles", "num_video_frames", "video_fps", "temporal_pool", "max_length")
DEFAULT_MAX_LENGTH = 4096  # NVILA-Lite SFT's model_max_length; the processor passes its tokenizer's instead


@dataclasses.dataclass(frozen=True)
class MediaConfig:
    """How images and videos become tiles, frames and LLM tokens, for one run.

    Attributes:
        image_aspect_ratio: `dynamic_s2` | `dynamic` | `resize` (config `image_aspect_ratio`, recipe model.*).
        max_tiles, min_tiles: tile grid bounds (config `max_tiles` 12 / `min_tiles` 1; recipe model.max_tiles).
        tile_size: tile side in px (vision tower `image_size`, 448).
        s2_scales: S2 image sides, ascending (config `s2_scales`, 448/896/1344).
        tokens_per_tile: projected tokens of one tile: (tile_size / patch_size)^2 through the projector's
            spatial-to-channel (1024 -> 256 for 2x2, 121 for 3x3).
        num_video_frames: frames sampled per video (config `num_video_frames`, 8).
        video_fps: 0 = uniform sampling, > 0 = at most this many frames per second (config `fps`).
        temporal_pool: ((t, h, w), ...) token pooling per video stream; () = none (config `video_encoder`
            pool_sizes; [8, 1, 1] for NVILA-8B-Video).
        max_length: largest expanded sequence in tokens (recipe data.max_length).

    Raises:
        ValueError: an unknown tiling mode, `num_video_frames` (uniform sampling) not a multiple of the
            temporal pool size t, or a spatial pool size that does not divide the frame token grid.
    """

    image_aspect_ratio: str = "dynamic_s2"
    max_tiles: int = 12
    min_tiles: int = 1
    tile_size: int = 448
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    tokens_per_tile: int = 256
    num_video_frames: int = 8
    video_fps: float = 0.0
    temporal_pool: tuple[PoolSize, ...] = ()
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self):
        object.__setattr__(self, "s2_scales", tuple(int(s) for s in self.s2_scales))
        object.__setattr__(self, "temporal_pool", tuple(pool_list(self.temporal_pool)))
        object.__setattr__(self, "video_fps", float(self.video_fps))
        self.tiling  # noqa: B018 - validates the tiling mode
        multiple = frames_multiple(self.pool_sizes)
        if self.video_fps == 0 and self.num_video_frames % multiple:
            raise ValueError(
                f"num_video_frames {self.num_video_frames} is not a multiple of the temporal pool size {multiple}: "
                f"pooling averages groups of consecutive frames. Use {multiple * max(1, self.num_video_frames // multiple)} "
                f"or {multiple * (self.num_video_frames // multiple + 1)} frames, or another pool size."
            )
        grid = math.isqrt(self.tokens_per_tile)
        for t, h, w in self.pool_sizes:
            if grid * grid != self.tokens_per_tile or grid % h or grid % w:
                raise ValueError(f"spatial pool {h}x{w} of temporal_pool {[t, h, w]} does not divide the "
                                 f"{grid}x{grid} tokens of a frame; use sizes that divide {grid}.")

    @classmethod
    def resolve(cls, config: NvilaConfig, **overrides: Any) -> MediaConfig:
        """The checkpoint's settings with `overrides` (keys of :data:`OVERRIDES`; None keeps the checkpoint's).

        `temporal_pool` takes [t, h, w] or a list of them ([1, 1, 1] or [] = no pooling). `max_length`
        None = :data:`DEFAULT_MAX_LENGTH`.

        Raises:
            TypeError: an unknown key. ValueError: `dynamic_s2` asked of a checkpoint without S2 (config
                `dynamic_s2: false`), or see the class.
        """
        unknown = set(overrides) - set(OVERRIDES)
        if unknown:
            raise TypeError(f"unknown media settings {sorted(unknown)}; known: {', '.join(OVERRIDES)}")
        o = {k: v for k, v in overrides.items() if v is not None}
        tiling = config.tiling(o.get("image_aspect_ratio"), o.get("max_tiles"))
        if tiling.image_aspect_ratio == "dynamic_s2" and not config.dynamic_s2:
            raise ValueError("image_aspect_ratio 'dynamic_s2' needs a dynamic_s2 checkpoint (config dynamic_s2: true)")
        return cls(
            image_aspect_ratio=tiling.image_aspect_ratio, max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles,
            tile_size=tiling.tile_size, s2_scales=tiling.s2_scales, tokens_per_tile=tokens_per_tile(config, tiling),
            num_video_frames=o.get("num_video_frames") or config.num_video_frames,
            video_fps=o.get("video_fps", config.fps),
            temporal_pool=pool_list(o["temporal_pool"]) if "temporal_pool" in o else config.pool_sizes,
            max_length=o.get("max_length", DEFAULT_MAX_LENGTH),
        )

    @classmethod
    def from_recipe(cls, config: NvilaConfig, recipe) -> MediaConfig:
        """`resolve` with a recipe's `model.image_aspect_ratio`, `max_tiles`, `num_video_frames`, `video_fps`,
        `temporal_pool` and `data.max_length`."""
        m = recipe.model
        return cls.resolve(config, **{k: getattr(m, k) for k in OVERRIDES if k != "max_length"},
                           max_length=recipe.data.max_length)

    @classmethod
    def from_dict(cls, saved: dict) -> MediaConfig:
        """From `to_dict`'s keys (a run's `processor_config.json`); other keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in fields})

    def to_dict(self) -> dict:
        """JSON-ready fields (`s2_scales` and `temporal_pool` as lists; `temporal_pool` [] = no pooling)."""
        out = dataclasses.asdict(self)
        out["s2_scales"] = list(self.s2_scales)
        out["temporal_pool"] = [list(p) for p in self.temporal_pool]
        return out

    def replace(self, **overrides: Any) -> MediaConfig:
        """A copy with `overrides` (None values ignored; `temporal_pool` as in :meth:`resolve`)."""
        o = {k: v for k, v in overrides.items() if v is not None}
        if "temporal_pool" in o:
            o["temporal_pool"] = tuple(pool_list(o["temporal_pool"]))
        return dataclasses.replace(self, **o)

    def write_to(self, config: NvilaConfig) -> None:
        """Writes the image mode, `max_tiles`, frames, fps and (when it differs) the temporal pool into a
        checkpoint config, so that a checkpoint saved from it (merge) is fed as this run was."""
        config.image_aspect_ratio, config.max_tiles = self.image_aspect_ratio, self.max_tiles
        config.num_video_frames, config.fps = self.num_video_frames, self.video_fps
        if list(config.pool_sizes) != self.pool_sizes:
            config.video_encoder = json.dumps(video_encoder_config(self.pool_sizes))

    @property
    def tiling(self) -> TilingConfig:
        """The image processor's view (`nvila_ft.model.image_processing`)."""
        return TilingConfig(image_aspect_ratio=self.image_aspect_ratio, tile_size=self.tile_size,
                            s2_scales=self.s2_scales, max_tiles=self.max_tiles, min_tiles=self.min_tiles)

    @property
    def pool_sizes(self) -> list[PoolSize]:
        """`temporal_pool` as a list of (t, h, w); [] = no pooling (what the model's video pooling reads)."""
        return list(self.temporal_pool)


def pool_list(temporal_pool) -> list[PoolSize]:
    """[t, h, w] or [[t, h, w], ...] -> list of 3-tuples; (1, 1, 1) alone or [] means no pooling.

    Raises:
        ValueError: a pool that is not three integers >= 1.
    """
    if temporal_pool is None or len(temporal_pool) == 0:
        return []
    pools = [temporal_pool] if isinstance(temporal_pool[0], int) else list(temporal_pool)
    pools = [tuple(int(x) for x in p) for p in pools]
    if any(len(p) != 3 or min(p) < 1 for p in pools):
        raise ValueError(f"temporal_pool must be [t, h, w] of integers >= 1, got {temporal_pool}")
    return [] if pools == [(1, 1, 1)] else pools


def tokens_per_tile(config: NvilaConfig, tiling: TilingConfig) -> int:
    """Projected tokens of one tile: (tile_size / patch_size)^2 patches through the projector's STC
    (1024 -> 256 for 2x2, 121 for 3x3)."""
    patches = (tiling.tile_size // config.vision_tower_cfg.get("patch_size", 14)) ** 2
    return num_output_tokens(config.mm_projector_type, patches)


# ---------------------------------------------------------------------------------------------- token counts
def image_rows(media: MediaConfig, num_end_tokens: int, image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """LLM input rows of each `<image>` placeholder that a sample's images become, from (width, height) alone.

    The official code tiles only a sample's single image; several images get one 448 resize each.
    dynamic_s2: one placeholder per image, rows*cols blocks of `tokens_per_tile` (one block without tiling);
    dynamic: each tile (+ thumbnail) is a placeholder of its own; resize: one tile per image. Each
    placeholder is followed by `num_end_tokens` ("\\n").
    """
    single = len(image_sizes) != 1
    tiling, per_tile = media.tiling, media.tokens_per_tile
    rows = []
    for w, h in image_sizes:
        n, block_size = num_tiles(w, h, tiling, single=single)
        if media.image_aspect_ratio == "dynamic" and not single:
            rows += [per_tile + num_end_tokens] * n
        else:
            blocks = block_size[0] * block_size[1] if block_size else 1
            rows.append(blocks * per_tile + num_end_tokens)
    return rows


def video_rows(media: MediaConfig, num_end_tokens: int, num_frames: int) -> int:
    """LLM input rows of one video, from its frame count alone.

    `F' = num_frames` rounded up to a multiple of t (last frame repeated); then per pool (t, h, w):
    `F' / t` groups x (`tokens_per_tile / (h * w)` tokens + the "\\n" end tokens). Without pooling:
    `F'` x (`tokens_per_tile` + end tokens), e.g. 8 frames x (256 + 1) = 2056 for NVILA-8B, and 256 frames
    with [8, 1, 1] (NVILA-8B-Video): 32 x 257 = 8224.
    """
    pools = media.pool_sizes
    multiple = frames_multiple(pools)
    padded = -(-num_frames // multiple) * multiple
    per_tile = media.tokens_per_tile
    return sum(padded // t * (per_tile // (h * w) + num_end_tokens) for t, h, w in pools or [(1, 1, 1)])


def expanded_length(media: MediaConfig, num_end_tokens: int, text_tokens: int,
                    image_sizes: Sequence[tuple[int, int]] = (), video_frames: Sequence[int] = ()) -> int:
    """Tokens of a sample after media expansion: `text_tokens` (the templated text without its media
    placeholders) + :func:`image_rows` of its images + :func:`video_rows` of each video.

    Args:
        image_sizes: (width, height) per image, in order.
        video_frames: frames per video (decoded, before padding to a multiple of t).
    """
    return (text_tokens + sum(image_rows(media, num_end_tokens, image_sizes))
            + sum(video_rows(media, num_end_tokens, f) for f in video_frames))


def segment_skip_ids(tokenizer) -> tuple[int, ...]:
    """Token ids NVIDIA's `_embed` drops where a text segment opens (VILA `llava/remote_code/modeling_vila.py`,
    `pad_token_list`): the tokenizer's pad and eos ids (its third entry, `tokenize("<|endoftext|>")[0]`, is a
    string and never equals an id). For NVILA's Qwen2 tokenizer: `[PAD]` and `<|im_end|>`."""
    if tokenizer is None:
        return ()
    return tuple(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None)


def embedded_text_tokens(ids: Sequence[int], media_ids: Sequence[int], skip_ids: Sequence[int]) -> int:
    """Text tokens of `ids` that reach the LLM: all but the media placeholders and the `skip_ids` that open a
    text segment (the sequence start, or right after a placeholder), as `NvilaForConditionalGeneration.embed`
    drops them (an image-only NVILA turn loses its `<|im_end|>`)."""
    media, skip = set(media_ids), set(skip_ids)
    count, at_start = 0, True
    for token in ids:
        if token in media:
            at_start = True
        elif at_start and token in skip:
            continue
        else:
            count, at_start = count + 1, False
    return count


def skip_leading(ids, start: int, skip: tuple[int, ...]) -> int:
    """First position at or after `start` whose token is not in `skip` (`NvilaForConditionalGeneration.embed`)."""
    while start < ids.shape[0] and skip and int(ids[start]) in skip:
        start += 1
    return start
