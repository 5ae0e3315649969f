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

import torch
from PIL import Image

from .configuration import IGNORE_INDEX, MEDIA_TOKENS, NvilaConfig
from .image_processing import TilingConfig, num_tiles, preprocess_image
from .projector import num_output_tokens

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class SampleTooLongError(ValueError):
    """A sample's expanded length (text + visual tokens) exceeds `max_length`."""


@dataclass
class MediaLayout:
    """How images of one sample become placeholders and tiles.

    Attributes:
        pixel_values: (T, 3, 448, 448) float32 tiles, or None without images.
        block_sizes: one entry per `<image>` placeholder: (rows, cols) for a dynamic_s2 image, else None.
        placeholder_text: text prepended to the first user turn.
        media_tokens: embedding rows each placeholder expands to (visual tokens + end tokens).
    """

    pixel_values: torch.Tensor | None
    block_sizes: list[tuple[int, int] | None]
    placeholder_text: str
    media_tokens: list[int]


class NvilaProcessor:
    """Turns LLaVA-style conversations and images into model inputs for NVILA.

    Args:
        tokenizer: tokenizer with NVILA's media tokens (from :func:`nvila_ft.modeling.load_tokenizer`).
        config: the checkpoint's :class:`NvilaConfig` (tiling, projector and token geometry).
        image_aspect_ratio: override the checkpoint's image mode (`dynamic_s2` | `dynamic` | `resize`).
        max_tiles: override the checkpoint's `max_tiles`.
        max_length: largest expanded sequence (tokens incl. visual tokens); default the tokenizer's
            `model_max_length` (4096 NVILA-Lite SFT, 8192 NVILA).
        system_prompt: system message for every conversation; None keeps the template's default.
    """

    def __init__(
        self,
        tokenizer,
        config: NvilaConfig,
        image_aspect_ratio: str | None = None,
        max_tiles: int | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.tiling: TilingConfig = config.tiling(image_aspect_ratio, max_tiles)
        if self.tiling.image_aspect_ratio == "dynamic_s2" and not config.dynamic_s2:
            raise ValueError("image_aspect_ratio 'dynamic_s2' needs a dynamic_s2 checkpoint (config dynamic_s2: true)")
        self.max_length = max_length or min(getattr(tokenizer, "model_max_length", 4096), 10**6)
        self.system_prompt = system_prompt
        self.image_token = MEDIA_TOKENS["image"]
        self.image_token_id = tokenizer.media_token_ids["image"]
        self.end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        self.tokens_per_tile = tokens_per_tile(config, self.tiling)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs) -> NvilaProcessor:
        """Processor for a checkpoint folder or hub id (reads `config.json` and `llm/` tokenizer)."""
        from .modeling import load_tokenizer, resolve_checkpoint

        folder = resolve_checkpoint(path_or_id)
        config = NvilaConfig.from_json_file(str(Path(folder) / "config.json"))
        return cls(load_tokenizer(folder), config, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes `processor_config.json` (tiling, max_length, system prompt) and the tokenizer to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        config = {**dataclasses.asdict(self.tiling), "max_length": self.max_length,
                  "system_prompt": self.system_prompt, "tokens_per_tile": self.tokens_per_tile}
        path = folder / "processor_config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    # ------------------------------------------------------------------ media
    def _image_mode_single(self, n_images: int) -> bool:
        # The official code tiles (dynamic / dynamic_s2) only when a sample has exactly one image.
        return n_images != 1

    def layout_media(self, images: Sequence[Image.Image | str | os.PathLike]) -> MediaLayout:
        """Loads and tiles the images of one sample.

        Returns:
            :class:`MediaLayout`. dynamic_s2: one placeholder per image with its block size;
            dynamic: one placeholder per tile (`<image>\\n` each); resize or several images: one per image.
        """
        if not images:
            return MediaLayout(None, [], "", [])
        single = self._image_mode_single(len(images))
        tiles, block_sizes, text, tokens = [], [], [], []
        for image in images:
            image = _open_image(image)
            pixels, block_size = preprocess_image(image, self.tiling, single=single)
            tiles.append(pixels)
            if self.tiling.image_aspect_ratio == "dynamic" and not single:
                # NVILA-Lite: each tile is an image of its own.
                block_sizes += [None] * pixels.shape[0]
                text.append(f"{self.image_token}\n" * pixels.shape[0])
                tokens += [self.tokens_per_tile + len(self.end_token_ids)] * pixels.shape[0]
            else:
                block_sizes.append(block_size)
                text.append(self.image_token)
                tokens.append(self._image_tokens(block_size))
        return MediaLayout(torch.cat(tiles), block_sizes, "".join(text), tokens)

    def _image_tokens(self, block_size: tuple[int, int] | None) -> int:
        blocks = block_size[0] * block_size[1] if block_size else 1
        return blocks * self.tokens_per_tile + len(self.end_token_ids)

    def count_media_tokens(self, image_sizes: Sequence[tuple[int, int]]) -> int:
        """Visual + end tokens of a sample's images from their (width, height) alone (no decoding)."""
        return count_image_tokens(self.tiling, self.tokens_per_tile, len(self.end_token_ids), image_sizes)

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
    ) -> dict:
        """Encodes one sample.

        Args:
            conversations: LLaVA turns [{"from": "human"|"gpt"|"system", "value": str}, ...]. For a
                generation prompt, pass the turns up to the last user turn and `add_generation_prompt=True`.
            images: PIL images or paths, in order.
            sample_id: named in errors.

        Returns:
            dict with `input_ids` (L,) int64, `attention_mask` (L,), `labels` (L,) int64 (-100 outside
            assistant answers; absent with `add_generation_prompt`), `pixel_values` (T, 3, 448, 448)
            float32 or None, `block_sizes` list, `num_tokens` (expanded length).

        Raises:
            SampleTooLongError: expanded length > `max_length` (never truncated: truncation could cut
                visual tokens or the whole answer).
        """
        media = self.layout_media(images)
        messages = self.to_messages(conversations, media.placeholder_text)
        ids, labels = self.tokenize_messages(messages, add_generation_prompt, with_labels=not add_generation_prompt)
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != len(media.media_tokens):
            raise ValueError(f"sample {sample_id}: {n_placeholders} <image> tokens after templating but "
                             f"{len(media.media_tokens)} images")
        num_tokens = len(ids) - n_placeholders + sum(media.media_tokens)
        if num_tokens > self.max_length:
            raise SampleTooLongError(
                f"sample {sample_id}: {num_tokens} tokens ({len(ids) - n_placeholders} text + "
                f"{sum(media.media_tokens)} visual) > max_length {self.max_length}. Raise data.max_length, "
                "lower model.max_tiles, or drop the sample (data.on_bad_row=skip)."
            )
        out = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "pixel_values": media.pixel_values,
            "block_sizes": media.block_sizes,
            "num_tokens": num_tokens,
        }
        if labels is not None:
            out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def num_tokens(self, conversations: Sequence[dict], image_sizes: Sequence[tuple[int, int]]) -> int:
        """Expanded length of a training sample from image sizes only (for preflight)."""
        n = len(image_sizes)
        if self.tiling.image_aspect_ratio == "dynamic" and n == 1:
            w, h = image_sizes[0]
            placeholder = f"{self.image_token}\n" * num_tiles(w, h, self.tiling)[0]
        else:
            placeholder = self.image_token * n
        ids, _ = self.tokenize_messages(self.to_messages(conversations, placeholder), with_labels=False)
        return len(ids) - ids.count(self.image_token_id) + self.count_media_tokens(image_sizes)

    def collate(self, features: Sequence[dict], padding_side: str = "right") -> dict:
        """Pads a list of encoded samples into a batch.

        Returns:
            `input_ids`, `attention_mask`, `labels` (when present) (B, L); `pixel_values` (T, 3, 448, 448)
            concatenated in sample order, or None; `block_sizes` LongTensor (num_images, 2), (0, 0) for
            images without a block size.
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
        return batch

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).strip()


def tokens_per_tile(config: NvilaConfig, tiling: TilingConfig) -> int:
    """Projected tokens of one tile: (tile_size / patch_size)^2 patches through the projector's STC
    (1024 -> 256 for 2x2, 121 for 3x3)."""
    patches = (tiling.tile_size // config.vision_tower_cfg.get("patch_size", 14)) ** 2
    return num_output_tokens(config.mm_projector_type, patches)


def count_image_tokens(
    tiling: TilingConfig, tokens_per_tile: int, num_end_tokens: int, image_sizes: Sequence[tuple[int, int]]
) -> int:
    """LLM input rows (visual + end tokens) of one sample's images, from their (width, height) alone.

    dynamic_s2: rows*cols blocks of `tokens_per_tile` per image (one block without tiling); dynamic: each
    tile (+ thumbnail) is an image of its own with its end tokens; resize, or a sample with several images:
    one tile per image. Each image is followed by `num_end_tokens` ("\\n").
    """
    single = len(image_sizes) != 1  # the official code tiles only a sample's single image
    total = 0
    for w, h in image_sizes:
        n, block_size = num_tiles(w, h, tiling, single=single)
        if tiling.image_aspect_ratio == "dynamic" and not single:
            total += n * (tokens_per_tile + num_end_tokens)
        else:
            blocks = block_size[0] * block_size[1] if block_size else 1
            total += blocks * tokens_per_tile + num_end_tokens
    return total


def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        im.load()
        return im.convert("RGB")
