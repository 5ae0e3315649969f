"""`NvilaForConditionalGeneration`: SigLIP `vision_tower` + `mm_projector` + causal `llm`, as in the
official NVILA checkpoints (NVlabs/VILA `modeling_vila.py`, `../shared/docs/nvila-architecture.md`).

    model = NvilaForConditionalGeneration.from_pretrained("Efficient-Large-Model/NVILA-Lite-2B")
    out = model(**processor(conversations, images), labels=...)

Loads and saves the original hub layout (`config.json` + `llm/` + `vision_tower/` + `mm_projector/`), and
loads NVIDIA's single-folder -hf layouts (`nvila_ft.model.hf_layout`), without `trust_remote_code`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nvila_ft.model.attention import compute_dtype, segment_attention
from nvila_ft.model.chat import GenerateContentMixin
from nvila_ft.model.checkpoint import load_official, save_official
from nvila_ft.model.configuration import IGNORE_INDEX, NvilaConfig, vision_layers_run
from nvila_ft.model.loss import answer_logps, label_loss
from nvila_ft.model.media import segment_skip_ids, skip_leading
from nvila_ft.model.multiscale import merge_tiles, split_blocks
from nvila_ft.model.projector import MultimodalProjector
from nvila_ft.model.video import PoolSize, pool_frames

logger = logging.getLogger(__name__)

BlockSizes = Sequence[tuple[int, int] | None] | torch.Tensor | None

def _compute_param(module: nn.Module) -> torch.Tensor:
    """The first parameter `module` computes with, whose dtype and device its input takes: in a peft
    `modules_to_save` wrapper (a part trained in full) the trained copy runs (fp32 under mixed precision), not
    the frozen original (`model.dtype`), which is skipped."""
    first = None
    for name, p in module.named_parameters():
        if "original_module." not in name:
            return p
        first = first if first is not None else p
    return first


class NvilaForConditionalGeneration(GenerateContentMixin, PreTrainedModel):
    """NVILA / NVILA-Lite vision-language model.

    Parts, named as NVILA names them: `vision_tower` (`transformers.SiglipVisionModel`), `mm_projector`
    (:class:`MultimodalProjector`) and `llm` (any `AutoModelForCausalLM`; Qwen2 for real NVILA).
    Parameter names are therefore `llm.*`, `vision_tower.vision_model.*`, `mm_projector.layers.<i>.*`.
    """

    config_class = NvilaConfig
    base_model_prefix = "nvila"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _supports_sdpa = True

    def __init__(
        self,
        config: NvilaConfig,
        llm: nn.Module | None = None,
        vision_tower: nn.Module | None = None,
        mm_projector: nn.Module | None = None,
    ):
        super().__init__(config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = vision_tower if vision_tower is not None else SiglipVisionModel(config.vision_config)
        self.mm_projector = (
            mm_projector
            if mm_projector is not None
            else MultimodalProjector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        )
        self.tokenizer = None  # set by from_pretrained; saved with the checkpoint

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.bfloat16,
        attn_implementation: str | None = None,
        llm_quantization_config=None,
        device_map=None,
        revision: str | None = None,
        init: str = "pretrained",
        **_unused,
    ) -> NvilaForConditionalGeneration:
        """Loads an official NVILA checkpoint, original or -hf layout, from a local folder or a hub id.

        Args:
            path_or_id: folder with `config.json`, `llm/`, `vision_tower/`, `mm_projector/`, or an -hf folder
                (`config.json` with `text_config` / `vision_config` + `model.safetensors`, read by
                `nvila_ft.model.hf_layout`), or a hub id such as `Efficient-Large-Model/NVILA-Lite-2B(-hf)`.
            dtype: weights dtype in memory (torch dtype or "bfloat16"/"float16"/"float32").
            attn_implementation: "sdpa" | "eager" | "flash_attention_2" | None (library default).
            llm_quantization_config: a `BitsAndBytesConfig` to load the LLM in 4/8 bit (QLoRA).
            device_map: passed to the LLM's `from_pretrained` (e.g. {"": 0}).
            init: "pretrained" (the checkpoint's weights) or "random" (its config only, seeded random weights
                built on `device_map`'s device: `nvila_ft.model.random_init`; recipe key `model.init`).

        Returns:
            The model in eval mode with `model.tokenizer` set; the LLM embeddings are resized to the
            tokenizer length after adding `<vila/sentinel>`, `<image>`, `<vila/video>`; new rows are the
            mean of the old rows rounded to the checkpoint dtype (what the official loader produces).

        Raises:
            FileNotFoundError: missing folder, sub-folder or hub id.
        """
        config, tokenizer, parts = load_official(path_or_id, dtype, attn_implementation, llm_quantization_config,
                                                 device_map, revision, init)
        model = cls(config, **parts)
        model.tokenizer = tokenizer
        model.eval()
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **_unused):
        """Writes the official original layout atomically (temp folder, then rename).

        `config.json` (llm_cfg / vision_tower_cfg / mm_projector_cfg embedded), `llm/` (weights, config,
        tokenizer with media tokens, chat template), `vision_tower/` (+ `preprocessor_config.json`),
        `mm_projector/` (`config.json`, `model.safetensors` with keys `layers.<i>.*`).
        """
        save_official(self, save_directory, state_dict)

    # ------------------------------------------------------------------ gradient checkpointing
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        parts=("llm", "vision_tower"), **kwargs):
        """Enables activation checkpointing per part (`llm`, `vision_tower`), non-reentrant by default.

        transformers 5 names this `activation_checkpointing_enable` (`gradient_checkpointing_enable` is its
        deprecated alias, which warns and lands here); the Trainer calls this name."""
        ac_kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        for part in parts:
            getattr(self, part).activation_checkpointing_enable(activation_checkpointing_kwargs=ac_kwargs, **kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """`is_activation_checkpointing` under its transformers-4 name, without the deprecation warning: peft
        (0.21, `PeftModel.__init__`) still reads this name on every model it wraps, at every load."""
        return self.is_activation_checkpointing

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    # ------------------------------------------------------------------ vision path
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP features of tiles: (T, 3, 448, 448) -> (T, 1024, C), equal to `hidden_states[select_layer]`.

        Only the patch embeddings and the encoder layers up to the selected one run (config
        `mm_vision_select_layer: -2`: all but the last of the 27 layers); the later layers and `post_layernorm`,
        whose output NVILA discards, are skipped but kept in the model (checkpoints, merge and save hold every
        layer). Each layer is called as a module, so the tower's per-layer gradient checkpointing applies.
        """
        param = _compute_param(self.vision_tower)
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        hidden = tower.embeddings(pixel_values.to(device=param.device, dtype=param.dtype))
        for layer in tower.encoder.layers[: vision_layers_run(len(tower.encoder.layers),
                                                              self.config.mm_vision_select_layer)]:
            hidden = layer(hidden, None)
        return hidden[:, 1:] if self.config.mm_vision_select_feature == "patch" else hidden

    def encode_images(self, pixel_values: torch.Tensor, block_sizes: BlockSizes = None) -> list[torch.Tensor]:
        """Projected embeddings of each image (without the trailing "\\n").

        Args:
            pixel_values: (T, 3, 448, 448) tiles of all images, in placeholder order.
            block_sizes: `dynamic_s2` only: one (rows, cols) or None per image ((0, 0) rows of a tensor
                mean None). An image with a block size owns 1 + 4 + rows*cols tiles; one without owns one
                tile whose features are repeated once per scale on channels. Ignored otherwise
                (every tile is its own image, as NVILA-Lite and resize modes do).

        Returns:
            list of (N_i, hidden_size) tensors: dynamic_s2 gives (16 rows) x (16 cols) tokens per image,
            row-major over the stitched map; 3x3 projectors give 121 tokens per tile.
        """
        feats = self.vision_features(pixel_values)
        if not self.config.dynamic_s2:
            return list(self.mm_projector(feats.to(self._projector_dtype)).unbind(0))
        scales = self.config.scales
        idx = self.config.s2_resize_output_to_scale_idx
        if block_sizes is None:
            block_sizes = [None] * feats.shape[0]
        elif isinstance(block_sizes, torch.Tensor):
            block_sizes = [tuple(b) if b[0] > 0 else None for b in block_sizes.tolist()]
        blocks, grids, cursor = [], [], 0
        for block_size in block_sizes:
            if block_size is None:
                one = merge_tiles(feats[cursor : cursor + 1], 1, 1)
                fmap, grid = one.repeat(1, len(scales), 1, 1), (1, 1)
                cursor += 1
            else:
                maps = []
                for scale in scales[:-1]:
                    n = scale // scales[0]
                    maps.append(merge_tiles(feats[cursor : cursor + n * n], n, n))
                    cursor += n * n
                rows, cols = block_size
                maps.append(merge_tiles(feats[cursor : cursor + rows * cols], rows, cols))
                cursor += rows * cols
                size = maps[idx].shape[-2:]
                fmap = torch.cat(
                    [F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in maps], dim=1
                )
                grid = tuple(block_size) if idx in (-1, len(scales) - 1) else (scales[idx] // scales[0],) * 2
            blocks.append(split_blocks(fmap, *grid))
            grids.append(grid)
        if cursor != feats.shape[0]:
            raise ValueError(f"block_sizes account for {cursor} tiles but pixel_values has {feats.shape[0]}")
        projected = self.mm_projector(torch.cat(blocks).to(self._projector_dtype))
        out = []
        for chunk, (rows, cols) in zip(projected.split([r * c for r, c in grids]), grids):
            out.append(merge_tiles(chunk, rows, cols).flatten(2).squeeze(0).transpose(0, 1))
        return out

    @property
    def _projector_dtype(self) -> torch.dtype:
        return _compute_param(self.mm_projector).dtype

    def media_embeddings(self, pixel_values: torch.Tensor, block_sizes: BlockSizes = None) -> list[torch.Tensor]:
        """Each image's embeddings as spliced into the LLM input: projected tokens + "\\n" embedding."""
        end_ids = torch.tensor(self.config.end_token_ids, device=self.get_input_embeddings().weight.device)
        end = self.get_input_embeddings()(end_ids)
        return [torch.cat([f.to(end.dtype), end]) for f in self.encode_images(pixel_values, block_sizes)]

    def video_embeddings(
        self,
        pixel_values_videos: torch.Tensor,
        video_frames: Sequence[int] | torch.Tensor,
        pool_sizes: Sequence[PoolSize] | torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Each video's embeddings as spliced into the LLM input at its `<vila/video>` token.

        Frames are encoded like images without a block size (single 448 resize; with dynamic_s2 the 1152-wide
        features are repeated per scale), projected, then for each pool size (t, h, w) averaged over groups of
        t consecutive frames (and h x w token windows) as NVILA's `TSPVideoEncoder` does; every frame group
        is followed by the "\\n" end-token embedding, groups in time order, pool streams concatenated.

        Args:
            pixel_values_videos: (F, 3, 448, 448) frames of all videos, video after video.
            video_frames: frames per video (sums to F); each must be a multiple of every t.
            pool_sizes: (t, h, w) per stream (list or (P, 3) LongTensor, as the processor's `collate` gives);
                None = config `video_encoder` (no pooling for BasicVideoEncoder).

        Returns:
            list of (groups x (tokens per group + end tokens), hidden_size) tensors, one per video.

        Raises:
            ValueError: frame counts do not sum to F, or a pool size does not divide a video (see `pool_frames`).
        """
        counts = [int(n) for n in (video_frames.tolist() if isinstance(video_frames, torch.Tensor) else video_frames)]
        if sum(counts) != pixel_values_videos.shape[0]:
            raise ValueError(f"video_frames {counts} sum to {sum(counts)} but pixel_values_videos has "
                             f"{pixel_values_videos.shape[0]} frames")
        if isinstance(pool_sizes, torch.Tensor):
            pool_sizes = [tuple(p) for p in pool_sizes.tolist()]
        pools = list(self.config.pool_sizes if pool_sizes is None else pool_sizes) or [(1, 1, 1)]
        end_ids = torch.tensor(self.config.end_token_ids, device=self.get_input_embeddings().weight.device)
        end = self.get_input_embeddings()(end_ids)
        frames = torch.stack(self.encode_images(pixel_values_videos, None)).to(end.dtype)  # F, N, H
        out = []
        for video in frames.split(counts):
            streams = []
            for pool in pools:
                groups = pool_frames(video, pool)  # G, N', H
                streams.append(torch.cat([groups, end.expand(groups.shape[0], -1, -1)], dim=1).flatten(0, 1))
            out.append(torch.cat(streams))
        return out

    # ------------------------------------------------------------------ splicing
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        block_sizes: BlockSizes = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: Sequence[int] | torch.Tensor | None = None,
        pool_sizes: Sequence[PoolSize] | torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Builds `inputs_embeds` with every `<image>` / `<vila/video>` token replaced by that medium's embeddings.

        Args:
            input_ids: (B, L) int64 with one `<image>` token per image and one `<vila/video>` token per video
                (padding per `attention_mask`).
            attention_mask: (B, L) 1 for real tokens; padded positions are dropped before splicing.
            pixel_values, block_sizes (see :meth:`encode_images`), pixel_values_videos, video_frames, pool_sizes
                (see :meth:`video_embeddings`): media are consumed in order of appearance, sample by sample.
            labels: (B, L) int64 or None; media positions become -100.
            padding_side: where the expanded sequences are padded ("right" for training, "left" to generate).
            segment_ids: (B, L, 2) int64 pack / branch index per token (`nvila_ft.data.grouping`), or None.

        Returns:
            inputs_embeds (B, L', H), attention_mask (B, L') int64, labels (B, L') or None; with `segment_ids`
            also the expanded segment ids (B, L', 2) (media rows take their placeholder's, padding (-1, 0)).

        As NVIDIA's `_embed` (VILA `llava/remote_code/modeling_vila.py`, `pad_token_list`): pad / eos tokens
        (`[PAD]`, `<|im_end|>` for NVILA's Qwen2 tokenizer) that open a text segment (the sequence start, or right
        after a media token) are dropped with their labels: an image-only user turn has no `<|im_end|>` row.

        Raises:
            ValueError: placeholder count and image (or video) count differ.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        is_image = input_ids == image_id
        is_video = input_ids == video_id if video_id is not None else torch.zeros_like(is_image)
        is_media = is_image | is_video
        n_placeholders = int((is_image & attention_mask.bool()).sum())
        media = self.media_embeddings(pixel_values, block_sizes) if pixel_values is not None else []
        if len(media) != n_placeholders:
            raise ValueError(f"{n_placeholders} <image> tokens in input_ids but {len(media)} images in pixel_values")
        n_video_placeholders = int((is_video & attention_mask.bool()).sum())
        videos = []
        if pixel_values_videos is not None:
            if video_frames is None:
                raise ValueError("pixel_values_videos given without video_frames (frames per video)")
            videos = self.video_embeddings(pixel_values_videos, video_frames, pool_sizes)
        if len(videos) != n_video_placeholders:
            raise ValueError(f"{n_video_placeholders} <vila/video> tokens in input_ids but {len(videos)} videos in "
                             "pixel_values_videos / video_frames")
        text = self.get_input_embeddings()(input_ids.masked_fill(is_media, 0))
        skip = self.segment_skip_token_ids
        seqs, labs, segs, m, v = [], [], [], 0, 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids, emb = input_ids[b][keep], text[b][keep]
            lab = labels[b][keep] if labels is not None else None
            seg = segment_ids[b][keep] if segment_ids is not None else None
            pieces, lab_pieces, seg_pieces, start = [], [], [], skip_leading(ids, 0, skip)
            for pos in (is_media[b][keep]).nonzero().flatten().tolist():
                if ids[pos] == image_id:
                    item, m = media[m], m + 1
                else:
                    item, v = videos[v], v + 1
                pieces += [emb[start:pos], item.to(emb.dtype)]
                if lab is not None:
                    lab_pieces += [lab[start:pos], lab.new_full((item.shape[0],), IGNORE_INDEX)]
                if seg is not None:
                    seg_pieces += [seg[start:pos], seg[pos].expand(item.shape[0], 2)]
                start = skip_leading(ids, pos + 1, skip)
            pieces.append(emb[start:])
            seqs.append(torch.cat(pieces))
            if seg is not None:
                segs.append(torch.cat(seg_pieces + [seg[start:]]))
            if lab is not None:
                lab_pieces.append(lab[start:])
                labs.append(torch.cat(lab_pieces))
        length = max(s.shape[0] for s in seqs)
        embeds = seqs[0].new_zeros(len(seqs), length, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=embeds.device)
        out_labels = torch.full((len(seqs), length), IGNORE_INDEX, device=embeds.device) if labels is not None else None
        out_segments = torch.tensor([-1, 0], device=embeds.device).repeat(len(seqs), length, 1) if segs else None
        for b, s in enumerate(seqs):
            sl = slice(0, s.shape[0]) if padding_side == "right" else slice(length - s.shape[0], length)
            embeds[b, sl], mask[b, sl] = s, 1
            if out_labels is not None:
                out_labels[b, sl] = labs[b]
            if out_segments is not None:  # padding: pack -1, branch 0
                out_segments[b, sl] = segs[b]
        return (embeds, mask, out_labels) if segment_ids is None else (embeds, mask, out_labels, out_segments)

    @property
    def segment_skip_token_ids(self) -> tuple[int, ...]:
        """Token ids NVIDIA's `_embed` drops at the start of a text segment (`media.segment_skip_ids`); none for
        an -hf checkpoint, whose processor expands media in `input_ids` and drops nothing (`hf_layout`)."""
        hf = getattr(self.config, "hf_model_type", None)
        return () if hf else segment_skip_ids(getattr(self, "tokenizer", None))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        block_sizes: BlockSizes = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: Sequence[int] | torch.Tensor | None = None,
        pool_sizes: Sequence[PoolSize] | torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        answer_logprob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of a (batch of) conversation(s) with images.

        Args:
            input_ids: (B, L) from :class:`~nvila_ft.model.processing.NvilaProcessor`.
            attention_mask: (B, L).
            pixel_values: (T, 3, 448, 448) float tiles of all images of the batch.
            block_sizes: per-image (rows, cols) for `dynamic_s2`; see :meth:`encode_images`.
            labels: (B, L) int64, -100 where no loss is taken.
            inputs_embeds: skip splicing and feed these to the LLM directly.
            pixel_values_videos: (F, 3, 448, 448) float frames of all videos of the batch.
            video_frames: (num_videos,) frames per video; pool_sizes: see :meth:`video_embeddings`.
            segment_ids: (B, L, 2) int64 pack / branch per token (`nvila_ft.data.grouping`): the LLM then gets the
                4D mask and position_ids of `attention.segment_attention` (sdpa or eager attention only).

            answer_logprob_fn: given, the forward returns (logps (B,) fp32, tokens (B,)) of each row's labelled
                tokens instead, `lm_head` at those rows only (:func:`nvila_ft.model.loss.answer_logps`, which
                takes this function; preference tuning).
            **kwargs: passed to the LLM (`output_hidden_states`, `num_items_in_batch` from the Trainer, ...).

        Returns:
            `CausalLMOutputWithPast` with `loss` (mean token cross-entropy, when labels are given) and `logits`:
            (B, L', vocab) over the expanded sequence, except in training mode with labels, where they are
            only the rows that carry loss, (N_label_tokens, vocab) in label order (see :meth:`_label_only_loss`).
        """
        if inputs_embeds is None:
            inputs_embeds, attention_mask, labels, *segments = self.embed(
                input_ids, attention_mask, pixel_values, block_sizes, labels,
                pixel_values_videos=pixel_values_videos, video_frames=video_frames, pool_sizes=pool_sizes,
                segment_ids=segment_ids,
            )
            segment_ids = segments[0] if segments else None
        if segment_ids is not None:
            attention_mask, kwargs["position_ids"] = segment_attention(segment_ids, compute_dtype(inputs_embeds))
        if answer_logprob_fn is not None:  # through forward, so that DDP / FSDP wrappers see the pass
            hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
            return answer_logps(self.llm.get_output_embeddings(), hidden.last_hidden_state, labels, answer_logprob_fn)
        if labels is not None and self.training:
            return self._label_only_loss(inputs_embeds, attention_mask, labels, **kwargs)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _label_only_loss(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The training loss with `lm_head` applied only where a label is predicted.

        Most NVILA SFT positions are media and prompt (label -100); the full head would build (B, L', vocab)
        logits (vocab 151,651 for NVILA-8B) and their fp32 upcast, kept for backward. Only the positions p
        whose shifted label `labels[p + 1]` is not -100 go through `lm_head` and the fp32 cross-entropy
        (`loss.label_loss`; Liger's fused kernel on CUDA with the `liger` extra). The loss is transformers'
        `ForCausalLMLoss`: mean over the labelled tokens, or their sum / `num_items_in_batch` (gradient
        accumulation). Args: inputs_embeds (B, L', H); attention_mask (B, L') or a 4D mask; labels (B, L')
        int64, -100 = no loss; num_items_in_batch: labelled tokens of all accumulated micro-batches, or None.

        Returns:
            `CausalLMOutputWithPast` with `loss` (fp32 scalar) and `logits` (N_label_tokens, vocab) in
            row-major (sample, position) order; `logits` is None on the fused path.
        """
        out = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        loss, logits = label_loss(self.llm.get_output_embeddings(), out.last_hidden_state[:, :-1][keep],
                                  targets[keep], num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        block_sizes: BlockSizes = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frames: Sequence[int] | torch.Tensor | None = None,
        pool_sizes: Sequence[PoolSize] | torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generates continuations; returns only the new token ids (B, new_tokens).

        Inputs as for :meth:`forward` (from :class:`~nvila_ft.model.processing.NvilaProcessor`, videos included).
        Sequences are left-padded after splicing so that batched prompts end together. Stops at the
        tokenizer's EOS (`<|im_end|>` for Qwen2 chat) unless `eos_token_id` is given.
        """
        inputs_embeds, attention_mask, _ = self.embed(
            input_ids, attention_mask, pixel_values, block_sizes, padding_side="left",
            pixel_values_videos=pixel_values_videos, video_frames=video_frames, pool_sizes=pool_sizes,
        )
        if self.tokenizer is not None:
            generate_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
