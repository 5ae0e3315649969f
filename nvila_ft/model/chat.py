"""`generate_content`: one prompt about images and/or videos in, the decoded answer out (the model's chat
convenience; :class:`~nvila_ft.model.modeling.NvilaForConditionalGeneration` inherits it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nvila_ft.model.processing import NvilaProcessor


class GenerateContentMixin:
    """Adds :meth:`generate_content` to a model with `tokenizer`, `config`, `generate` and input embeddings."""

    @torch.no_grad()
    def generate_content(
        self,
        prompt: str,
        images: Sequence = (),
        videos: Sequence = (),
        num_video_frames: int | None = None,
        video_fps: float | None = None,
        temporal_pool: Sequence[int] | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> str:
        """Answers one prompt about images and/or videos (greedy unless sampling kwargs are given).

            model.generate_content("What happens in this video?", videos=["clip.mp4"])

        Args:
            prompt: the user's text; media placeholders are added in front (or keep your own, one per medium).
            images: PIL images or paths.
            videos: video paths, bytes or frames folders, or lists of PIL frames.
            num_video_frames, video_fps, temporal_pool: video sampling and pooling for this call; None = the
                checkpoint config (`num_video_frames`, `fps`, `video_encoder` pool_sizes).
            max_new_tokens: generation budget (tokens).

        Returns:
            The decoded answer, stripped.
        """
        processor = NvilaProcessor(self.tokenizer, self.config, num_video_frames=num_video_frames,
                                   video_fps=video_fps, temporal_pool=temporal_pool)
        enc = processor([{"from": "human", "value": prompt}], images, add_generation_prompt=True, videos=videos)
        batch = processor.collate([enc])
        device = self.get_input_embeddings().weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        generate_kwargs.setdefault("do_sample", False)
        out = self.generate(**batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        return processor.decode(out[0])
